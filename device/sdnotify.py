"""systemd notification (READY, STATUS, WATCHDOG, STOPPING).

Uses systemd-python's ``systemd.daemon.notify`` where installed (the
``systemd`` extra) and speaks the NOTIFY_SOCKET datagram protocol itself
otherwise; outside systemd (no NOTIFY_SOCKET) every call does nothing.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Callable

log = logging.getLogger(__name__)


def _socket_sender(path: str) -> Callable[[str], bool]:
    address = "\0" + path[1:] if path.startswith("@") else path

    def send(message: str) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(address)
                s.sendall(message.encode())
            return True
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)
            return False
    return send


class Notifier:
    def __init__(self, env: dict[str, str] | None = None, prefer_library: bool = True) -> None:
        env = dict(os.environ) if env is None else env
        self.socket_path = env.get("NOTIFY_SOCKET", "")
        self.via = "none"
        self._send: Callable[[str], bool] = lambda message: False
        if self.socket_path:
            lib = None
            if prefer_library:
                try:
                    from systemd import daemon  # systemd-python
                    lib = daemon
                except ImportError:
                    lib = None
            if lib is not None:
                self._send = lambda message: bool(lib.notify(message))
                self.via = "systemd-python"
            else:
                self._send = _socket_sender(self.socket_path)
                self.via = "socket"
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s: float | None = None
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return bool(self.socket_path)

    def notify(self, message: str) -> bool:
        return self._send(message) if self.socket_path else False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))
