"""A local Mosquitto for the demo and the tests: a child process on a free loopback port."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from ..errors import EdgeInferError

log = logging.getLogger(__name__)


class BrokerError(EdgeInferError, RuntimeError):
    """The local Mosquitto could not be started (not installed, no free port, it exited)."""


def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
    if path is None:
        raise BrokerError("mosquitto is not installed. Install it with: sudo apt-get install mosquitto "
                          "(the service itself does not need it on the device; the demo and tests do)")
    return path


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL: how the demo and the tests end their children."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBroker:
    """``with LocalBroker(dir) as b: ... b.port``. Plain TCP on 127.0.0.1 unless extra config says otherwise."""

    def __init__(self, workdir: Path, *, port: int | None = None, persistence: bool = False,
                 extra_config: str = "", listener: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.persistence = persistence
        self.extra_config = extra_config
        self.listener = listener
        self.proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def config_text(self) -> str:
        lines = [
            self.listener or f"listener {self.port} 127.0.0.1",
            "allow_anonymous true" if self.listener is None else "",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            # Room for offline devices' backlogs and for batching workers.
            "max_queued_messages 200000",
            "max_inflight_messages 1000",
            "set_tcp_nodelay true",
            "log_type error", "log_type warning", "log_type notice",
            f"log_dest file {self.log_path}",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to 'mosquitto' and cannot write here
        return "\n".join(filter(None, lines)) + "\n" + self.extra_config

    def start(self, timeout: float = 10.0) -> "LocalBroker":
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        self.proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log_text = self.log_path.read_text() if self.log_path.exists() else ""
                raise BrokerError(f"mosquitto exited with {self.proc.returncode}: {err.strip()} {log_text[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout}s")

    def stop(self) -> None:
        stop_process(self.proc, timeout=5)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
