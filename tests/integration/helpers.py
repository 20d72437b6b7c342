from __future__ import annotations

from pathlib import Path

from edge_infer.config import DeviceConfig, ModelConfig, MqttConfig, OutboxConfig, PolicyConfig, SpoolConfig
from edge_infer_cloud.config import CloudModelConfig, WorkerConfig, WorkerSection

from ..conftest import CLOUD_CARD, EDGE_CARD, unique


def device_config(tmp_path: Path, port: int, *, threshold: float = 0.9, spool: Path | None = None,
                  device_id: str | None = None, **outbox) -> DeviceConfig:
    return DeviceConfig(
        device_id=device_id or unique("dev"), state_dir=tmp_path / "state",
        model=ModelConfig(card=EDGE_CARD), policy=PolicyConfig(threshold=threshold),
        mqtt=MqttConfig(host="127.0.0.1", port=port, reconnect_min_s=0.2, reconnect_max_s=1.0),
        outbox=OutboxConfig(**outbox), spool=SpoolConfig(dir=spool, poll_interval_s=0.05))


def worker_config(port: int, *, group: str = "test", **worker) -> WorkerConfig:
    return WorkerConfig(model=CloudModelConfig(card=CLOUD_CARD),
                        worker=WorkerSection(id=unique("w"), group=group, **worker),
                        mqtt=MqttConfig(host="127.0.0.1", port=port, reconnect_min_s=0.2, reconnect_max_s=1.0))
