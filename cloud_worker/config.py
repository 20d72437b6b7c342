"""The cloud worker configuration (``/etc/edge-infer/cloud-worker.toml``)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from edge_infer.config import MqttConfig, topic_safe_id
from edge_infer.tomlcfg import build, in_range, load_toml, option, positive, resolve_paths


@dataclass(frozen=True, kw_only=True)
class CloudModelConfig:
    card: Path = option(help="path of the cloud model's card.json (ONNX model beside it)")
    intra_op_threads: int = option(0, help="onnxruntime intra-op threads; 0 = onnxruntime's default",
                                   check=in_range(0, 256))


@dataclass(frozen=True, kw_only=True)
class WorkerSection:
    id: str = option("", help="worker id (MQTT client id suffix); empty = host name and process id")
    group: str = option("cloud-workers", help="shared subscription group; workers in one group split the samples",
                        check=topic_safe_id)
    batch_max: int = option(32, help="largest batch run through the model at once", check=in_range(1, 4096))
    batch_wait_ms: float = option(5.0, help="how long to wait for more samples before running a partial batch",
                                  check=in_range(0, 10_000))
    max_payload_bytes: int = option(1024 * 1024, help="larger samples are rejected with error code too_large",
                                    check=positive)
    max_pixels: int = option(4_000_000, help="larger decoded images are rejected with error code bad_image",
                             check=positive)
    status_interval_s: float = option(10.0, help="how often the retained status (with its counters) is refreshed; "
                                      "also on every (re)connect", check=in_range(0.1, 3600))


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    model: CloudModelConfig = option(help="[model] table")
    worker: WorkerSection = option(factory=WorkerSection, help="[worker] table")
    mqtt: MqttConfig = option(factory=MqttConfig, help="[mqtt] table")
    log_level: str = option("INFO", help="DEBUG, INFO, WARNING or ERROR")

    @property
    def worker_id(self) -> str:
        return self.worker.id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edge-infer-worker-{self.worker_id}"


def load_worker_config(path: str | Path) -> WorkerConfig:
    """Relative paths in the file (model card, TLS files) are relative to the file's folder."""
    path = Path(path)
    return resolve_paths(build(WorkerConfig, load_toml(path)), path.resolve().parent)
