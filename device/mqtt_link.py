"""A thin MQTT v5 adapter over paho-mqtt, used by the device and the workers.

paho calls back on its network thread, sometimes holding its own locks
(on_publish runs under the out-message mutex). So the callbacks only put
events on a queue; the owner's single worker thread consumes them. That keeps
every state change in one thread and rules out lock-order deadlocks with paho.
"""
from __future__ import annotations

import logging
import queue
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import MqttConfig
from .mqttprops import (MalformedProperties, pack_publish_properties, pack_user_properties,
                        unpack_publish_properties)

__all__ = ["Connected", "Disconnected", "Event", "MqttLink", "PackedProperties", "Published", "Received",
           "pack_publish_properties", "pack_user_properties"]

log = logging.getLogger(__name__)


class PackedProperties:
    """What paho's publish() needs of a Properties object: ``pack()``."""
    __slots__ = ("_packed",)

    def __init__(self, packed: bytes) -> None:
        self._packed = packed

    def pack(self) -> bytes:
        return self._packed


class _Client(mqtt.Client):
    """paho's client with MQTT v5 PUBLISH decoding by :mod:`.mqttprops`.

    paho parses a sample's properties in ~200 us on its network thread (measured), which capped
    a cloud worker at a third of its model's speed; this does it in a few. The override follows
    paho 2.x's own ``_handle_publish`` step for step (message fields, the callback, PUBACK unless
    acknowledged manually); tests/unit/test_mqtt_properties.py checks it against paho's parser and
    every integration test runs through it.
    """

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        if self._protocol != mqtt.MQTTv5:
            return super()._handle_publish()
        header = self._in_packet["command"]
        packet = memoryview(self._in_packet["packet"])
        qos = (header & 0x06) >> 1
        if len(packet) < 2:
            raise MalformedPacket("PUBLISH shorter than its topic length")
        (tlen,) = struct.unpack_from("!H", packet, 0)
        pos = 2 + tlen
        if pos > len(packet):
            raise MalformedPacket("PUBLISH topic runs past the packet")
        topic = bytes(packet[2:pos])
        mid = 0
        if qos > 0:
            if len(packet) < pos + 2:
                raise MalformedPacket("PUBLISH without its packet identifier")
            (mid,) = struct.unpack_from("!H", packet, pos)
            pos += 2
        try:
            props, used = unpack_publish_properties(packet[pos:])
        except MalformedProperties as exc:
            raise MalformedPacket(str(exc)) from None
        message = mqtt.MQTTMessage(mid=mid, topic=topic)
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.properties = props
        message.payload = bytes(packet[pos + used:])
        message.timestamp = time.monotonic()
        if qos == 0:
            self._handle_on_message(message)
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        if qos == 1:
            self._handle_on_message(message)
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS if self._manual_ack else self._send_puback(mid)
        return super()._handle_publish()   # QoS 2: never used here; paho's own path (it re-parses)


def _no_delay(client: Any, userdata: Any, sock: Any) -> None:
    """Small request/response messages: without TCP_NODELAY, Nagle's algorithm and
    delayed ACKs hold each one back ~40 ms (measured: correction latency 48 -> 10 ms)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (unix, websockets wrapper): nothing to do


@dataclass(frozen=True)
class Connected:
    session_present: bool


@dataclass(frozen=True)
class Disconnected:
    reason: str


@dataclass(frozen=True)
class Published:
    mid: int
    failed: bool
    reason: str


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    mid: int
    content_type: str | None
    response_topic: str | None
    correlation_data: bytes | None
    user_properties: list[tuple[str, str]]


Event = Connected | Disconnected | Published | Received


class MqttLink:
    def __init__(self, cfg: MqttConfig, client_id: str, *, subscriptions: list[tuple[str, int]],
                 will: tuple[str, bytes] | None = None, manual_ack: bool = False, clean_start: bool = False,
                 receive_maximum: int | None = None) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.events: "queue.Queue[Event]" = queue.Queue()
        self.connected = threading.Event()
        self._subscriptions = subscriptions
        self._clean_start = clean_start
        self._stopping = False
        self._receive_maximum = receive_maximum
        self._client = _Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                               protocol=mqtt.MQTTv5, manual_ack=manual_ack)
        c = self._client
        # Our own windows bound what is in flight; paho must not hold more back.
        c.max_inflight_messages_set(65535)
        c.reconnect_delay_set(max(1, int(cfg.reconnect_min_s)), max(1, int(cfg.reconnect_max_s)))
        if cfg.username is not None:
            c.username_pw_set(cfg.username, cfg.password)
        if cfg.tls is not None:
            c.tls_set(ca_certs=str(cfg.tls.ca_file),
                      certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                      keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
                      cert_reqs=ssl.CERT_REQUIRED)
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = _no_delay

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        if self._receive_maximum:
            # How many unacknowledged QoS 1 messages the broker may send us at once.
            props.ReceiveMaximum = self._receive_maximum
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s,
                                   clean_start=self._clean_start, properties=props)
        # loop_start retries the first connection too: starting offline is normal.
        self._client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
        self.connected.clear()

    # ------------------------------------------------------------ actions
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                content_type: str | None = None, response_topic: str | None = None,
                correlation_data: bytes | None = None,
                user_properties: list[tuple[str, str]] | tuple = (),
                packed_user_properties: bytes = b"") -> tuple[int, int]:
        """Queue a publish; returns (paho rc, mid). NO_CONN still queues a QoS 1 message in paho."""
        props = None
        if content_type or response_topic or correlation_data or user_properties or packed_user_properties:
            props = PackedProperties(pack_publish_properties(content_type, response_topic, correlation_data,
                                                             user_properties, packed_user_properties))
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        return int(info.rc), info.mid

    def ack(self, mid: int, qos: int) -> None:
        self._client.ack(mid, qos)

    # ------------------------------------------------------------ paho callbacks (network thread)
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("broker %s:%d refused the connection: %s", self.cfg.host, self.cfg.port, reason_code)
            return
        for topic, qos in self._subscriptions:
            client.subscribe(topic, qos=qos)
        self.connected.set()
        log.info("connected to %s:%d as %s (session present: %s)", self.cfg.host, self.cfg.port, self.client_id,
                 flags.session_present)
        self.events.put(Connected(bool(flags.session_present)))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was:
            level = logging.INFO if self._stopping else logging.WARNING
            log.log(level, "disconnected from %s:%d: %s", self.cfg.host, self.cfg.port, reason_code)
        self.events.put(Disconnected(str(reason_code)))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self.events.put(Published(mid, bool(reason_code.is_failure), str(reason_code)))

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                log.error("subscription refused by the broker: %s (check the broker ACL)", rc)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        p = getattr(msg, "properties", None)
        self.events.put(Received(
            topic=msg.topic, payload=bytes(msg.payload), qos=msg.qos, mid=msg.mid,
            content_type=getattr(p, "ContentType", None), response_topic=getattr(p, "ResponseTopic", None),
            correlation_data=getattr(p, "CorrelationData", None),
            user_properties=list(getattr(p, "UserProperty", []) or []),
        ))
