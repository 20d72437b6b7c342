"""What calibrate writes and prints: the device's ``[policy]`` snippet, the calibration.json
report, and the table of scores."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from .compare import Calibration
from .perclass import ClassThresholdFit


POLICY_FILE = "policy.toml"


ROUTER_FILE = "router.json"


REPORT_FILE = "calibration.json"


def _toml_str(s: str) -> str:
    return json.dumps(s)   # a JSON string is a valid TOML basic string


def policy_snippet(score: str, threshold: float, temperature: float, router_file: str | None, header: str,
                   class_thresholds: Mapping[str, float] | None = None) -> str:
    """The ``[policy]`` table for the device config. ``router_file`` is written only when there is
    one (the device's loader rejects an empty path; it needs the key only for score = "router");
    ``class_thresholds`` (label -> threshold) only when per-class thresholds were chosen."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [
        "[policy]",
        f"score = {_toml_str(score)}",
        f"threshold = {float(threshold)!r}",
        f"temperature = {float(temperature)!r}",
        f"router_file = {_toml_str(router_file)}" if router_file
        else '# router_file: only for score = "router"',
    ]
    if class_thresholds:
        lines.append("class_thresholds = { " + ", ".join(f"{_toml_str(k)} = {float(v)!r}"
                                                        for k, v in class_thresholds.items()) + " }")
    return "\n".join(lines) + "\n"


def _guarantee_summary(cal: Calibration, picked: str | None) -> dict[str, Any] | None:
    if cal.risk is None:
        return None
    chosen = cal.results.get(picked) if picked else None
    g = chosen.guarantee if chosen is not None else None
    test_excess = None
    if chosen is not None and chosen.test is not None:
        test_excess = round(chosen.test.accuracy - cal.cloud_accuracy["test"], 6)
    return {
        "risk": cal.risk, "confidence": 1 - cal.risk, "candidates": list(cal.risk_candidates),
        "level_per_score": cal.risk / max(1, len(cal.risk_candidates)),
        "method": "Learn-then-Test: one-sided exact binomial (Clopper-Pearson) test per threshold, fixed-sequence "
                  "over a fixed threshold grid from keep-nothing to keep-everything, Bonferroni over the candidate "
                  "scores (docs/calibration.md)",
        "statement": None if g is None else g.statement(cal.target),
        "threshold": None if g is None else g.threshold,
        "upper_confidence_bound_at_threshold": None if g is None else round(g.upper_bound, 6),
        "exact": None if g is None else g.exact,
        "test_hybrid_minus_cloud_accuracy": test_excess,
        "test_within_guarantee": None if test_excess is None or g is None else (
            test_excess >= -g.bound - 1e-12 if g.loss == "kept_edge_wrong_cloud_right"
            else chosen.test.accuracy >= 1 - g.bound - 1e-12),
    }


def build_report(cal: Calibration, picked: str | None, inputs: dict[str, Any], runtime_s: dict[str, float],
                 class_thresholds: ClassThresholdFit | None = None, labels: Sequence[str] = (),
                 kept_agreement: Mapping[str, float | None] | None = None) -> dict:
    chosen = cal.results.get(picked) if picked else None
    per_class = class_thresholds if class_thresholds is not None and class_thresholds.chosen else None
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
            "class_thresholds": None if per_class is None else per_class.by_label(labels),
            "validation": (per_class.val if per_class else chosen.val).to_dict() if chosen.val else None,
            "test": (per_class.test if per_class else chosen.test).to_dict() if chosen.test else None,
            # what the device's audits should read (status audit_agreement): edge = cloud on kept inputs
            "kept_agreement": None if kept_agreement is None else dict(kept_agreement),
        },
        "guarantee": _guarantee_summary(cal, picked),
        "class_thresholds": None if class_thresholds is None else class_thresholds.to_dict(labels),
        "scores": {k: r.to_dict(cal.target) | {"validation_gain_vs_max_softmax": cal.val_gain[k].to_dict()
                                               if k in cal.val_gain else None} for k, r in cal.results.items()},
        "oracle_router": cal.oracle.to_dict(),
        "curves": {k: {s: c.sampled(100) for s, c in v.items()} for k, v in cal.curves.items()},
        "runtime_s": {k: round(v, 2) for k, v in runtime_s.items()},
    }


def score_table(cal: Calibration, picked: str | None) -> str:
    """One row per score. With --risk: the certified threshold, the Clopper-Pearson bound of the
    loss there, and what the point estimate would have kept on validation."""
    risk = cal.risk is not None
    rows = [(f"{'score':<12} {'val kept':>9} {'val acc':>8} {'test kept':>10} {'test acc':>9} {'gap acc':>8} "
             f"{'threshold':>10}") + (f" {'bound':>7} {'point kept':>10}" if risk else "")]
    for name, r in cal.results.items():
        if r.val is None:
            why = ("no threshold certified (bound " + f"{r.guarantee.upper_bound:.4f} at the most conservative)"
                   if risk and r.guarantee is not None else
                   "target unreachable on validation (best " + f"{r.val_best.accuracy:.4f})")
            rows.append(f"{name:<12} {why:>50}")
            continue
        mark = "  <- chosen" if name == picked else ""
        if risk and name not in cal.risk_candidates:
            mark += "  (not exact: fitted on validation)"
        extra = ""
        if risk and r.guarantee is not None:
            pk = "-" if r.point_val is None else f"{r.point_val.kept_share:.1%}"
            extra = f" {r.guarantee.upper_bound:>7.4f} {pk:>10}"
        rows.append(f"{name:<12} {r.val.kept_share:>9.1%} {r.val.accuracy:>8.4f} {r.test.kept_share:>10.1%} "
                    f"{r.test.accuracy:>9.4f} {r.test.accuracy - r.val.accuracy:>+8.4f} {r.val.threshold:>10.5f}"
                    f"{extra}{mark}")
    return "\n".join(rows)


def class_threshold_lines(fit: ClassThresholdFit, labels: Sequence[str]) -> str:
    """What the per-class thresholds did, for the console."""
    head = f"per-class thresholds on {fit.score}: {fit.note}"
    if fit.thresholds is None or fit.val is None or fit.test is None:
        return head
    lines = [head,
             f"  cross-fitted on validation: kept {fit.val_cross_fitted.kept_share:.1%} "
             f"(single threshold {fit.single_val.kept_share:.1%}); the table on validation: kept "
             f"{fit.val.kept_share:.1%} at {fit.val.accuracy:.4f}, on test: kept {fit.test.kept_share:.1%} at "
             f"{fit.test.accuracy:.4f} (single threshold: {fit.single_test.kept_share:.1%} at "
             f"{fit.single_test.accuracy:.4f})",
             "  " + ", ".join(f"{name} {t:.4f}" for name, t in zip(labels, fit.thresholds))]
    return "\n".join(lines)
