"""Running the float originals and the converted models on the same inputs: logits, top-1
agreement, and timings on one thread.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def torch_logits(model, x_nchw: np.ndarray, batch: int = 16) -> np.ndarray:
    import torch
    out = []
    with torch.no_grad():
        for i in range(0, len(x_nchw), batch):
            out.append(model(torch.from_numpy(x_nchw[i:i + batch])).numpy())
    return np.concatenate(out).astype(np.float32)


def ort_session(path: Path, threads: int = 1):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_logits(sess, x_nchw: np.ndarray, batch: int = 16) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x_nchw[i:i + batch]})[0]
                           for i in range(0, len(x_nchw), batch)]).astype(np.float32)


class TfliteInt8:
    """A full-int8 .tflite on ai-edge-litert, one image per invoke, as the device runs it."""

    def __init__(self, data: bytes, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter
        self.it = Interpreter(model_content=data, num_threads=threads)
        self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]
        self.out = self.it.get_output_details()[0]
        self.in_scale, self.in_zp = self.inp["quantization"]
        self.out_scale, self.out_zp = self.out["quantization"]

    def quantize(self, x_nhwc: np.ndarray) -> np.ndarray:
        q = np.round(x_nhwc.astype(np.float64) / self.in_scale + self.in_zp)
        return np.clip(q, -128, 127).astype(np.int8)

    def run_q(self, q: np.ndarray) -> np.ndarray:
        """int8 (1, H, W, 3) -> int8 logits (1, 1000)."""
        self.it.set_tensor(self.inp["index"], q)
        self.it.invoke()
        return self.it.get_tensor(self.out["index"])

    def logits(self, x_nhwc: np.ndarray) -> np.ndarray:
        """Float NHWC inputs -> dequantized logits (N, 1000)."""
        q = self.quantize(x_nhwc)
        raw = np.concatenate([self.run_q(q[i:i + 1]) for i in range(len(q))])
        return ((raw.astype(np.float32) - self.out_zp) * self.out_scale).astype(np.float32)


def tflite_float_logits(path: Path, x_nhwc: np.ndarray, threads: int = 1) -> np.ndarray:
    """A float32 .tflite (onnx2tf's unquantized output) on float NHWC inputs, one image per invoke."""
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    out = []
    for k in range(len(x_nhwc)):
        it.set_tensor(i, x_nhwc[k:k + 1])
        it.invoke()
        out.append(it.get_tensor(o).copy())
    return np.concatenate(out).astype(np.float32)


@dataclass(frozen=True)
class Agreement:
    n: int
    top1_agree: int
    top5_contains_top1: int   # the original's top-1 is in the converted model's top-5

    @property
    def rate(self) -> float:
        return self.top1_agree / self.n if self.n else 0.0

    def as_dict(self) -> dict:
        return {"n": self.n, "top1_agreement": round(self.rate, 4), "top1_agree": self.top1_agree,
                "original_top1_in_top5": self.top5_contains_top1}


def agreement(reference: np.ndarray, converted: np.ndarray) -> Agreement:
    ref1 = reference.argmax(1)
    top5 = np.argsort(-converted, axis=1)[:, :5]
    return Agreement(len(ref1), int((converted.argmax(1) == ref1).sum()),
                     int((top5 == ref1[:, None]).any(1).sum()))


def correct(logits: np.ndarray, labels: np.ndarray) -> int:
    return int((logits.argmax(1) == labels).sum())


def time_tflite(model: TfliteInt8, q: np.ndarray, *, warmup: int = 20, runs: int = 200) -> dict:
    """Median and mean ms of one invoke (set_tensor + invoke + get_tensor), batch 1."""
    for i in range(warmup):
        model.run_q(q[i % len(q):i % len(q) + 1])
    times = []
    for i in range(runs):
        x = q[i % len(q):i % len(q) + 1]
        t0 = time.perf_counter()
        model.run_q(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms_per_image_median": round(statistics.median(times), 3), "ms_per_image_mean": round(statistics.fmean(times), 3),
            "runs": runs}


def time_ort(sess, x_nchw: np.ndarray, *, batch: int = 16, warmup: int = 2, runs: int = 10) -> dict:
    """Images per second at a fixed batch (the median batch time)."""
    name = sess.get_inputs()[0].name
    xb = np.ascontiguousarray(np.resize(x_nchw, (batch, *x_nchw.shape[1:])))
    for _ in range(warmup):
        sess.run(None, {name: xb})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: xb})
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"images_per_second": round(batch / med, 1), "ms_per_batch_median": round(med * 1e3, 1), "batch": batch,
            "runs": runs}
