"""The large model, run with onnxruntime, preprocessing from its card."""
from __future__ import annotations

import importlib.metadata
import logging

import numpy as np

from edge_infer.modelcard import ModelCard, ModelCardError, load_card, verified_model_bytes
from edge_infer.preprocess import Preprocessor
from edge_infer.scores import max_softmax_batch, probabilities

log = logging.getLogger(__name__)


class CloudModel:
    def __init__(self, card_path, intra_op_threads: int = 0) -> None:
        import onnxruntime as ort  # the cloud extra; imported here so the module loads without it

        self.card: ModelCard = load_card(card_path)
        if self.card.format != "onnx":
            raise ModelCardError(f"{card_path}: the cloud worker runs ONNX models, this card is {self.card.format}")
        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(verified_model_bytes(self.card), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.pre = Preprocessor(self.card.input)
        self.runtime = f"onnxruntime {importlib.metadata.version('onnxruntime')}"
        log.info("loaded %s with %s", self.card.model_id, self.runtime)

    def predict(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (any size; fitted per the card) -> (labels, confidences)."""
        batch = self.pre.batch([self.pre.fit(im) for im in images])
        (raw,) = self.session.run(None, {self.input_name: batch})
        return max_softmax_batch(probabilities(raw, self.card.output))

    def logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Already model-sized uint8 images (N, H, W) -> float32 (N, C) outputs; for evaluation."""
        out = [self.session.run(None, {self.input_name: self.pre.batch(images[i:i + batch_size])})[0]
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, len(self.card.labels)), np.float32)

    def predict_fitted(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Already model-sized uint8 images (N, H, W) -> labels; for evaluation."""
        return self.logits(images, batch_size).argmax(axis=-1)
