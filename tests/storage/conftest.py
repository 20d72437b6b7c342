"""Storage drills on real file systems: a small tmpfs that fills up, one remounted read-only."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


class SmallFs:
    """A tmpfs of a few MiB mounted for one test (root only: CI and the dev machines run as root)."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        self.filler = path / "filler"

    def fill(self) -> None:
        """Take every free byte (what a runaway log does to a device)."""
        with open(self.filler, "ab", buffering=0) as f:   # unbuffered: nothing left to fail at close
            for block in (65536, 512):   # then the last partial blocks too
                try:
                    while f.write(b"\0" * block):
                        pass
                except OSError:
                    pass

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    made: list[SmallFs] = []

    def make(size: str = "8m", name: str = "fs") -> SmallFs:
        fs = SmallFs(tmp_path / name, size)
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.close()
