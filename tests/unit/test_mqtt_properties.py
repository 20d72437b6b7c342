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
