"""The MQTT protocol both sides speak (MQTT v5). Pure encode/decode.

Topics (``P`` = topic prefix, ``D`` = device id):

- ``P/D/samples``      device -> cloud, QoS 1. Payload: the image bytes.
  Content Type = image MIME type; Response Topic = ``P/D/corrections``;
  Correlation Data = sample id (ASCII); user properties carry metadata.
- ``P/D/corrections``  cloud -> device, QoS 1, JSON correction or error reply.
- ``P/D/results``      device -> integrators, QoS 1, JSON: a list of results.
- ``P/D/status``       device, retained, QoS 1, JSON; last will = offline.
- ``P/_workers/W/status``  worker ``W``, retained, QoS 1, JSON; last will = offline.

Workers subscribe with ``$share/<group>/P/+/samples``. Everything received is
untrusted: parsers check size, types and ranges and raise ProtocolError, and
nothing else, whatever the bytes (tests/unit/test_hostile_input.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

from .config import topic_safe_id
from .errors import EdgeInferError
from .preprocess import CONTENT_TYPES
from .result import Result

VERSION = 1
MAX_REPLY_BYTES = 4096
_SAMPLE_ID_MAX = 64

#: Every code a worker puts in an error reply (and counts as ``rejected_<code>``):
#: the envelope checks of parse_sample, then the worker's own image and model checks.
SAMPLE_ERROR_CODES: tuple[str, ...] = (
    "bad_topic", "bad_device_id", "bad_response_topic", "no_correlation", "bad_correlation", "device_mismatch",
    "bad_version", "bad_content_type", "too_large", "empty", "bad_image", "model_error",
)
#: Every code parse_reply raises (a device counts each as ``replies_rejected_<code>``).
REPLY_ERROR_CODES: tuple[str, ...] = (
    "too_large", "no_correlation", "bad_json", "bad_schema", "bad_version", "bad_correlation", "bad_label",
)
#: Every code decode_results and decode_status raise.
MESSAGE_ERROR_CODES: tuple[str, ...] = ("bad_json", "bad_schema")


class ProtocolError(EdgeInferError, ValueError):
    """A message does not follow the protocol. ``code`` is a stable short name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Topics:
    prefix: str
    device_id: str

    @property
    def samples(self) -> str:
        return f"{self.prefix}/{self.device_id}/samples"

    @property
    def corrections(self) -> str:
        return f"{self.prefix}/{self.device_id}/corrections"

    @property
    def results(self) -> str:
        return f"{self.prefix}/{self.device_id}/results"

    @property
    def status(self) -> str:
        return f"{self.prefix}/{self.device_id}/status"


def shared_samples_filter(prefix: str, group: str) -> str:
    return f"$share/{group}/{prefix}/+/samples"


def worker_status_topic(prefix: str, worker_id: str) -> str:
    """Retained worker status. Device ids start with a letter or digit, so ``_workers`` never clashes."""
    return f"{prefix}/_workers/{worker_id}/status"


def device_of_sample_topic(topic: str, prefix: str) -> str | None:
    parts = topic.split("/")
    pre = prefix.split("/")
    if len(parts) != len(pre) + 2 or parts[: len(pre)] != pre or parts[-1] != "samples" or not parts[-2]:
        return None
    return parts[-2]


def valid_sample_id(value: str) -> bool:
    return 0 < len(value) <= _SAMPLE_ID_MAX and value.isascii() and all(c.isalnum() or c in "-_." for c in value)


def valid_device_id(value: str) -> bool:
    """The documented device id pattern (``device_id`` in the device config): it names MQTT topics."""
    return topic_safe_id(value) is None


def _json(payload: bytes, what: str) -> Any:
    """JSON from the network: anything that is not JSON (or nests too deep to parse) is ``bad_json``."""
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("bad_json", f"{what} is not JSON") from None


# ---------------------------------------------------------------- samples

@dataclass(frozen=True)
class SampleMeta:
    sample_id: str
    device_id: str
    model_id: str
    edge_label: int
    edge_confidence: float
    created_at: float
    reason: str = "below_threshold"   # or "audit": a confident input sent to measure the edge model


def sample_properties(meta: SampleMeta) -> list[tuple[str, str]]:
    return [
        ("v", str(VERSION)),
        ("sample_id", meta.sample_id),
        ("device_id", meta.device_id),
        ("model", meta.model_id),
        ("edge_label", str(meta.edge_label)),
        ("edge_confidence", f"{meta.edge_confidence:.6f}"),
        ("created_at", f"{meta.created_at:.6f}"),
        ("reason", meta.reason),
    ]


@dataclass(frozen=True)
class SampleRequest:
    """A sample as a worker received it, validated."""
    device_id: str
    sample_id: str
    response_topic: str
    correlation_data: bytes
    content_type: str
    payload: bytes
    created_at: float | None


def parse_sample(topic: str, payload: bytes, *, prefix: str, content_type: str | None,
                 response_topic: str | None, correlation_data: bytes | None,
                 user_properties: list[tuple[str, str]] | None, max_bytes: int) -> SampleRequest:
    """Validate a received sample's envelope (not the image itself)."""
    device_id = device_of_sample_topic(topic, prefix)
    if device_id is None:
        raise ProtocolError("bad_topic", f"topic {topic!r} is not {prefix}/<device>/samples")
    if not valid_device_id(device_id):
        raise ProtocolError("bad_device_id", f"device id {device_id[:80]!r} in the topic is not a valid device id "
                            "(1-64 letters, digits, '_', '.', '-', starting with a letter or digit)")
    expected_reply = Topics(prefix, device_id).corrections
    if response_topic != expected_reply:
        # Replying anywhere else would let a sender make workers publish to
        # topics of its choosing.
        raise ProtocolError("bad_response_topic",
                            f"response topic {response_topic!r} is not the device's own {expected_reply!r}")
    props = dict(user_properties or [])
    if not correlation_data:
        raise ProtocolError("no_correlation", "sample has no correlation data")
    try:
        sample_id = correlation_data.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("bad_correlation", "correlation data is not an ASCII sample id") from None
    if not valid_sample_id(sample_id):
        raise ProtocolError("bad_correlation", "correlation data is not a valid sample id")
    if props.get("device_id", device_id) != device_id:
        raise ProtocolError("device_mismatch",
                            f"user property device_id {props.get('device_id')!r} does not match topic device {device_id!r}")
    if props.get("sample_id", sample_id) != sample_id:
        raise ProtocolError("bad_correlation", "user property sample_id differs from the correlation data")
    if props.get("v") != str(VERSION):
        # Required: a sample without a version is not one this worker can vouch it understands.
        raise ProtocolError("bad_version", f"protocol version {str(props.get('v'))[:20]!r} not supported "
                            f"(the v user property must be {VERSION})")
    if content_type not in CONTENT_TYPES:
        raise ProtocolError("bad_content_type",
                            f"content type {content_type!r} not accepted; use one of {', '.join(CONTENT_TYPES)}")
    if len(payload) > max_bytes:
        raise ProtocolError("too_large", f"payload of {len(payload)} bytes exceeds {max_bytes}")
    if not payload:
        raise ProtocolError("empty", "empty payload")
    created = None
    try:
        created = float(props["created_at"]) if "created_at" in props else None
    except (TypeError, ValueError):
        created = None
    if created is not None and not math.isfinite(created):
        created = None
    return SampleRequest(device_id, sample_id, response_topic, bytes(correlation_data), content_type, payload, created)


# ---------------------------------------------------------------- replies

@dataclass(frozen=True)
class Correction:
    sample_id: str
    label: int
    label_name: str
    confidence: float
    model_id: str
    worker_id: str


@dataclass(frozen=True)
class ErrorReply:
    sample_id: str
    code: str
    message: str
    worker_id: str


def encode_correction(c: Correction) -> bytes:
    return json.dumps({
        "v": VERSION, "type": "correction", "sample_id": c.sample_id, "label": c.label,
        "label_name": c.label_name, "confidence": round(c.confidence, 6), "model": c.model_id,
        "worker": c.worker_id,
    }, separators=(",", ":")).encode()


def encode_error(e: ErrorReply) -> bytes:
    return json.dumps({
        "v": VERSION, "type": "error", "sample_id": e.sample_id,
        "error": {"code": e.code, "message": e.message[:500]}, "worker": e.worker_id,
    }, separators=(",", ":")).encode()


def _field(obj: dict, key: str, typ: type | tuple) -> Any:
    value = obj.get(key)
    if not isinstance(value, typ) or isinstance(value, bool):
        raise ProtocolError("bad_schema", f"field {key!r} missing or of the wrong type")
    return value


def _text(value: Any, limit: int, default: str = "") -> str:
    """A free-text field from the network: a string cut to ``limit``; anything else is ``default``."""
    return value[:limit] if isinstance(value, str) else default


def parse_reply(payload: bytes, correlation_data: bytes | None, labels: Sequence[str]) -> Correction | ErrorReply:
    """Validate a correction or error reply received by a device.

    ``labels`` are the device's own model card's labels: a correction's label
    must be one of them, and its ``label_name`` is the card's name for it; the
    name in the reply is ignored (a reply cannot make a device publish a name
    its model does not have). The Correlation Data is required and must be
    the ``sample_id``. Raises ProtocolError (codes: REPLY_ERROR_CODES) and
    nothing else.
    """
    if len(payload) > MAX_REPLY_BYTES:
        raise ProtocolError("too_large", f"reply of {len(payload)} bytes exceeds {MAX_REPLY_BYTES}")
    if not correlation_data:
        raise ProtocolError("no_correlation", "reply has no correlation data (a reply must echo the sample's)")
    obj = _json(payload, "reply")
    if not isinstance(obj, dict):
        raise ProtocolError("bad_schema", "reply is not a JSON object")
    if obj.get("v") != VERSION or isinstance(obj.get("v"), bool):
        raise ProtocolError("bad_version", f"reply version {_text(obj.get('v'), 20, '?')!r} is not {VERSION}")
    sample_id = _field(obj, "sample_id", str)
    if not valid_sample_id(sample_id):
        raise ProtocolError("bad_schema", "sample_id is not a valid sample id")
    if correlation_data != sample_id.encode():
        raise ProtocolError("bad_correlation", "correlation data does not match sample_id")
    worker = _text(obj.get("worker"), 128)
    kind = obj.get("type")
    if kind == "error":
        err = obj.get("error")
        if not isinstance(err, dict):
            raise ProtocolError("bad_schema", "error reply without an 'error' object")
        return ErrorReply(sample_id, _text(err.get("code"), 64, "unknown"), _text(err.get("message"), 500), worker)
    if kind != "correction":
        raise ProtocolError("bad_schema", f"unknown reply type {_text(kind, 40, '?')!r}")
    label = _field(obj, "label", int)
    if not 0 <= label < len(labels):
        raise ProtocolError("bad_label", f"label {label} out of range 0..{len(labels) - 1}"[:120])
    raw = _field(obj, "confidence", (int, float))
    try:
        confidence = float(raw)
    except OverflowError:   # an integer too large for a float
        confidence = math.inf
    if not (0.0 <= confidence <= 1.0):   # NaN fails this too
        raise ProtocolError("bad_schema", "confidence must be within [0, 1]")
    return Correction(sample_id, label, labels[label], confidence, _text(obj.get("model"), 128), worker)


# ---------------------------------------------------------------- results and status

def result_dict(r: Result) -> dict[str, Any]:
    d = {
        "sample_id": r.sample_id, "source": r.source,
        "label": r.label, "label_name": r.label_name, "confidence": round(r.confidence, 6),
        "origin": r.origin, "state": r.state, "offloaded": r.offloaded, "offload_reason": r.offload_reason,
        # backend/fallback: which backend answered, and whether the fallback model did ([model] fallback)
        "edge": {"label": r.edge_label, "confidence": round(r.edge_confidence, 6), "model": r.model_id,
                 "backend": r.backend, "fallback": r.fallback},
        "cloud_model": r.cloud_model_id, "created_at": round(r.created_at, 6),
        "corrected_at": None if r.corrected_at is None else round(r.corrected_at, 6),
    }
    # Optional and additive (v1 subscribers ignore unknown keys); only the few results the
    # cloud could not help carry it, so the bursts of ordinary results keep their size.
    if r.offload_error is not None:
        d["offload_error"] = r.offload_error
    return d


def encode_results(results: list[Result], device_id: str) -> bytes:
    """One results message: results in the order they became due (one or many).

    Batching is what lets a device publish thousands of results a second: one
    MQTT message (and one PUBACK) carries every result that is due at once.
    """
    return json.dumps({"v": VERSION, "device": device_id, "results": [result_dict(r) for r in results]},
                      separators=(",", ":")).encode()


def decode_results(payload: bytes) -> list[dict[str, Any]]:
    """For subscribers: the results in one message (validates the envelope)."""
    obj = _json(payload, "results message")
    if not isinstance(obj, dict) or obj.get("v") != VERSION or isinstance(obj.get("v"), bool) or not isinstance(obj.get("results"), list):
        raise ProtocolError("bad_schema", "results message must be {'v': 1, 'device': ..., 'results': [...]}")
    results = obj["results"]
    if not all(isinstance(r, dict) for r in results):
        raise ProtocolError("bad_schema", "every result must be a JSON object")
    for r in results:
        # Absent when there is none (and from devices older than the field): one shape for subscribers.
        r.setdefault("offload_error", None)
    return results


def encode_status(fields: dict[str, Any]) -> bytes:
    return json.dumps({"v": VERSION, **fields}, separators=(",", ":"), default=str).encode()


def offline_status(device_id: str) -> bytes:
    return encode_status({"device": device_id, "state": "offline"})


#: the states a device or worker status says
STATUS_STATES = ("online", "degraded", "offline")


def decode_status(payload: bytes) -> dict[str, Any]:
    """For subscribers: a device's (``P/D/status``) or a worker's (``P/_workers/W/status``) status.

    Checks the envelope: a JSON object with ``v`` 1, a ``state`` of STATUS_STATES,
    a ``device`` or ``worker`` id (a string), and ``counters``, when present, an
    object of integers. Other fields are passed through (subscribers ignore
    keys they do not know). Raises ProtocolError (``bad_json``, ``bad_schema``).
    """
    obj = _json(payload, "status message")
    if not isinstance(obj, dict) or obj.get("v") != VERSION or isinstance(obj.get("v"), bool):
        raise ProtocolError("bad_schema", "status message must be a JSON object with 'v': 1")
    if obj.get("state") not in STATUS_STATES:
        raise ProtocolError("bad_schema", f"status 'state' must be one of {', '.join(STATUS_STATES)}")
    if not any(isinstance(obj.get(k), str) and obj.get(k) for k in ("device", "worker")):
        raise ProtocolError("bad_schema", "status message names no 'device' or 'worker'")
    for k in ("device", "worker"):
        if k in obj and not (isinstance(obj[k], str) and obj[k]):
            raise ProtocolError("bad_schema", f"status {k!r} must be a non-empty string")
    counters = obj.get("counters")
    if counters is not None and not (isinstance(counters, dict) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in counters.values())):
        raise ProtocolError("bad_schema", "status 'counters' must be an object of integers")
    return obj
