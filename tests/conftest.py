"""Shared fixtures: a real Mosquitto per test session, the shipped models, helpers."""
from __future__ import annotations

import itertools
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

import paho.mqtt.client as mqtt
import pytest

from edge_infer.tools.localbroker import LocalBroker

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
EDGE_CARD = MODELS / "fmnist-edge-v1" / "card.json"
CLOUD_CARD = MODELS / "fmnist-cloud-v1" / "card.json"
_ids = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> LocalBroker:
    b = LocalBroker(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def fmnist():
    from edge_infer.tools.datasets import fashion_mnist_splits
    return fashion_mnist_splits()


def device_toml(tmp: Path, port: int, **extra: str) -> Path:
    """A device config file for `edge-infer` processes; extra tables as ``name="key = value..."``."""
    f = tmp / "edge-infer.toml"
    body = (f'device_id = "{extra.pop("device_id", unique("cli"))}"\nstate_dir = "{tmp / "state"}"\n'
            f'[model]\ncard = "{EDGE_CARD}"\n[mqtt]\nport = {port}\nreconnect_max_s = 1\n')
    for section, text in extra.items():
        body += f"[{section}]\n{text}\n"
    f.write_text(body)
    return f


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.02, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def paho_properties(content_type=None, response_topic=None, correlation=None, user=None):
    """PUBLISH properties built with paho's own Properties class (what a third-party client sends)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    p = Properties(PacketTypes.PUBLISH)
    if content_type:
        p.ContentType = content_type
    if response_topic:
        p.ResponseTopic = response_topic
    if correlation:
        p.CorrelationData = correlation
    if user:
        p.UserProperty = list(user)
    return p


def drained(store) -> bool:
    """Nothing left to send or awaiting a reply, and every result acknowledged by the broker."""
    c = store.outbox_counts()
    return c["queued"] + c["inflight"] + c["delivered"] == 0 and store.unpublished_count() == 0


class Recorder:
    """A plain paho client that records what arrives on some topics (an integrator's view)."""

    def __init__(self, port: int, *topics: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=unique("rec"), protocol=mqtt.MQTTv5)
        if topics:
            self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
            self.client.on_subscribe = lambda *a: self._subscribed.set()
        else:
            self.client.on_connect = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "recorder could not connect and subscribe"

    def _on_message(self, c, u, msg) -> None:
        with self._lock:
            self.messages.append(msg)

    def on(self, topic: str) -> list[mqtt.MQTTMessage]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def json(self, topic: str) -> list[dict]:
        return [json.loads(m.payload) for m in self.on(topic)]

    def results(self, topic: str) -> list[dict]:
        """Every result received on a results topic, in order (messages carry lists of results)."""
        from edge_infer.protocol import decode_results
        return [r for m in self.on(topic) for r in decode_results(m.payload)]

    def publish(self, topic: str, payload: bytes, props=None, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, properties=props, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def recorder_factory(broker):
    made: list[Recorder] = []

    def make(*topics: str) -> Recorder:
        r = Recorder(broker.port, *topics)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()
