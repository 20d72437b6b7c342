"""The tools' progress (edge_infer.tools.progress) and the runtime's independence from the tools."""
from __future__ import annotations

import io
import subprocess
import sys

from edge_infer.tools.progress import Progress


def test_off_a_terminal_one_summary_line():
    out = io.StringIO()
    bar = Progress(10, "edge val", stream=out)
    bar.update(4)
    bar.update(10)
    bar.close()
    assert out.getvalue().startswith("edge val: 10/10 in ") and out.getvalue().count("\n") == 1


def test_enabled_draws_a_tqdm_bar_instead():
    out = io.StringIO()
    bar = Progress(10, "classify", stream=out, enabled=True)
    bar.update(10)
    bar.close()
    assert "classify" in out.getvalue() and "10/10" in out.getvalue() and " in " not in out.getvalue()


def test_the_runtime_never_imports_the_tools():
    code = ("import sys, edge_infer.cli, edge_infer.service; "
            "bad = sorted(m for m in sys.modules if m.startswith(('edge_infer.tools', 'edge_infer.calibration', "
            "'tqdm', 'matplotlib'))); print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
