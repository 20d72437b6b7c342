"""The device configuration (``/etc/edge-infer/edge-infer.toml``).

The MQTT table is shared with the cloud worker, which imports it from here.
See docs/configuration.md for the reference (generated from these classes).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import REGISTRY, options_class, unknown_backend_message
from .scores import SCORES
from .tomlcfg import (ConfigError, build, describe, in_range, load_toml, non_negative, one_of, option, positive,
                      resolve_paths)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def topic_safe_id(value: str) -> str | None:
    if _ID_RE.fullmatch(value):
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


def known_backend(value: str) -> str | None:
    return None if value in REGISTRY else unknown_backend_message(value, named=False)


#: [model] keys from before the per-backend tables: tflite-cpu options, still read
LEGACY_TFLITE_KEYS = ("runtime", "num_threads")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    card: Path = option(help="path of the model card (card.json) beside the model file")
    backend: str = option("tflite-cpu", help="inference backend, a name from `edge-infer backends` "
                                             "(docs/backends.md); its options are the [backend.<name>] table",
                          check=known_backend)
    runtime: str | None = option(None, help="deprecated: `backend.tflite-cpu.runtime` (still read when "
                                            "[backend.tflite-cpu] is absent)",
                                 check=one_of("auto", "ai-edge-litert", "tflite-runtime"))
    num_threads: int | None = option(None, help="deprecated: `backend.tflite-cpu.num_threads` (still read when "
                                                "[backend.tflite-cpu] is absent)", check=in_range(1, 64))

    isolate: bool | None = option(None, help="run the backend in a supervised child process, so that a crash or "
                                             "hang of its library (libedgetpu aborts on USB faults) costs one input's "
                                             "retry, not the service; unset: true for accelerator backends "
                                             "(edgetpu), false otherwise (docs/backends.md)")
    invoke_timeout_s: float = option(5.0, help="isolated: a run of the model that has not answered after this is "
                                               "taken as hung: the child is killed and the input retried",
                                     check=positive)
    start_timeout_s: float = option(60.0, help="isolated: how long a fresh child may take to load the model",
                                    check=positive)
    restart_min_s: float = option(0.5, help="isolated: after a child fails, a fresh one starts at once; after "
                                            "further failures in a row the wait starts here and doubles",
                                  check=positive)
    restart_max_s: float = option(30.0, help="isolated: longest wait between starts of a failing child (how often "
                                             "a missing accelerator is retried)", check=positive)
    failure_grace_s: float = option(60.0, help="isolated, no fallback: how long the backend may fail (its child "
                                               "restarting) before the service stops pinging the systemd watchdog, "
                                               "so that the unit restarts", check=positive)
    fallback: str = option("none", help='"cpu": while the backend is missing or failing, answer with the CPU model '
                                        'of fallback_card on tflite-cpu (status says degraded, results name the '
                                        'backend); "none": fail those inputs. Needs isolate = true',
                           check=one_of("none", "cpu"))
    fallback_card: Path | None = option(None, help='the CPU model\'s card for fallback = "cpu"; unset: the card\'s '
                                                   '"fallback_card"')

    def __post_init__(self) -> None:
        if self.restart_min_s > self.restart_max_s:
            raise ConfigError(f"model.restart_min_s ({self.restart_min_s:g}) is above model.restart_max_s "
                              f"({self.restart_max_s:g})")
        if self.fallback_card is not None and self.fallback == "none":
            raise ConfigError('model.fallback_card is set but model.fallback = "none": set fallback = "cpu" to '
                              "use it, or remove it")
        if self.fallback != "none" and not self.isolated:
            raise ConfigError(f'model.fallback = "{self.fallback}" needs model.isolate = true: the fallback answers '
                              "when the isolated child fails; a backend in the service's own process takes the "
                              "service with it when it crashes")

    @property
    def isolated(self) -> bool:
        """``isolate``, or the backend's default: accelerators are isolated."""
        if self.isolate is not None:
            return self.isolate
        found = REGISTRY.get(self.backend)
        return bool(found and found.accelerator)

    def legacy_options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in LEGACY_TFLITE_KEYS if getattr(self, k) is not None}


@dataclass(frozen=True)
class BackendTables:
    """The ``[backend.<name>]`` tables: each backend's own options, built by its ``Options``
    class (named in the backend registry). A backend without a table gets its defaults."""

    tables: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    @classmethod
    def from_toml(cls, value: Any, key: str) -> "BackendTables":
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected tables like [{key}.tflite-cpu], got {value!r}")
        tables = {}
        for name, table in value.items():
            if name not in REGISTRY:
                raise ConfigError(f"[{key}.{name}]: {unknown_backend_message(name)}")
            if not isinstance(table, dict):
                raise ConfigError(f"{key}.{name}: expected a table [{key}.{name}], got {table!r}")
            tables[name] = build(options_class(name), table, f"{key}.{name}")
        return cls(tables)

    @classmethod
    def toml_rows(cls, key: str) -> list[tuple[str, str, str, str]]:
        return [row for name in REGISTRY for row in describe(options_class(name), f"{key}.{name}")]

    def get(self, name: str) -> Any:
        """Backend ``name``'s options: its table, or its defaults."""
        found = self.tables.get(name)
        return found if found is not None else options_class(name)()


_CLASS_THRESHOLDS_HELP = (
    "a threshold per predicted class, instead of `threshold` for the classes it names: an inline table of the "
    "model card's label names, e.g. { \"shirt\" = 0.99, \"coat\" = 0.97 } (written by `edge-infer calibrate` "
    "when it keeps more beyond noise; docs/calibration.md). A name that is not a label of the card stops the "
    "start and `check-config`")


@dataclass(frozen=True)
class ClassThresholdTable:
    """``[policy] class_thresholds``: label name -> threshold. The names are checked against
    the model card when it is loaded (:meth:`for_labels`): the config alone does not know them."""

    entries: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_toml(cls, value: Any, key: str) -> "ClassThresholdTable":
        if not isinstance(value, dict):
            raise ConfigError(f'{key}: expected a table of class name = threshold, e.g. {{ "shirt" = 0.99 }}, '
                              f"got {value!r}")
        entries = []
        for name, v in value.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{key}.{name!r}: expected a number between 0 and 1, got {v!r}")
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ConfigError(f"{key}.{name!r} = {v!r}: must be between 0.0 and 1.0")
            entries.append((name, float(v)))
        return cls(tuple(entries))

    @classmethod
    def toml_rows(cls, key: str) -> list[tuple[str, str, str, str]]:
        return [(key, "a table: class name = number", "{} (none: `threshold` for every class)",
                 _CLASS_THRESHOLDS_HELP)]

    def __bool__(self) -> bool:
        return bool(self.entries)

    def for_labels(self, labels: Sequence[str], default: float, source: str = "the model card") -> tuple[float, ...]:
        """The threshold of each label index: its entry, or ``default``; () when the table is empty.
        A name that is not one of ``labels`` is a ConfigError naming it and listing the labels."""
        if not self.entries:
            return ()
        unknown = [name for name, _ in self.entries if name not in labels]
        if unknown:
            raise ConfigError(f"policy.class_thresholds: {', '.join(repr(n) for n in unknown)} "
                              f"{'is not a label' if len(unknown) == 1 else 'are not labels'} of {source}; its "
                              f"labels are: {', '.join(repr(x) for x in labels)} (recalibrate for this model, or "
                              "fix the names)")
        table = dict(self.entries)
        return tuple(table.get(label, default) for label in labels)


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    threshold: float = option(0.9, help="offload when the confidence score is below this (pick it with "
                                        "`edge-infer calibrate`)", check=in_range(0.0, 1.0))
    score: str = option("max_softmax", help="confidence score: " + ", ".join(SCORES[:-1]) + " or " + SCORES[-1],
                        check=one_of(*SCORES))
    temperature: float = option(1.0, help="softmax temperature for score = \"temperature\" (fitted by calibrate)",
                                check=positive)
    router_file: Path | None = option(None, help="router JSON written by calibrate, for score = \"router\"")
    class_thresholds: ClassThresholdTable = option(factory=ClassThresholdTable, help=_CLASS_THRESHOLDS_HELP)
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
    max_bytes: int = option(256 * 1024 * 1024, help="disk budget for the payloads of samples awaiting correction "
                                                    "(and of those kept after it, which go first); beyond it the "
                                                    "oldest are evicted (counted, local answers stay)",
                            check=positive)
    resend_after_s: float = option(120.0, help="a delivered sample with no reply after this is sent again "
                                               "(the broker may have had no worker for it); the wait doubles "
                                               "with each attempt, up to 64x; with resend_adaptive the "
                                               "longest wait", check=positive)
    resend_adaptive: bool = option(True, help="wait 8x the p99 of the observed sample-to-reply round trips "
                                              "instead (between resend_after_min_s and resend_after_s): a dead "
                                              "worker's samples come back in seconds, not minutes")
    resend_after_min_s: float = option(10.0, help="shortest adaptive wait before a resend", check=positive)
    max_payload_bytes: int = option(1024 * 1024, help="largest sample payload accepted for offload",
                                    check=positive)
    keep_payload_after_correction: bool = option(
        False, help="keep a corrected sample's image in the state database (e.g. to retrain with the cloud's "
                    "labels) until its result is pruned (results.keep) or outbox.max_bytes needs the room; "
                    "false: dropped when the correction is applied (and, at start, any an earlier run kept)")


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


_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def parse_listen(value: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[IPV6]:PORT"`` -> (host, port); ValueError saying what is wrong.

    The host must be given: an empty one would listen on every interface by accident
    (say 0.0.0.0 or [::] to mean it). Port 0 picks a free port (tests)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError('must be HOST:PORT with a port 0-65535, e.g. "127.0.0.1:9464" ([::1]:9464 for IPv6)')
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host} is not an IPv6 address") from None
        return host[1:-1], int(port)
    if ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets: [{host}]:{port}")
    if not host:
        raise ValueError(f'no host: "127.0.0.1:{port}" serves this machine only; "0.0.0.0:{port}" every interface '
                         "(exposes the metrics to the network: firewall it)")
    if host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host} is not an IPv4 address") from None
    elif not _HOST_RE.fullmatch(host):
        raise ValueError(f"{host!r} is neither an IP address nor a host name")
    return host, int(port)


def listen_address(value: str) -> str | None:
    try:
        parse_listen(value)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    enabled: bool = option(False, help="serve Prometheus metrics on http://<listen>/metrics (needs the `metrics` "
                                       "extra, prometheus_client; docs/operations.md)")
    listen: str = option("127.0.0.1:9464", help="HOST:PORT of the metrics server; the default serves this machine "
                                                "only (scrape through an agent on the device, or give the address "
                                                "of a firewalled interface; docs/security.md)", check=listen_address)


@dataclass(frozen=True, kw_only=True)
class ArchiveConfig:
    enabled: bool = option(False, help="keep each offloaded sample with its correction (the image as sent, the edge "
                                       "and cloud answers) in state_dir/archive.db, for `edge-infer archive export` "
                                       "and `edge-infer retrain` (docs/closed-loop.md). It holds camera images at "
                                       "rest: docs/security.md says who can read it and how to wipe it")
    max_items: int = option(10_000, help="samples kept at most; beyond it the oldest are dropped", check=positive)
    max_bytes: int = option(64 * 1024 * 1024, help="image bytes kept at most; beyond it the oldest are dropped",
                            check=positive)


@dataclass(frozen=True, kw_only=True)
class DeviceConfig:
    device_id: str = option(help="this device's id; it names its MQTT topics", check=topic_safe_id)
    state_dir: Path = option(Path("/var/lib/edge-infer"), help="where the outbox and results database live")
    model: ModelConfig = option(help="[model] table")
    backend: BackendTables = option(factory=BackendTables, help="[backend.<name>] tables")
    policy: PolicyConfig = option(factory=PolicyConfig, help="[policy] table")
    mqtt: MqttConfig = option(factory=MqttConfig, help="[mqtt] table")
    outbox: OutboxConfig = option(factory=OutboxConfig, help="[outbox] table")
    spool: SpoolConfig = option(factory=SpoolConfig, help="[spool] table")
    results: ResultsConfig = option(factory=ResultsConfig, help="[results] table")
    store: StoreConfig = option(factory=StoreConfig, help="[store] table")
    metrics: MetricsConfig = option(factory=MetricsConfig, help="[metrics] table")
    archive: ArchiveConfig = option(factory=ArchiveConfig, help="[archive] table")
    log_level: str = option("INFO", help="DEBUG, INFO, WARNING or ERROR",
                            check=one_of("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        legacy = self.model.legacy_options()
        if not legacy:
            return
        keys = " and ".join(f"model.{k}" for k in legacy)
        if self.model.backend != "tflite-cpu":
            raise ConfigError(f"{keys}: options of the tflite-cpu backend, but model.backend is "
                              f"{self.model.backend!r}; its options go in [backend.{self.model.backend}]")
        if "tflite-cpu" in self.backend.tables:
            raise ConfigError(f"{keys} and [backend.tflite-cpu] both set tflite-cpu options: move "
                              f"{keys} into [backend.tflite-cpu]")

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edge-infer-{self.device_id}"

    @property
    def store_path(self) -> Path:
        """The state database (results and outbox) in ``state_dir``."""
        return Path(self.state_dir) / "edge-infer.db"

    @property
    def archive_path(self) -> Path:
        """The hard-example archive ([archive]) in ``state_dir``."""
        return Path(self.state_dir) / "archive.db"

    @property
    def backend_options(self) -> Any:
        """The configured backend's ``Options`` (for tflite-cpu, the deprecated [model] keys apply)."""
        options = self.backend.get(self.model.backend)
        legacy = self.model.legacy_options()
        return dataclasses.replace(options, **legacy) if legacy else options


def parse_device_config(table: dict, base_dir: Path | None = None) -> DeviceConfig:
    """``base_dir``: relative paths in a config file are relative to the file's folder."""
    cfg = build(DeviceConfig, table)
    return resolve_paths(cfg, base_dir) if base_dir is not None else cfg


def load_device_config(path: str | Path) -> DeviceConfig:
    path = Path(path)
    return parse_device_config(load_toml(path), base_dir=path.resolve().parent)
