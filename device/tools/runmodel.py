"""Run a model over a data set: the edge model exactly as the device runs it, the cloud model
through the worker's own :class:`edge_infer_cloud.model.CloudModel`. What ``edge-infer
calibrate``, the model recipes' evaluation and the benches measure with."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..modelcard import ModelCard
from .progress import Progress


def _progress(total: int, label: str, enabled: bool) -> Progress:
    return Progress(total, label, enabled=None if enabled else False)


def edge_logits(card: ModelCard, images: Sequence[np.ndarray], backend: str = "tflite-cpu", runtime: str = "auto",
                progress: bool = True, label: str = "edge") -> np.ndarray:
    """Run the edge model exactly as the device does, one image per invoke -> float32 (N, C) logits
    (a model that outputs probabilities gives their logs, as the device scores them; a card with
    test-time views gives the log of their mean softmax, one invoke per view)."""
    from ..backends import BackendOptions, create_backend
    from ..modelcard import verified_model_bytes
    from ..preprocess import Preprocessor
    from ..scores import as_score_logits, dequantize, views_score_logits

    be = create_backend(backend, card, verified_model_bytes(card), BackendOptions(runtime, 1))
    pre = Preprocessor(card.input)
    out = np.empty((len(images), len(card.labels)), dtype=np.float32)
    bar = _progress(len(images), label, progress)
    try:
        views = card.input.views
        for i, im in enumerate(images):
            if views:
                tensor = pre.views_tensor(pre.fit(im))
                out[i] = views_score_logits([be.invoke(tensor[j:j + 1]) for j in range(len(views))], card.output)
            else:
                raw = be.invoke(pre.to_tensor(im))
                out[i] = as_score_logits(dequantize(raw, card.output), card.output.kind).reshape(-1)
            if i % 256 == 0:
                bar.update(i + 1)
        bar.update(len(images))
    finally:
        bar.close()
        be.close()
    return out


def cloud_outputs(model: Any, images: Sequence[np.ndarray], batch_size: int = 256, progress: bool = True,
                  label: str = "cloud") -> np.ndarray:
    """Run a :class:`~edge_infer_cloud.model.CloudModel` over images of any size (fitted to its
    card as the worker fits them) in batches -> its float32 (N, C) outputs, as the card's
    output kind says (logits or probabilities)."""
    out = []
    bar = _progress(len(images), label, progress)
    try:
        for i in range(0, len(images), batch_size):
            chunk = [model.pre.fit(im) for im in images[i:i + batch_size]]
            out.append(model.logits(chunk, batch_size=len(chunk)))
            bar.update(min(i + batch_size, len(images)))
    finally:
        bar.close()
    return np.concatenate(out) if out else np.zeros((0, len(model.card.labels)), np.float32)
