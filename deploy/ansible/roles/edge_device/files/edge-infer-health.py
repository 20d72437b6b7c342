"""The edge_device role's health gate, part 2, run on the device with the release's own Python.

(Part 1, edge-infer-retained-status.py, has already checked from the
controller that the service's retained status is online with the expected
model and version.) It passes only when, within --timeout seconds:
  1. a probe image dropped into the spool is classified: the store holds one
     result more (``edge-infer status``);
  2. when the probe was offloaded, its correction came back through the broker
     and the cloud worker: the store holds one corrected result more.
It prints one JSON line; on failure it exits 1 and the line's "reason" says why.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path


def store_counts(edge_infer: str, config: str) -> dict:
    p = subprocess.run([edge_infer, "status", "--config", config], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        return {}
    return json.loads(p.stdout)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--edge-infer", required=True, help="the release's edge-infer command")
    ap.add_argument("--model", required=True, help="the model id (name:version), for the failure message")
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

    # 1. a real classification through the spool
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

    # 2. the round trip: offloaded probe corrected through broker + cloud worker
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
