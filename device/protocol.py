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
untrusted: parsers check size, types and ranges and raise ProtocolError.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import EdgeInferError
from .preprocess import CONTENT_TYPES
from .result import Result

VERSION = 1
MAX_REPLY_BYTES = 4096
_SAMPLE_ID_MAX = 64

#: Every code a worker puts in an error reply (and counts as ``rejected_<code>``):
#: the envelope checks of parse_sample, then the worker's own image and model checks.
SAMPLE_ERROR_CODES: tuple[str, ...] = (
    "bad_topic", "bad_response_topic", "no_correlation", "bad_correlation", "device_mismatch", "bad_version",
    "bad_content_type", "too_large", "empty", "bad_image", "model_error",
)


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
    if props.get("v", str(VERSION)) != str(VERSION):
        raise ProtocolError("bad_version", f"protocol version {props.get('v')!r} not supported (this worker speaks {VERSION})")
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
    except ValueError:
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


def parse_reply(payload: bytes, correlation_data: bytes | None, num_labels: int) -> Correction | ErrorReply:
    """Validate a correction or error reply received by a device."""
    if len(payload) > MAX_REPLY_BYTES:
        raise ProtocolError("too_large", f"reply of {len(payload)} bytes exceeds {MAX_REPLY_BYTES}")
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("bad_json", "reply is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_schema", "reply is not a JSON object")
    if obj.get("v") != VERSION:
        raise ProtocolError("bad_version", f"reply version {obj.get('v')!r} is not {VERSION}")
    sample_id = _field(obj, "sample_id", str)
    if not valid_sample_id(sample_id):
        raise ProtocolError("bad_schema", "sample_id is not a valid sample id")
    if correlation_data is not None and correlation_data != sample_id.encode():
        raise ProtocolError("bad_correlation", "correlation data does not match sample_id")
    worker = str(obj.get("worker", ""))[:128]
    kind = obj.get("type")
    if kind == "error":
        err = obj.get("error")
        if not isinstance(err, dict):
            raise ProtocolError("bad_schema", "error reply without an 'error' object")
        return ErrorReply(sample_id, str(err.get("code", "unknown"))[:64], str(err.get("message", ""))[:500], worker)
    if kind != "correction":
        raise ProtocolError("bad_schema", f"unknown reply type {kind!r}")
    label = _field(obj, "label", int)
    if not 0 <= label < num_labels:
        raise ProtocolError("bad_label", f"label {label} out of range 0..{num_labels - 1}")
    confidence = float(_field(obj, "confidence", (int, float)))
    if not (0.0 <= confidence <= 1.0) or math.isnan(confidence):
        raise ProtocolError("bad_schema", "confidence must be within [0, 1]")
    return Correction(sample_id, label, str(obj.get("label_name", ""))[:128], confidence,
                      str(obj.get("model", ""))[:128], worker)


# ---------------------------------------------------------------- results and status

def result_dict(r: Result) -> dict[str, Any]:
    d = {
        "sample_id": r.sample_id, "source": r.source,
        "label": r.label, "label_name": r.label_name, "confidence": round(r.confidence, 6),
        "origin": r.origin, "state": r.state, "offloaded": r.offloaded, "offload_reason": r.offload_reason,
        "edge": {"label": r.edge_label, "confidence": round(r.edge_confidence, 6), "model": r.model_id},
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
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("bad_json", "results message is not JSON") from None
    if not isinstance(obj, dict) or obj.get("v") != VERSION or not isinstance(obj.get("results"), list):
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
