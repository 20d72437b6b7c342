"""The edge_device role's health gate, run on the device with the release's own Python.

It passes only when, within --timeout seconds:
  1. the retained status on <prefix>/<device>/status says "online", with the
     expected model id and software version (read through the broker, with the
     device's own MQTT settings and TLS identity from its config);
  2. a probe image dropped into the spool is classified: the store holds one
     result more (``edge-infer status``);
  3. when the probe was offloaded, its correction came back through the broker
     and the cloud worker: the store holds one corrected result more.
It prints one JSON line; on failure it exits 1 and the line's "reason" says why.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path


def store_counts(edge_infer: str, config: str) -> dict:
    p = subprocess.run([edge_infer, "status", "--config", config], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        return {}
    return json.loads(p.stdout)


def retained_status(cfg, timeout: float) -> dict | None:
    import paho.mqtt.client as mqtt
    topic = f"{cfg.mqtt.topic_prefix}/{cfg.device_id}/status"
    got: list[dict] = []
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{cfg.device_id}-health-{uuid.uuid4().hex[:6]}",
                         protocol=mqtt.MQTTv5)
    if cfg.mqtt.username is not None:
        client.username_pw_set(cfg.mqtt.username, cfg.mqtt.password)
    if cfg.mqtt.tls is not None:
        t = cfg.mqtt.tls
        client.tls_set(ca_certs=str(t.ca_file), certfile=str(t.cert_file) if t.cert_file else None,
                       keyfile=str(t.key_file) if t.key_file else None, cert_reqs=ssl.CERT_REQUIRED)

    def on_message(c, u, msg):
        try:
            got.append(json.loads(msg.payload))
        except ValueError:
            return
        done.set()

    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1)
    client.on_message = on_message
    client.connect(cfg.mqtt.host, cfg.mqtt.port, keepalive=30)
    client.loop_start()
    try:
        done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[-1] if got else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--edge-infer", required=True, help="the release's edge-infer command")
    ap.add_argument("--model", required=True, help="expected model id (name:version)")
    ap.add_argument("--version", required=True, help="expected software version")
    ap.add_argument("--probe", required=True, help="a PNG image to classify")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--require-correction", action="store_true",
                    help="fail when the probe was not offloaded (no round trip through the cloud was proven)")
    a = ap.parse_args()
    from edge_infer.config import load_device_config
    cfg = load_device_config(a.config)
    deadline = time.monotonic() + a.timeout
    report: dict = {"device": cfg.device_id}

    def fail(reason: str) -> int:
        report["ok"] = False
        report["reason"] = reason
        print(json.dumps(report))
        return 1

    # 1. retained status: online, expected model and version (the service publishes it on connect)
    st = None
    while time.monotonic() < deadline:
        st = retained_status(cfg, min(5.0, max(0.5, deadline - time.monotonic())))
        if st and st.get("state") == "online" and st.get("model") == a.model and st.get("version") == a.version:
            break
        time.sleep(0.3)
    else:
        if st is None:
            return fail(f"no retained status on {cfg.mqtt.topic_prefix}/{cfg.device_id}/status "
                        f"(broker {cfg.mqtt.host}:{cfg.mqtt.port} unreachable or the service never connected)")
        return fail(f"retained status is state={st.get('state')!r} model={st.get('model')!r} "
                    f"version={st.get('version')!r}; expected online, {a.model}, {a.version}")
    report["status"] = {k: st.get(k) for k in ("state", "model", "version", "broker_connected")}

    # 2. a real classification through the spool
    before = store_counts(a.edge_infer, a.config)
    if not before:
        before = {"results": 0, "offloaded": 0, "corrected": 0}
    spool = Path(cfg.spool.dir)
    name = f"health-{uuid.uuid4().hex[:10]}.png"
    tmp = spool / f".{name}"
    shutil.copyfile(a.probe, tmp)
    os.chmod(tmp, 0o644)
    os.rename(tmp, spool / name)
    now = before
    while time.monotonic() < deadline:
        now = store_counts(a.edge_infer, a.config) or now
        if now.get("results", 0) > before["results"]:
            break
        time.sleep(0.2)
    else:
        return fail(f"probe {name} dropped into {spool} was not classified within {a.timeout:.0f}s")
    offloaded = now.get("offloaded", 0) > before["offloaded"]
    report["probe"] = {"file": name, "offloaded": offloaded}

    # 3. the round trip: offloaded probe corrected through broker + cloud worker
    if offloaded:
        while time.monotonic() < deadline:
            now = store_counts(a.edge_infer, a.config) or now
            if now.get("corrected", 0) > before["corrected"]:
                break
            time.sleep(0.2)
        else:
            return fail(f"probe {name} was offloaded but no correction came back within {a.timeout:.0f}s "
                        f"(is a cloud worker running against the broker {cfg.mqtt.host}:{cfg.mqtt.port}?)")
        report["probe"]["corrected"] = True
    elif a.require_correction:
        return fail(f"probe {name} was not offloaded by model {a.model}: the cloud round trip was not proven "
                    "(pick a probe image below the offload threshold)")
    report["ok"] = True
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
