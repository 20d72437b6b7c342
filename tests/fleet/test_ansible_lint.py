"""The roles and playbooks pass ansible-lint's production profile (what the issue and docs/deploy.md promise)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import REPO

pytestmark = pytest.mark.fleet

BIN = Path(sys.executable).parent


def test_ansible_lint_production_profile_is_clean():
    lint = str(BIN / "ansible-lint") if (BIN / "ansible-lint").exists() else shutil.which("ansible-lint")
    assert lint, "ansible-lint missing: pip install 'edge-infer[fleet]'"
    p = subprocess.run([lint, "--offline", "--profile", "production", "--nocolor"], cwd=REPO / "deploy" / "ansible",
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert "Profile 'production' was required, and it passed" in p.stdout + p.stderr
