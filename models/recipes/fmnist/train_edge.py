#!/usr/bin/env python3
"""Train the edge Fashion-MNIST classifier (Keras) and export it as a full-int8 TFLite model.

The network is deliberately small (< 10,000 parameters, BatchNorm included) and
uses only Edge-TPU-friendly ops: Conv2D, DepthwiseConv2D, ReLU, MaxPool,
GlobalAveragePooling and Dense. The exported model has a fixed batch size of 1,
int8 input and int8 output, and its output is the LOGITS (no softmax layer), so
the host computes a fine-grained softmax from the dequantized logits.

Reproducible: tf.keras.utils.set_random_seed + deterministic ops; the checkpoint
(epoch) is selected on the validation split; the test split is not used here.

    .venv-train/bin/python models/recipes/fmnist/train_edge.py

Outputs: models/fmnist-edge-v1/model.tflite and card.json (metrics filled in by
models/recipes/fmnist/evaluate.py), plus logs/checkpoints under models/.cache/ (git-ignored).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # exact, reproducible float math

import numpy as np

import _data  # this folder's helpers (the script's folder is on sys.path)

OUT_DIR = _data.MODELS_DIR / "fmnist-edge-v1"
SEED = 20261125
MAX_PARAMS = 10_000


def build_model(tf, batch_size: int | None = None):
    """Conv(16) -> pool -> Conv(32) -> pool -> [DW(32)+PW(32)] -> [DW(32)+PW(64)] -> GAP -> Dense(10).

    Every conv is followed by BatchNorm (folded into the conv by the converter)
    and ReLU. The output is the logits (no softmax).
    """
    L = tf.keras.layers

    def bn_relu(x):
        return L.ReLU()(L.BatchNormalization()(x))

    def conv(x, filters, kernel=3):
        return bn_relu(L.Conv2D(filters, kernel, padding="same", use_bias=False)(x))

    def dw(x):
        return bn_relu(L.DepthwiseConv2D(3, padding="same", use_bias=False)(x))

    inp = L.Input(shape=(28, 28, 1), batch_size=batch_size, name="image")
    x = conv(inp, 16)                # 28x28
    x = L.MaxPooling2D(2)(x)         # 14x14
    x = conv(x, 32)
    x = L.MaxPooling2D(2)(x)         # 7x7
    x = conv(dw(x), 32, kernel=1)    # depthwise-separable
    x = conv(dw(x), 64, kernel=1)
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(10, name="logits")(x)  # logits: no softmax
    return tf.keras.Model(inp, out, name="fmnist_edge")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--summary", action="store_true", help="print the model summary and exit")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR,
                    help="where model.tflite and card.json go (default: %(default)s)")
    args = ap.parse_args()

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    tf.keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()

    model = build_model(tf)
    n_params = int(model.count_params())
    if args.summary:
        model.summary()
        return
    assert n_params < MAX_PARAMS, f"{n_params} parameters, the budget is {MAX_PARAMS}"
    print(f"edge model: {n_params:,} parameters (BatchNorm included)", flush=True)

    data = _data.splits()
    train, val = data["train"], data["val"]
    x_train = (train.images.astype(np.float32) / 255.0)[..., None]
    x_val = (val.images.astype(np.float32) / 255.0)[..., None]
    y_train, y_val = train.labels, val.labels

    steps = args.epochs * int(np.ceil(len(x_train) / args.batch_size))
    lr = tf.keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=args.lr / 10, decay_steps=steps - steps // 10,
        warmup_target=args.lr, warmup_steps=steps // 10, alpha=0.01)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(lr),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    _data.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    ckpt = _data.CACHE_DIR / "edge_best.weights.h5"
    callbacks = [tf.keras.callbacks.ModelCheckpoint(
        str(ckpt), monitor="val_accuracy", mode="max", save_best_only=True, save_weights_only=True)]
    t0 = time.perf_counter()
    hist = model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                     validation_data=(x_val, y_val), shuffle=True, callbacks=callbacks, verbose=2)
    train_seconds = time.perf_counter() - t0
    val_hist = hist.history["val_accuracy"]
    best_epoch = int(np.argmax(val_hist)) + 1
    print(f"best float val_acc {max(val_hist):.4f} at epoch {best_epoch}; training took {train_seconds:.0f} s",
          flush=True)

    # ---- export: same graph with a fixed batch of 1, weights of the best epoch ----
    model.load_weights(str(ckpt))
    export_model = build_model(tf, batch_size=1)
    export_model.set_weights(model.get_weights())

    rng = np.random.default_rng(args.seed)
    rep_idx = rng.choice(len(x_train), size=1000, replace=False)

    def representative_dataset():
        for i in rep_idx:
            yield [x_train[i:i + 1]]

    converter = tf.lite.TFLiteConverter.from_keras_model(export_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    tflite_bytes = converter.convert()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tflite_path = args.out_dir / "model.tflite"
    tflite_path.write_bytes(tflite_bytes)

    # ---- inspect the int8 model through ai-edge-litert ----
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    plain = Interpreter(model_path=str(tflite_path),  # without XNNPACK: the model's own op list
                        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    plain.allocate_tensors()
    ops = sorted({d["op_name"] for d in plain._get_ops_details()})
    interp = Interpreter(model_path=str(tflite_path), num_threads=1)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    print(f"int8 model ops: {ops}")
    print(f"input {inp['shape'].tolist()} {inp['dtype'].__name__} q={inp['quantization']}; "
          f"output {out['shape'].tolist()} {out['dtype'].__name__} q={out['quantization']}")
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    in_scale, in_zp = inp["quantization"]
    out_scale, out_zp = out["quantization"]
    correct = 0
    for i in range(len(x_val)):
        q = np.clip(np.round(x_val[i:i + 1] / in_scale + in_zp), -128, 127).astype(np.int8)
        interp.set_tensor(inp["index"], q)
        interp.invoke()
        correct += int(np.argmax(interp.get_tensor(out["index"])[0]) == y_val[i])
    float_val = float(np.mean(np.argmax(model.predict(x_val, batch_size=1000, verbose=0), 1) == y_val))
    print(f"val accuracy: float {float_val:.4f}, int8 {correct / len(x_val):.4f}")

    card = {
        "schema": 1,
        "name": "fmnist-edge",
        "version": "1.0.0",
        "role": "edge",
        "format": "tflite",
        "file": "model.tflite",
        "sha256": _data.sha256_file(tflite_path),
        "params": n_params,
        "labels": _data.LABELS,
        "input": {
            "shape": [1, 28, 28, 1],
            "layout": "NHWC",
            "dtype": "int8",
            "color": "L",
            "pixel_scale": 255.0,
            "mean": 0.0,
            "std": 1.0,
            "quantization": {"scale": float(in_scale), "zero_point": int(in_zp)},
        },
        "output": {"kind": "logits", "dtype": "int8",
                   "quantization": {"scale": float(out_scale), "zero_point": int(out_zp)}},
        "metrics": {},  # filled in by models/recipes/fmnist/evaluate.py
        "training": {
            "script": "models/recipes/fmnist/train_edge.py",
            "seed": args.seed,
            "framework": f"tensorflow {tf.__version__} (keras {tf.keras.__version__})",
            "epochs": args.epochs,
            "train_seconds": round(train_seconds, 1),
            "dataset": _data.DATASET_DESCRIPTION,
        },
        "license": "MIT (data); model weights: same as this repository",
    }
    card_path = args.out_dir / "card.json"
    _data.write_card(card_path, card)
    _data.write_json(_data.CACHE_DIR / "edge_train_history.json", {
        "args": {k: str(v) for k, v in vars(args).items()}, "history": {k: [float(v) for v in vs] for k, vs in hist.history.items()},
        "best_epoch": best_epoch, "float_val_acc": float_val, "int8_val_acc": correct / len(x_val),
        "ops": ops, "train_seconds": train_seconds,
        "tensorflow": tf.__version__, "python": platform.python_version(),
    })
    print(f"wrote {tflite_path} ({tflite_path.stat().st_size:,} bytes) and {card_path}")


if __name__ == "__main__":
    main()
