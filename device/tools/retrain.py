"""``edge-infer retrain``: a better edge model from the fleet's hard-example archives, or none.

    edge-infer retrain --edge-card models/fmnist-edge-v1/card.json --archive a.npz [b.npz ...] \\
        --out models/fmnist-edge-v1.1/ [--cloud-predictions models/fmnist-cloud-v1/predictions.npz]

What it does (docs/closed-loop.md has the why):

1. reads the exports (``edge-infer archive export``), splits them (seeded) into a training
   part and a held-out part;
2. computes each image's int8 feature vector, the input of the model's last
   FULLY_CONNECTED layer, by running a copy of the model whose output is that tensor
   (:mod:`.tflitehead`), with the runtime the device uses;
3. fine-tunes that layer alone (softmax regression in numpy, pulled toward the old weights,
   :mod:`.headfit`) on the archive's training part labelled by the cloud, plus a replay
   sample of the original training split so that it does not forget;
4. quantizes the new layer to the model's int8 scheme and writes it into a copy of the file
   in place, then checks that the copy runs and that its int8 logits are the numpy head's;
5. compares old and new, both run as the device runs them, on the held-out archive and on
   the original validation split at the same threshold (:mod:`.acceptance`: paired exact
   tests), and writes the new folder (model, card with version, sha256, training and
   metrics, the report) only if every check passes. Exit 0: written; 1: not better, nothing
   written (the report says why); 2: bad input.

No training framework is needed: numpy and the TFLite runtime of the ``device`` extra.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeInferError
from .acceptance import Criterion, Decision, decide

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
METHOD = "head fine-tune from the hard-example archive"
#: the model-update playbook's health gate classifies this image and, by default, needs it offloaded
HEALTH_PROBE = REPO_ROOT / "deploy" / "ansible" / "roles" / "edge_device" / "files" / "health-probe.png"
#: archived samples needed at least in each part of the split
MIN_PART = 20


class RetrainError(EdgeInferError):
    exit_code = 2


@dataclass(frozen=True)
class Settings:
    threshold: float
    seed: int = 20261126
    holdout: float = 0.3
    replay: int = 1000
    l2: float = 0.01
    iterations: int = 300
    learning_rate: float = 0.5
    alpha: float = 0.05
    tolerance: float = 0.005
    edge_tolerance: float = 0.01


def _default_threshold() -> float:
    from ..config import PolicyConfig, load_device_config
    cfg = REPO_ROOT / "deploy" / "config" / "edge-infer.toml"
    return load_device_config(cfg).policy.threshold if cfg.exists() else PolicyConfig().threshold


def add_retrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--edge-card", type=Path, required=True, help="the current edge model's card.json")
    p.add_argument("--archive", type=Path, nargs="+", required=True,
                   help="archive exports (.npz from `edge-infer archive export`), one per device")
    p.add_argument("--out", type=Path, required=True, help="the new model folder (must not exist)")
    p.add_argument("--threshold", type=float, default=None,
                   help="the devices' offload threshold, for comparing at the same threshold (default: the "
                        "shipped config's, deploy/config/edge-infer.toml)")
    p.add_argument("--config", type=Path, default=None, help="or: a device config to take the threshold from")
    p.add_argument("--data", type=Path, default=None,
                   help="Fashion-MNIST IDX folder: the replay sample (train split) and the validation split")
    cloud = p.add_mutually_exclusive_group()
    cloud.add_argument("--cloud-predictions", type=Path, default=None,
                       help="the cloud model's answers on the validation split (.npz with val_logits, as the "
                            "model folders ship): the hybrid accuracy is then compared too")
    cloud.add_argument("--cloud-card", type=Path, default=None,
                       help="or: the cloud model's card, run here (the 'cloud' extra)")
    d = Settings(threshold=0.0)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--holdout", type=float, default=d.holdout, help="share of the archive held out for the "
                                                                    f"comparison (default {d.holdout})")
    p.add_argument("--replay", type=int, default=d.replay, help="training-split images mixed in so the head does "
                                                                f"not forget (default {d.replay})")
    p.add_argument("--l2", type=float, default=d.l2, help=f"pull toward the old head's weights (default {d.l2})")
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--alpha", type=float, default=d.alpha, help="level of every test (default 0.05)")
    p.add_argument("--tolerance", type=float, default=d.tolerance,
                   help="how far the kept share and the hybrid accuracy may fall, the lower bound of the "
                        f"difference (default {d.tolerance}: half a point)")
    p.add_argument("--edge-tolerance", type=float, default=d.edge_tolerance,
                   help=f"likewise for the edge model's own accuracy on validation (default {d.edge_tolerance})")
    p.add_argument("--version", default=None, help="the new model's version (default: the minor one up)")
    p.add_argument("--health-probe", type=Path, default=HEALTH_PROBE if HEALTH_PROBE.exists() else None,
                   help="the rollout health gate's probe image: the report says whether the new model still "
                        "offloads it (edge_device_health_require_correction needs that)")
    p.add_argument("--report", type=Path, default=None, help="also write the JSON report here (accepted or not)")
    p.add_argument("--no-progress", action="store_true")


def run_retrain(args: argparse.Namespace) -> int:
    if args.out.exists():
        raise RetrainError(f"{args.out} exists: give a new folder for the new model version")
    if not 0.0 < args.holdout < 1.0:
        raise RetrainError("--holdout must be between 0 and 1")
    if args.threshold is not None:
        threshold = args.threshold
    elif args.config is not None:
        from ..config import load_device_config
        threshold = load_device_config(args.config).policy.threshold
    else:
        threshold = _default_threshold()
    settings = Settings(threshold=threshold, seed=args.seed, holdout=args.holdout, replay=args.replay, l2=args.l2,
                        iterations=args.iterations, learning_rate=args.learning_rate, alpha=args.alpha,
                        tolerance=args.tolerance, edge_tolerance=args.edge_tolerance)
    report = retrain(args.edge_card, args.archive, args.out, settings, data=args.data,
                     cloud_predictions=args.cloud_predictions, cloud_card=args.cloud_card, version=args.version,
                     health_probe=args.health_probe, progress=not args.no_progress)
    if args.report is not None:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    decision = report["decision"]
    for check in decision["says"]:
        print(("  ok   " if check["passed"] else "  FAIL ") + check["text"])
    probe = report.get("health_probe")
    if decision["accepted"] and probe and not probe["offloaded_by_new"]:
        print(f"warning: the new model keeps the health probe {probe['file']} on the device (confidence "
              f"{probe['new_confidence']:.4f} >= {threshold}): the model-update health gate needs a probe it offloads "
              "(edge_device_health_probe), or edge_device_health_require_correction: false", file=sys.stderr)
    if decision["accepted"]:
        print(f"accepted: wrote {args.out}/ ({report['model']['id']}); roll it out with deploy/ansible/"
              f"model-update.yml -e edge_device_model_src={args.out.resolve()}")
        return 0
    print(f"not accepted: {report['decision']['why']}; nothing was written", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------- the steps

def split_archive(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices), a seeded permutation; both sorted."""
    order = np.random.default_rng(seed).permutation(n)
    k = int(round(holdout * n))
    return np.sort(order[k:]), np.sort(order[:k])


def bump_version(version: str) -> str:
    """"1.0.0" -> "1.1.0"; anything else gets ".1" appended."""
    parts = version.split(".")
    if len(parts) >= 2 and all(x.isdigit() for x in parts):
        return ".".join([parts[0], str(int(parts[1]) + 1)] + ["0"] * (len(parts) - 2))
    return version + ".1"


def head_features(card, model: bytes, head, images: np.ndarray) -> np.ndarray:
    """int8 (N, F): each image's input to the head, computed by the model's own layers (with the runtime the
    device uses, one image per invoke as it runs them)."""
    from ..backends.tflite_cpu import load_interpreter_module
    from ..preprocess import Preprocessor
    from .tflitehead import feature_model
    module, _ = load_interpreter_module("auto")
    interp = module.Interpreter(model_content=feature_model(model, head), num_threads=1)
    interp.allocate_tensors()
    (inp,) = interp.get_input_details()
    (out,) = interp.get_output_details()
    pre = Preprocessor(card.input)
    feats = np.empty((len(images), head.width), np.int8)
    for i in range(len(images)):
        interp.set_tensor(inp["index"], pre.batch(images[i:i + 1]))
        interp.invoke()
        feats[i] = interp.get_tensor(out["index"]).reshape(-1)
    return feats


@dataclass(frozen=True, eq=False)
class Outcomes:
    """Per input, at the threshold: kept on the device, edge answer right, hybrid answer right."""
    kept: np.ndarray
    edge_ok: np.ndarray
    hybrid_ok: np.ndarray


def outcomes(logits: np.ndarray, truth: np.ndarray, threshold: float, cloud_ok: np.ndarray | None) -> Outcomes:
    """``cloud_ok``: whether the cloud's answer is right per input; None when ``truth`` IS the cloud's answer
    (the archive) or unknown: then an offloaded input counts as right, so the hybrid outcome is "no wrong
    answer kept on the device"."""
    from ..scores import softmax
    z = np.asarray(logits, np.float64)
    conf = softmax(z).max(axis=1)
    edge_ok = z.argmax(axis=1) == truth
    kept = conf >= threshold
    offloaded_ok = np.ones(len(truth), bool) if cloud_ok is None else np.asarray(cloud_ok, bool)
    return Outcomes(kept, edge_ok, np.where(kept, edge_ok, offloaded_ok))


def acceptance_criteria(old: dict[str, Outcomes], new: dict[str, Outcomes], held_out_audit: np.ndarray,
                        s: Settings, val_hybrid_name: str) -> list[Criterion]:
    """The checks the new model must pass (docs/closed-loop.md, "When a model is accepted")."""
    h_old, h_new, v_old, v_new = old["held_out"], new["held_out"], old["val"], new["val"]
    unsure = ~held_out_audit
    crit = [
        Criterion("held-out archive (offloaded for doubt): kept on the device", h_old.kept[unsure], h_new.kept[unsure],
                  "better"),
        Criterion("held-out archive: hybrid answer = the cloud's", h_old.hybrid_ok, h_new.hybrid_ok, "not_worse",
                  s.tolerance),
    ]
    if held_out_audit.any():
        crit.append(Criterion("held-out archive (audited, confident): kept on the device", h_old.kept[held_out_audit],
                              h_new.kept[held_out_audit], "not_worse", s.tolerance))
    crit += [
        Criterion(f"validation: {val_hybrid_name}", v_old.hybrid_ok, v_new.hybrid_ok, "not_worse", s.tolerance),
        Criterion("validation: edge accuracy", v_old.edge_ok, v_new.edge_ok, "not_worse", s.edge_tolerance),
        Criterion("validation: kept on the device", v_old.kept, v_new.kept, "not_worse", s.tolerance),
    ]
    return crit


def _summary(o: Outcomes) -> dict[str, float]:
    return {"kept_share": round(float(o.kept.mean()), 6), "edge_accuracy": round(float(o.edge_ok.mean()), 6),
            "hybrid_accuracy": round(float(o.hybrid_ok.mean()), 6),
            "kept_accuracy": round(float(o.edge_ok[o.kept].mean()), 6) if o.kept.any() else None}


def _cloud_ok_val(val, cloud_predictions: Path | None, cloud_card: Path | None, labels, progress: bool,
                  full_sizes: dict[str, int], truth: dict[str, np.ndarray]) -> np.ndarray | None:
    from ..calibration import CalibrateError
    from ..calibration.data import ImageSet, cloud_predictions_from_file, cloud_predictions_from_model
    try:
        if cloud_predictions is not None:
            preds = cloud_predictions_from_file(cloud_predictions, full_sizes, truth, len(labels))["val"]
        elif cloud_card is not None:
            preds = cloud_predictions_from_model(cloud_card, {"val": ImageSet(val.images, val.labels, "val")}, 0,
                                                 progress)[0]["val"]
        else:
            return None
    except CalibrateError as exc:
        raise RetrainError(str(exc)) from None
    return preds == val.labels


def retrain(edge_card: Path, archives: Sequence[Path], out: Path, s: Settings, *, data: Path | None = None,
            cloud_predictions: Path | None = None, cloud_card: Path | None = None, version: str | None = None,
            health_probe: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the whole procedure; the report (a dict) says what was measured and decided. Writes ``out``
    only when accepted."""
    from .. import __version__
    from ..modelcard import load_card, verified_model_bytes
    from .archivefile import read_exports
    from .datasets import DEFAULT_FMNIST_DIR, fashion_mnist_splits
    from .headfit import fit_head, quantize_head
    from .runmodel import edge_logits
    from .tflitehead import find_head, read_quant_head, write_head

    t0 = time.monotonic()
    card = load_card(edge_card)
    if card.format != "tflite" or card.input.dtype not in ("int8", "uint8"):
        raise RetrainError(f"{card.path}: retrain fine-tunes full-int8 .tflite models; this is {card.format} "
                           f"with {card.input.dtype} input")
    if card.input.views:
        # The head is fitted on one invoke's features; the views' combined answer is another model.
        raise RetrainError(f"{card.path}: retrain fine-tunes a card without test-time views; retrain the card "
                           "of the same model without \"views\", then write the views into the new card")
    model = verified_model_bytes(card)
    head = find_head(model, str(card.file))
    old_q = read_quant_head(model, head)
    oq = card.output.quantization
    if head.classes != len(card.labels) or oq is None or not np.isclose(oq.scale, old_q.output_scale, rtol=1e-5) \
            or oq.zero_point != old_q.output_zero_point:
        raise RetrainError(f"{card.path}: the card's output ({len(card.labels)} labels, quantization {oq}) does not "
                           f"describe the model's head ({head.classes} outputs)")
    shape = (card.input.height, card.input.width) + (() if card.input.channels == 1 else (3,))
    arch = read_exports(archives, card.labels, shape)
    train_idx, hold_idx = split_archive(len(arch), s.holdout, s.seed)
    if min(len(train_idx), len(hold_idx)) < MIN_PART:
        raise RetrainError(f"{len(arch)} archived sample(s) are too few: each part of the split needs at least "
                           f"{MIN_PART}; let the devices archive longer (or collect from more of them)", exit_code=1)
    splits = fashion_mnist_splits(data or DEFAULT_FMNIST_DIR)
    train, val, test = splits["train"], splits["val"], splits["test"]
    rng = np.random.default_rng(s.seed + 1)
    replay_idx = np.sort(rng.choice(len(train), min(s.replay, len(train)), replace=False)) if s.replay else \
        np.zeros(0, np.int64)
    _say(progress, f"archive: {len(arch)} samples from {len(arch.sources)} file(s) ({arch.duplicates} duplicates "
                   f"dropped): {len(train_idx)} to train on, {len(hold_idx)} held out; replay {len(replay_idx)}")

    # features of everything the head is trained on (the held-out part and validation are judged end to end)
    f_arch = head_features(card, model, head, arch.images[train_idx])
    f_replay = head_features(card, model, head, train.images[replay_idx])
    x = old_q.features(np.concatenate([f_arch, f_replay]))
    y = np.concatenate([arch.cloud_label[train_idx], train.labels[replay_idx]])
    fit = fit_head(x, y, old_q.dequantized(), l2=s.l2, iterations=s.iterations, learning_rate=s.learning_rate)
    new_q = quantize_head(fit.head, old_q)
    new_model = write_head(model, head, new_q.q_weights, new_q.weight_scales, new_q.q_bias)
    _say(progress, f"head fitted: loss {fit.loss_start:.4f} -> {fit.loss_end:.4f} (gradient {fit.grad_norm:.2e}) "
                   f"in {time.monotonic() - t0:.1f}s")

    old_version = card.version
    new_version = version or bump_version(old_version)
    with tempfile.TemporaryDirectory(prefix=".retrain-", dir=out.parent if out.parent.exists() else None) as tmp:
        staged = Path(tmp) / "model"
        staged.mkdir()
        new_card_data = _new_card(card, new_model, new_version)
        (staged / "model.tflite").write_bytes(new_model)
        (staged / "card.json").write_text(json.dumps(new_card_data, indent=2) + "\n")
        new_card = load_card(staged / "card.json")

        # the new file, run as the device runs it, against the numpy int8 head on the same features
        f_val = head_features(card, model, head, val.images)
        run = lambda c, images, label: edge_logits(c, images, progress=progress, label=label)   # noqa: E731
        old_val, new_val = run(card, val.images, "old val"), run(new_card, val.images, "new val")
        expect = new_q.output_logits(new_q.int8_logits(f_val))
        steps = float(np.abs(new_val - expect).max() / new_q.output_scale)
        if steps > 1.01:
            raise RetrainError(f"the rewritten model's logits differ from the numpy head's by {steps:.1f} "
                               "quantization steps (at most 1 expected): the model file was not rewritten correctly")
        float_agree = float((fit.head.logits(new_q.features(f_val)).argmax(1) == new_val.argmax(1)).mean())

        cloud_ok = _cloud_ok_val(val, cloud_predictions, cloud_card, card.labels, progress,
                                 {"val": len(val), "test": len(test)}, {"val": val.labels, "test": test.labels})
        val_hybrid = "hybrid accuracy" if cloud_ok is not None else "no wrong answer kept on the device"
        h_images = arch.images[hold_idx]
        h_truth = arch.cloud_label[hold_idx]
        old = {"held_out": outcomes(run(card, h_images, "old held-out"), h_truth, s.threshold, None),
               "val": outcomes(old_val, val.labels, s.threshold, cloud_ok)}
        new = {"held_out": outcomes(run(new_card, h_images, "new held-out"), h_truth, s.threshold, None),
               "val": outcomes(new_val, val.labels, s.threshold, cloud_ok)}
        audit = arch.offload_reason[hold_idx] == "audit"
        decision = decide(acceptance_criteria(old, new, audit, s, val_hybrid), s.alpha)
        test_acc = {}
        if decision.accepted:
            test_acc = {name: float((run(c, test.images, f"{name} test").argmax(1) == test.labels).mean())
                        for name, c in (("old", card), ("new", new_card))}
        report = _report(card, new_card, arch, train_idx, hold_idx, replay_idx, s, fit, steps, float_agree, old, new,
                         decision, test_acc, val_hybrid, archives, __version__, time.monotonic() - t0)
        if health_probe is not None:
            report["health_probe"] = _probe(health_probe, card, new_card, s.threshold)
        if decision.accepted:
            new_card_data["metrics"] = report["metrics"]["new"]
            new_card_data["training"] = report["training"]
            (staged / "card.json").write_text(json.dumps(new_card_data, indent=2) + "\n")
            (staged / "retrain.json").write_text(json.dumps(report, indent=2) + "\n")
            load_card(staged / "card.json")   # what the device will parse
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(staged), str(out))
    return report


def _probe(path: Path, card, new_card, threshold: float) -> dict[str, Any]:
    """Whether each model offloads the rollout health gate's probe image at the threshold."""
    from ..preprocess import ImageError, Preprocessor, decode_image
    from ..scores import softmax
    from .runmodel import edge_logits
    try:
        fitted = Preprocessor(card.input).fit(decode_image(path.read_bytes()).pixels)
    except (OSError, ImageError) as exc:
        raise RetrainError(f"health probe {path}: {exc}") from None
    conf = {name: float(softmax(edge_logits(c, [fitted], progress=False).astype(np.float64)).max())
            for name, c in (("old", card), ("new", new_card))}
    return {"file": str(path), "old_confidence": round(conf["old"], 6), "new_confidence": round(conf["new"], 6),
            "offloaded_by_new": conf["new"] < threshold}


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr)


def _new_card(card, model: bytes, version: str) -> dict[str, Any]:
    data = json.loads(card.path.read_text())
    data.update(version=version, file="model.tflite", sha256=hashlib.sha256(model).hexdigest())
    data.pop("fallback_card", None)
    data["metrics"] = {}
    return data


def _report(card, new_card, arch, train_idx, hold_idx, replay_idx, s: Settings, fit, steps: float,
            float_agree: float, old: dict[str, Outcomes], new: dict[str, Outcomes], decision: Decision,
            test_acc: dict[str, float], val_hybrid: str, archives: Sequence[Path], version: str,
            seconds: float) -> dict[str, Any]:
    from ..backends.tflite_cpu import load_interpreter_module
    runtime = load_interpreter_module("auto")[1]
    failed = decision.failed
    why = ("every check passed" if decision.accepted else "; ".join(c.says() for c in failed))
    models, counts = np.unique(arch.model_id, return_counts=True)
    metrics: dict[str, dict[str, Any]] = {}
    for name, o in (("old", old), ("new", new)):
        metrics[name] = {"val_accuracy": round(float(o["val"].edge_ok.mean()), 6),
                         **({"test_accuracy": round(test_acc[name], 6)} if name in test_acc else {}),
                         "threshold": s.threshold,
                         "val": _summary(o["val"]), "held_out_archive": _summary(o["held_out"]),
                         "runtime": runtime, "num_threads": 1}
    return {
        "model": {"id": new_card.model_id, "base": card.model_id, "base_sha256": card.sha256,
                  "sha256": new_card.sha256},
        "decision": {"accepted": decision.accepted, "why": why,
                     "says": [{"passed": c.passed, "text": c.says()} for c in decision.checks],
                     **decision.to_dict()},
        "metrics": metrics,
        "training": {
            "method": METHOD, "script": f"edge-infer retrain (edge-infer {version})", "base_model": card.model_id,
            "seed": s.seed, "threshold": s.threshold,
            "archive": {"files": [str(a) for a in archives], "samples": len(arch), "train": int(len(train_idx)),
                        "held_out": int(len(hold_idx)), "duplicates_dropped": arch.duplicates,
                        "devices": int(len(np.unique(arch.device_id))),
                        "answered_by": {str(m): int(n) for m, n in zip(models, counts)},
                        "audited": int((arch.offload_reason == "audit").sum())},
            "replay": {"source": "Fashion-MNIST train split (device/tools/datasets.py)", "samples": int(len(replay_idx))},
            "labels": "the cloud's corrections (archive); the data set's labels (replay)",
            "head": {"l2_to_old_weights": s.l2, "iterations": fit.iterations, "learning_rate": s.learning_rate,
                     "loss_start": round(fit.loss_start, 6), "loss_end": round(fit.loss_end, 6),
                     "gradient_norm_end": float(f"{fit.grad_norm:.3g}"),
                     "int8_vs_numpy_max_steps": round(steps, 3),
                     "int8_vs_float_label_agreement_val": round(float_agree, 6)},
            "acceptance": {"alpha": s.alpha, "tolerance": s.tolerance, "edge_tolerance": s.edge_tolerance,
                           "validation_hybrid": val_hybrid},
            "seconds": round(seconds, 1),
        },
        "settings": asdict(s),
    }
