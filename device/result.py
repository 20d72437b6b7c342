"""The result record every input gets."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Result:
    sample_id: str
    label: int
    label_name: str
    confidence: float
    #: "edge" (the local model's answer) or "cloud" (a correction)
    origin: str
    #: "provisional" while a correction is awaited, "final" otherwise
    state: str
    offloaded: bool
    edge_label: int
    edge_confidence: float
    model_id: str
    created_at: float
    source: str = ""
    corrected_at: float | None = None
    cloud_model_id: str | None = None
    #: set when the outbox could not take the sample (budget, payload too large)
    offload_error: str | None = None
    #: why it was offloaded ("below_threshold" or "audit"), or why not although unsure ("budget_samples", ...)
    offload_reason: str | None = None
    #: identifies the input at its source (the spool: name, size, mtime), so that an
    #: input classified just before a crash is not classified again after it
    source_key: str = ""
    #: the registry name of the backend that produced the edge answer ("" in stores written before schema 4)
    backend: str = ""
    #: the edge answer came from the fallback model ([model] fallback), not the configured backend
    fallback: bool = False
