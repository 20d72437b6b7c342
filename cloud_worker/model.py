"""The large model, run with onnxruntime, preprocessing from its card."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from edge_infer.modelcard import ModelCard, ModelCardError, load_card, verified_model_bytes
from edge_infer.preprocess import Preprocessor
from edge_infer.scores import max_softmax_batch, probabilities

log = logging.getLogger(__name__)


#: config name -> onnxruntime execution provider
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_GRAPH_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                 "all": "ORT_ENABLE_ALL"}


class ProviderError(ModelCardError):
    """None of the configured execution providers can run here."""


def session_providers(wanted: Sequence[str], available: Sequence[str], device_id: int = 0,
                      trt_engine_cache_dir: str = "") -> list:
    """The providers (with their options) to give onnxruntime: the configured ones this build has, in order.

    The CPU provider always ends the list, as onnxruntime's own fallback for ops a GPU provider
    does not take; a configured GPU provider missing from this build is an error naming the
    package to install, not a silent CPU run. ``trt_engine_cache_dir``: where the TensorRT provider
    keeps the engines it builds (building one takes minutes at the first start; onnxruntime keys
    the files by model, shapes and TensorRT version).
    """
    missing = [w for w in wanted if PROVIDERS[w] not in available]
    if missing:
        raise ProviderError(
            f"onnxruntime here has no {', '.join(missing)} execution provider (available: {', '.join(available)}). "
            "Install onnxruntime-gpu (CUDA, and TensorRT's libraries for tensorrt) on a GPU host, or set "
            'model.providers = ["cpu"]')
    out: list = []
    for w in wanted:
        name = PROVIDERS[w]
        if w == "tensorrt" and trt_engine_cache_dir:
            out.append((name, {"device_id": device_id, "trt_engine_cache_enable": True,
                               "trt_engine_cache_path": trt_engine_cache_dir}))
        else:
            out.append((name, {"device_id": device_id}) if w in ("cuda", "tensorrt") else name)
    if "cpu" not in wanted:
        out.append(PROVIDERS["cpu"])
    return out


class CloudModel:
    def __init__(self, card_path, intra_op_threads: int = 0, *, providers: Sequence[str] = ("cpu",),
                 graph_optimization: str = "all", device_id: int = 0, spin_wait: bool = False,
                 trt_engine_cache_dir: str = "") -> None:
        import onnxruntime as ort  # the cloud extra; imported here so the module loads without it

        self.card: ModelCard = load_card(card_path)
        if self.card.format != "onnx":
            raise ModelCardError(f"{card_path}: the cloud worker runs ONNX models, this card is {self.card.format}")
        if self.card.input.views:
            raise ModelCardError(f"{card_path}: test-time \"views\" are for edge models; the cloud worker runs "
                                 "its model once per sample: remove them from the cloud model's card")
        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _GRAPH_LEVELS[graph_optimization])
        # onnxruntime's pool threads spin after each run by default: measured ~1.1 cores busy on a
        # worker answering 50 samples/s, CPU the broker and the decode stage need.
        spin = "1" if spin_wait else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        chosen = session_providers(providers, ort.get_available_providers(), device_id, trt_engine_cache_dir)
        self.session = ort.InferenceSession(verified_model_bytes(self.card), sess_options=opts, providers=chosen)
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name
        self.pre = Preprocessor(self.card.input)
        # ort.__version__, not the distribution's metadata: onnxruntime-gpu installs the same module
        # under another distribution name, and looking up 'onnxruntime' then fails.
        self.runtime = f"onnxruntime {ort.__version__} ({self.providers[0]})"
        log.info("loaded %s with %s", self.card.model_id, self.runtime)

    def predict(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (any size; fitted per the card) -> (labels, confidences)."""
        return self.predict_fitted_batch([self.pre.fit(im) for im in images])

    def predict_fitted_batch(self, fitted: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Images already fitted to the card's input (``pre.fit``) -> (labels, confidences)."""
        (raw,) = self.session.run(None, {self.input_name: self.pre.batch(fitted)})
        return max_softmax_batch(probabilities(raw, self.card.output))

    def logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Already model-sized uint8 images (N, H, W) -> float32 (N, C) outputs; for evaluation."""
        out = [self.session.run(None, {self.input_name: self.pre.batch(images[i:i + batch_size])})[0]
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, len(self.card.labels)), np.float32)

    def predict_fitted(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Already model-sized uint8 images (N, H, W) -> labels; for evaluation."""
        return self.logits(images, batch_size).argmax(axis=-1)
