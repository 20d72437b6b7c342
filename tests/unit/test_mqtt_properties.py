"""Our PUBLISH property encoder produces exactly paho's bytes."""
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_infer.mqtt_link import pack_publish_properties

from ..conftest import paho_properties


def paho_pack(ct, rt, cd, ups):
    return paho_properties(ct, rt, cd, ups).pack()


@pytest.mark.parametrize("ct, rt, cd, ups", [
    ("image/png", "edge-infer/d/corrections", b"abc", [("v", "1"), ("model", "m:1")]),
    ("application/json", None, b"x" * 300, []),
    (None, None, None, [("k", "välue ünïcode"), ("k", "twice")]),
    ("image/x-portable-graymap", "t/" + "r" * 200, b"\x00\xff", [(f"k{i}", "v" * i) for i in range(40)]),
])
def test_same_bytes_as_paho(ct, rt, cd, ups):
    assert pack_publish_properties(ct, rt, cd, ups) == paho_pack(ct, rt, cd, ups)


def test_round_trip_through_paho_unpack():
    packed = pack_publish_properties("image/png", "a/b", b"id-1", [("x", "y")])
    p = Properties(PacketTypes.PUBLISH)
    p.unpack(packed)
    assert p.ContentType == "image/png" and p.ResponseTopic == "a/b" and p.CorrelationData == b"id-1"
    assert p.UserProperty == [("x", "y")]


def test_prepacked_user_properties_give_the_same_bytes():
    from edge_infer.mqtt_link import pack_user_properties
    ups = [("v", "1"), ("model", "m:1"), ("reason", "audit")]
    assert pack_publish_properties("image/png", "a/b", b"id", packed_user_properties=pack_user_properties(ups)) == \
        paho_pack("image/png", "a/b", b"id", ups)


# --- receiving: our parser reads what paho's reads, and refuses what MQTT v5 refuses ----------------------------
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edge_infer.mqttprops import MalformedProperties, unpack_publish_properties  # noqa: E402

text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40)
props = st.fixed_dictionaries({}, optional={
    "PayloadFormatIndicator": st.integers(0, 1), "MessageExpiryInterval": st.integers(0, 2**32 - 1),
    "ContentType": text, "ResponseTopic": text, "CorrelationData": st.binary(max_size=80),
    "TopicAlias": st.integers(1, 65535),
    "SubscriptionIdentifier": st.lists(st.integers(1, 268_435_455), min_size=1, max_size=3),
    "UserProperty": st.lists(st.tuples(text, text), min_size=1, max_size=12)})


def paho_packed(fields: dict) -> bytes:
    p = Properties(PacketTypes.PUBLISH)
    for k, v in fields.items():
        if k == "SubscriptionIdentifier":
            for sid in v:            # paho appends: the property may repeat
                p.SubscriptionIdentifier = sid
        else:
            setattr(p, k, v)
    return p.pack()


@given(props, st.binary(max_size=20))
def test_unpack_reads_what_paho_packs(fields, payload):
    data = paho_packed(fields)
    ours, used = unpack_publish_properties(data + payload)
    assert used == len(data)
    theirs = Properties(PacketTypes.PUBLISH)
    theirs.unpack(data)
    for name in ("PayloadFormatIndicator", "MessageExpiryInterval", "ContentType", "ResponseTopic",
                 "CorrelationData", "TopicAlias"):
        assert getattr(ours, name) == getattr(theirs, name, None), name
    assert list(ours.UserProperty) == list(getattr(theirs, "UserProperty", []) or [])
    assert list(ours.SubscriptionIdentifier) == list(getattr(theirs, "SubscriptionIdentifier", []) or [])


@pytest.mark.parametrize("data, why", [
    (b"\x05\x03\x00\x09ab", "past"),                     # string longer than the properties
    (b"\x0a\x03\x00\x02ab\x03\x00\x02cd", "twice"),      # content type repeated
    (b"\x02\x11\x00", "not a PUBLISH property"),         # session expiry: a CONNECT property
    (b"\x05\x03\x00\x02\xff\xfe", "UTF-8"),
    (b"\x04\x03\x00\x01\x00", "U\\+0000"),
    (b"\x80\x80\x80\x80\x01", "longer than 4"),
    (b"\x10\x03", "only"),                               # length past the data
])
def test_unpack_refuses_malformed_properties(data, why):
    with pytest.raises(MalformedProperties, match=why):
        unpack_publish_properties(data)


def test_a_sample_round_trips_through_the_client_that_uses_our_parser(tmp_path):
    """Through a real broker: MqttLink's client (our parser) receives a sample with all its properties."""
    from edge_infer.config import MqttConfig
    from edge_infer.mqtt_link import MqttLink, Received
    from edge_infer.tools.localbroker import LocalBroker
    with LocalBroker(tmp_path) as broker:
        link = MqttLink(MqttConfig(port=broker.port), "props-rx", subscriptions=[("t/#", 1)], manual_ack=True)
        link.start()
        try:
            assert link.connected.wait(10)
            sender = MqttLink(MqttConfig(port=broker.port), "props-tx", subscriptions=[])
            sender.start()
            assert sender.connected.wait(10)
            ups = [("v", "1"), ("sample_id", "s1"), ("ünï", "cödé")]
            while True:       # the subscription may lag the connection by a moment
                sender.publish("t/x", b"\x00payload", content_type="image/png", response_topic="t/r",
                               correlation_data=b"s1", user_properties=ups)
                ev = link.events.get(timeout=10)
                if isinstance(ev, Received):
                    break
            sender.stop()
            assert (ev.topic, ev.payload, ev.qos, ev.content_type, ev.response_topic, ev.correlation_data) == \
                ("t/x", b"\x00payload", 1, "image/png", "t/r", b"s1")
            assert ev.user_properties == ups
        finally:
            link.stop()
