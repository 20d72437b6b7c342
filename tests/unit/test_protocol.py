import json
from pathlib import Path

import pytest

from edge_infer import protocol
from edge_infer.protocol import Correction, ErrorReply, ProtocolError, SampleMeta, Topics

T = Topics("edge-infer", "dev-1")
#: the device's own card's labels (Fashion-MNIST)
LABELS = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


def sample(**over):
    args = dict(topic=T.samples, payload=b"\x89PNG...", prefix="edge-infer", content_type="image/png",
                response_topic=T.corrections, correlation_data=b"abc123",
                user_properties=protocol.sample_properties(SampleMeta("abc123", "dev-1", "m:1", 3, 0.5, 1.0)),
                max_bytes=1000)
    args.update(over)
    return protocol.parse_sample(**args)


def test_topics():
    assert T.samples == "edge-infer/dev-1/samples" and T.corrections == "edge-infer/dev-1/corrections"
    assert protocol.shared_samples_filter("edge-infer", "g") == "$share/g/edge-infer/+/samples"
    assert protocol.device_of_sample_topic("edge-infer/dev-1/samples", "edge-infer") == "dev-1"
    assert protocol.device_of_sample_topic("edge-infer/dev-1/results", "edge-infer") is None
    assert protocol.device_of_sample_topic("other/dev-1/samples", "edge-infer") is None


def test_valid_sample_parses():
    req = sample()
    assert req.device_id == "dev-1" and req.sample_id == "abc123" and req.created_at == 1.0


@pytest.mark.parametrize("over, code", [
    ({"topic": "edge-infer/dev-1/other"}, "bad_topic"),
    ({"response_topic": "edge-infer/dev-2/corrections"}, "bad_response_topic"),
    ({"response_topic": None}, "bad_response_topic"),
    ({"correlation_data": None}, "no_correlation"),
    ({"correlation_data": b"\xff\xfe"}, "bad_correlation"),
    ({"correlation_data": b"has space"}, "bad_correlation"),
    ({"content_type": "text/plain"}, "bad_content_type"),
    ({"payload": b"x" * 1001}, "too_large"),
    ({"payload": b""}, "empty"),
    ({"user_properties": [("device_id", "dev-9")]}, "device_mismatch"),
    ({"user_properties": [("v", "2")]}, "bad_version"),
    ({"user_properties": [("sample_id", "abc123"), ("device_id", "dev-1")]}, "bad_version"),   # no version
    ({"user_properties": []}, "bad_version"),
    ({"topic": "edge-infer/dev 1/samples", "response_topic": "edge-infer/dev 1/corrections"}, "bad_device_id"),
    ({"topic": "edge-infer/_workers/samples", "response_topic": "edge-infer/_workers/corrections"}, "bad_device_id"),
    ({"topic": "edge-infer/" + "d" * 65 + "/samples"}, "bad_device_id"),
])
def test_bad_samples_are_rejected_with_a_code(over, code):
    with pytest.raises(ProtocolError) as exc:
        sample(**over)
    assert exc.value.code == code
    assert code in protocol.SAMPLE_ERROR_CODES   # the worker's status lists every code's counter


def test_every_error_code_is_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    assert [c for c in protocol.SAMPLE_ERROR_CODES if f"| `{c}` |" not in doc] == []
    assert f"{protocol.MAX_REPLY_BYTES} bytes" in doc


def test_correction_round_trip():
    c = Correction("abc123", 4, "coat", 0.93, "cloud:1", "w1")
    back = protocol.parse_reply(protocol.encode_correction(c), b"abc123", LABELS)
    assert back == Correction("abc123", 4, "coat", 0.93, "cloud:1", "w1")


def test_the_label_name_comes_from_the_devices_card_never_from_the_reply():
    """A reply claiming label 4 is "trouser" yields the card's name for 4; the claim is ignored."""
    forged = json.dumps({"v": 1, "type": "correction", "sample_id": "abc123", "label": 4, "label_name": "trouser",
                         "confidence": 0.9, "model": "m", "worker": "w"}).encode()
    assert protocol.parse_reply(forged, b"abc123", LABELS).label_name == "coat"
    nameless = json.dumps({"v": 1, "type": "correction", "sample_id": "abc123", "label": 9,
                           "confidence": 0.9}).encode()
    assert protocol.parse_reply(nameless, b"abc123", LABELS).label_name == "ankle boot"
    odd = json.dumps({"v": 1, "type": "correction", "sample_id": "abc123", "label": 1, "label_name": ["x"] * 9,
                      "confidence": 0.9, "model": {"a": 1}, "worker": 7}).encode()
    back = protocol.parse_reply(odd, b"abc123", LABELS)
    assert (back.label_name, back.model_id, back.worker_id) == ("trouser", "", "")


def test_error_reply_round_trip():
    e = ErrorReply("abc123", "bad_image", "not decodable", "w1")
    assert protocol.parse_reply(protocol.encode_error(e), b"abc123", LABELS) == e


@pytest.mark.parametrize("payload, cd, code", [
    (b"not json", b"s1", "bad_json"),
    (b"[" * 3000 + b"]" * 1000, b"s1", "bad_json"),   # nested deeper than the parser recurses
    (b"[1,2]", b"s1", "bad_schema"),
    (json.dumps({"v": 2, "type": "correction"}).encode(), b"s1", "bad_version"),
    (json.dumps({"v": True, "type": "correction"}).encode(), b"s1", "bad_version"),
    (json.dumps({"v": 1, "type": "correction", "sample_id": "s1", "label": 10, "confidence": 0.5}).encode(), b"s1", "bad_label"),
    (json.dumps({"v": 1, "type": "correction", "sample_id": "s1", "label": -1, "confidence": 0.5}).encode(), b"s1", "bad_label"),
    (json.dumps({"v": 1, "type": "correction", "sample_id": "s1", "label": True, "confidence": 0.5}).encode(), b"s1", "bad_schema"),
    (json.dumps({"v": 1, "type": "correction", "sample_id": "s1", "label": 1, "confidence": 1.5}).encode(), b"s1", "bad_schema"),
    (b'{"v":1,"type":"correction","sample_id":"s1","label":1,"confidence":NaN}', b"s1", "bad_schema"),
    (b'{"v":1,"type":"correction","sample_id":"s1","label":1,"confidence":' + b"9" * 400 + b"}", b"s1", "bad_schema"),
    (json.dumps({"v": 1, "type": "correction", "sample_id": "s1", "label": 1, "confidence": 0.5}).encode(), b"s2", "bad_correlation"),
    (json.dumps({"v": 1, "type": "correction", "sample_id": "s1", "label": 1, "confidence": 0.5}).encode(), None, "no_correlation"),
    (json.dumps({"v": 1, "type": "correction", "sample_id": "s1", "label": 1, "confidence": 0.5}).encode(), b"", "no_correlation"),
    (json.dumps({"v": 1, "type": "error", "sample_id": "s1", "error": {"code": "x"}}).encode(), None, "no_correlation"),
    (json.dumps({"v": 1, "type": "other", "sample_id": "s1"}).encode(), b"s1", "bad_schema"),
    (b"{" + b" " * 5000 + b"}", b"s1", "too_large"),
])
def test_bad_replies_are_rejected(payload, cd, code):
    with pytest.raises(ProtocolError) as exc:
        protocol.parse_reply(payload, cd, LABELS)
    assert exc.value.code == code
    assert code in protocol.REPLY_ERROR_CODES


def test_every_reply_error_code_is_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    assert [c for c in protocol.REPLY_ERROR_CODES if f"| `{c}` |" not in doc] == []


def test_status_round_trip_and_envelope_check():
    device = protocol.decode_status(protocol.encode_status({"device": "dev-1", "state": "online",
                                                             "counters": {"classified": 3}}))
    assert device["state"] == "online" and device["counters"] == {"classified": 3}
    assert protocol.decode_status(protocol.offline_status("dev-1")) == {"v": 1, "device": "dev-1", "state": "offline"}
    assert protocol.decode_status(protocol.encode_status({"worker": "w1", "state": "offline"}))["worker"] == "w1"
    for bad in (b"nope", b"[]", b'{"v":1,"device":"d"}', b'{"v":2,"device":"d","state":"online"}',
                b'{"v":1,"state":"online"}', b'{"v":1,"device":"d","state":"asleep"}',
                b'{"v":1,"device":"d","state":"online","counters":{"a":"1"}}',
                b'{"v":1,"device":"d","state":"online","counters":[1]}', b"[" * 5000):
        with pytest.raises(ProtocolError) as exc:
            protocol.decode_status(bad)
        assert exc.value.code in protocol.MESSAGE_ERROR_CODES


def test_results_message_round_trip_and_envelope_check():
    from edge_infer.result import Result
    rs = [Result(sample_id=f"s{i}", label=i, label_name=str(i), confidence=0.5, origin="edge", state="final",
                 offloaded=False, edge_label=i, edge_confidence=0.5, model_id="m:1", created_at=1.0) for i in range(3)]
    out = protocol.decode_results(protocol.encode_results(rs, "dev-1"))
    assert [r["sample_id"] for r in out] == ["s0", "s1", "s2"] and out[2]["edge"]["label"] == 2
    for bad in (b"nope", b'{"v":1}', b'{"v":2,"results":[]}', b'{"v":1,"results":[1]}'):
        with pytest.raises(ProtocolError):
            protocol.decode_results(bad)


def _local_final(sample_id: str, offload_error: str | None):
    from edge_infer.result import Result
    return Result(sample_id=sample_id, label=3, label_name="dress", confidence=0.4, origin="edge", state="final",
                  offloaded=True, edge_label=3, edge_confidence=0.4, model_id="m:1", created_at=1.0,
                  offload_reason="below_threshold", offload_error=offload_error)


def test_results_say_why_the_local_answer_stands():
    rs = [_local_final("s-exp", "expired"), _local_final("s-ev", "evicted: outbox byte budget full"),
          _local_final("s-err", "cloud error bad_image: not decodable")]
    wire = json.loads(protocol.encode_results(rs, "dev-1"))["results"]
    assert [r["offload_error"] for r in wire] == ["expired", "evicted: outbox byte budget full",
                                                  "cloud error bad_image: not decodable"]
    assert all(r["offload_reason"] == "below_threshold" for r in wire)
    assert [r["offload_error"] for r in protocol.decode_results(protocol.encode_results(rs, "dev-1"))] == \
        [r.offload_error for r in rs]


def test_offload_error_is_left_out_when_there_is_none_and_decoded_as_null():
    payload = protocol.encode_results([_local_final("s1", None)], "dev-1")
    assert "offload_error" not in json.loads(payload)["results"][0]   # v1 messages keep their shape and size
    assert protocol.decode_results(payload)[0]["offload_error"] is None
