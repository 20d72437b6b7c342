"""The NOTIFY_SOCKET protocol against a real datagram socket."""
import os
import socket

import pytest

from edge_infer.sdnotify import Notifier


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    yield path, s
    s.close()


def test_socket_protocol(notify_socket):
    path, s = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())},
                 prefer_library=False)
    assert n.via == "socket" and n.watchdog_s == 4.0
    assert n.ready("model loaded")
    assert s.recv(4096) == b"READY=1\nSTATUS=model loaded"
    n.watchdog()
    assert s.recv(4096) == b"WATCHDOG=1"
    n.stopping()
    assert s.recv(4096) == b"STOPPING=1"


def test_library_path_when_installed(notify_socket, monkeypatch):
    # The dev setup installs systemd-python (the [systemd] extra), so this path is always tested there.
    import systemd.daemon  # noqa: F401
    path, s = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)   # sd_notify() reads the real environment
    n = Notifier()
    assert n.via == "systemd-python"
    n.status("hello")
    assert s.recv(4096) == b"STATUS=hello"


def test_outside_systemd_nothing_happens():
    n = Notifier({})
    assert not n.enabled and n.watchdog_s is None and n.ready() is False


def test_watchdog_for_another_pid_is_ignored():
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s is None
