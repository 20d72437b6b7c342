#!/usr/bin/env python3
"""The offload curve of every edge model and every way of routing, side by side in one run.

    .venv/bin/python bench/offload_curve.py [--edge-card CARD ...] [--cloud-predictions PRED.npz]
                                            [--resamples 1000] [--out out/bench-offload.json]
                                            [--png out/bench-offload.png]

--edge-card may be given several times (default: every shipped Fashion-MNIST CPU edge
model, models/fmnist-edge-v<N>/); the first is the reference the others are compared
with. Edge logits come from the device's own path (backend + Preprocessor, one image per
invoke); the cloud's answers from onnxruntime through edge_infer_cloud.CloudModel (or a
predictions file). For every score the threshold is chosen on the validation split
(5,000) to reach the cloud model's validation accuracy with the least offloading, then
applied to the untouched test split (10,000). Per model it prints:

- A. the honest procedure per score: val kept, what that threshold does on test (kept,
  accuracy, gap to the cloud), and the validation gain over max-softmax with its noise
- B. the test curves read at the cloud's test accuracy and just below it, with paired
  bootstrap intervals, best accuracy and AUC

Router variants (logistic / MLP; target "edge answer right" / "cloud would not fix
it") are cross-fitted on validation. The bounds frame the result: the oracle router
(offloads exactly what the cloud fixes), an "embedding router" (a logistic router on the
edge model's penultimate features read from the interpreter: the shipped models do not
export them, so it measures what a richer edge output would give) and test-time
augmentation (the mean softmax over the image and four one-pixel shifts: 5 invokes).

C. then sets every model and method side by side: the single max-softmax threshold, the
score `edge-infer calibrate` would pick, per-class thresholds, the threshold certified by
`calibrate --risk` (its own target: the cloud's accuracy minus --tolerance), and the
bounds; with each model's validation gain over the reference model, from a paired
bootstrap that resamples the same inputs for both models. The PNG draws the test curves.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_infer.calibration.compare import Split, calibrate_arrays, evaluate_score
from edge_infer.calibration.curves import bootstrap_kept_difference, kept_share_at
from edge_infer.calibration.guarantee import EXACT_SCORES
from edge_infer.calibration.perclass import ClassData, fit_class_thresholds
from edge_infer.calibration.data import cloud_predictions_from_file, cloud_predictions_from_model, load_data
from edge_infer.calibration.fitting import (
    DEFAULT_ROUTER_FEATURES, RouterTraining, fit_router_arrays, fold_indices, router_labels,
)
from edge_infer.modelcard import load_card, verified_model_bytes
from edge_infer.scores import ScoreParams, make_scorer, router_features
from edge_infer.tools.datasets import DEFAULT_FMNIST_DIR
from edge_infer.tools.runmodel import edge_logits

EDGE_CARD = REPO / "models" / "fmnist-edge-v1" / "card.json"
CLOUD_CARD = REPO / "models" / "fmnist-cloud-v1" / "card.json"

TTA = "tta5[max_softmax]"

ROUTER_VARIANTS = {
    "router": RouterTraining(model="logistic", target="edge_correct"),
    "router[logistic,cloud_not_fixing]": RouterTraining(model="logistic", target="cloud_not_fixing"),
    "router[mlp16,edge_correct]": RouterTraining(model="mlp", hidden=16, target="edge_correct", l2=1e-2, steps=600),
    "router[mlp16,cloud_not_fixing]": RouterTraining(model="mlp", hidden=16, target="cloud_not_fixing", l2=1e-2,
                                                     steps=600),
}


def edge_embeddings(card, images: np.ndarray) -> np.ndarray | None:
    """The edge model's penultimate (global average pooling) output, dequantized; None if absent."""
    import warnings

    from edge_infer.preprocess import Preprocessor
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = Interpreter(model_content=verified_model_bytes(card), experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    cands = [t for t in it.get_tensor_details()
             if "global_average_pooling" in t["name"] and len(t["shape"]) == 2 and t["shape"][0] == 1]
    if not cands:
        return None
    emb = cands[0]
    scale, zp = emb["quantization"]
    pre = Preprocessor(card.input)
    inp = it.get_input_details()[0]["index"]
    out = np.empty((len(images), emb["shape"][1]), np.float32)
    for i, im in enumerate(images):
        it.set_tensor(inp, pre.to_tensor(im))
        it.invoke()
        out[i] = (it.get_tensor(emb["index"])[0].astype(np.float32) - zp) * (scale or 1.0)
    return out


def cross_fitted(features_val: np.ndarray, features_test: np.ndarray, y: np.ndarray, cfg: RouterTraining,
                 folds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    oof = np.empty(len(y))
    for part in fold_indices(len(y), folds, seed):
        train = np.ones(len(y), bool)
        train[part] = False
        oof[part] = fit_router_arrays(features_val[train], y[train], cfg).predict(features_val[part])
    return oof, fit_router_arrays(features_val, y, cfg).predict(features_test)


def tta_logits(card, images: np.ndarray) -> np.ndarray:
    """The card's model run as a views card would run it (device/views.py): the image and its four
    1-pixel shifts, the log of their mean softmax (5 invokes per input)."""
    from dataclasses import replace

    from edge_infer.views import View
    views = (View(), View(0, 1), View(0, -1), View(1, 0), View(-1, 0))
    return edge_logits(replace(card, input=replace(card.input, views=views)), images, progress=False,
                       label="edge tta")


def pp(x: float | None) -> str:
    return "   -  " if x is None else f"{x * 100:5.1f}%"


def ci(point: float | None, d) -> str:
    """The point estimate with the paired bootstrap's 95% interval."""
    if d is None or point is None:
        return "-"
    return f"{point * 100:+5.1f} [{d.low * 100:+5.1f},{d.high * 100:+5.1f}]"


@dataclass
class ModelRun:
    """One edge model measured: its splits, calibrate's result, every score's values and curves."""
    card: Any
    val: Split
    test: Split
    cal: Any                                   # edge_infer.calibration.compare.Calibration
    results: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)         # score -> test curve
    values: dict[str, np.ndarray] = field(default_factory=dict)  # score -> test values
    val_values: dict[str, np.ndarray] = field(default_factory=dict)
    val_edge_ok: dict[str, np.ndarray] = field(default_factory=dict)   # score -> val edge answers (TTA: its own)
    test_edge_ok: dict[str, np.ndarray] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    per_class: Any = None                      # ClassThresholdFit on max_softmax, mode "on"
    certified: Any = None                      # Calibration at --risk
    seconds: dict[str, float] = field(default_factory=dict)
    name: str = ""                             # model id, made unique when two runs share one


def default_edge_cards() -> list[Path]:
    """The shipped CPU edge models (fmnist-edge-v<N>), oldest first, each with its test-time views
    cards (card_views<N>.json); not the -trt / -edgetpu builds."""
    found = [d for d in (REPO / "models").glob("fmnist-edge-v*") if re.fullmatch(r"fmnist-edge-v\d+", d.name)]
    cards: list[Path] = []
    for d in sorted(found, key=lambda d: int(d.name.rsplit("v", 1)[1])):
        if (d / "card.json").is_file():
            cards += [d / "card.json", *sorted(d.glob("card_views*.json"))]
    return cards


def measure_model(card, val_set, test_set, cloud: dict[str, np.ndarray], args: argparse.Namespace) -> ModelRun:
    t0 = time.monotonic()
    logits = {"val": edge_logits(card, val_set.images, progress=False, label="edge val"),
              "test": edge_logits(card, test_set.images, progress=False, label="edge test")}
    t_edge = time.monotonic() - t0
    val = Split(logits["val"], val_set.labels, cloud["val"])
    test = Split(logits["test"], test_set.labels, cloud["test"])

    t0 = time.monotonic()
    cal = calibrate_arrays(val, test, router_cfg=ROUTER_VARIANTS["router"], folds=args.folds, seed=args.seed,
                           resamples=args.resamples)
    run = ModelRun(card, val, test, cal, results=dict(cal.results),
                   curves={k: v["test"] for k, v in cal.curves.items()},
                   values={k: v["test"] for k, v in cal.values.items()},
                   val_values={k: v["val"] for k, v in cal.values.items()})
    run.kinds = dict.fromkeys(run.results, "deployable")
    for name, cfg in ROUTER_VARIANTS.items():
        if name == "router":
            continue
        c = calibrate_arrays(val, test, scores=("router",), router_cfg=cfg, folds=args.folds, seed=args.seed)
        if "router" in c.results:
            r = c.results["router"]
            run.results[name] = r.__class__(**{**r.__dict__, "score": name})
            run.values[name], run.curves[name], run.kinds[name] = c.values["router"]["test"], \
                c.curves["router"]["test"], "deployable"
            run.val_values[name] = c.values["router"]["val"]
    for name in run.results:
        run.val_edge_ok[name], run.test_edge_ok[name] = val.edge_ok, test.edge_ok

    # what calibrate's two other ways of setting the threshold make of this model
    single = cal.results["max_softmax"]
    run.per_class = fit_class_thresholds(
        "max_softmax", ClassData(run.val_values["max_softmax"], val.logits.argmax(1), val.edge_ok, val.cloud_ok),
        ClassData(run.values["max_softmax"], test.logits.argmax(1), test.edge_ok, test.cloud_ok), cal.target,
        test.logits.shape[1], single.val, single.test, mode="on", folds=args.folds, seed=args.seed,
        resamples=args.resamples)
    run.certified = calibrate_arrays(val, test, scores=EXACT_SCORES, folds=args.folds, seed=args.seed,
                                     resamples=0, tolerance=args.tolerance, risk=args.risk)
    t_cal = time.monotonic() - t0

    def add_bound(name: str, sv: np.ndarray, st: np.ndarray, v: Split, t: Split, kind: str) -> None:
        res, _, ct = evaluate_score(name, sv, st, v.edge_ok, v.cloud_ok, t.edge_ok, t.cloud_ok,
                                    cal.target, cal.test_target_accuracy)
        run.results[name], run.values[name], run.curves[name], run.kinds[name] = res, st, ct, kind
        run.val_values[name], run.val_edge_ok[name], run.test_edge_ok[name] = sv, v.edge_ok, t.edge_ok

    # the bounds run the model once per input; a views card is the TTA bound deployed
    bounds = not args.no_bounds and not card.input.views
    if bounds:
        t0 = time.monotonic()
        ev = edge_embeddings(card, val_set.images)
        et = edge_embeddings(card, test_set.images)
        if ev is not None and et is not None:
            fv = np.concatenate([ev, router_features(val.logits, DEFAULT_ROUTER_FEATURES, cal.temperature)], axis=1)
            ft = np.concatenate([et, router_features(test.logits, DEFAULT_ROUTER_FEATURES, cal.temperature)], axis=1)
            for tgt in ("edge_correct", "cloud_not_fixing"):
                y = router_labels(val.edge_ok, val.cloud_ok, tgt)
                oof, st = cross_fitted(fv, ft, y, RouterTraining(model="logistic", target=tgt, l2=1e-2),
                                       args.folds, args.seed)
                add_bound(f"embedding-router[{tgt}]", oof, st, val, test, "needs a model exporting embeddings")
            run.notes["embedding"] = (f"{ev.shape[1]}-d penultimate features + logit features "
                                      f"({time.monotonic() - t0:.1f}s)")
        else:
            run.notes["embedding"] = "unavailable (no ai-edge-litert or no pooling tensor)"
    if bounds:
        t0 = time.monotonic()
        tv = Split(tta_logits(card, val_set.images), val.labels, val.cloud_pred)
        tt = Split(tta_logits(card, test_set.images), test.labels, test.cloud_pred)
        f = make_scorer("max_softmax", ScoreParams())
        add_bound(TTA, f(tv.logits), f(tt.logits), tv, tt, "needs 5 invokes per input")
        run.notes["tta"] = (f"mean softmax over the image and 4 one-pixel shifts; its own edge accuracy "
                            f"val {tv.edge_ok.mean():.4f} test {tt.edge_ok.mean():.4f} ({time.monotonic() - t0:.1f}s)")
    run.seconds = {"edge": t_edge, "calibration": t_cal}
    return run


def print_detail(run: ModelRun, args: argparse.Namespace) -> dict[str, Any]:
    """Sections A and B for one model; returns its JSON record."""
    cal, val, test, results, curves = run.cal, run.val, run.test, run.results, run.curves
    ca = cal.cloud_accuracy["test"]
    # TTA changes the edge answers too, so this bootstrap (one model's answers) leaves it out
    same_edge = {k: v for k, v in run.values.items() if k != TTA}
    d0 = bootstrap_kept_difference(same_edge, test.edge_ok, test.cloud_ok, resamples=args.resamples, seed=args.seed)
    d5 = bootstrap_kept_difference(same_edge, test.edge_ok, test.cloud_ok, resamples=args.resamples, seed=args.seed,
                                   accuracy_offset=0.005)
    ref = results["max_softmax"]
    val_gain = bootstrap_kept_difference({k: v for k, v in run.val_values.items() if k != TTA},
                                         val.edge_ok, val.cloud_ok, resamples=args.resamples, seed=args.seed)

    print(f"=== edge {run.name} (device path, {run.seconds['edge']:.1f}s for {len(val) + len(test):,} images): "
          f"val {cal.edge_accuracy['val']:.4f}  test {cal.edge_accuracy['test']:.4f}")
    e, c = test.edge_ok, test.cloud_ok
    print(f"test: the cloud fixes {(~e & c).mean():.2%} of inputs, breaks {(e & ~c).mean():.2%}, both wrong "
          f"{(~e & ~c).mean():.2%}; temperature fitted on val {cal.temperature:.3f}")
    print()
    print("A. the honest procedure: threshold chosen on val to reach the cloud's val accuracy "
          f"({cal.target.value:.4f}), applied to test")
    head = (f"{'score':<36} {'val kept':>8} {'test kept':>9} {'test acc':>8} {'- cloud':>8} {'vs max_softmax':>14} "
            f"{'val gain, 95% CI (bootstrap)':>30}")
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        g = val_gain.get(name)
        tag = "" if run.kinds[name] == "deployable" else f"  ({run.kinds[name]})"
        if r.test is None:
            print(f"{name:<36} {pp(None):>8}  (the target is not reached on validation){tag}")
            continue
        print(f"{name:<36} {pp(r.val.kept_share):>8} {pp(r.test.kept_share):>9} {r.test.accuracy:>8.4f} "
              f"{r.test.accuracy - ca:>+8.4f} {(r.test.kept_share - ref.test.kept_share) * 100:>+12.1f}pp "
              f"{ci(r.val.kept_share - ref.val.kept_share, g) if g else '':>30}{tag}")
    print()
    print(f"B. reading the test curves (as the reference experiment did): share kept at the cloud's test accuracy "
          f"({ca:.4f}) and just below it")
    head = (f"{'score':<36} {'@cloud':>7} {'vs max_softmax, 95% CI':>24} {'@-0.25pp':>8} {'@-0.5pp':>8} "
            f"{'vs max_softmax @-0.5pp':>24} {'best test acc @ offload':>24} {'AUC':>6}")
    print(head)
    print("-" * len(head))
    rows = []
    r0, r5 = kept_share_at(curves["max_softmax"], ca), kept_share_at(curves["max_softmax"], ca - 0.005)
    for name, r in results.items():
        cv = curves[name]
        k0, k25, k5 = (kept_share_at(cv, ca - d) for d in (0.0, 0.0025, 0.005))
        a, b = (None, None) if name == "max_softmax" else (d0.get(name), d5.get(name))

        def fmt(d, point, nm=name) -> str:
            return "reference" if nm == "max_softmax" else (ci(point, d) if d else "(own edge answers)")
        print(f"{name:<36} {pp(k0):>7} {fmt(a, None if k0 is None else k0 - r0):>24} {pp(k25):>8} {pp(k5):>8} "
              f"{fmt(b, None if k5 is None else k5 - r5):>24} "
              f"{r.test_best.accuracy:>10.4f} @ {r.test_best.offloaded_share:>5.1%} off {r.test_auc or float('nan'):>6.3f}")
        rows.append(r.to_dict() | {"kind": run.kinds[name],
                                   "test_curve_kept": {"at_cloud": k0, "at_cloud_minus_0.25pp": k25,
                                                       "at_cloud_minus_0.5pp": k5},
                                   "vs_max_softmax_at_cloud": a.to_dict() if a else None,
                                   "vs_max_softmax_at_cloud_minus_0.5pp": b.to_dict() if b else None,
                                   "validation_gain": val_gain[name].to_dict() if name in val_gain else None})
    oc = cal.oracle_curves["test"]
    ok0, ok25, ok5 = (kept_share_at(oc, ca - d) for d in (0.0, 0.0025, 0.005))
    print(f"{'oracle router (upper bound)':<36} {pp(ok0):>7} {'':>24} {pp(ok25):>8} {pp(ok5):>8} {'':>24} "
          f"{cal.oracle.test_best.accuracy:>10.4f} @ {cal.oracle.test_best.offloaded_share:>5.1%} off")
    for k, v in run.notes.items():
        print(f"{k}: {v}")
    print()
    return {"edge": run.name, "edge_accuracy": cal.edge_accuracy, "temperature": cal.temperature,
            "scores": rows, "oracle": cal.oracle.to_dict() | {"test_curve_kept": {
                "at_cloud": ok0, "at_cloud_minus_0.25pp": ok25, "at_cloud_minus_0.5pp": ok5}},
            "per_class_thresholds": run.per_class.to_dict(list(run.card.labels)),
            "certified": {k: r.to_dict(run.certified.target) for k, r in run.certified.results.items()},
            "certified_choice": run.certified.chosen, "notes": run.notes, "seconds": run.seconds}


@dataclass(frozen=True)
class Row:
    """One line of the side-by-side table: a model and a way of routing its answers."""
    model: str
    method: str
    kind: str                    # deployable, or what it would need
    val_kept: float | None       # at the val-chosen threshold
    test_kept: float | None
    test_accuracy: float | None
    curve_at_cloud: float | None     # the test curve read at the cloud's test accuracy
    curve_at_minus_025: float | None
    edge_test_accuracy: float
    auc: float | None
    gain_key: str | None = None  # the score whose values enter the cross-model bootstrap
    cloud_target: bool = True    # its threshold was chosen for the cloud's accuracy (not a tolerance below)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("gain_key", "cloud_target")}


def model_rows(run: ModelRun) -> tuple[list[Row], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """One model's rows of the side-by-side table, and per bootstrap key its validation values
    and edge answers."""
    rows: list[Row] = []
    series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ca = run.cal.cloud_accuracy["test"]

    def add(method: str, name: str, kind: str, res=None, at_cloud: bool = True) -> None:
        r = run.results[name] if res is None else res
        key = f"{run.name} {method}"
        curve = run.curves[name]
        rows.append(Row(run.name, method, kind, r.val.kept_share if r.val else None,
                        r.test.kept_share if r.test else None, r.test.accuracy if r.test else None,
                        kept_share_at(curve, ca) if at_cloud else None,
                        kept_share_at(curve, ca - 0.0025) if at_cloud else None,
                        float(run.test_edge_ok[name].mean()), r.test_auc, key if at_cloud else None, at_cloud))
        if at_cloud:
            series[key] = (run.val_values[name], run.val_edge_ok[name])

    add("max_softmax", "max_softmax", "deployable")
    chosen = run.cal.chosen
    if chosen and chosen != "max_softmax":
        add(f"calibrate's pick ({chosen})", chosen, "deployable")
    pc = run.per_class
    if pc.test is not None:
        rows.append(Row(run.name, "per-class thresholds (max_softmax)", "deployable",
                        pc.val_cross_fitted.kept_share if pc.val_cross_fitted else None, pc.test.kept_share,
                        pc.test.accuracy, None, None, float(run.test.edge_ok.mean()), None))
    cert_name = run.certified.chosen
    if cert_name is not None:
        add(f"certified ({cert_name}, risk {run.certified.risk:g}, -{run.certified.target.tolerance * 100:.2f}pp)",
            cert_name, "deployable", res=run.certified.results[cert_name], at_cloud=False)
    if TTA in run.results:
        add(TTA, TTA, run.kinds[TTA])
    emb = [k for k in run.results if k.startswith("embedding-router")]
    if emb:
        best = max(emb, key=lambda k: run.results[k].val.kept_share if run.results[k].val else -1)
        add(best, best, run.kinds[best])
    return rows, series


def print_side_by_side(runs: list[ModelRun], args: argparse.Namespace) -> dict[str, Any]:
    rows: list[Row] = []
    series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for run in runs:
        r, sv = model_rows(run)
        rows += r
        series |= sv
    ref_run = runs[0]
    ref_key = f"{ref_run.name} max_softmax"
    val_c = ref_run.val.cloud_ok
    gains = bootstrap_kept_difference({k: v for k, (v, _) in series.items()}, {k: e for k, (_, e) in series.items()},
                                      val_c, reference=ref_key, resamples=args.resamples, seed=args.seed)
    ca = ref_run.cal.cloud_accuracy
    ref_val = rows[0].val_kept          # the reference model's max_softmax
    print(f"C. every model and method side by side (cloud accuracy val {ca['val']:.4f}, test {ca['test']:.4f}); "
          "kept at the val-chosen threshold, and the test curve read at the cloud's test accuracy")
    head = (f"{'model':<26} {'method':<48} {'val kept':>8} {'test kept':>9} {'- cloud':>8} {'curve@cloud':>11} "
            f"{'@-0.25pp':>8} {'edge acc':>8} {'AUC':>6} {'val gain vs ' + ref_key + ', 95% CI':>40}")
    print(head)
    print("-" * len(head))
    for r in rows:
        g = gains.get(r.gain_key) if r.gain_key else None
        gap = "" if r.test_accuracy is None else f"{r.test_accuracy - ca['test']:+8.4f}"
        tag = "" if r.kind == "deployable" else f"  ({r.kind})"
        print(f"{r.model:<26} {r.method:<48} {pp(r.val_kept):>8} {pp(r.test_kept):>9} {gap:>8} "
              f"{pp(r.curve_at_cloud):>11} {pp(r.curve_at_minus_025):>8} {r.edge_test_accuracy:>8.4f} "
              f"{'-' if r.auc is None else f'{r.auc:.3f}':>6} "
              f"{ci(None if r.val_kept is None or ref_val is None else r.val_kept - ref_val, g) if g else '':>40}{tag}")
    for run in runs:
        ok = kept_share_at(run.cal.oracle_curves["test"], ca["test"])
        print(f"{run.name:<26} {'oracle router (upper bound)':<48} {'':>8} {'':>9} {'':>8} {pp(ok):>11}")
        pc = run.per_class
        if pc.gain is not None:
            print(f"{'':<26}   per-class thresholds vs the single threshold on val: "
                  f"{ci(pc.gain.mean, pc.gain)} pp ({'beyond' if pc.gain.significant else 'within'} noise)")
    # chosen as a deployment would choose: on validation; test only reports what that choice does
    candidates = [r for r in rows if r.kind == "deployable" and r.cloud_target and r.val_kept is not None
                  and r.test_kept is not None]
    best = max(candidates, key=lambda r: r.val_kept, default=None)
    if best is not None:
        held = best.test_accuracy is not None and best.test_accuracy >= ca["test"]
        met = held and best.test_kept >= 0.80
        print(f"goal (#16: >= 80% kept at the cloud's accuracy, chosen on val, measured on test, deployable): the "
              f"method keeping the most on val is {best.model} {best.method}: val {best.val_kept:.1%}, test "
              f"{best.test_kept:.1%} at {best.test_accuracy:.4f} ({'at least' if held else 'below'} the cloud's "
              f"{ca['test']:.4f}) -> {'MET' if met else 'NOT MET'}")
    print()
    return {"reference": ref_key, "rows": [r.to_dict() | {
        "validation_gain_vs_reference": gains[r.gain_key].to_dict() if r.gain_key in gains else None} for r in rows],
        "goal_best": None if best is None else best.to_dict()}


def plot_side_by_side(runs: list[ModelRun], path: Path) -> str:
    """Hybrid test accuracy against the share kept on the device, every model's max-softmax and
    TTA curves, the val-chosen points, the cloud's accuracy; the right panel zooms in on it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "no PNG: matplotlib is not installed (pip install 'edge-infer[calibrate]')"
    fig = Figure(figsize=(13, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    ca = runs[0].cal.cloud_accuracy["test"]
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    for ax, (lo, hi), title in ((axes[0], (0.85, 0.96), "test split"),
                                (axes[1], (ca - 0.006, ca + 0.003), "zoom on the cloud's accuracy")):
        for i, run in enumerate(runs):
            col = colors[i % len(colors)]
            styles = {"max_softmax": "-", TTA: "--"}
            if run.cal.chosen not in (None, "max_softmax"):
                styles[run.cal.chosen] = "-."
            for name, ls in styles.items():
                if name not in run.curves:
                    continue
                c = run.curves[name]
                ax.plot((1 - c.offloaded_share) * 100, c.accuracy * 100, color=col, ls=ls, lw=1.2,
                        label=f"{run.name} {name}")
            r = run.results["max_softmax"].test
            if r is not None:
                ax.plot([r.kept_share * 100], [r.accuracy * 100], "o", mfc="none", mew=2, color=col)
            oc = run.cal.oracle_curves["test"]
            if i == 0:
                ax.plot((1 - oc.offloaded_share) * 100, oc.accuracy * 100, color="gray", ls=":", lw=1,
                        label=f"{run.name} oracle router")
        ax.axhline(ca * 100, color="black", ls="--", lw=1, label=f"cloud only {ca:.2%}")
        ax.axvline(80, color="tab:red", ls=":", lw=1, label="goal: 80% kept")
        ax.set_xlim(40, 100)
        ax.set_ylim(lo * 100, hi * 100)
        ax.set_xlabel("inputs kept on the device (%)")
        ax.set_ylabel("hybrid accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=7)
    fig.suptitle("bench/offload_curve.py: hybrid accuracy vs share kept (circles: threshold chosen on val)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return f"wrote {path}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edge-card", type=Path, action="append", default=None,
                    help="an edge model's card; repeat to compare several (the first is the reference; default: "
                         "every shipped models/fmnist-edge-v<N>/card.json)")
    ap.add_argument("--cloud-card", type=Path, default=CLOUD_CARD)
    ap.add_argument("--cloud-predictions", type=Path, default=None,
                    help="use these cloud answers instead of running the cloud model")
    ap.add_argument("--data", type=Path, default=DEFAULT_FMNIST_DIR)
    ap.add_argument("--resamples", type=int, default=1000, help="paired bootstrap resamples")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--risk", type=float, default=0.05, help="the certified row's risk (calibrate --risk)")
    ap.add_argument("--tolerance", type=float, default=0.0025,
                    help="the certified row's tolerance below the cloud's accuracy (calibrate --tolerance)")
    ap.add_argument("--no-bounds", action="store_true", help="skip the embedding-router and TTA measurements")
    ap.add_argument("--out", type=Path, default=Path("out/bench-offload.json"))
    ap.add_argument("--png", type=Path, default=Path("out/bench-offload.png"))
    args = ap.parse_args()

    t_start = time.monotonic()
    paths = args.edge_card or default_edge_cards()
    if not paths:
        print("no edge model: pass --edge-card CARD", file=sys.stderr)
        return 2
    cards = [load_card(p) for p in paths]
    labels = list(cards[0].labels)
    if any(list(c.labels) != labels for c in cards):
        print("the edge models' labels differ: compare models of one task", file=sys.stderr)
        return 2
    val_set, test_set, _ = load_data(args.data, None, labels, args.seed)
    t0 = time.monotonic()
    if args.cloud_predictions:
        cloud = cloud_predictions_from_file(args.cloud_predictions, {"val": len(val_set), "test": len(test_set)},
                                            {"val": val_set.labels, "test": test_set.labels}, len(labels))
        cloud_src = str(args.cloud_predictions)
    else:
        cloud, info = cloud_predictions_from_model(args.cloud_card, {"val": val_set, "test": test_set}, 0, False)
        cloud_src = f"{info['model']} via {info['runtime']}"
    t_cloud = time.monotonic() - t0
    print(f"cloud {cloud_src}: val {(cloud['val'] == val_set.labels).mean():.4f}  "
          f"test {(cloud['test'] == test_set.labels).mean():.4f}")
    print()
    runs = [measure_model(card, val_set, test_set, cloud, args) for card in cards]
    ids = [c.model_id for c in cards]
    for i, run in enumerate(runs):
        run.name = ids[i] if ids.count(ids[i]) == 1 else f"{ids[i]}#{i + 1}"
    details = [print_detail(run, args) for run in runs]
    table = print_side_by_side(runs, args)
    print(plot_side_by_side(runs, args.png))
    t_total = time.monotonic() - t_start
    print(f"time: edge models {sum(r.seconds['edge'] for r in runs):.1f}s, cloud {t_cloud:.1f}s, calibration "
          f"{sum(r.seconds['calibration'] for r in runs):.1f}s, total {t_total:.1f}s")

    cal = runs[0].cal
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "cloud": cloud_src, "sizes": cal.sizes, "cloud_accuracy": cal.cloud_accuracy,
        "target": cal.target.to_dict(), "test_target_accuracy": cal.test_target_accuracy,
        "models": details, "side_by_side": table, "seconds": {"cloud": t_cloud, "total": t_total},
    }, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
