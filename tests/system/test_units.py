"""The systemd units parse cleanly (systemd-analyze prints parse errors as warnings, exit 0)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import REPO

UNITS = REPO / "deploy" / "systemd"


@pytest.mark.parametrize("unit, instance", [("edge-infer.service", "edge-infer.service"),
                                            ("edge-infer-cloud-worker@.service", "edge-infer-cloud-worker@1.service")])
def test_systemd_analyze_verify_is_silent(tmp_path, unit, instance):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is part of systemd (apt-get install systemd)"
    # Point ExecStart at this environment's scripts so the executable check passes.
    bindir = Path(sys.executable).parent
    text = (UNITS / unit).read_text().replace("/opt/edge-infer/bin", str(bindir))
    (tmp_path / instance).write_text(text)
    p = subprocess.run([analyze, "verify", str(tmp_path / instance)], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr


def test_a_broken_unit_is_caught(tmp_path):
    """The check above can fail: a typo'd directive is reported on stderr."""
    text = (UNITS / "edge-infer.service").read_text().replace("/opt/edge-infer/bin", str(Path(sys.executable).parent))
    (tmp_path / "edge-infer.service").write_text(text.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    p = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "edge-infer.service")], capture_output=True,
                       text=True, cwd=tmp_path)
    assert "NoNewPrivilege" in p.stderr
