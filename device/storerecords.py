"""The store's frozen records: what goes in, what comes out."""
from __future__ import annotations

from dataclasses import dataclass

from .result import Result


@dataclass(frozen=True)
class OutboxItem:
    sample_id: str
    created_at: float
    content_type: str
    payload: bytes
    #: MQTT v5 user properties, packed as sent (opaque to the store)
    user_props: bytes
    #: publication sequence of its result's provisional version (set by the store; 0 = already published)
    result_seq: int = 0


@dataclass(frozen=True)
class Due:
    """A result version due for publication: ``seq`` is its publication sequence."""
    seq: int
    result: Result


@dataclass(frozen=True)
class ApplyOutcome:
    """What applying a reply did. ``due`` is None when nothing changed."""
    due: Due | None
    reason: str   # "applied", "duplicate", "unknown", "late"
    #: (content type, payload) of the corrected sample, when asked for (the hard-example archive)
    sample: tuple[str, bytes] | None = None

    @property
    def result(self) -> Result | None:
        return self.due.result if self.due else None


@dataclass(frozen=True)
class RecordOutcome:
    seqs: list[int]
    #: results of samples evicted to make room (now final, due for publication)
    evicted: list[Due]


@dataclass(frozen=True)
class OpenReport:
    requeued: int
    #: what an operator should hear about: an upgrade, a repaired index, a torn WAL tail
    notices: tuple[str, ...] = ()
    repaired: bool = False


def row_to_result(row: tuple) -> Result:
    (sample_id, created_at, source, model, edge_label, edge_conf, label, label_name, confidence,
     origin, state, offloaded, corrected_at, cloud_model, offload_error, offload_reason, backend, fallback) = row
    return Result(sample_id=sample_id, label=label, label_name=label_name, confidence=confidence, origin=origin,
                  state=state, offloaded=bool(offloaded), edge_label=edge_label, edge_confidence=edge_conf,
                  model_id=model, created_at=created_at, source=source, corrected_at=corrected_at,
                  cloud_model_id=cloud_model, offload_error=offload_error, offload_reason=offload_reason,
                  backend=backend, fallback=bool(fallback))
