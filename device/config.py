"""The device configuration (``/etc/edge-infer/edge-infer.toml``).

The MQTT table is shared with the cloud worker, which imports it from here.
See docs/configuration.md for the reference (generated from these classes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .tomlcfg import ConfigError, build, in_range, load_toml, non_negative, one_of, option, positive, resolve_paths

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def topic_safe_id(value: str) -> str | None:
    if _ID_RE.match(value):
        return None
    return ("must be 1-64 characters of letters, digits, '_', '.', '-' (it becomes an MQTT topic level "
            "and may not contain '/', '+', '#' or spaces)")


def topic_prefix(value: str) -> str | None:
    if not value or value.startswith("/") or value.endswith("/") or any(c in value for c in "+#$ "):
        return "must be a non-empty topic prefix like 'edge-infer' without wildcards, spaces or leading/trailing '/'"
    return None


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    ca_file: Path = option(help="CA certificate that signed the broker's certificate")
    cert_file: Path | None = option(None, help="this client's certificate (mutual TLS)")
    key_file: Path | None = option(None, help="this client's private key (mutual TLS)")

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("tls.cert_file and tls.key_file must be given together")


@dataclass(frozen=True, kw_only=True)
class MqttConfig:
    host: str = option("127.0.0.1", help="broker host name or address")
    port: int = option(1883, help="broker port (8883 is usual with TLS)", check=in_range(1, 65535))
    topic_prefix: str = option("edge-infer", help="first level of every topic", check=topic_prefix)
    client_id: str = option("", help="MQTT client id; empty = derived from the device or worker id")
    username: str | None = option(None, help="username, when the broker uses password authentication")
    password: str | None = option(None, help="password, when the broker uses password authentication")
    keepalive_s: int = option(30, help="MQTT keepalive in seconds", check=in_range(5, 3600))
    session_expiry_s: int = option(
        7 * 24 * 3600, help="how long the broker keeps this client's session (queued QoS 1 messages) while it is offline",
        check=non_negative)
    reconnect_min_s: float = option(0.5, help="first reconnect delay", check=positive)
    reconnect_max_s: float = option(30.0, help="longest reconnect delay (exponential backoff)", check=positive)
    tls: TlsConfig | None = option(None, help="TLS settings; omit the table for plain TCP")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    card: Path = option(help="path of the model card (card.json) beside the model file")
    backend: str = option("tflite-cpu", help="inference backend (see `edge-infer backends`)")
    runtime: str = option("auto", help="TFLite runtime: auto, ai-edge-litert or tflite-runtime",
                          check=one_of("auto", "ai-edge-litert", "tflite-runtime"))
    num_threads: int = option(1, help="interpreter threads; measure before raising it", check=in_range(1, 64))


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    threshold: float = option(0.9, help="offload when the confidence score is below this (pick it with "
                                        "`edge-infer calibrate`)", check=in_range(0.0, 1.0))
    score: str = option("max_softmax", help="confidence score: max_softmax, temperature, margin, entropy or router",
                        check=one_of("max_softmax", "temperature", "margin", "entropy", "router"))
    temperature: float = option(1.0, help="softmax temperature for score = \"temperature\" (fitted by calibrate)",
                                check=positive)
    router_file: Path | None = option(None, help="router JSON written by calibrate, for score = \"router\"")
    offload: bool = option(True, help="false keeps every result local (no samples are sent)")
    audit_rate: float = option(0.0, help="share of confident inputs offloaded anyway, to measure the edge model's "
                                         "real accuracy and notice drift (e.g. 0.01)", check=in_range(0.0, 1.0))
    max_samples_per_minute: int = option(0, help="offload budget: at most this many samples a minute "
                                                 "(0 = no limit); beyond it the local answer stands (counted)",
                                         check=non_negative)
    max_bytes_per_hour: int = option(0, help="offload budget: at most this many payload bytes an hour (0 = no limit)",
                                     check=non_negative)

    def __post_init__(self) -> None:
        if self.score == "router" and self.router_file is None:
            raise ConfigError("policy.score = \"router\" needs policy.router_file (written by `edge-infer calibrate`)")


@dataclass(frozen=True, kw_only=True)
class OutboxConfig:
    max_inflight: int = option(32, help="samples published and not yet acknowledged by the broker",
                               check=in_range(1, 65535))
    max_age_s: float = option(24 * 3600.0, help="a sample not corrected within this expires (its local answer "
                                                "stands)", check=positive)
    max_bytes: int = option(256 * 1024 * 1024, help="disk budget for the payloads of samples awaiting correction; "
                                                    "beyond it the oldest are evicted (counted, local answers stay)",
                            check=positive)
    resend_after_s: float = option(120.0, help="a delivered sample with no reply after this is sent again "
                                               "(the broker may have had no worker for it); the wait doubles "
                                               "with each attempt, up to 64x", check=positive)
    max_payload_bytes: int = option(1024 * 1024, help="largest sample payload accepted for offload",
                                    check=positive)


@dataclass(frozen=True, kw_only=True)
class SpoolConfig:
    dir: Path | None = option(None, help="watched directory; image files dropped here are classified "
                                         "(written under a dot-name or moved in atomically)")
    poll_interval_s: float = option(0.2, help="how often the spool directory is scanned", check=positive)
    settle_s: float = option(2.0, help="a file that does not decode and changed less than this long ago is taken "
                                       "to be still being written and read again later (not moved to failed/)",
                             check=non_negative)
    max_file_bytes: int = option(16 * 1024 * 1024, help="larger files are rejected to failed/", check=positive)


@dataclass(frozen=True, kw_only=True)
class ResultsConfig:
    keep: int = option(100_000, help="results kept in the local store (oldest published ones are pruned)",
                       check=positive)


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    max_pending: int = option(2048, help="answered inputs whose results may wait in memory for the store writer; "
                                         "beyond it classify() waits (backpressure), so memory stays bounded",
                              check=in_range(64, 1_000_000))
    max_pending_bytes: int = option(64 * 1024 * 1024, help="likewise, for the payloads of offloaded samples "
                                                           "waiting in memory", check=positive)
    max_wait_s: float = option(10.0, help="how long classify() waits for room before it fails with "
                                          "StoreUnavailable (the store is degraded: disk full, read-only)",
                               check=positive)
    degraded_grace_s: float = option(300.0, help="while the store cannot commit, the service answers from memory "
                                                 "and retries; after this long it stops pinging the systemd "
                                                 "watchdog, so the unit restarts (and a start that cannot open "
                                                 "the store exits 2 for the operator)", check=positive)


@dataclass(frozen=True, kw_only=True)
class DeviceConfig:
    device_id: str = option(help="this device's id; it names its MQTT topics", check=topic_safe_id)
    state_dir: Path = option(Path("/var/lib/edge-infer"), help="where the outbox and results database live")
    model: ModelConfig = option(help="[model] table")
    policy: PolicyConfig = option(factory=PolicyConfig, help="[policy] table")
    mqtt: MqttConfig = option(factory=MqttConfig, help="[mqtt] table")
    outbox: OutboxConfig = option(factory=OutboxConfig, help="[outbox] table")
    spool: SpoolConfig = option(factory=SpoolConfig, help="[spool] table")
    results: ResultsConfig = option(factory=ResultsConfig, help="[results] table")
    store: StoreConfig = option(factory=StoreConfig, help="[store] table")
    log_level: str = option("INFO", help="DEBUG, INFO, WARNING or ERROR",
                            check=one_of("DEBUG", "INFO", "WARNING", "ERROR"))

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edge-infer-{self.device_id}"


def parse_device_config(table: dict, base_dir: Path | None = None) -> DeviceConfig:
    """``base_dir``: relative paths in a config file are relative to the file's folder."""
    cfg = build(DeviceConfig, table)
    return resolve_paths(cfg, base_dir) if base_dir is not None else cfg


def load_device_config(path: str | Path) -> DeviceConfig:
    path = Path(path)
    return parse_device_config(load_toml(path), base_dir=path.resolve().parent)
