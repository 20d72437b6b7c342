"""`systemctl start edge-infer` under a real systemd (nspawn container of the host root)."""
from __future__ import annotations

import base64
import json
import os
import sys
import time
from pathlib import Path

import pytest

from edge_infer.preprocess import encode_png

from ..conftest import REPO, Recorder, unique, wait_for
from .nspawn import Container

pytestmark = pytest.mark.system

VENV = Path(sys.prefix)
PYTHON_HOME = Path(os.path.realpath(sys.executable)).parents[1]   # the interpreter the venv was made from
DB = "/var/lib/edge-infer/edge-infer.db"

# Only for this test machine: the interpreter lives under /root (pyenv), which
# ProtectHome=yes hides, and the checkout (an editable install) may live under
# /tmp, which PrivateTmp=yes hides. Devices use the system Python and /opt.
TEST_DROPIN = f"""[Service]
ProtectHome=tmpfs
BindReadOnlyPaths={PYTHON_HOME}
BindReadOnlyPaths={REPO}
"""


def device_config(port: int, device_id: str, extra: str = "") -> str:
    return (f'device_id = "{device_id}"\nstate_dir = "/var/lib/edge-infer"\n'
            f'[model]\ncard = "{REPO}/models/fmnist-edge-v1/card.json"\n'
            f'[mqtt]\nport = {port}\nreconnect_max_s = 1\n'
            f'[spool]\ndir = "/var/lib/edge-infer/spool"\npoll_interval_s = 0.1\n' + extra)


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    why = Container.available()
    assert why is None, why
    c = Container(unique("ei").replace("-", ""), tmp_path_factory.mktemp("nspawn"),
                  binds_ro=[(str(REPO), str(REPO)), (str(VENV), "/opt/edge-infer")])
    c.start()
    try:
        c.run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "edge-infer")
        for unit in ("edge-infer.service", "edge-infer-cloud-worker@.service"):
            c.write(f"/etc/systemd/system/{unit}", (REPO / "deploy" / "systemd" / unit).read_text())
            c.write(f"/etc/systemd/system/{unit}.d/test-python.conf", TEST_DROPIN)
        c.run("systemctl", "daemon-reload")
        yield c
    finally:
        c.stop()


def fresh(c: Container, config: str) -> None:
    """Each test starts from an empty state directory and its own config."""
    c.run("systemctl", "stop", "edge-infer", check=False)
    c.run("systemctl", "reset-failed", "edge-infer", check=False)
    c.run("bash", "-c", "rm -rf /var/lib/edge-infer/* /var/lib/private/edge-infer/*")
    c.write("/etc/edge-infer/edge-infer.toml", config)


def status_text(c: Container) -> str:
    return c.show("edge-infer", "StatusText")


def journal(c: Container, *args: str) -> str:
    return c.run("journalctl", "-u", "edge-infer", "--no-pager", *args, check=False).stdout


def db_query(c: Container, sql: str) -> list:
    code = f"import sqlite3,json;print(json.dumps(sqlite3.connect('file:{DB}?mode=ro',uri=True).execute({sql!r}).fetchall()))"
    return json.loads(c.run("/opt/edge-infer/bin/python", "-c", code).stdout)


def drop_image(c: Container, name: str, png: bytes) -> None:
    # write under a dot-name, then rename: the spool never sees half a file
    path = f"/var/lib/edge-infer/spool/{name}"
    c.run("bash", "-c", f"base64 -d > /var/lib/edge-infer/spool/.{name} && "
                        f"mv /var/lib/edge-infer/spool/.{name} {path}", input=base64.b64encode(png).decode())


def test_start_ready_status_journal_and_a_spool_input(container, broker, fmnist):
    c = container
    dev = unique("sd")
    rec = Recorder(broker.port, f"edge-infer/{dev}/results", f"edge-infer/{dev}/status")
    try:
        fresh(c, device_config(broker.port, dev))
        t0 = time.monotonic()
        c.run("systemctl", "start", "edge-infer")           # returns once READY=1 arrived (Type=notify)
        assert c.show("edge-infer", "ActiveState") == "active"
        assert c.show("edge-infer", "Type") == "notify"
        assert c.show("edge-infer", "User") == "edge-infer"
        wait_for(lambda: "broker connected" in status_text(c), timeout=20, what="STATUS= with broker connected")
        st = status_text(c)
        assert "model fmnist-edge:1.0.0" in st and "tflite-cpu" in st and "outbox" in st and "offload" in st
        assert "ready" in journal(c)
        # structured journal fields (systemd-python's JournalHandler)
        entries = [json.loads(line) for line in journal(c, "-o", "json").splitlines() if line.strip()]
        assert any(e.get("EDGE_INFER_DEVICE") == dev for e in entries)

        drop_image(c, "first.png", encode_png(fmnist["test"].images[0]))
        wait_for(lambda: c.run("test", "-e", "/var/lib/edge-infer/spool/done/first.png", check=False).returncode == 0,
                 timeout=20, what="spool file classified")
        wait_for(lambda: any(r["source"] == "first.png" for r in rec.results(f"edge-infer/{dev}/results")),
                 what="result published")
        assert db_query(c, "select source from results") == [["first.png"]]
        print(f"\nstart to active: {time.monotonic() - t0:.1f}s; STATUS={st}")
        c.run("systemctl", "stop", "edge-infer")
        assert c.show("edge-infer", "ActiveState") == "inactive"
        wait_for(lambda: rec.json(f"edge-infer/{dev}/status")[-1]["state"] == "offline",
                 what="offline status published by the clean stop")
    finally:
        rec.close()
        c.run("systemctl", "stop", "edge-infer", check=False)


def test_sigkill_is_restarted_and_the_outbox_survives(container, broker, fmnist):
    c = container
    dev = unique("sd")
    # no worker in this test's group: offloaded samples stay in the outbox
    fresh(c, device_config(broker.port, dev, "[policy]\nthreshold = 1.0\n"))
    c.run("systemctl", "start", "edge-infer")
    try:
        for i in range(3):
            drop_image(c, f"k{i}.png", encode_png(fmnist["test"].images[i]))
        wait_for(lambda: len(db_query(c, "select sample_id from outbox")) == 3, timeout=20, what="3 samples queued")
        before = int(c.show("edge-infer", "NRestarts"))
        pid = c.show("edge-infer", "MainPID")
        c.run("kill", "-KILL", pid)
        wait_for(lambda: c.show("edge-infer", "MainPID") not in ("0", pid) and
                 c.show("edge-infer", "ActiveState") == "active", timeout=30, what="restart after SIGKILL")
        assert int(c.show("edge-infer", "NRestarts")) == before + 1
        assert len(db_query(c, "select sample_id from outbox")) == 3
    finally:
        c.run("systemctl", "stop", "edge-infer", check=False)


def test_watchdog_restarts_a_hung_inference_loop(container, broker, fmnist):
    c = container
    dev = unique("sd")
    fresh(c, device_config(broker.port, dev, "[policy]\nthreshold = 1.0\n"))
    c.write("/etc/systemd/system/edge-infer.service.d/zz-hang.conf",
            "[Service]\nEnvironment=EDGE_INFER_TEST_FAILPOINT=hang_invoke_after=1\nWatchdogSec=4\n")
    c.run("systemctl", "daemon-reload")
    try:
        c.run("systemctl", "reset-failed", "edge-infer", check=False)
        c.run("systemctl", "restart", "edge-infer")
        before = int(c.show("edge-infer", "NRestarts"))
        drop_image(c, "w0.png", encode_png(fmnist["test"].images[0]))
        wait_for(lambda: len(db_query(c, "select sample_id from outbox")) == 1, timeout=20, what="first sample")
        drop_image(c, "w1.png", encode_png(fmnist["test"].images[1]))      # this one hangs
        wait_for(lambda: int(c.show("edge-infer", "NRestarts")) > before, timeout=30, what="watchdog restart")
        log = journal(c)
        assert "watchdog" in log.lower()
        # the outbox survived the kill: the first sample is still there
        assert len(db_query(c, "select sample_id from outbox")) >= 1
    finally:
        c.run("rm", "-f", "/etc/systemd/system/edge-infer.service.d/zz-hang.conf")
        c.run("systemctl", "daemon-reload")
        c.run("systemctl", "stop", "edge-infer", check=False)
        c.run("systemctl", "reset-failed", "edge-infer", check=False)
    # without the failpoint the service comes back and finishes the file that hung
    c.run("systemctl", "start", "edge-infer")
    try:
        wait_for(lambda: c.run("test", "-e", "/var/lib/edge-infer/spool/done/w1.png", check=False).returncode == 0,
                 timeout=20, what="hung file processed after the fix")
    finally:
        c.run("systemctl", "stop", "edge-infer", check=False)


def test_bad_config_fails_the_start_with_the_key_in_the_journal(container, broker):
    c = container
    fresh(c, device_config(broker.port, unique("sd")).replace("[mqtt]\n", "[mqtt]\nprot = 1\n"))
    before = c.show("edge-infer", "NRestarts")
    p = c.run("systemctl", "start", "edge-infer", check=False)
    assert p.returncode != 0
    assert c.show("edge-infer", "ActiveState") == "failed"
    assert "unknown key 'mqtt.prot'" in journal(c)
    time.sleep(3)   # RestartPreventExitStatus=2: no restart loop on a config error
    assert c.show("edge-infer", "NRestarts") == before and c.show("edge-infer", "ActiveState") == "failed"
    # check-config gives the same verdict without starting anything
    p = c.run("/opt/edge-infer/bin/edge-infer", "check-config", "/etc/edge-infer/edge-infer.toml", check=False)
    assert p.returncode == 2 and "mqtt.prot" in p.stderr
    c.run("systemctl", "reset-failed", "edge-infer", check=False)


def test_cloud_worker_template_runs_n_workers(container, broker):
    c = container
    c.write("/etc/edge-infer/cloud-worker.toml",
            f'[model]\ncard = "{REPO}/models/fmnist-cloud-v1/card.json"\n[worker]\ngroup = "{unique("sdg")}"\n'
            f'[mqtt]\nport = {broker.port}\n')
    rec = Recorder(broker.port, "edge-infer/_workers/+/status")
    try:
        c.run("systemctl", "start", "edge-infer-cloud-worker@1", "edge-infer-cloud-worker@2")
        for i in (1, 2):
            assert c.show(f"edge-infer-cloud-worker@{i}", "ActiveState") == "active"
        host = c.run("hostname").stdout.strip()
        wait_for(lambda: {m.topic for m in rec.messages if json.loads(m.payload).get("state") == "online"}
                 >= {f"edge-infer/_workers/{host}-1/status", f"edge-infer/_workers/{host}-2/status"},
                 timeout=60, what="both workers online")
    finally:
        c.run("systemctl", "stop", "edge-infer-cloud-worker@1", "edge-infer-cloud-worker@2", check=False)
        rec.close()
