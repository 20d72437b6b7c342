"""A fleet of real systemd machines deployed, updated and rolled back by the real ansible-playbook.

Three systemd-nspawn containers of the host root are the devices, reached with the
community.docker.nsenter connection. The broker (a LocalBroker) and one cloud worker run on the
host; the containers share its network. One test, in stages, because each stage starts from the
fleet the one before left (a rollout is only meaningful on a deployed fleet).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_infer.preprocess import encode_png
from edge_infer.tools.localbroker import LocalBroker, stop_process

from ..conftest import CLOUD_CARD, MODELS, REPO, wait_for
from ..system.nspawn import Container

pytestmark = pytest.mark.fleet

ANSIBLE = REPO / "deploy" / "ansible"
BIN = Path(sys.executable).parent
PLAYBOOK = str(BIN / "ansible-playbook") if (BIN / "ansible-playbook").exists() else shutil.which("ansible-playbook")
OLD, NEW = "0.1.0", "0.1.1"
CONFIG = "/etc/edge-infer/edge-infer.toml"


def build_wheels(out: Path) -> Path:
    """The wheel folder the role copies: edge-infer OLD (this tree) and NEW (the same tree,
    version bumped), and every dependency, so devices install offline."""
    wheels = out / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                    "--wheel-dir", str(wheels), f"{REPO}[device]"], check=True, capture_output=True)
    src = out / "src-new"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv*", ".git", "build", "dist", "*.egg-info",
                                                             "models", "tests", "__pycache__", ".pytest_cache"))
    for f, old, new in ((src / "setup.py", f'version="{OLD}"', f'version="{NEW}"'),
                        (src / "device" / "__init__.py", f'__version__ = "{OLD}"', f'__version__ = "{NEW}"')):
        text = f.read_text()
        assert old in text, f"{f} no longer holds {old}"
        f.write_text(text.replace(old, new))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                    "--wheel-dir", str(wheels), str(src)], check=True, capture_output=True)
    return wheels


def model_variant(out: Path, name: str, version: str, broken: bool = False) -> Path:
    """A copy of the shipped edge model under a new card version; broken: garbage model bytes whose
    hash the card carries (it passes the hash check and check-config and fails to load)."""
    d = out / name
    d.mkdir()
    card = json.loads((MODELS / "fmnist-edge-v1" / "card.json").read_text())
    data = b"\x00not a tflite model\x00" * 64 if broken else (MODELS / "fmnist-edge-v1" / card["file"]).read_bytes()
    (d / card["file"]).write_bytes(data)
    card.update(version=version, sha256=hashlib.sha256(data).hexdigest())
    (d / "card.json").write_text(json.dumps(card, indent=2))
    return d


class Fleet:
    def __init__(self, tmp: Path, broker: LocalBroker, wheels: Path, devices: list[Container]) -> None:
        self.tmp, self.broker, self.wheels, self.devices = tmp, broker, wheels, devices

    def inventory(self, host_vars: dict[str, dict] | None = None, **all_vars) -> Path:
        lines = ["[cpu]"]
        for d in self.devices:
            hv = " ".join(f"{k}={json.dumps(v)}" for k, v in (host_vars or {}).get(d.name, {}).items())
            lines.append(f"{d.name} ansible_connection=community.docker.nsenter ansible_nsenter_pid={d.pid1} "
                         f"ansible_python_interpreter=/usr/bin/python3 {hv}")
        lines += ["[devices:children]", "cpu", "[workers]", "[broker]"]
        inv = self.tmp / "inventory"
        inv.mkdir(exist_ok=True)
        (inv / "hosts.ini").write_text("\n".join(lines) + "\n")
        gv = {"edge_device_version": OLD, "edge_device_mqtt_port": self.broker.port,
              "edge_device_mqtt_reconnect_max_s": 1, "edge_device_wheel_dir": str(self.wheels),
              "edge_device_model_src": str(MODELS / "fmnist-edge-v1"), "edge_device_spool_poll_interval_s": 0.1,
              "edge_device_health_timeout_s": 40, **all_vars}
        (inv / "group_vars").mkdir(exist_ok=True)
        (inv / "group_vars" / "all.json").write_text(json.dumps(gv, indent=2))
        return inv / "hosts.ini"

    def play(self, playbook: str, inventory: Path, *extra: str) -> tuple[int, str, float]:
        env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_FORCE_COLOR="0", ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks",
                   ANSIBLE_LOCAL_TEMP=str(self.tmp / "ansible-local"))
        t0 = time.monotonic()
        p = subprocess.run([PLAYBOOK, "-i", str(inventory), playbook, *extra], cwd=ANSIBLE, env=env,
                           capture_output=True, text=True, timeout=600)
        took = time.monotonic() - t0
        out = p.stdout + p.stderr
        (self.tmp / f"ansible-{playbook}-{int(t0)}.log").write_text(out)
        return p.returncode, out, took

    def status(self, d: Container) -> dict:
        return json.loads(d.run("/opt/edge-infer/current/bin/edge-infer", "status", "--config", CONFIG).stdout)

    def retained_model_version(self, d: Container) -> tuple[str, str]:
        import paho.mqtt.client as mqtt
        got: list[dict] = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fleet-probe-{d.name}", protocol=mqtt.MQTTv5)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"edge-infer/{d.name}/status", 1)
        c.on_message = lambda cl, u, m: got.append(json.loads(m.payload))
        c.connect("127.0.0.1", self.broker.port)
        c.loop_start()
        try:
            wait_for(lambda: got, timeout=10, what=f"retained status of {d.name}")
        finally:
            c.disconnect()
            c.loop_stop()
        return got[-1]["model"], got[-1]["version"]

    def release(self, d: Container) -> str:
        return d.run("readlink", "/opt/edge-infer/current").stdout.strip().rsplit("/", 1)[-1]


def recap(out: str) -> dict[str, dict[str, int]]:
    rows = {}
    for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", out, re.M):
        rows[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return rows


def drop(d: Container, name: str, png: bytes) -> None:
    import base64
    d.run("bash", "-c", f"base64 -d > /var/lib/edge-infer/spool/.{name} && "
                        f"mv /var/lib/edge-infer/spool/.{name} /var/lib/edge-infer/spool/{name}",
          input=base64.b64encode(png).decode())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    why = Container.available()
    assert why is None, why
    assert PLAYBOOK, "ansible-playbook missing: pip install ansible (the fleet extra)"
    tmp = tmp_path_factory.mktemp("fleet")
    t0 = time.monotonic()
    wheels = build_wheels(tmp)
    print(f"\nwheels built in {time.monotonic() - t0:.1f}s")
    broker = LocalBroker(tmp / "broker").start()
    wcfg = tmp / "cloud-worker.toml"
    wcfg.write_text(f'[model]\ncard = "{CLOUD_CARD}"\n[worker]\ngroup = "fleet"\n[mqtt]\nport = {broker.port}\n')
    worker = subprocess.Popen([str(BIN / "edge-infer-cloud-worker"), "run", "--config", str(wcfg),
                               "--worker-id", f"fleet-{os.getpid()}"],
                              stdout=open(tmp / "worker.log", "w"), stderr=subprocess.STDOUT)
    devices: list[Container] = []
    try:
        for i in range(3):
            devices.append(Container(f"fd{i + 1}x{os.getpid()}", tmp, binds_ro=[]).start())
        yield Fleet(tmp, broker, wheels, devices)
    finally:
        for d in devices:
            d.stop()
        stop_process(worker)
        broker.stop()


def test_fleet_deploy_rerun_update_rollback_and_broken_model_rollout(fleet, fmnist):
    f = fleet
    names = [d.name for d in f.devices]
    times = {}
    inv = f.inventory()

    # --- first deploy -------------------------------------------------------------------------
    rc, out, times["first deploy"] = f.play("site.yml", inv)
    assert rc == 0, out[-6000:]
    for d in f.devices:
        assert d.show("edge-infer", "ActiveState") == "active"
        assert f.release(d) == OLD
        assert f.retained_model_version(d) == ("fmnist-edge:1.0.0", OLD)
        s = f.status(d)
        assert s["results"] >= 1 and s["offloaded"] >= 1 and s["corrected"] >= 1, s   # the gate's probe
    rows = recap(out)
    assert all(rows[n]["failed"] == 0 and rows[n]["rescued"] == 0 for n in names), out[-4000:]
    print(f"\nfirst deploy {times['first deploy']:.1f}s")
    # the rendered unit is the shipped one, pointed at current/, and systemd accepts it
    unit = f.devices[0].run("cat", "/etc/systemd/system/edge-infer.service").stdout
    assert "ExecStart=/opt/edge-infer/current/bin/edge-infer run" in unit
    v = f.devices[0].run("systemd-analyze", "verify", "/etc/systemd/system/edge-infer.service", check=False)
    assert not v.stderr.strip(), v.stderr

    # --- re-run: nothing changes --------------------------------------------------------------
    rc, out, times["re-run"] = f.play("site.yml", inv)
    assert rc == 0, out[-4000:]
    rows = recap(out)
    assert {n: rows[n]["changed"] for n in names} == dict.fromkeys(names, 0), out[-4000:]
    print(f"re-run {times['re-run']:.1f}s, changed=0 on every device")

    # --- software update, then the one-command fleet rollback; count every store ------------------
    for d in f.devices:
        for i in range(12):
            drop(d, f"pre{i}.png", encode_png(fmnist["test"].images[i]))
    wait_for(lambda: all(f.status(d)["results"] >= 13 for d in f.devices), timeout=30, what="pre-update inputs")
    before = {d.name: f.status(d) for d in f.devices}
    rc, out, times["software update"] = f.play("software-update.yml", f.inventory(edge_device_version=NEW))
    assert rc == 0, out[-6000:]
    for d in f.devices:
        assert f.release(d) == NEW and f.retained_model_version(d)[1] == NEW
    print(f"software update {times['software update']:.1f}s")
    rc, out, times["rollback"] = f.play("rollback.yml", f.inventory(edge_device_version=NEW))
    assert rc == 0, out[-6000:]
    print(f"fleet rollback {times['rollback']:.1f}s")
    for d in f.devices:
        assert f.release(d) == OLD
        assert f.retained_model_version(d) == ("fmnist-edge:1.0.0", OLD)
        assert d.show("edge-infer", "ActiveState") == "active"

    def settled(d):
        s = f.status(d)
        ob = s["outbox"]
        return s["results_unpublished"] == 0 and sum(ob.get(k, 0) for k in ("queued", "inflight", "delivered")) == 0

    wait_for(lambda: all(settled(d) for d in f.devices), timeout=30, what="outboxes drained")
    for d in f.devices:
        a, b = f.status(d), before[d.name]
        # two health-gate probes were added (after the update and after the rollback): nothing else changed
        assert a["results"] == b["results"] + 2, (d.name, b, a)
        assert a["offloaded"] == b["offloaded"] + 2 and a["corrected"] == a["offloaded"], (d.name, b, a)
        assert a["outbox"].get("expired", 0) == b["outbox"].get("expired", 0) == 0
        assert a["outbox"].get("evicted", 0) == 0
    print("\nstores before the update / after the rollback: "
          + "; ".join(f"{n}: {before[n]['results']}->{f.status(d)['results']} results, "
                      f"{f.status(d)['corrected']} corrected" for n, d in zip(names, f.devices)))

    # --- rolling model update; the second batch's device gets a broken model --------------------
    good = model_variant(f.tmp, "fmnist-edge-v1.1", "1.1.0")
    broken = model_variant(f.tmp, "fmnist-edge-v1.1-broken", "1.1.0", broken=True)
    third_config = f.devices[2].run("cat", CONFIG).stdout
    inv = f.inventory(host_vars={names[1]: {"edge_device_model_src": str(broken)}}, edge_device_model_src=str(good))
    rc, out, times["model rollout"] = f.play("model-update.yml", inv)
    assert rc != 0, out[-4000:]
    failure = [line for line in out.splitlines() if line.startswith("fatal:") and "failed at task" in line]
    print("\nbroken-model rollout reported:\n" + "\n".join(failure)[:3000])
    assert failure and names[1] in failure[0] and "Rolled back" in failure[0], out[-6000:]
    assert f.retained_model_version(f.devices[0]) == ("fmnist-edge:1.1.0", OLD)       # canary updated
    assert f.retained_model_version(f.devices[1]) == ("fmnist-edge:1.0.0", OLD)       # rolled back
    assert f.devices[1].show("edge-infer", "ActiveState") == "active"
    assert "fmnist-edge-v1/card.json" in f.devices[1].run("cat", CONFIG).stdout
    assert f.devices[2].run("cat", CONFIG).stdout == third_config                       # never touched
    rows = recap(out)
    assert names[2] not in rows, out[-3000:]
    probe_before = f.status(f.devices[1])["results"]
    drop(f.devices[1], "after-rollback.png", encode_png(fmnist["test"].images[0]))
    wait_for(lambda: f.status(f.devices[1])["results"] == probe_before + 1, what="rolled-back device classifies")

    print("\nfleet of 3: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
