#!/usr/bin/env python3
"""Train a cascade-aware edge model: the same budget as train_edge.py (the network of --arch,
_arch.py; by default v1's), trained for the edge/cloud cascade, exported as a full-int8 TFLite
model with its card.

Two stages (the loss is _cascade.LossConfig):

1. distillation from the cloud model: the cloud's soft labels (temperature T) on the 55k
   training images, plain and mirrored (computed once through the worker's own CloudModel
   and cached under models/.cache/), loss a*T^2*KL(teacher_T || student_T) + (1-a)*CE, with
   optional (--augment) random-crop (--pad, 2 px) and horizontal-flip augmentation. Its weights are cached by
   their settings, so stage-2 variants reuse them.
2. optional Gatekeeper fine-tuning (arXiv 2502.19335): on training samples the student gets
   wrong while the cloud gets them right, push the student toward the uniform distribution
   (weight g), elsewhere keep the stage-1 loss; a few epochs at a lower learning rate.

The weights of the last epoch are exported (cosine schedules; no checkpoint is picked). The
int8 model is then run the way the device runs it (edge_infer.tools.runmodel.edge_logits) on
val and test and compared with the cloud model's predictions.npz: the share kept on the device
at the cloud's accuracy (threshold on val, measured on test), edge accuracy, AUC, and a
paired bootstrap on val against fmnist-edge-v1. The report goes to
models/.cache/cascade/<out-dir name>.json. Choosing a variant uses val only.

Reproducible: seeds everywhere, deterministic TensorFlow ops, 1 thread by default.

    .venv-train/bin/python models/recipes/fmnist/train_cascade.py --out-dir models/.cache/cascade/try1 [--augment]
    .venv-train/bin/python models/recipes/fmnist/train_cascade.py            # -> models/fmnist-edge-v2
    .venv-train/bin/python models/recipes/fmnist/evaluate.py --only edge --edge-dir models/fmnist-edge-v2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # exact, reproducible float math

import numpy as np

import _arch
import _cascade
import _data  # this folder's helpers (the script's folder is on sys.path)

log = logging.getLogger(__name__)

OUT_DIR = _data.MODELS_DIR / "fmnist-edge-v2"
CLOUD_DIR = _data.MODELS_DIR / "fmnist-cloud-v1"
BASELINE_DIR = _data.MODELS_DIR / "fmnist-edge-v1"
SEED = 20261126
MAX_PARAMS = 10_000


# ---------------------------------------------------------------- the teacher

def teacher_logits(train_images: np.ndarray) -> dict[str, np.ndarray]:
    """The cloud model's logits on the training images, plain and mirrored, via the worker's
    CloudModel (card-driven normalisation), cached under models/.cache/ by the model's sha256."""
    from edge_infer_cloud.model import CloudModel
    from edge_infer.tools.runmodel import cloud_outputs

    card = _data.read_json(CLOUD_DIR / "card.json")
    cache = _data.CACHE_DIR / f"cloud_train_logits_{card['sha256'][:12]}.npz"
    if cache.exists():
        with np.load(cache) as z:
            if len(z["plain"]) == len(train_images):
                return {"plain": z["plain"], "mirrored": z["mirrored"]}
    t0 = time.perf_counter()
    model = CloudModel(CLOUD_DIR / "card.json", intra_op_threads=1)
    out = {"plain": cloud_outputs(model, train_images, batch_size=500, progress=False),
           "mirrored": cloud_outputs(model, np.ascontiguousarray(train_images[:, :, ::-1]), batch_size=500,
                                     progress=False)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, **out)
    log.info("teacher logits on %d x 2 training images in %.0f s -> %s", len(train_images),
             time.perf_counter() - t0, cache)
    return out


# ---------------------------------------------------------------- the loss in TensorFlow

def make_tf_loss(tf, cfg: _cascade.LossConfig):
    """_cascade.cascade_loss in TensorFlow (y_true laid out by _cascade.pack_targets)."""
    t = float(cfg.temperature)
    a = float(cfg.distill_weight)
    g = float(cfg.gate_weight)
    log_k = float(np.log(_cascade.NUM_CLASSES))

    def loss(y_true, logits):
        c = _cascade.NUM_CLASSES
        q = y_true[:, :c]
        labels = tf.cast(tf.round(y_true[:, c]), tf.int32)
        cloud_ok = y_true[:, c + 1]
        logp_t = tf.nn.log_softmax(logits / t, axis=-1)
        kd = tf.reduce_sum(q * (tf.math.log(tf.maximum(q, 1e-12)) - logp_t), axis=-1) * (t * t)
        logp = tf.nn.log_softmax(logits, axis=-1)
        ce = -tf.gather(logp, labels, axis=1, batch_dims=1)
        base = a * kd + (1.0 - a) * ce
        if g == 0.0:
            return base
        kl_uniform = tf.reduce_sum(tf.exp(logp) * logp, axis=-1) + log_k
        wrong = tf.cast(tf.not_equal(tf.cast(tf.argmax(logits, axis=-1), tf.int32), labels), tf.float32)
        if cfg.gate_only_cloud_right:
            wrong = wrong * cloud_ok
        return base + wrong * g * (kl_uniform - base)

    return loss


def check_tf_loss(tf, cfg: _cascade.LossConfig, seed: int) -> None:
    """The TensorFlow loss must equal the numpy reference (the one the unit test checks)."""
    rng = np.random.default_rng(seed)
    n = 256
    logits = rng.normal(0, 3, (n, _cascade.NUM_CLASSES)).astype(np.float32)
    y = _cascade.pack_targets(rng.integers(0, 10, n), rng.normal(0, 3, (n, 10)), rng.random(n) < 0.8,
                              cfg.temperature)
    got = make_tf_loss(tf, cfg)(tf.constant(y), tf.constant(logits)).numpy()
    want = _cascade.cascade_loss(logits, y, cfg)
    if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise SystemExit(f"the TensorFlow loss differs from _cascade.cascade_loss by up to "
                         f"{np.abs(got - want).max():.3g}: fix make_tf_loss")


# ---------------------------------------------------------------- training

def cosine_lr(tf, peak: float, steps: int, warmup: bool):
    if warmup:
        return tf.keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=peak / 10, decay_steps=steps - steps // 10,
            warmup_target=peak, warmup_steps=steps // 10, alpha=0.01)
    return tf.keras.optimizers.schedules.CosineDecay(initial_learning_rate=peak, decay_steps=steps, alpha=0.01)


def fit_stage(tf, model, cfg: _cascade.LossConfig, *, epochs: int, lr: float, warmup: bool, batch_size: int,
              train_images: np.ndarray, y_plain: np.ndarray, y_mirrored: np.ndarray, augment: bool,
              pad: int, flip: bool,
              rng: np.random.Generator, x_val: np.ndarray, y_val: np.ndarray, val_cloud: np.ndarray,
              name: str) -> list[dict[str, float]]:
    steps = epochs * int(np.ceil(len(train_images) / batch_size))
    model.compile(optimizer=tf.keras.optimizers.Adam(cosine_lr(tf, lr, steps, warmup)),
                  loss=make_tf_loss(tf, cfg))
    history = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        if augment:
            images, flipped = _cascade.augment(train_images, rng, pad=pad, flip=flip)
        else:
            images, flipped = train_images, np.zeros(len(train_images), dtype=bool)
        x = (images.astype(np.float32) / 255.0)[..., None]
        y = np.where(flipped[:, None], y_mirrored, y_plain)
        h = model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=True, verbose=0)
        logits = model.predict(x_val, batch_size=1000, verbose=0)
        m = _cascade.cascade_metrics({"val": logits, "test": logits}, {"val": val_cloud, "test": val_cloud},
                                     {"val": y_val, "test": y_val})
        row = {"stage": name, "epoch": epoch + 1, "loss": float(h.history["loss"][-1]),
               "float_val_acc": m.edge_val_accuracy, "float_val_kept": m.val_kept, "float_val_auc": m.val_auc,
               "seconds": time.perf_counter() - t0}
        history.append(row)
        log.info("%s epoch %d/%d: loss %.4f  float val acc %.4f  kept at cloud %s  AUC %.4f  (%.0f s)",
                 name, epoch + 1, epochs, row["loss"], m.edge_val_accuracy,
                 "-" if m.val_kept is None else f"{m.val_kept:.3f}", m.val_auc, row["seconds"])
    return history


def stage1_key(args: argparse.Namespace, cfg: _cascade.LossConfig) -> str:
    settings = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                "augment": not args.no_augment, "loss": cfg.to_dict(), "v": 1}
    if args.arch != "v1":   # keeps the keys of runs made before --arch
        settings["arch"] = args.arch
    if not args.no_augment and (args.pad != 2 or args.no_flip):   # keeps the keys of runs made before these flags
        settings.update(pad=args.pad, flip=not args.no_flip)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- export (as train_edge.py does)

def export_int8(tf, model, build_model, x_rep: np.ndarray, path: Path) -> list[str]:
    """Full-int8 TFLite with a fixed batch of 1, int8 in and out, logits out; returns its ops."""
    export_model = build_model(tf, batch_size=1)
    export_model.set_weights(model.get_weights())

    def representative_dataset():
        for i in range(len(x_rep)):
            yield [x_rep[i:i + 1]]

    converter = tf.lite.TFLiteConverter.from_keras_model(export_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(converter.convert())

    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    plain = Interpreter(model_path=str(path),   # without XNNPACK: the model's own op list
                        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    plain.allocate_tensors()
    return sorted({d["op_name"] for d in plain._get_ops_details()})


EDGE_TPU_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "MAX_POOL_2D", "AVERAGE_POOL_2D", "MEAN", "FULLY_CONNECTED", "ADD"}


def quantization_of(path: Path) -> tuple[tuple[float, int], tuple[float, int], list]:
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    if inp["dtype"] != np.int8 or out["dtype"] != np.int8 or list(inp["shape"]) != [1, 28, 28, 1]:
        raise SystemExit(f"{path}: expected int8 [1,28,28,1] in and int8 out, got {inp['dtype']} {inp['shape']}"
                         f" / {out['dtype']}")
    return inp["quantization"], out["quantization"], out["shape"].tolist()


# ---------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=_arch.ARCHS, default="v1", help="the network (_arch.py; default: v1's)")
    ap.add_argument("--epochs", type=int, default=20, help="stage 1 (distillation) epochs")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3, help="stage 1 peak learning rate (cosine, 10%% warm-up)")
    ap.add_argument("--temperature", type=float, default=3.0)
    ap.add_argument("--distill-weight", type=float, default=0.7, help="a: weight of the distillation term")
    # augmentation is off by default: on this 9.9k-parameter network crop+flip cost accuracy and kept
    # share on val (models/.cache/cascade/kd20.json against kd20_noaug.json)
    ap.add_argument("--augment", dest="no_augment", action="store_false", help="random crop / flip in stage 1 and 2")
    ap.add_argument("--no-augment", dest="no_augment", action="store_true", default=True, help=argparse.SUPPRESS)
    ap.add_argument("--pad", type=int, default=2, help="random-crop padding in pixels (0: no crop)")
    ap.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    ap.add_argument("--gate-epochs", type=int, default=0, help="stage 2 (Gatekeeper) epochs; 0: no stage 2")
    ap.add_argument("--gate-weight", type=float, default=0.5, help="g: weight of KL(student || uniform) on errors")
    ap.add_argument("--gate-all-errors", action="store_true",
                    help="push every student error toward uniform, not only those the cloud gets right")
    ap.add_argument("--gate-lr", type=float, default=5e-4, help="stage 2 learning rate (cosine, no warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--version", default="2.0.0")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR,
                    help="where model.tflite and card.json go (default: %(default)s); outside models/.cache "
                         "only when the model keeps more than fmnist-edge-v1 on val beyond noise, or --force")
    ap.add_argument("--force", action="store_true", help="write --out-dir even when the model is not better")
    return ap.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args()
    stage1 = _cascade.LossConfig(args.temperature, args.distill_weight, 0.0)
    stage2 = _cascade.LossConfig(args.temperature, args.distill_weight, args.gate_weight,
                                 gate_only_cloud_right=not args.gate_all_errors)

    import tensorflow as tf
    build_model = _arch.builder(args.arch)

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    tf.keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    check_tf_loss(tf, stage2 if args.gate_epochs else stage1, args.seed)

    model = build_model(tf)
    n_params = int(model.count_params())
    if n_params >= MAX_PARAMS:
        raise SystemExit(f"{n_params} parameters, the budget is {MAX_PARAMS}")

    data = _data.splits()
    train, val = data["train"], data["val"]   # test: only measured, through edge_logits below
    teacher = teacher_logits(train.images)
    cloud_train_ok = teacher["plain"].argmax(1) == train.labels
    log.info("teacher train accuracy %.4f (plain), %.4f (mirrored)", cloud_train_ok.mean(),
             (teacher["mirrored"].argmax(1) == train.labels).mean())
    y_plain = _cascade.pack_targets(train.labels, teacher["plain"], cloud_train_ok, args.temperature)
    y_mirrored = _cascade.pack_targets(train.labels, teacher["mirrored"],
                                       teacher["mirrored"].argmax(1) == train.labels, args.temperature)
    with np.load(CLOUD_DIR / "predictions.npz") as z:
        cloud = {"val": z["val_logits"], "test": z["test_logits"]}
    x_val = (val.images.astype(np.float32) / 255.0)[..., None]
    rng = np.random.default_rng(args.seed)
    common = dict(batch_size=args.batch_size, train_images=train.images, y_plain=y_plain, y_mirrored=y_mirrored,
                  augment=not args.no_augment, pad=args.pad, flip=not args.no_flip,
                  x_val=x_val, y_val=val.labels, val_cloud=cloud["val"])

    _data.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    key = stage1_key(args, stage1)
    ckpt = _data.CACHE_DIR / f"cascade_stage1_{key}.weights.h5"
    hist_path = _data.CACHE_DIR / f"cascade_stage1_{key}.json"
    t0 = time.perf_counter()
    if ckpt.exists() and hist_path.exists():
        model.load_weights(str(ckpt))
        history = _data.read_json(hist_path)["history"]
        log.info("stage 1: reusing %s (same settings)", ckpt)
        stage1_seconds = _data.read_json(hist_path)["seconds"]
    else:
        history = fit_stage(tf, model, stage1, epochs=args.epochs, lr=args.lr, warmup=True, rng=rng,
                            name="distill", **common)
        stage1_seconds = time.perf_counter() - t0
        model.save_weights(str(ckpt))
        _data.write_json(hist_path, {"history": history, "seconds": stage1_seconds, "key": key})
    train_seconds = stage1_seconds
    if args.gate_epochs:
        # a stage-2 stream of its own, so reusing the cached stage 1 draws the same augmentations
        t1 = time.perf_counter()
        history += fit_stage(tf, model, stage2, epochs=args.gate_epochs, lr=args.gate_lr, warmup=False,
                             rng=np.random.default_rng(args.seed + 1), name="gatekeeper", **common)
        train_seconds += time.perf_counter() - t1

    x_rep = (train.images[np.random.default_rng(args.seed).choice(len(train.images), 1000, replace=False)]
             .astype(np.float32) / 255.0)[..., None]
    # a shipped folder (outside models/.cache) gets the model only once it is known to be better
    staged = _data.CACHE_DIR.resolve() in args.out_dir.resolve().parents
    stage_dir = args.out_dir if staged else _data.CACHE_DIR / "cascade" / f"{args.out_dir.name}-candidate"
    tflite_path = stage_dir / "model.tflite"
    ops = export_int8(tf, model, build_model, x_rep, tflite_path)
    bad = sorted(set(ops) - EDGE_TPU_OPS)
    if bad:
        raise SystemExit(f"the int8 model uses ops outside the Edge-TPU set: {bad}")
    (in_scale, in_zp), (out_scale, out_zp), _ = quantization_of(tflite_path)

    card = {
        "schema": 1,
        "name": "fmnist-edge",
        "version": args.version,
        "role": "edge",
        "format": "tflite",
        "file": "model.tflite",
        "sha256": _data.sha256_file(tflite_path),
        "params": n_params,
        "labels": _data.LABELS,
        "input": {"shape": [1, 28, 28, 1], "layout": "NHWC", "dtype": "int8", "color": "L",
                  "pixel_scale": 255.0, "mean": 0.0, "std": 1.0,
                  "quantization": {"scale": float(in_scale), "zero_point": int(in_zp)}},
        "output": {"kind": "logits", "dtype": "int8",
                   "quantization": {"scale": float(out_scale), "zero_point": int(out_zp)}},
        "metrics": {},  # filled in by models/recipes/fmnist/evaluate.py --edge-dir
        "training": {
            "script": "models/recipes/fmnist/train_cascade.py",
            "method": ("distillation from fmnist-cloud-v1 (soft labels at temperature T on the training images, "
                       "plain and mirrored) + cross-entropy"
                       + ("; then Gatekeeper fine-tuning (arXiv 2502.19335): student errors "
                          + ("the cloud gets right" if stage2.gate_only_cloud_right else "")
                          + " pushed toward uniform" if args.gate_epochs else "")),
            "architecture": ("as fmnist-edge-v1 (models/recipes/fmnist/train_edge.py build_model)" if args.arch == "v1"
                             else f"{args.arch} (models/recipes/fmnist/_arch.py)"),
            "teacher": "fmnist-cloud-v1",
            "seed": args.seed,
            "framework": f"tensorflow {tf.__version__} (keras {tf.keras.__version__})",
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "temperature": args.temperature,
            "distill_weight": args.distill_weight,
            "augment": ("none" if args.no_augment else
                        f"random crop (padding {args.pad} px)" + ("" if args.no_flip else ", horizontal flip")),
            "gate_epochs": args.gate_epochs,
            "gate_weight": args.gate_weight if args.gate_epochs else 0.0,
            "gate_only_cloud_right": stage2.gate_only_cloud_right,
            "gate_lr": args.gate_lr if args.gate_epochs else 0.0,
            "checkpoint": "last epoch",
            "train_seconds": round(train_seconds, 1),
            "threads": args.threads,
            "dataset": _data.DATASET_DESCRIPTION,
        },
        "license": "MIT (data); model weights: same as this repository",
    }
    card_path = stage_dir / "card.json"
    _data.write_card(card_path, card)

    # ---- the int8 model as the device runs it, beside the cloud model and v1 ----
    from edge_infer.modelcard import load_card
    from edge_infer.tools.runmodel import edge_logits
    edge = {s: edge_logits(load_card(card_path), data[s].images, runtime="ai-edge-litert", progress=False)
            for s in ("val", "test")}
    labels = {s: data[s].labels for s in ("val", "test")}
    metrics = _cascade.cascade_metrics(edge, cloud, labels)
    metrics_tol = _cascade.cascade_metrics(edge, cloud, labels, tolerance=0.0025)
    with np.load(BASELINE_DIR / "predictions.npz") as z:
        v1_val = z["val_logits"]
    vs_v1 = _cascade.paired_kept_bootstrap(v1_val, edge["val"], cloud["val"], labels["val"], seed=args.seed)
    vs_v1_tol = _cascade.paired_kept_bootstrap(v1_val, edge["val"], cloud["val"], labels["val"], tolerance=0.0025,
                                               seed=args.seed)
    report = {"out_dir": str(args.out_dir), "sha256": card["sha256"], "params": n_params, "ops": ops,
              "args": {k: str(v) for k, v in vars(args).items()}, "stage1_key": key,
              "at_cloud": metrics.to_dict(), "at_cloud_minus_0.25pp": metrics_tol.to_dict(),
              "val_kept_minus_v1": vs_v1.to_dict(), "val_kept_minus_v1_at_cloud_minus_0.25pp": vs_v1_tol.to_dict(),
              "history": history, "train_seconds": train_seconds,
              "tensorflow": tf.__version__, "python": platform.python_version()}
    report_path = _data.CACHE_DIR / "cascade" / f"{args.out_dir.name}.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    _data.write_json(report_path, report)
    np.savez_compressed(report_path.with_suffix(".npz"),   # the int8 logits, as predictions.npz lays them out
                        val_logits=edge["val"], test_logits=edge["test"],
                        val_labels=labels["val"].astype(np.int64), test_labels=labels["test"].astype(np.int64))

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"
    log.info("int8 ops %s; %d params; %s (%d bytes)", ops, n_params, tflite_path, tflite_path.stat().st_size)
    log.info("edge int8: val %.4f test %.4f; AUC val %.4f test %.4f", metrics.edge_val_accuracy,
             metrics.edge_test_accuracy, metrics.val_auc, metrics.test_auc)
    for name, m, d in (("cloud acc", metrics, vs_v1), ("cloud - 0.25 pp", metrics_tol, vs_v1_tol)):
        log.info("at %s: t %s, kept val %s, test %s (hybrid test acc %s); val kept minus v1 %+.1f pp "
                 "[%+.1f, %+.1f]%s", name, m.threshold, pct(m.val_kept), pct(m.test_kept),
                 "-" if m.test_hybrid_accuracy is None else f"{m.test_hybrid_accuracy:.4f}",
                 100 * d.mean, 100 * d.low, 100 * d.high, " (beyond noise)" if d.significant else "")
    log.info("report: %s", report_path)
    if staged:
        return
    if not (vs_v1.significant or args.force):
        raise SystemExit(f"not shipped: on val this model keeps {100 * vs_v1.mean:+.1f} pp against fmnist-edge-v1 "
                         f"(95% interval {100 * vs_v1.low:+.1f} to {100 * vs_v1.high:+.1f}), not better beyond noise; "
                         f"the candidate is in {stage_dir}. Pass --force to write {args.out_dir} anyway.")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tflite_path, args.out_dir / "model.tflite")
    _data.write_card(args.out_dir / "card.json", _data.read_json(card_path))
    log.info("wrote %s; now run evaluate.py --only edge --edge-dir %s", args.out_dir, args.out_dir)


if __name__ == "__main__":
    main()
