"""The cloud worker configuration (``/etc/edge-infer/cloud-worker.toml``)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from edge_infer.config import ConfigError, MetricsConfig, MqttConfig, listen_address, topic_safe_id
from edge_infer.tomlcfg import build, in_range, load_toml, one_of, option, positive, resolve_paths

from .batcher import BatchPolicy


@dataclass(frozen=True, kw_only=True)
class CloudModelConfig:
    card: Path = option(help="path of the cloud model's card.json (ONNX model beside it)")
    intra_op_threads: int = option(0, help="onnxruntime intra-op threads; 0 = onnxruntime's default",
                                   check=in_range(0, 256))
    providers: tuple[str, ...] = option(("cpu",), help="onnxruntime execution providers in order of "
                                  "preference: cpu, cuda, tensorrt (docs/scaling.md); the first that loads runs")
    graph_optimization: str = option("all", help="onnxruntime graph optimisation: disabled, basic, extended, all",
                                     check=one_of("disabled", "basic", "extended", "all"))
    device_id: int = option(0, help="GPU index for the cuda and tensorrt providers", check=in_range(0, 64))
    trt_engine_cache_dir: str = option("", help="where the tensorrt provider keeps the engines it builds, so that "
                                              "a restart does not build them again (minutes); \"\" = no cache")
    spin_wait: bool = option(False, help="let onnxruntime's threads spin between runs: a little faster back to back, "
                                         "but an idle worker then burns its cores")

    def __post_init__(self) -> None:
        from .model import PROVIDERS
        bad = [p for p in self.providers if p not in PROVIDERS]
        if bad or not self.providers:
            raise ConfigError(f"model.providers {self.providers}: give one or more of {', '.join(PROVIDERS)}")


@dataclass(frozen=True, kw_only=True)
class WorkerSection:
    id: str = option("", help="worker id (MQTT client id suffix); empty = host name and process id")
    group: str = option("cloud-workers", help="shared subscription group; workers in one group split the samples",
                        check=topic_safe_id)
    max_batch_size: int | None = option(None, help="largest batch run through the model at once (default 32); "
                                                   "a batch takes every sample queued when the model is free",
                                        check=in_range(1, 4096))
    max_queue_delay_us: float = option(0.0, help="how long a partial batch may wait for more samples, from its "
                                                 "oldest one; 0 = run at once (the right choice on a CPU)",
                                       check=in_range(0, 10_000_000))
    preferred_batch_sizes: tuple[int, ...] = option((), help="batch sizes that run without waiting out "
                                                                 "max_queue_delay_us (e.g. a TensorRT engine's)")
    decode_threads: int = option(1, help="threads decoding and validating samples beside the model's thread",
                                 check=in_range(1, 64))
    switch_interval_us: int = option(1000, help="how long one of the worker's Python threads may hold the "
                                     "interpreter (the GIL) while another waits; 0 = Python's default (5000)",
                                     check=in_range(0, 100_000))
    batch_max: int | None = option(None, help="deprecated: max_batch_size", check=in_range(1, 4096))
    batch_wait_ms: float | None = option(None, help="deprecated and ignored: batches no longer wait a fixed time "
                                                    "(max_queue_delay_us)", check=in_range(0, 10_000))
    max_payload_bytes: int = option(1024 * 1024, help="larger samples are rejected with error code too_large",
                                    check=positive)
    max_pixels: int = option(4_000_000, help="larger decoded images are rejected with error code bad_image",
                             check=positive)
    status_interval_s: float = option(10.0, help="how often the retained status (with its counters) is refreshed; "
                                      "also on every (re)connect", check=in_range(0.1, 3600))


    def __post_init__(self) -> None:
        if self.max_batch_size is not None and self.batch_max is not None:
            raise ConfigError("worker.batch_max and worker.max_batch_size both set: keep max_batch_size")
        size = self.batch_size
        bad = [n for n in self.preferred_batch_sizes if not 1 <= n <= size]
        if bad:
            raise ConfigError(f"worker.preferred_batch_sizes {bad}: each must be an integer in 1..{size} "
                              "(max_batch_size)")

    @property
    def batch_size(self) -> int:
        """max_batch_size, or the deprecated batch_max, or 32."""
        return self.max_batch_size or self.batch_max or 32

    def batch_policy(self) -> BatchPolicy:
        return BatchPolicy(self.batch_size, self.max_queue_delay_us, tuple(sorted(set(self.preferred_batch_sizes))))


@dataclass(frozen=True, kw_only=True)
class WorkerMetricsConfig(MetricsConfig):
    """The device's [metrics] table, on its own port by default (a worker may share a host with a device)."""

    listen: str = option("127.0.0.1:9465", help="HOST:PORT of the metrics server; the default serves this machine "
                                                "only: give the address Prometheus reaches, behind a firewall "
                                                "(docs/security.md)", check=listen_address)


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    model: CloudModelConfig = option(help="[model] table")
    worker: WorkerSection = option(factory=WorkerSection, help="[worker] table")
    mqtt: MqttConfig = option(factory=MqttConfig, help="[mqtt] table")
    metrics: WorkerMetricsConfig = option(factory=WorkerMetricsConfig, help="[metrics] table")
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
