"""A throw-away systemd container: the host's root with overlays (writes vanish at stop).

Booted with systemd-nspawn as described in shared/REAL-INFRA.md. The repository
and its virtual environment are bound read-only at their own paths, and the
environment is also bound at /opt/edge-infer, where the units expect it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from edge_infer.tools.localbroker import stop_process

CGROUP_HIERARCHIES = ("systemd", "unified")
#: enabled on the host image and of no use in a container (PostgreSQL costs ~2 s of every boot)
OTHER_HOST_SERVICES = ("postgresql.service", "postgresql@15-main.service")


class Container:
    def __init__(self, name: str, workdir: Path, binds_ro: list[tuple[str, str]],
                 masked: tuple[str, ...] = ("mosquitto.service", *OTHER_HOST_SERVICES)) -> None:
        self.name = name
        self.workdir = workdir
        self.binds_ro = binds_ro
        # host services that would start inside (the host's Mosquitto; a broker container unmasks it)
        self.masked = masked
        self.nspawn: subprocess.Popen | None = None
        self.pid1: int | None = None

    @staticmethod
    def available() -> str | None:
        """None if containers can run here, else why not."""
        if os.geteuid() != 0:
            return "needs root"
        if not shutil.which("systemd-nspawn"):
            return "systemd-nspawn missing (apt-get install systemd-container)"
        return None

    def _cgroup_dirs(self) -> list[Path]:
        return [Path(f"/sys/fs/cgroup/{h}/nspawn-{self.name}") for h in CGROUP_HIERARCHIES
                if Path(f"/sys/fs/cgroup/{h}").is_dir()]

    def start(self, timeout: float = 60.0) -> "Container":
        dirs = self._cgroup_dirs()
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        procs = " ".join(str(d / "cgroup.procs") for d in dirs)
        args = ["systemd-nspawn", "-D", "/", "-M", self.name, "--volatile=yes",
                "--overlay=+/etc::/etc", "--overlay=+/var::/var", "--overlay=+/opt::/opt",
                "--overlay=+/root::/root", "--overlay=+/usr::/usr",
                "--register=no", "--keep-unit", "--boot", "--console=passive"]
        args += [f"--bind-ro={src}:{dst}" for src, dst in self.binds_ro]
        args += ["--", *(f"systemd.mask={unit}" for unit in self.masked)]
        script = f'for f in {procs}; do echo $$ > "$f"; done; exec setsid "$@"'
        self.log = open(self.workdir / f"{self.name}.log", "w")
        self.nspawn = subprocess.Popen(["bash", "-c", script, "nspawn", *args], stdout=self.log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {(self.workdir / f'{self.name}.log').read_text()[-3000:]}")
            children = subprocess.run(["pgrep", "-P", str(self.nspawn.pid)], capture_output=True, text=True).stdout.split()
            if children:
                self.pid1 = int(children[0])
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"container {self.name} did not boot within {timeout}s")

    def run(self, *cmd: str, check: bool = True, timeout: float = 120, input: str | None = None
            ) -> subprocess.CompletedProcess:
        assert self.pid1 is not None
        p = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *cmd], capture_output=True, text=True,
                           timeout=timeout, input=input)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout}\n{p.stderr}")
        return p

    def write(self, path: str, text: str) -> None:
        self.run("mkdir", "-p", str(Path(path).parent))
        self.run("tee", path, input=text)

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def stop(self) -> None:
        stop_process(self.nspawn, timeout=30)
        self.nspawn = None
        for d in self._cgroup_dirs():
            for sub in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if sub.is_dir():
                    try:
                        sub.rmdir()
                    except OSError:
                        pass
            try:
                d.rmdir()
            except OSError:
                pass
        if getattr(self, "log", None):
            self.log.close()
