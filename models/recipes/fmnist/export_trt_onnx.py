#!/usr/bin/env python3
"""Export the edge model as ONNX for TensorRT: float32, float16 and INT8 (Q/DQ) -> models/fmnist-edge-v1-trt/.

    .venv-train/bin/python models/recipes/fmnist/train_edge.py --out-dir /tmp/edge-retrain   # the checkpoint
    .venv-train/bin/python models/recipes/fmnist/export_trt_onnx.py

The float model is the Keras checkpoint that train_edge.py keeps (models/.cache/edge_best.weights.h5): the
weights the shipped int8 TFLite model was quantized from (train_edge.py is deterministic; a re-run writes a
model.tflite with the shipped sha256, which this script checks when given --retrained-tflite). Its graph is
written with onnx.helper from the Keras layers, BatchNorm folded into the convolutions as the TFLite converter
folds it, and checked against Keras on 1,000 test images. Writing the ~10 nodes by hand keeps the export free of
a converter (tf2onnx pins older TensorFlow and protobuf releases than the recipe's).

Three files, one card each (the TensorRT backend's precision is the file's; docs/backends.md, "TensorRT"):

    model.onnx        float32, input "image" [N,1,28,28] (pixel / 255), output "logits" [N,10]      card.json
    model_fp16.onnx   float16 weights and arithmetic, float32 input and output (Cast at both ends)   card_fp16.json
    model_qdq.onnx    INT8 by explicit quantization: onnxruntime.quantization.quantize_static,      card_int8.json
                      QDQ format, per-channel symmetric int8 weights, symmetric int8 activations
                      (zero point 0, as TensorRT requires), calibrated on the 1,000 seeded training
                      images train_edge.py calibrated the TFLite model with (MinMax); Q/DQ on the
                      inputs of every Conv and Gemm, float32 biases

Every card's metrics are measured here through the device's own onnxruntime backend on the CPU (1 thread):
val and test accuracy, and agreement with the shipped TFLite model's test labels (fmnist-edge-v1/predictions.npz).
Each card names the int8 TFLite model as its "fallback_card" (the CPU model that answers while the GPU is
missing). Exit 0: written; 2: the checkpoint is missing or does not reproduce the shipped model.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np

import _data  # this folder's helpers (the script's folder is on sys.path)

OUT_DIR = _data.MODELS_DIR / "fmnist-edge-v1-trt"
TFLITE_CARD = _data.MODELS_DIR / "fmnist-edge-v1" / "card.json"
CHECKPOINT = _data.CACHE_DIR / "edge_best.weights.h5"
SEED = 20261125            # train_edge.py's: the same 1,000 calibration images as the TFLite model
CALIBRATION_IMAGES = 1000
OPSET = 17                 # TensorRT 10.3's ONNX parser reads opsets up to 20; 13+ has per-channel Q/DQ
BN_EPSILON_DEFAULT = 1e-3  # Keras BatchNormalization's default
INPUT, OUTPUT = "image", "logits"
EXIT_BAD_SOURCE = 2


class RecipeError(Exception):
    pass


# ----------------------------------------------------------------------------- Keras -> ONNX (float32)

def _fold_bn(weight_oihw: np.ndarray, bn) -> tuple[np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (np.asarray(w, np.float64) for w in bn.get_weights())
    scale = gamma / np.sqrt(var + bn.epsilon)
    w = weight_oihw.astype(np.float64) * scale[:, None, None, None]
    return w.astype(np.float32), (beta - mean * scale).astype(np.float32)


def keras_to_onnx(model, *, opset: int = OPSET):
    """The chain Conv/DepthwiseConv -> BatchNorm -> ReLU, MaxPool, GlobalAveragePool, Dense of train_edge.py's
    build_model as an ONNX graph with a dynamic batch dimension, NCHW (the same bytes as NHWC for 1 channel)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    nodes, inits = [], []
    current, i, n = INPUT, 0, 0

    def name(kind: str) -> str:
        nonlocal n
        n += 1
        return f"{kind}_{n}"

    while i < len(layers):
        layer = layers[i]
        kind = type(layer).__name__
        if kind in ("Conv2D", "DepthwiseConv2D"):
            (kernel,) = layer.get_weights()                  # use_bias=False: the BatchNorm after it is the bias
            if kind == "Conv2D":
                w = kernel.transpose(3, 2, 0, 1)             # HWIO -> OIHW
                group = 1
            else:
                w = kernel.transpose(2, 3, 0, 1)             # H W C M -> C M H W: (C*M, 1, kh, kw) for M = 1
                group = kernel.shape[2]
            bn = layers[i + 1]
            if type(bn).__name__ != "BatchNormalization" or type(layers[i + 2]).__name__ != "ReLU":
                raise RecipeError(f"{layer.name}: expected BatchNormalization and ReLU after it (train_edge.py's "
                                  "build_model); this script exports that network only")
            w, b = _fold_bn(w, bn)
            kh, kw = w.shape[2:]
            if layer.padding != "same" or tuple(layer.strides) != (1, 1):
                raise RecipeError(f"{layer.name}: only stride-1 'same' convolutions are exported")
            conv = name("conv")
            inits += [numpy_helper.from_array(w, f"{conv}.weight"), numpy_helper.from_array(b, f"{conv}.bias")]
            nodes.append(helper.make_node("Conv", [current, f"{conv}.weight", f"{conv}.bias"], [conv], name=conv,
                                          kernel_shape=[kh, kw], pads=[kh // 2, kw // 2, kh // 2, kw // 2],
                                          strides=[1, 1], group=group))
            relu = name("relu")
            nodes.append(helper.make_node("Relu", [conv], [relu], name=relu))
            current, i = relu, i + 3
        elif kind == "MaxPooling2D":
            pool = name("maxpool")
            nodes.append(helper.make_node("MaxPool", [current], [pool], name=pool,
                                          kernel_shape=list(layer.pool_size), strides=list(layer.strides)))
            current, i = pool, i + 1
        elif kind == "GlobalAveragePooling2D":
            gap, flat = name("gap"), name("flatten")
            nodes.append(helper.make_node("GlobalAveragePool", [current], [gap], name=gap))
            nodes.append(helper.make_node("Flatten", [gap], [flat], name=flat, axis=1))
            current, i = flat, i + 1
        elif kind == "Dense":
            kernel, bias = layer.get_weights()
            # (out, in) with transB = 1, as PyTorch exports Linear: per-channel weight scales on axis 0
            inits += [numpy_helper.from_array(np.ascontiguousarray(kernel.T, np.float32), "logits.weight"),
                      numpy_helper.from_array(bias.astype(np.float32), "logits.bias")]
            nodes.append(helper.make_node("Gemm", [current, "logits.weight", "logits.bias"], [OUTPUT], name="logits",
                                          transB=1))
            current, i = OUTPUT, i + 1
        else:
            raise RecipeError(f"layer {layer.name} ({kind}) is not one train_edge.py's build_model has")
    if current != OUTPUT:
        raise RecipeError("the network does not end in the Dense logits layer")
    graph = helper.make_graph(
        nodes, "fmnist_edge",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 10])], inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                   producer_name="edge-infer export_trt_onnx.py")
    onnx_model.ir_version = 8          # what onnxruntime and TensorRT 10.3 read (IR 8 = ONNX 1.10+)
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


# ----------------------------------------------------------------------------- float16

def to_float16(model):
    """Float16 weights and arithmetic, float32 input and output: a Cast after the input and before the output.
    Strongly typed TensorRT then builds FP16 kernels for every layer between them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for k, init in enumerate(g.initializer):
        if init.data_type == TensorProto.FLOAT:
            g.initializer[k].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                                              init.name))
    inner_in, inner_out = f"{INPUT}_fp16", f"{OUTPUT}_fp16"
    for node in g.node:
        node.input[:] = [inner_in if x == INPUT else x for x in node.input]
        node.output[:] = [inner_out if x == OUTPUT else x for x in node.output]
    g.node.insert(0, helper.make_node("Cast", [INPUT], [inner_in], name="cast_in", to=TensorProto.FLOAT16))
    g.node.append(helper.make_node("Cast", [inner_out], [OUTPUT], name="cast_out", to=TensorProto.FLOAT))
    del g.value_info[:]
    onnx.checker.check_model(m, full_check=True)
    return m


# ----------------------------------------------------------------------------- INT8 Q/DQ

def quantize_qdq(float_path: Path, out_path: Path, calibration: np.ndarray) -> None:
    """onnxruntime's static quantization in QDQ format, the way TensorRT takes it: symmetric int8 everywhere
    (zero points 0), per-channel weights, Q/DQ on the inputs of Conv and Gemm only, float biases."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(calibration[i:i + 1] for i in range(len(calibration)))

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {INPUT: batch}

    quantize_static(
        str(float_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "Gemm"],
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                       # TensorRT places the output quantization itself (fusing Conv+ReLU+Q of the next layer)
                       "OpTypesToExcludeOutputQuantization": ["Conv", "Gemm"]})


# ----------------------------------------------------------------------------- measuring and cards

def tflite_test_labels() -> np.ndarray:
    return np.load(TFLITE_CARD.parent / "predictions.npz")["test_logits"].argmax(1)


def measure(card_path: Path, images: dict[str, np.ndarray],
            labels: dict[str, np.ndarray]) -> tuple[dict, np.ndarray]:
    """Through the device's own onnxruntime backend (card preprocessing, 1 thread, batches of 256)."""
    from edge_infer.backends import create_backend
    from edge_infer.backends.onnxrt import Options
    from edge_infer.modelcard import load_card, verified_model_bytes
    from edge_infer.preprocess import Preprocessor

    card = load_card(card_path)
    be = create_backend("onnxruntime", card, verified_model_bytes(card), Options(intra_op_threads=1, max_batch=256))
    pre = Preprocessor(card.input)
    try:
        pred = {s: be.invoke_batch(pre.batch(list(images[s]))).argmax(1) for s in images}
        x = pre.batch(list(images["test"][:1100]))
        for i in range(100):
            be.invoke(x[i:i + 1])
        t0 = time.perf_counter()
        for i in range(100, 1100):
            be.invoke(x[i:i + 1])
        ms = 1000 * (time.perf_counter() - t0) / 1000
        runtime = be.runtime
    finally:
        be.close()
    return {"val_accuracy": round(float((pred["val"] == labels["val"]).mean()), 4),
            "test_accuracy": round(float((pred["test"] == labels["test"]).mean()), 4),
            "test_agreement_with_tflite": round(float((pred["test"] == tflite_test_labels()).mean()), 4),
            "runtime": runtime, "num_threads": 1, "ms_per_image": round(ms, 4)}, pred["test"]


def card_for(file: Path, precision: str, params: int, source: dict, extra: dict) -> dict:
    tfl = _data.read_json(TFLITE_CARD)
    return {
        "schema": 1, "name": f"fmnist-edge-{precision}", "version": "1.0.0", "role": "edge", "format": "onnx",
        "file": file.name, "sha256": _data.sha256_file(file), "params": params, "labels": tfl["labels"],
        "input": {"shape": [-1, 1, 28, 28], "layout": "NCHW", "dtype": "float32", "color": "L",
                  "pixel_scale": 255.0, "mean": 0.0, "std": 1.0},
        "output": {"kind": "logits", "dtype": "float32"},
        # the TensorRT backend reads the precision from the file; this says it for people
        "precision": precision, "accelerator": "tensorrt",
        "fallback_card": f"../{TFLITE_CARD.parent.name}/{TFLITE_CARD.name}",
        "exported_from": source, **extra,
        "metrics": {},
        "license": tfl.get("license", ""),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="train_edge.py's best weights")
    ap.add_argument("--retrained-tflite", type=Path, default=None,
                    help="the model.tflite of the train_edge.py run that wrote the checkpoint: refused unless it is "
                         "the shipped model (same sha256)")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)

    shipped_sha = _data.read_json(TFLITE_CARD)["sha256"]
    if not args.checkpoint.exists():
        print(f"export_trt_onnx: {args.checkpoint} is missing: run train_edge.py first (it keeps the checkpoint "
              "there; --out-dir /tmp/x leaves the shipped model alone)", file=sys.stderr)
        return EXIT_BAD_SOURCE
    if args.retrained_tflite is not None:
        got = hashlib.sha256(args.retrained_tflite.read_bytes()).hexdigest()
        if got != shipped_sha:
            print(f"export_trt_onnx: {args.retrained_tflite} has sha256 {got}, the shipped model {shipped_sha}: "
                  "this checkpoint is not the shipped model's", file=sys.stderr)
            return EXIT_BAD_SOURCE

    import onnx
    import tensorflow as tf
    import onnxruntime

    import train_edge
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras_model = train_edge.build_model(tf)
    keras_model.load_weights(str(args.checkpoint))

    data = _data.splits()
    images = {s: data[s].images for s in ("val", "test")}
    labels = {s: data[s].labels for s in ("val", "test")}
    x_test = (images["test"][:1000].astype(np.float32) / 255.0)

    float_model = keras_to_onnx(keras_model)
    keras_logits = keras_model.predict(x_test[..., None], batch_size=250, verbose=0)
    sess = onnxruntime.InferenceSession(float_model.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_logits = sess.run(None, {INPUT: x_test[:, None]})[0]
    max_diff = float(np.abs(onnx_logits - keras_logits).max())
    print(f"float ONNX vs Keras on 1,000 test images: max |logit difference| {max_diff:.2e}")
    if max_diff > 1e-3:
        raise RecipeError(f"the ONNX export differs from Keras by {max_diff}")

    args.out.mkdir(parents=True, exist_ok=True)
    fp32, fp16, qdq = args.out / "model.onnx", args.out / "model_fp16.onnx", args.out / "model_qdq.onnx"
    onnx.save(float_model, fp32)
    onnx.save(to_float16(float_model), fp16)
    rng = np.random.default_rng(SEED)
    train = data["train"].images
    calib_idx = rng.choice(len(train), size=CALIBRATION_IMAGES, replace=False)
    calibration = (train[calib_idx].astype(np.float32) / 255.0)[:, None]
    with tempfile.TemporaryDirectory() as tmp:
        # quantize_static writes its augmented model and calibration cache next to the output: keep them out
        tmp_out = Path(tmp) / qdq.name
        quantize_qdq(fp32, tmp_out, calibration)
        qdq_model = onnx.load(tmp_out)
    qdq_model.producer_name = "edge-infer export_trt_onnx.py (onnxruntime.quantization)"
    onnx.save(qdq_model, qdq)

    params = int(sum(np.prod(t.dims) for t in float_model.graph.initializer))
    source = {"script": "models/recipes/fmnist/export_trt_onnx.py", "checkpoint": "models/.cache/edge_best.weights.h5 "
              "(train_edge.py, seed 20261125)", "tflite_card": "../fmnist-edge-v1/card.json",
              "tflite_sha256": shipped_sha, "keras_params": int(keras_model.count_params()),
              "max_abs_logit_diff_vs_keras": float(f"{max_diff:.3g}"),
              "framework": f"tensorflow {tf.__version__}, onnx {onnx.__version__}, "
                           f"onnxruntime {onnxruntime.__version__}", "opset": OPSET}
    quant = {"quantization": {
        "tool": f"onnxruntime.quantization.quantize_static {onnxruntime.__version__}", "format": "QDQ",
        "weights": "int8, per-channel (axis 0), symmetric", "activations": "int8, per-tensor, symmetric (zero point 0)",
        "ops": ["Conv", "Gemm"], "bias": "float32", "calibration": f"MinMax over {CALIBRATION_IMAGES} training "
        f"images drawn with numpy default_rng({SEED}).choice (train_edge.py's representative set)"}}
    cards = {"fp32": (fp32, "card.json", {}), "fp16": (fp16, "card_fp16.json", {}),
             "int8": (qdq, "card_int8.json", quant)}
    preds = {}
    for precision, (file, card_name, extra) in cards.items():
        card_path = args.out / card_name
        _data.write_json(card_path, card_for(file, precision, params, source, extra))
        try:
            metrics, preds[precision] = measure(card_path, images, labels)
        except Exception as exc:   # onnxruntime's CPU provider has no float16 kernels for some operators
            print(f"{card_name}: not measured on onnxruntime CPU ({str(exc).splitlines()[0][:200]})")
            metrics = {"onnxruntime_cpu": f"not measured: {str(exc).splitlines()[0][:200]}"}
        card = _data.read_json(card_path)
        card["metrics"] = metrics
        _data.write_json(card_path, card)
        print(f"{card_name}: {file.name} {file.stat().st_size:,} bytes, {metrics}")
    if "fp32" in preds and "int8" in preds:
        print(f"int8 vs fp32 test labels agree on {(preds['int8'] == preds['fp32']).mean():.4f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RecipeError as exc:
        print(f"export_trt_onnx: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_SOURCE)
