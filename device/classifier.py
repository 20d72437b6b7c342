"""The classifier: model card + preprocessing + backend + confidence score -> a frozen inference.

Owns the backend (through its invoke guard); knows nothing of offloading,
the store or the network.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends import create_backend
from .backends.guard import InvokeGuard
from .config import ModelConfig, PolicyConfig
from .modelcard import ModelCard, load_card, verified_model_bytes
from .preprocess import Preprocessor
from .router import load_router
from .scores import Prediction, ScoreParams, as_score_logits, dequantize, make_scorer, top1


@dataclass(frozen=True)
class Inference:
    label: int
    confidence: float
    #: the model-sized image the model saw (uint8, as the card says)
    fitted: np.ndarray


class Classifier:
    def __init__(self, model: ModelConfig, policy: PolicyConfig, backend_options: Any = None) -> None:
        """``backend_options``: the backend's own ``Options`` (``DeviceConfig.backend_options``);
        ``None`` takes its defaults, with the deprecated ``[model]`` runtime/num_threads for tflite-cpu."""
        self._model_cfg = model
        if backend_options is None and model.legacy_options():
            from .backends.tflite_cpu import Options
            backend_options = Options(**model.legacy_options())
        self._backend_options = backend_options
        self.card: ModelCard = load_card(model.card)
        self.pre = Preprocessor(self.card.input)
        # max_softmax has a fast path (top1); the other scores go through the shared scorer.
        self._scorer = None
        if policy.score != "max_softmax":
            router = load_router(policy.router_file) if policy.score == "router" else None
            self._scorer = make_scorer(policy.score, ScoreParams(temperature=policy.temperature, router=router))
        self._guard: InvokeGuard | None = None

    def start(self) -> None:
        """Check the model file against its card, load it on the backend, run one warm-up invoke.

        Raises BackendError (exit 2) for a backend that does not run this card's format, a
        runtime that is not installed, or a model the card does not describe.
        """
        if self._guard is not None:
            raise RuntimeError("Classifier.start() called twice")
        model_bytes = verified_model_bytes(self.card)
        backend = create_backend(self._model_cfg.backend, self.card, model_bytes, self._backend_options)
        try:
            # The first call allocates, and a model that cannot run should fail here, not on the first input.
            backend.invoke(self.pre.batch(np.zeros((1, self.card.input.height, self.card.input.width), np.uint8)))
        except BaseException:
            backend.close()
            raise
        self._guard = InvokeGuard(backend)

    def close(self) -> None:
        if self._guard is not None:
            self._guard.close()
            self._guard = None

    def __enter__(self) -> "Classifier":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def backend(self):
        return self._guard.backend if self._guard is not None else None

    @property
    def runtime(self) -> str:
        return self._guard.backend.runtime if self._guard is not None else ""

    def stuck_for(self) -> float:
        return self._guard.stuck_for() if self._guard is not None else 0.0

    def infer(self, pixels: np.ndarray) -> Inference:
        """One uint8 image (any size and mode the preprocessor fits) -> label, confidence score."""
        if self._guard is None:
            raise RuntimeError("the classifier is not started: call EdgeService.start() first")
        fitted = self.pre.fit(pixels)
        raw = self._guard.invoke(self.pre.batch(fitted[None]))
        pred = self._score(raw)
        return Inference(pred.label, pred.confidence, fitted)

    def infer_many(self, images: list[np.ndarray]) -> list[Inference]:
        """Many images, in order: batches of the backend's ``max_batch`` where it batches
        (onnxruntime on a dynamic-batch model), one invoke each otherwise; the same labels either way."""
        if self._guard is None:
            raise RuntimeError("the classifier is not started: call EdgeService.start() first")
        if self._guard.max_batch == 1 or len(images) < 2:
            return [self.infer(im) for im in images]
        step = self._guard.max_batch
        out: list[Inference] = []
        for start in range(0, len(images), step):
            fitted = [self.pre.fit(im) for im in images[start:start + step]]
            raw = self._guard.invoke_batch(self.pre.batch(fitted))   # the lock is held one batch at a time
            for i, f in enumerate(fitted):
                pred = self._score(raw[i:i + 1])
                out.append(Inference(pred.label, pred.confidence, f))
        return out

    def _score(self, raw: np.ndarray) -> Prediction:
        if self._scorer is None:
            return top1(raw, self.card.output)
        values = as_score_logits(dequantize(raw, self.card.output), self.card.output.kind).reshape(1, -1)
        return Prediction(int(values.argmax()), float(self._scorer(values)[0]))
