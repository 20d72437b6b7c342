#!/usr/bin/env python3
"""The offload curve on the shipped models, measured in one run.

    .venv/bin/python bench/offload_curve.py [--cloud-predictions models/fmnist-cloud-v1/predictions.npz]
                                            [--resamples 1000] [--out out/bench-offload.json]

Edge logits come from the device's own path (backend + Preprocessor, one image per
invoke); the cloud's answers from onnxruntime through edge_infer_cloud.CloudModel (or a
predictions file). For every score the threshold is chosen on the validation split
(5,000) to reach the cloud model's validation accuracy with the least offloading, then
applied to the untouched test split (10,000). Printed per score:

- val kept        share kept on the device on validation at the target
- test kept/acc   what that threshold does on test, and the accuracy gap to the cloud's
- curve kept      reading the test curve itself at the cloud's test accuracy (the
                  reference experiment's number: its threshold is chosen on test)
- vs max_softmax  curve kept minus max-softmax's, mean and 95% interval of a paired
                  bootstrap over test inputs (the noise of the comparison)
- best acc        the best hybrid accuracy the score reaches on test, at what offload

Router variants (logistic / MLP; target "edge answer right" / "cloud would not fix
it") are cross-fitted on validation. Two bounds frame the result: the oracle router
(offloads exactly what the cloud fixes) and an "embedding router", a logistic router
on the edge model's 64-d penultimate features read from the interpreter; the shipped
model does not export them, so it is a measurement of what a richer edge output would
give, not a deployable score.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_infer.calibration.compare import Split, calibrate_arrays, evaluate_score
from edge_infer.calibration.curves import bootstrap_kept_difference, kept_share_at
from edge_infer.calibration.data import cloud_predictions_from_file, cloud_predictions_from_model, load_data
from edge_infer.calibration.fitting import (
    DEFAULT_ROUTER_FEATURES, RouterTraining, fit_router_arrays, fold_indices, router_labels,
)
from edge_infer.modelcard import load_card, verified_model_bytes
from edge_infer.scores import router_features
from edge_infer.tools.datasets import DEFAULT_FMNIST_DIR
from edge_infer.tools.runmodel import edge_logits

EDGE_CARD = REPO / "models" / "fmnist-edge-v1" / "card.json"
CLOUD_CARD = REPO / "models" / "fmnist-cloud-v1" / "card.json"

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


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def tta_logits(card, images: np.ndarray) -> np.ndarray:
    """Log of the mean softmax over the image and its four 1-pixel shifts (5 invokes per input)."""
    from edge_infer.scores import softmax
    views = [images] + [shifted(images, dy, dx) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
    probs = np.mean([softmax(edge_logits(card, v, progress=False, label="edge tta").astype(np.float64))
                     for v in views], axis=0)
    return np.log(np.maximum(probs, 1e-12)).astype(np.float32)


def pp(x: float | None) -> str:
    return "   -  " if x is None else f"{x * 100:5.1f}%"


def ci(point: float | None, d) -> str:
    """The point estimate with the paired bootstrap's 95% interval."""
    if d is None or point is None:
        return "-"
    return f"{point * 100:+5.1f} [{d.low * 100:+5.1f},{d.high * 100:+5.1f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edge-card", type=Path, default=EDGE_CARD)
    ap.add_argument("--cloud-card", type=Path, default=CLOUD_CARD)
    ap.add_argument("--cloud-predictions", type=Path, default=None,
                    help="use these cloud answers instead of running the cloud model")
    ap.add_argument("--data", type=Path, default=DEFAULT_FMNIST_DIR)
    ap.add_argument("--resamples", type=int, default=1000, help="paired bootstrap resamples")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-bounds", action="store_true", help="skip the embedding-router and TTA measurements")
    ap.add_argument("--out", type=Path, default=Path("out/bench-offload.json"))
    args = ap.parse_args()

    t_start = time.monotonic()
    card = load_card(args.edge_card)
    val_set, test_set, _ = load_data(args.data, None, list(card.labels), args.seed)
    t0 = time.monotonic()
    logits = {"val": edge_logits(card, val_set.images, progress=False, label="edge val"),
              "test": edge_logits(card, test_set.images, progress=False, label="edge test")}
    t_edge = time.monotonic() - t0
    t0 = time.monotonic()
    if args.cloud_predictions:
        cloud = cloud_predictions_from_file(args.cloud_predictions, {"val": len(val_set), "test": len(test_set)},
                                            {"val": val_set.labels, "test": test_set.labels}, len(card.labels))
        cloud_src = str(args.cloud_predictions)
    else:
        cloud, info = cloud_predictions_from_model(args.cloud_card, {"val": val_set, "test": test_set}, 0, False)
        cloud_src = f"{info['model']} via {info['runtime']}"
    t_cloud = time.monotonic() - t0
    val = Split(logits["val"], val_set.labels, cloud["val"])
    test = Split(logits["test"], test_set.labels, cloud["test"])

    t0 = time.monotonic()
    cal = calibrate_arrays(val, test, router_cfg=ROUTER_VARIANTS["router"], folds=args.folds, seed=args.seed,
                           resamples=args.resamples)
    t_cal = time.monotonic() - t0
    results = dict(cal.results)
    curves = {k: v["test"] for k, v in cal.curves.items()}
    values = {k: v["test"] for k, v in cal.values.items()}
    val_values = {k: v["val"] for k, v in cal.values.items()}
    kinds = {k: "deployable" for k in results}
    for name, cfg in ROUTER_VARIANTS.items():
        if name == "router":
            continue
        c = calibrate_arrays(val, test, scores=("router",), router_cfg=cfg, folds=args.folds, seed=args.seed)
        if "router" in c.results:
            r = c.results["router"]
            results[name] = r.__class__(**{**r.__dict__, "score": name})
            values[name], curves[name], kinds[name] = c.values["router"]["test"], c.curves["router"]["test"], \
                "deployable"
            val_values[name] = c.values["router"]["val"]

    def add_bound(name: str, sv: np.ndarray, st: np.ndarray, v: Split, t: Split, kind: str) -> None:
        res, _, ct = evaluate_score(name, sv, st, v.edge_ok, v.cloud_ok, t.edge_ok, t.cloud_ok,
                                    cal.target, cal.test_target_accuracy)
        results[name], values[name], curves[name], kinds[name] = res, st, ct, kind
        val_values[name] = sv

    notes = {}
    if not args.no_bounds:
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
            notes["embedding"] = f"{ev.shape[1]}-d penultimate features + logit features ({time.monotonic() - t0:.1f}s)"
        else:
            notes["embedding"] = "unavailable (no ai-edge-litert or no pooling tensor)"
        t0 = time.monotonic()
        tv = Split(tta_logits(card, val_set.images), val.labels, val.cloud_pred)
        tt = Split(tta_logits(card, test_set.images), test.labels, test.cloud_pred)
        from edge_infer.scores import ScoreParams, make_scorer
        f = make_scorer("max_softmax", ScoreParams())
        add_bound("tta5[max_softmax]", f(tv.logits), f(tt.logits), tv, tt, "needs 5 invokes per input")
        notes["tta"] = (f"mean softmax over the image and 4 one-pixel shifts; its own edge accuracy "
                        f"val {tv.edge_ok.mean():.4f} test {tt.edge_ok.mean():.4f} ({time.monotonic() - t0:.1f}s)")

    ca = cal.cloud_accuracy["test"]
    # TTA changes the edge answers too, so its bootstrap pairs its own correctness; skip it there
    same_edge = {k: v for k, v in values.items() if not k.startswith("tta")}
    d0 = bootstrap_kept_difference(same_edge, test.edge_ok, test.cloud_ok, resamples=args.resamples, seed=args.seed)
    d5 = bootstrap_kept_difference(same_edge, test.edge_ok, test.cloud_ok, resamples=args.resamples, seed=args.seed,
                                   accuracy_offset=0.005)
    ref = results["max_softmax"]
    val_gain = bootstrap_kept_difference({k: v for k, v in val_values.items() if not k.startswith("tta")},
                                         val.edge_ok, val.cloud_ok, resamples=args.resamples, seed=args.seed)

    print(f"edge {card.model_id} (device path, {t_edge:.1f}s for {len(val) + len(test):,} images): "
          f"val {cal.edge_accuracy['val']:.4f}  test {cal.edge_accuracy['test']:.4f}")
    print(f"cloud {cloud_src}: val {cal.cloud_accuracy['val']:.4f}  test {ca:.4f}")
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
        tag = "" if kinds[name] == "deployable" else f"  ({kinds[name]})"
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
    for name, r in results.items():
        cv = curves[name]
        k0, k25, k5 = (kept_share_at(cv, ca - d) for d in (0.0, 0.0025, 0.005))
        a, b = (None, None) if name == "max_softmax" else (d0.get(name), d5.get(name))
        r0, r5 = kept_share_at(curves["max_softmax"], ca), kept_share_at(curves["max_softmax"], ca - 0.005)

        def fmt(d, point, nm=name) -> str:
            return "reference" if nm == "max_softmax" else (ci(point, d) if d else "(own edge answers)")
        print(f"{name:<36} {pp(k0):>7} {fmt(a, None if k0 is None else k0 - r0):>24} {pp(k25):>8} {pp(k5):>8} "
              f"{fmt(b, None if k5 is None else k5 - r5):>24} "
              f"{r.test_best.accuracy:>10.4f} @ {r.test_best.offloaded_share:>5.1%} off {r.test_auc or float('nan'):>6.3f}")
        rows.append(r.to_dict() | {"kind": kinds[name], "test_curve_kept": {"at_cloud": k0, "at_cloud_minus_0.25pp": k25,
                                                                          "at_cloud_minus_0.5pp": k5},
                                   "vs_max_softmax_at_cloud": a.to_dict() if a else None,
                                   "vs_max_softmax_at_cloud_minus_0.5pp": b.to_dict() if b else None,
                                   "validation_gain": val_gain[name].to_dict() if name in val_gain else None})
    oc = cal.oracle_curves["test"]
    ok0, ok25, ok5 = (kept_share_at(oc, ca - d) for d in (0.0, 0.0025, 0.005))
    print(f"{'oracle router (upper bound)':<36} {pp(ok0):>7} {'':>24} {pp(ok25):>8} {pp(ok5):>8} {'':>24} "
          f"{cal.oracle.test_best.accuracy:>10.4f} @ {cal.oracle.test_best.offloaded_share:>5.1%} off")
    print()
    deployable = {k: v for k, v in results.items() if kinds[k] == "deployable"}
    met = {k: r for k, r in deployable.items() if r.test.accuracy >= ca}
    best = max(met.values() or deployable.values(), key=lambda r: r.test.kept_share)
    gain = best.test.kept_share - ref.test.kept_share
    g = val_gain.get(best.score)
    print(f"A: of the deployable scores whose val-chosen threshold also reaches the cloud's accuracy on test, "
          f"{best.score} keeps the most: {best.test.kept_share:.1%} vs max_softmax {ref.test.kept_share:.1%} "
          f"({gain * 100:+.1f} pp)" + (f"; on validation {(best.val.kept_share - ref.val.kept_share) * 100:+.1f} pp, "
                                       f"95% CI [{g.low * 100:+.1f}, "
                                       f"{g.high * 100:+.1f}]: {'beyond' if g.significant else 'within'} noise"
                                       if g else ""))
    missed = [k for k in deployable if k not in met]
    if missed:
        print(f"   (on test {', '.join(missed)} fall below the cloud's accuracy, so their kept share is not "
              "at the same accuracy)")
    k_ref = kept_share_at(curves["max_softmax"], ca)
    best_b = max(deployable, key=lambda k: kept_share_at(curves[k], ca) or 0)
    print(f"B: at the cloud's test accuracy max_softmax keeps {k_ref:.1%}, the best deployable ({best_b}) "
          f"{kept_share_at(curves[best_b], ca):.1%}, the oracle router {ok0:.1%}")
    print(f"goal (+10 pp kept vs max_softmax at the same accuracy): {'MET' if gain >= 0.10 else 'NOT MET'}")
    for k, v in notes.items():
        print(f"{k}: {v}")
    t_total = time.monotonic() - t_start
    print(f"time: edge inference {t_edge:.1f}s, cloud {t_cloud:.1f}s, calibration {t_cal:.1f}s, total {t_total:.1f}s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "edge": card.model_id, "cloud": cloud_src, "sizes": cal.sizes,
        "edge_accuracy": cal.edge_accuracy, "cloud_accuracy": cal.cloud_accuracy, "temperature": cal.temperature,
        "target": cal.target.to_dict(), "test_target_accuracy": cal.test_target_accuracy,
        "scores": rows, "oracle": cal.oracle.to_dict() | {"test_curve_kept": {
            "at_cloud": ok0, "at_cloud_minus_0.25pp": ok25, "at_cloud_minus_0.5pp": ok5}},
        "notes": notes, "best_deployable_at_cloud_accuracy": best.score, "gain_pp_test": gain * 100,
        "seconds": {"edge": t_edge, "cloud": t_cloud, "calibration": t_cal, "total": t_total},
    }, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
