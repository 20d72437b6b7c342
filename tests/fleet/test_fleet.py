"""A fleet of real systemd machines deployed, updated and rolled back by the real ansible-playbook.

Four systemd-nspawn containers of the host root, reached with the community.docker.nsenter
connection: three devices, and one host in the broker and workers groups on which site.yml
deploys Mosquitto (mutual TLS, the shipped ACL rendered for the fleet) and two cloud worker
instances, each with its own certificate. Every certificate comes from the fleet PKI
(edge-infer pki); the health gate reads retained status from the controller (this host) with a
reader certificate. The containers share the host's network. One test, in stages, because each
stage starts from the fleet the one before left (a rollout is only meaningful on a deployed fleet).
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
from edge_infer.tools.brokerconf import render_conf
from edge_infer.tools.localbroker import free_port
from edge_infer.tools.pki import FleetPki

from ..conftest import MODELS, REPO, wait_for
from ..system.nspawn import OTHER_HOST_SERVICES, Container

pytestmark = pytest.mark.fleet

ANSIBLE = REPO / "deploy" / "ansible"
BIN = Path(sys.executable).parent
PLAYBOOK = str(BIN / "ansible-playbook") if (BIN / "ansible-playbook").exists() else shutil.which("ansible-playbook")
OLD, NEW = "0.1.0", "0.1.1"
CONFIG = "/etc/edge-infer/edge-infer.toml"
WORKERS = 2          # cloud worker instances on the broker host
GATE = "fleet-gate"  # the health gate's reader identity


def build_wheels(out: Path) -> Path:
    """The wheel folder the role copies: edge-infer OLD (this tree) and NEW (the same tree,
    version bumped), and every dependency, so devices install offline."""
    wheels = out / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                    "--wheel-dir", str(wheels), f"{REPO}[device,cloud]"], check=True, capture_output=True)
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


def make_pki(root: Path, devices: list[str], broker_host: str) -> FleetPki:
    """The fleet's certificates, as an admin makes them with `edge-infer pki` (README in deploy/pki/)."""
    pki = FleetPki(root)
    pki.init(broker_hosts=["localhost"], broker_ips=["127.0.0.1"])
    for name in devices:
        pki.add_device(name)
    for i in range(1, WORKERS + 1):
        pki.add_worker(f"{broker_host}-{i}")
    pki.add_reader(GATE)
    return pki


class Fleet:
    def __init__(self, tmp: Path, pki: FleetPki, port: int, wheels: Path, devices: list[Container],
                 broker: Container) -> None:
        self.tmp, self.pki, self.port, self.wheels = tmp, pki, port, wheels
        self.devices, self.broker = devices, broker

    @staticmethod
    def _host(c: Container, host_vars: dict | None = None) -> str:
        hv = " ".join(f"{k}={json.dumps(v)}" for k, v in (host_vars or {}).items())
        return (f"{c.name} ansible_connection=community.docker.nsenter ansible_nsenter_pid={c.pid1} "
                f"ansible_python_interpreter=/usr/bin/python3 {hv}").rstrip()

    def inventory(self, host_vars: dict[str, dict] | None = None, **all_vars) -> Path:
        lines = ["[cpu]"]
        lines += [self._host(d, (host_vars or {}).get(d.name)) for d in self.devices]
        lines += ["[devices:children]", "cpu", "[workers]", self._host(self.broker), "[broker]",
                  self._host(self.broker)]
        inv = self.tmp / "inventory"
        inv.mkdir(exist_ok=True)
        (inv / "hosts.ini").write_text("\n".join(lines) + "\n")
        pki = str(self.pki.root)
        gv = {"edge_device_version": OLD, "edge_device_mqtt_port": self.port,
              "edge_device_mqtt_reconnect_max_s": 1, "edge_device_wheel_dir": str(self.wheels),
              "edge_device_model_src": str(MODELS / "fmnist-edge-v1"), "edge_device_spool_poll_interval_s": 0.1,
              "edge_device_health_timeout_s": 40, "edge_device_tls": True, "edge_device_tls_pki_dir": pki,
              "edge_device_health_reader": GATE,
              "broker_tls": True, "broker_tls_pki_dir": pki, "broker_tls_port": self.port,
              "broker_install_package": False,
              "cloud_worker_tls": True, "cloud_worker_tls_pki_dir": pki, "cloud_worker_mqtt_port": self.port,
              "cloud_worker_instances": WORKERS, "cloud_worker_wheel_dir": str(self.wheels),
              "cloud_worker_model_src": str(MODELS / "fmnist-cloud-v1"), "cloud_worker_group": "fleet",
              **all_vars}
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
        import ssl

        import paho.mqtt.client as mqtt
        got: list[dict] = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fleet-probe-{d.name}", protocol=mqtt.MQTTv5)
        reader = self.pki.root / "readers" / GATE
        c.tls_set(ca_certs=str(self.pki.ca_cert_path), certfile=str(reader / "cert.pem"),
                  keyfile=str(reader / "key.pem"), cert_reqs=ssl.CERT_REQUIRED)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"edge-infer/{d.name}/status", 1)
        c.on_message = lambda cl, u, m: got.append(json.loads(m.payload))
        c.connect("127.0.0.1", self.port)
        c.loop_start()
        try:
            wait_for(lambda: got, timeout=10, what=f"retained status of {d.name}")
        finally:
            c.disconnect()
            c.loop_stop()
        return got[-1]["model"], got[-1]["version"]

    def connects(self, *, tls: bool, identity: Path | None = None) -> bool:
        """Whether the broker accepts an MQTT connection (a CONNACK with success) made so."""
        import ssl

        import paho.mqtt.client as mqtt
        ok = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fleet-try-{time.monotonic_ns()}",
                        protocol=mqtt.MQTTv5)
        if tls:
            c.tls_set(ca_certs=str(self.pki.ca_cert_path), certfile=str(identity / "cert.pem") if identity else None,
                      keyfile=str(identity / "key.pem") if identity else None, cert_reqs=ssl.CERT_REQUIRED)
        c.on_connect = lambda cl, u, flags, rc, p: ok.append(not rc.is_failure)
        try:
            c.connect("127.0.0.1", self.port)
        except (OSError, ssl.SSLError):
            return False
        c.loop_start()
        try:
            deadline = time.monotonic() + 5
            while not ok and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            c.disconnect()
            c.loop_stop()
        return bool(ok and ok[0])

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
    names = [f"fd{i + 1}x{os.getpid()}" for i in range(3)]
    broker_name = f"fbx{os.getpid()}"
    pki = make_pki(tmp / "pki", names, broker_name)
    machines: list[Container] = []
    try:
        broker = Container(broker_name, tmp, binds_ro=[], masked=OTHER_HOST_SERVICES).start()
        machines.append(broker)
        for name in names:
            machines.append(Container(name, tmp, binds_ro=[]).start())
        yield Fleet(tmp, pki, free_port(), wheels, machines[1:], broker)
    finally:
        for m in machines:
            m.stop()


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
    assert all(rows[n]["failed"] == 0 and rows[n]["rescued"] == 0 for n in names + [f.broker.name]), out[-4000:]
    print(f"\nfirst deploy {times['first deploy']:.1f}s")
    # the broker runs the shipped TLS config (paths and port replaced) and the ACL rendered for this
    # fleet's workers and reader; the two worker instances run, each with its own certificate
    b = f.broker
    assert b.show("mosquitto", "ActiveState") == "active"
    conf = b.run("cat", "/etc/mosquitto/conf.d/edge-infer-tls.conf").stdout
    shipped = (REPO / "deploy" / "mosquitto" / "edge-infer-tls.conf").read_text()
    assert conf == render_conf(shipped, {"listener": str(f.port), **{
        k: f"/etc/mosquitto/edge-infer/{v}" for k, v in (("cafile", "ca.crt"), ("certfile", "broker.crt"),
                                                         ("keyfile", "broker.key"), ("crlfile", "crl.pem"),
                                                         ("acl_file", "edge-infer.acl"))}})
    assert b.run("ls", "/etc/mosquitto/conf.d").stdout.split() == ["README", "edge-infer-tls.conf"]
    acl = b.run("cat", "/etc/mosquitto/edge-infer/edge-infer.acl").stdout
    users = [line for line in acl.splitlines() if line.startswith("user ")]
    assert users == [f"user worker:{b.name}-1", f"user worker:{b.name}-2", f"user reader:{GATE}"], users
    for i in range(1, WORKERS + 1):
        assert b.show(f"edge-infer-cloud-worker@{i}", "ActiveState") == "active"
    assert b.run("stat", "-c", "%a %U", f"/etc/edge-infer/worker-tls/{b.name}-1/worker.key").stdout.split() == \
        ["600", "root"]
    assert f.devices[0].run("stat", "-c", "%a %U", "/etc/edge-infer/tls/device.key").stdout.split() == \
        ["600", "edge-infer"]
    # no way in without a fleet certificate: not in plain MQTT, not with TLS and no client certificate
    assert not f.connects(tls=False) and not f.connects(tls=True)
    assert f.connects(tls=True, identity=f.pki.root / "readers" / GATE)      # while the reader's works
    # the rendered unit is the shipped one, pointed at current/, and systemd accepts it
    unit = f.devices[0].run("cat", "/etc/systemd/system/edge-infer.service").stdout
    assert "ExecStart=/opt/edge-infer/current/bin/edge-infer run" in unit
    v = f.devices[0].run("systemd-analyze", "verify", "/etc/systemd/system/edge-infer.service", check=False)
    assert not v.stderr.strip(), v.stderr

    # --- re-run: nothing changes --------------------------------------------------------------
    rc, out, times["re-run"] = f.play("site.yml", inv)
    assert rc == 0, out[-4000:]
    rows = recap(out)
    hosts = names + [f.broker.name]
    assert {n: rows[n]["changed"] for n in hosts} == dict.fromkeys(hosts, 0), out[-4000:]
    print(f"re-run {times['re-run']:.1f}s, changed=0 on every device and on the broker/worker host")

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
