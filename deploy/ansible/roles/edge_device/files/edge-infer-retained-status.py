"""The edge_device role's health gate, part 1, run on the Ansible controller.

Waits until the retained status on <prefix>/<device>/status says "online"
with the expected model id and software version, read through the broker.
It runs on the controller, not on the device: with the fleet's mutual TLS
the broker takes the client id from the certificate's CN, so a second
connection with the device's own certificate would kick its service off;
the controller reads with a read-only identity (CN reader:<name>, from
`edge-infer pki add-reader`), which the ACL lets read every device's status.
Needs paho-mqtt only. Prints one JSON line; exit 1 with a "reason" on failure.
"""
from __future__ import annotations

import argparse
import json
import ssl
import sys
import threading
import time
import uuid


def read_retained(a: argparse.Namespace, topic: str, wait: float) -> tuple[dict | None, str]:
    """The retained status (or None) and, when there is none, what went wrong with the connection."""
    import paho.mqtt.client as mqtt
    got: list[dict] = []
    problem: list[str] = []
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edge-infer-gate-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    if a.ca:
        client.tls_set(ca_certs=a.ca, certfile=a.cert or None, keyfile=a.key or None, cert_reqs=ssl.CERT_REQUIRED)

    def on_connect(c, userdata, flags, reason, props):
        if reason.is_failure:
            problem.append(f"the broker refused the connection: {reason}")
            done.set()
        else:
            c.subscribe(topic, 1)

    def on_message(c, userdata, msg):
        try:
            got.append(json.loads(msg.payload))
        except ValueError:
            problem.append(f"the retained status on {topic} is not JSON")
            return
        done.set()

    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(a.host, a.port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        return None, f"cannot connect to the broker {a.host}:{a.port} from the controller: {exc}"
    client.loop_start()
    try:
        done.wait(wait)
    finally:
        client.disconnect()
        client.loop_stop()
    return (got[-1] if got else None), (problem[-1] if problem else "")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefix", required=True, help="mqtt.topic_prefix")
    ap.add_argument("--device", required=True, help="device id")
    ap.add_argument("--model", required=True, help="expected model id (name:version)")
    ap.add_argument("--version", required=True, help="expected software version")
    ap.add_argument("--ca", default="", help="fleet CA (TLS); empty: plain TCP")
    ap.add_argument("--cert", default="", help="the gate's reader certificate")
    ap.add_argument("--key", default="", help="the gate's reader key")
    ap.add_argument("--timeout", type=float, default=30.0)
    a = ap.parse_args()
    topic = f"{a.prefix}/{a.device}/status"
    deadline = time.monotonic() + a.timeout
    report: dict = {"device": a.device, "topic": topic}
    st, problem = None, ""
    while time.monotonic() < deadline:
        st, problem = read_retained(a, topic, min(5.0, max(0.5, deadline - time.monotonic())))
        if st and st.get("state") == "online" and st.get("model") == a.model and st.get("version") == a.version:
            report.update(ok=True, status={k: st.get(k) for k in ("state", "model", "version")})
            print(json.dumps(report))
            return 0
        time.sleep(0.3)
    report["ok"] = False
    if st is None:
        report["reason"] = problem or (
            f"no retained status on {topic} within {a.timeout:.0f}s (the service never connected to "
            f"{a.host}:{a.port}, or the gate's identity may not read it: journalctl -u edge-infer on the device)")
    else:
        report["reason"] = (f"retained status on {topic} is state={st.get('state')!r} model={st.get('model')!r} "
                            f"version={st.get('version')!r}; expected online, {a.model}, {a.version}")
    print(json.dumps(report))
    return 1


if __name__ == "__main__":
    sys.exit(main())
