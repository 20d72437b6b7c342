"""What calibrate writes and prints: the device's ``[policy]`` snippet, the calibration.json
report, and the table of scores."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from .compare import Calibration


POLICY_FILE = "policy.toml"


ROUTER_FILE = "router.json"


REPORT_FILE = "calibration.json"


def _toml_str(s: str) -> str:
    return json.dumps(s)   # a JSON string is a valid TOML basic string


def policy_snippet(score: str, threshold: float, temperature: float, router_file: str | None, header: str) -> str:
    """The ``[policy]`` table for the device config. ``router_file`` is written only when there is
    one (the device's loader rejects an empty path; it needs the key only for score = "router")."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [
        "[policy]",
        f"score = {_toml_str(score)}",
        f"threshold = {float(threshold)!r}",
        f"temperature = {float(temperature)!r}",
        f"router_file = {_toml_str(router_file)}" if router_file
        else '# router_file: only for score = "router"',
    ]
    return "\n".join(lines) + "\n"


def build_report(cal: Calibration, picked: str | None, inputs: dict[str, Any], runtime_s: dict[str, float]) -> dict:
    chosen = cal.results.get(picked) if picked else None
    return {
        "tool": "edge-infer calibrate",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "sizes": cal.sizes,
        "target": cal.target.to_dict() | {"test_accuracy_to_reach": cal.test_target_accuracy},
        "edge_only_accuracy": cal.edge_accuracy,
        "cloud_only_accuracy": cal.cloud_accuracy,
        "temperature": cal.temperature,
        "router": cal.router_note,
        "best_on_validation": cal.chosen,
        "chosen": None if chosen is None else {
            "score": picked, "threshold": chosen.val.threshold if chosen.val else None,
            "validation": chosen.val.to_dict() if chosen.val else None,
            "test": chosen.test.to_dict() if chosen.test else None,
        },
        "scores": {k: r.to_dict() | {"validation_gain_vs_max_softmax": cal.val_gain[k].to_dict()
                                     if k in cal.val_gain else None} for k, r in cal.results.items()},
        "oracle_router": cal.oracle.to_dict(),
        "curves": {k: {s: c.sampled(100) for s, c in v.items()} for k, v in cal.curves.items()},
        "runtime_s": {k: round(v, 2) for k, v in runtime_s.items()},
    }


def score_table(cal: Calibration, picked: str | None) -> str:
    rows = [(f"{'score':<12} {'val kept':>9} {'val acc':>8} {'test kept':>10} {'test acc':>9} {'gap acc':>8} "
             f"{'threshold':>10}")]
    for name, r in cal.results.items():
        if r.val is None:
            rows.append(f"{name:<12} {'target unreachable on validation (best ' + f'{r.val_best.accuracy:.4f})':>50}")
            continue
        mark = "  <- chosen" if name == picked else ""
        rows.append(f"{name:<12} {r.val.kept_share:>9.1%} {r.val.accuracy:>8.4f} {r.test.kept_share:>10.1%} "
                    f"{r.test.accuracy:>9.4f} {r.test.accuracy - r.val.accuracy:>+8.4f} {r.val.threshold:>10.5f}{mark}")
    return "\n".join(rows)
