"""``edge-infer calibrate``: choose the offload score and threshold from labelled data.

Runs the edge model through the same backend and preprocessing code the device
uses, gets the cloud model's answers (by running it, or from a predictions
file), fits the temperature and the router on the validation split, chooses a
threshold per score on validation for the target, reports every score on the
untouched test split, and writes:

- ``policy.toml``   the ``[policy]`` snippet for the device (score, threshold,
                    temperature, router_file, class_thresholds when chosen)
- ``router.json``   the router, when the router is the chosen score
- ``calibration.json``  the full report
- ``offload_curve.png`` hybrid accuracy against the share offloaded, per score

The maths lives in the pure modules of :mod:`edge_infer.calibration`; this module is the
command line.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ..modelcard import ModelCardError, load_card
from ..router import FEATURES, ROUTER_TARGETS, save_router
from ..scores import SCORES
from ..tools.datasets import DEFAULT_FMNIST_DIR, DatasetError
from ..tools.runmodel import edge_logits
from . import CalibrateError
from .compare import Split, calibrate_arrays
from .data import check_labels, cloud_predictions_from_file, cloud_predictions_from_model, load_data
from .fitting import DEFAULT_ROUTER_FEATURES, ROUTER_MODELS, RouterTraining
from .guarantee import smallest_certifiable_bound
from .perclass import CLASS_THRESHOLD_MODES, ClassData, ClassThresholdFit, apply_thresholds, fit_class_thresholds
from .plot import PLOT_EXTRA, PLOT_FILE, plot_offload_curves
from .report import (
    POLICY_FILE, REPORT_FILE, ROUTER_FILE, build_report, class_threshold_lines, policy_snippet, score_table,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- arguments

def _share(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1 (a share, e.g. 0.3 for 30%)")
    return v


def _risk(text: str) -> float:
    v = float(text)
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1 (e.g. 0.05 for 95% confidence)")
    return v


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    if p.description is None and __doc__:
        p.description = __doc__.split("\n\n")[0]
    m = p.add_argument_group("models")
    m.add_argument("--edge-card", type=Path, required=True, help="the edge model's card.json")
    cloud = m.add_mutually_exclusive_group(required=True)
    cloud.add_argument("--cloud-card", type=Path, help="the cloud model's card.json (run with onnxruntime; "
                                                       "needs the 'cloud' extra)")
    cloud.add_argument("--cloud-predictions", type=Path,
                       help="the cloud model's answers instead: .npz with val_logits/test_logits (or "
                            "val_predictions/test_predictions), or .npy with validation then test rows")
    m.add_argument("--backend", default="tflite-cpu", help="edge backend (default: tflite-cpu)")
    m.add_argument("--runtime", default="auto", help="TFLite runtime: auto, ai-edge-litert or tflite-runtime")
    m.add_argument("--cloud-threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    d = p.add_argument_group("data")
    d.add_argument("--data", type=Path, default=DEFAULT_FMNIST_DIR,
                   help="labelled validation data: a Fashion-MNIST IDX folder (gives both the val and the test "
                        "split), an .npz (images, labels), or a folder with one sub-folder per class "
                        "(default: %(default)s)")
    d.add_argument("--test-data", type=Path, default=None,
                   help="labelled test data, never used for choosing (same forms; without it a non-IDX --data "
                        "is split in half, seeded)")
    d.add_argument("--limit", type=int, default=None, help="use only the first N images of each split "
                                                          "(a quick look, not a calibration)")
    t = p.add_argument_group("target (one of)")
    tg = t.add_mutually_exclusive_group()
    tg.add_argument("--target", choices=["cloud"], default="cloud",
                    help="reach the cloud model's validation accuracy with the least offloading (default)")
    t.add_argument("--tolerance", type=_share, default=0.0, metavar="POINTS",
                   help="with --target cloud: accept this much below the cloud's accuracy, in accuracy points "
                        "(0.0025 = 0.25 pp); near the top the curve is flat, so a little keeps much more local")
    tg.add_argument("--target-accuracy", type=_share, default=None, metavar="ACC",
                    help="reach this hybrid accuracy (e.g. 0.92) with the least offloading")
    tg.add_argument("--max-offload-share", type=_share, default=None, metavar="SHARE",
                    help="offload at most this share of inputs (a bandwidth/cost budget), best accuracy within it")
    t.add_argument("--risk", type=_risk, default=None, metavar="RISK",
                   help="certify the threshold instead of reading it off the validation curve: with probability "
                        ">= 1 - RISK over the draw of the validation data, the target holds on new inputs from "
                        "the same distribution (e.g. 0.05; docs/calibration.md). With --target cloud it needs "
                        "--tolerance > 0")
    s = p.add_argument_group("scores")
    s.add_argument("--scores", default=",".join(SCORES),
                   help="comma-separated scores to evaluate (default: all: %(default)s)")
    s.add_argument("--pick", choices=SCORES, default=None,
                   help="write the snippet for this score instead of the best one (e.g. when the devices "
                        "do not support the router yet)")
    s.add_argument("--router-model", choices=ROUTER_MODELS, default="logistic")
    s.add_argument("--router-target", choices=ROUTER_TARGETS, default="edge_correct",
                   help="what the router predicts: the edge answer is right (default), or offloading would "
                        "not fix it")
    s.add_argument("--router-features", default=",".join(DEFAULT_ROUTER_FEATURES),
                   help=f"comma-separated router inputs from: {', '.join(FEATURES)} (default: %(default)s)")
    s.add_argument("--router-hidden", type=int, default=16, help="hidden units of the MLP router")
    s.add_argument("--folds", type=int, default=5, help="cross-fitting folds for the router and the per-class "
                                                         "thresholds (default: 5)")
    s.add_argument("--class-thresholds", choices=CLASS_THRESHOLD_MODES, default="auto",
                   help="a threshold per predicted class on the chosen score: auto writes them when they keep more "
                        "than the single threshold on validation beyond noise; on always; off never "
                        "(default: %(default)s; not with --risk)")
    s.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("calibration"),
                   help="output folder for policy.toml, calibration.json, offload_curve.png, router.json "
                        "(default: %(default)s)")
    o.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    o.add_argument("--no-progress", action="store_true")


# ----------------------------------------------------------------------------- the command

def _target(args: argparse.Namespace) -> tuple[str, float | None]:
    if getattr(args, "target_accuracy", None) is not None:
        return "accuracy", args.target_accuracy
    if getattr(args, "max_offload_share", None) is not None:
        return "max_offload_share", args.max_offload_share
    return "cloud", None


def run_calibrate(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (CalibrateError, ModelCardError, DatasetError) as exc:
        print(f"edge-infer calibrate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:   # an unwritable --out, a file that vanished while reading
        print(f"edge-infer calibrate: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from ..backends import BackendError
        if isinstance(exc, BackendError):
            print(f"edge-infer calibrate: {exc}", file=sys.stderr)
            return 2
        raise


def _run(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    progress = not args.no_progress
    scores = tuple(s.strip() for s in args.scores.split(",") if s.strip())
    bad = [s for s in scores if s not in SCORES]
    if bad or not scores:
        raise CalibrateError(f"--scores: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(SCORES)}")
    if args.pick and args.pick not in scores:
        raise CalibrateError(f"--pick {args.pick} is not among --scores {','.join(scores)}")
    features = tuple(f.strip() for f in args.router_features.split(",") if f.strip())
    bad = [f for f in features if f not in FEATURES]
    if bad or not features:
        raise CalibrateError(f"--router-features: unknown {', '.join(bad) or '(none given)'}; "
                             f"choose from {', '.join(FEATURES)}")
    if args.folds < 2:
        raise CalibrateError("--folds must be at least 2")
    if args.tolerance and (args.target_accuracy is not None or args.max_offload_share is not None):
        raise CalibrateError("--tolerance applies to --target cloud only")
    risk = getattr(args, "risk", None)
    if risk is not None and args.max_offload_share is not None:
        raise CalibrateError("--risk applies to an accuracy target (--target cloud, --target-accuracy), not to "
                             "--max-offload-share")
    class_mode = getattr(args, "class_thresholds", "auto")
    if class_mode == "on" and risk is not None:
        raise CalibrateError("--class-thresholds on cannot be combined with --risk: the guarantee covers one "
                             "threshold per score (docs/calibration.md)")
    if class_mode == "on" and args.pick == "router":
        raise CalibrateError("--class-thresholds on: not for the router score (it already takes the predicted "
                             "class as an input); --pick another score")
    if args.limit is not None and args.limit < 2:
        raise CalibrateError("--limit must be at least 2")
    if not args.no_plot:   # fail before minutes of work, not after
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            raise CalibrateError(f"the plot needs matplotlib: pip install 'edge-infer[{PLOT_EXTRA}]', or pass "
                                 "--no-plot")

    card = load_card(args.edge_card)
    labels = list(card.labels)
    if args.cloud_card is not None and list(load_card(args.cloud_card).labels) != labels:
        raise CalibrateError(f"{args.cloud_card}: the cloud card's labels differ from the edge card's "
                             f"({args.edge_card}); both models must use the same classes in the same order")
    t0 = time.monotonic()
    val_set, test_set, split_note = load_data(args.data, args.test_data, labels, args.seed)
    full_sizes = {"val": len(val_set), "test": len(test_set)}
    full_labels = {"val": val_set.labels, "test": test_set.labels}
    if args.limit:
        val_set, test_set = val_set.head(args.limit), test_set.head(args.limit)
    check_labels(val_set, len(labels), "validation data")
    check_labels(test_set, len(labels), "test data")
    timings["load_data"] = time.monotonic() - t0
    log.info("validation %d images, test %d images (%s)", len(val_set), len(test_set), split_note)

    t0 = time.monotonic()
    logits = {name: edge_logits(card, ds.images, args.backend, args.runtime, progress, f"edge {name}")
              for name, ds in (("val", val_set), ("test", test_set))}
    timings["edge_inference"] = time.monotonic() - t0

    t0 = time.monotonic()
    if args.cloud_card is not None:
        cloud_pred, cloud_info = cloud_predictions_from_model(
            args.cloud_card, {"val": val_set, "test": test_set}, args.cloud_threads, progress)
    else:
        full = cloud_predictions_from_file(args.cloud_predictions, full_sizes, full_labels, len(labels))
        cloud_pred = {"val": full["val"][:len(val_set)], "test": full["test"][:len(test_set)]}
        cloud_info = {"predictions": str(args.cloud_predictions)}
    timings["cloud_predictions"] = time.monotonic() - t0

    t0 = time.monotonic()
    kind, value = _target(args)
    router_cfg = RouterTraining(model=args.router_model, features=features, target=args.router_target,
                                hidden=args.router_hidden, seed=args.seed)
    try:
        cal = calibrate_arrays(Split(logits["val"], val_set.labels, cloud_pred["val"]),
                               Split(logits["test"], test_set.labels, cloud_pred["test"]),
                               target_kind=kind, target_value=value, scores=scores, router_cfg=router_cfg,
                               folds=args.folds, seed=args.seed, tolerance=args.tolerance, risk=risk)
    except ValueError as exc:
        raise CalibrateError(str(exc)) from None

    picked = args.pick or cal.chosen
    per_class = _class_thresholds(args, cal, picked, logits, val_set.labels, test_set.labels, cloud_pred,
                                  len(labels))
    timings["calibration"] = time.monotonic() - t0
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rc = 0
    written = []
    res = cal.results.get(picked) if picked else None
    if args.pick and (res is None or res.val is None):
        print(f"edge-infer calibrate: --pick {args.pick} "
              + ("was skipped: " + cal.router_note if res is None else "does not meet the target on validation"),
              file=sys.stderr)
        res, rc = None, 1
    policy_path = out / POLICY_FILE
    if res is None or res.val is None:
        best = max(cal.results.values(), key=lambda r: r.val_best.accuracy, default=None)
        if rc == 0 and risk is not None:
            print("edge-infer calibrate: " + _uncertified_message(cal, len(val_set)) + " No policy snippet written.",
                  file=sys.stderr)
        elif rc == 0:
            print("edge-infer calibrate: no score meets the target on validation ("
                  + cal.target.describe() + ")"
                  + (f"; the best is {best.score} at accuracy {best.val_best.accuracy:.4f} offloading "
                     f"{best.val_best.offloaded_share:.1%}" if best else "")
                  + ". Lower --target-accuracy or raise --max-offload-share. No policy snippet written.",
                  file=sys.stderr)
        rc = 1
        if policy_path.exists():
            policy_path.unlink()   # never leave a stale snippet beside a new report
    else:
        router_file = None
        if picked == "router":
            assert cal.router is not None
            router_path = out / ROUTER_FILE
            save_router(cal.router, router_path)
            router_file = ROUTER_FILE   # relative paths in a device config are relative to the config's folder
            written.append(router_path)
        threshold = res.val.threshold
        if threshold > 1.0:
            log.warning("the target needs every input offloaded; threshold %.6g is written as 1.0 (inputs scoring "
                        "exactly 1.0 stay on the device)", threshold)
            threshold = 1.0
        table = per_class.by_label(labels) if per_class is not None and per_class.chosen else None
        shown_val, shown_test = (per_class.val, per_class.test) if table else (res.val, res.test)
        header = (f"written by edge-infer calibrate on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
                  f"edge {card.model_id}; target: {cal.target.describe()}\n"
                  + (f"guarantee: {res.guarantee.statement(cal.target)}\n" if res.guarantee is not None else "")
                  + ("per-class thresholds (class_thresholds): " + per_class.note + "\n" if table else "")
                  + f"validation: kept {shown_val.kept_share:.2%} on device, hybrid accuracy {shown_val.accuracy:.4f}\n"
                  f"test:       kept {shown_test.kept_share:.2%} on device, hybrid accuracy {shown_test.accuracy:.4f}\n"
                  "offload when score < threshold (the class's own, when class_thresholds lists it); temperature\n"
                  "is used by score \"temperature\" only, router_file by score \"router\" only (a relative path is\n"
                  "relative to the config file's folder: install router.json beside the config)")
        policy_path.write_text(policy_snippet(picked, threshold, cal.temperature, router_file, header, table))
        written.append(policy_path)
    stale_router = out / ROUTER_FILE
    if picked != "router" and stale_router.exists():
        stale_router.unlink()

    inputs = {
        "edge": {"card": str(args.edge_card), "model": card.model_id, "backend": args.backend,
                 "runtime": args.runtime},
        "cloud": cloud_info, "data": {"validation": val_set.source, "test": test_set.source, "split": split_note,
                                      "limit": args.limit},
        "python": platform.python_version(), "seed": args.seed,
        "scores": list(scores), "picked_by": "--pick" if args.pick else "most kept on validation at the target",
    }
    if not args.no_plot:
        t0 = time.monotonic()
        plot_offload_curves(out / PLOT_FILE, cal, picked if res is not None else None)
        timings["plot"] = time.monotonic() - t0
        written.append(out / PLOT_FILE)
    timings["total"] = time.monotonic() - t_start
    agreement = _kept_agreement(cal, picked, res, per_class, logits, cloud_pred) if res is not None else None
    report = build_report(cal, picked if res is not None else None, inputs, timings, per_class, labels, agreement)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    written.append(out / REPORT_FILE)

    print(f"edge-only accuracy  val {cal.edge_accuracy['val']:.4f}  test {cal.edge_accuracy['test']:.4f}")
    print(f"cloud-only accuracy val {cal.cloud_accuracy['val']:.4f}  test {cal.cloud_accuracy['test']:.4f}")
    print(f"target: {cal.target.describe()}; temperature {cal.temperature:.4f}")
    print(score_table(cal, picked if res is not None else None))
    gain = cal.val_gain.get(picked) if picked and res is not None else None
    if gain is not None and res is not None and cal.results["max_softmax"].val is not None:
        verdict = "beyond noise" if gain.significant else "WITHIN NOISE (consider --pick max_softmax)"
        point = res.val.kept_share - cal.results["max_softmax"].val.kept_share
        print(f"{picked} vs max_softmax on validation: {point * 100:+.1f} pp kept, 95% interval "
              f"[{gain.low * 100:+.1f}, {gain.high * 100:+.1f}] (paired bootstrap): {verdict}")
    if res is not None and res.guarantee is not None:
        print(_guarantee_lines(cal, res))
    if per_class is not None:
        print(class_threshold_lines(per_class, labels))
    if agreement is not None and None not in agreement.values():
        print(f"expected audit_agreement (edge and cloud agree on the inputs kept): validation "
              f"{agreement['validation']:.4f}, test {agreement['test']:.4f}; a device whose audits agree clearly "
              "less sees other inputs: recalibrate (docs/calibration.md)")
    if cal.oracle.test_kept_at_target is not None:
        print(f"oracle router (offloads exactly what the cloud fixes): kept {cal.oracle.test_kept_at_target:.1%} "
              "on test at the target")
    for p in written:
        print(f"wrote {p}")
    print(f"calibrate took {timings['total']:.1f}s")
    return rc


def _class_thresholds(args: argparse.Namespace, cal, picked: str | None, logits, val_labels, test_labels,
                      cloud_pred, num_classes: int) -> ClassThresholdFit | None:
    """Per-class thresholds on the picked score (a record saying why not, where they do not apply); None: no score."""
    mode = getattr(args, "class_thresholds", "auto")
    res = cal.results.get(picked) if picked else None
    if res is None:
        return None
    if cal.risk is not None:   # --class-thresholds on was refused up front
        return ClassThresholdFit(picked, mode, False, "not with --risk: the guarantee covers one threshold per score")
    if picked == "router":
        return ClassThresholdFit(picked, mode, False, "not for the router score: it takes the predicted class as an "
                                                      "input already")
    data = {name: ClassData(cal.values[picked][name], logits[name].argmax(axis=1),
                            logits[name].argmax(axis=1) == lab, cloud_pred[name] == lab)
            for name, lab in (("val", val_labels), ("test", test_labels))}
    return fit_class_thresholds(picked, data["val"], data["test"], cal.target, num_classes, res.val, res.test,
                                mode=mode, keep_target=args.router_target, folds=args.folds, seed=args.seed)


def _kept_agreement(cal, picked: str, res, per_class: ClassThresholdFit | None, logits,
                    cloud_pred) -> dict[str, float | None] | None:
    """The share of the inputs the chosen policy keeps on which the edge and the cloud agree: what the
    device's audits (``audit_agreement`` in its status) should read on inputs like the validation data."""
    if res.val is None:
        return None
    out: dict[str, float | None] = {}
    for split, name in (("val", "validation"), ("test", "test")):
        pred = logits[split].argmax(axis=1)
        score = cal.values[picked][split]
        if per_class is not None and per_class.chosen and per_class.thresholds is not None:
            kept = ~apply_thresholds(score, pred, per_class.thresholds)
        else:
            kept = score >= res.val.threshold
        out[name] = float((pred[kept] == cloud_pred[split][kept]).mean()) if kept.any() else None
    return out


def _uncertified_message(cal, n: int) -> str:
    g = next((r.guarantee for r in cal.results.values() if r.guarantee is not None), None)
    floor = smallest_certifiable_bound(n, g.level) if g is not None else None
    if not cal.risk_candidates:
        return ("no score can be chosen with --risk: the guarantee is exact only for scores with nothing fitted "
                "on validation (max_softmax, margin, entropy); add one to --scores, or --pick the score")
    if cal.target.kind == "cloud":
        what = "hybrid accuracy >= the cloud's" + (f" - {cal.target.tolerance * 100:.2f} pp" if cal.target.tolerance
                                                   else "")
    else:
        what = f"hybrid accuracy >= {cal.target.value:.4f}"
    if cal.target.kind != "cloud":
        return (f"no threshold can be certified: {what} with {1 - cal.risk:.0%} confidence needs more evidence than "
                "the validation data gives: lower --target-accuracy, raise --risk, or calibrate on more labelled "
                "data.")
    hint = ""
    if g is not None and floor is not None and g.bound < floor:
        hint = (f" With {n} validation inputs nothing below {floor * 100:.2f} pp can be certified at level "
                f"{g.level:.3g} (even zero errors among the kept inputs leave that much room).")
    return (f"no threshold can be certified: {what} with {1 - cal.risk:.0%} confidence needs more evidence than "
            f"the validation data gives.{hint} Raise --tolerance (e.g. 0.0025), raise --risk, or calibrate on "
            "more labelled data.")


def _guarantee_lines(cal, res) -> str:
    g = res.guarantee
    lines = [f"guarantee (--risk {cal.risk:g}): {g.statement(cal.target)}"]
    k = len(cal.risk_candidates)
    lines.append(f"  method: Clopper-Pearson test of {g.loss} <= {g.bound:.4g} at level {g.level:.3g} per score"
                 + (f" (Bonferroni over {k} candidate scores)" if k > 1 else "")
                 + f", fixed-sequence over a fixed grid: {g.tested} thresholds tested; at the threshold "
                   f"{g.losses} of {g.n} validation inputs, bound {g.upper_bound * 100:.3f}%")
    if res.point_val is not None:
        lines.append(f"  the point estimate (no --risk) would keep {res.point_val.kept_share:.1%} on validation "
                     f"(threshold {res.point_val.threshold:.5f}); certified: {res.val.kept_share:.1%}")
    excess = res.test.accuracy - cal.cloud_accuracy["test"]
    lines.append(f"  test: hybrid {res.test.accuracy:.4f} vs cloud {cal.cloud_accuracy['test']:.4f} "
                 f"({excess * 100:+.2f} pp); validation -> test gap: kept {(res.test.kept_share - res.val.kept_share) * 100:+.1f} pp, "
                 f"accuracy {(res.test.accuracy - res.val.accuracy) * 100:+.2f} pp")
    return "\n".join(lines)
