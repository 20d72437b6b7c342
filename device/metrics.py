"""Prometheus metrics of the device service (``[metrics]``; the ``metrics`` extra: prometheus_client).

Nothing here is imported unless ``metrics.enabled`` is true, and prometheus_client
only when the server is built, so the service runs without it installed.

What is counted already (``service.counters``, the store's trigger-kept counts,
``service.status()``) is read at scrape time by ``DeviceCollector``: no call on
the input's path, and a scrape costs a handful of O(1) or O(log n) reads,
whatever the store holds. The one thing observed per input is the inference
latency histogram (``DeviceMetrics.observe_inference``), a few hundred
nanoseconds next to an invoke of tens of microseconds or more.

Each service has its own ``CollectorRegistry`` (no global registry), served by
prometheus_client's WSGI server in one thread, started and stopped with the
service. The address is localhost unless the operator says otherwise.
"""
from __future__ import annotations

import ipaddress
import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .config import parse_listen
from .failover import BackendState
from .protocol import REPLY_ERROR_CODES
from .tomlcfg import ConfigError

if TYPE_CHECKING:
    from .service import EdgeService

log = logging.getLogger(__name__)

#: inference latency buckets (seconds): 10 us .. 1 s, about three per decade
INFERENCE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25,
                     0.5, 1.0)
INSTALL_HINT = "pip install 'edge-infer[metrics]' (or pip install prometheus_client)"


def require_prometheus(setting: str = "metrics.enabled") -> ModuleType:
    """prometheus_client, or a ConfigError (exit 2) saying what to install."""
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError(f"{setting} = true needs prometheus_client, which is not installed: {INSTALL_HINT}; "
                          "or set it to false") from None
    return prometheus_client


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsServer:
    """A dedicated registry served on ``listen`` (``HOST:PORT``) at /metrics, in one thread."""

    def __init__(self, listen: str, *, setting: str = "metrics") -> None:
        self._prom = require_prometheus(f"{setting}.enabled")
        self.listen = listen
        self._setting = setting
        self.registry = self._prom.CollectorRegistry()
        self._server: Any = None
        self._thread: Any = None

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("MetricsServer.start() called twice")
        host, port = parse_listen(self.listen)
        try:
            self._server, self._thread = self._prom.start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"{self._setting}.listen = {self.listen!r}: cannot listen there: "
                              f"{exc.strerror or exc} (another process on the port? an address of this "
                              "machine?)") from None
        self._thread.name = "metrics-http"
        host, port = self.address
        if is_loopback(host):
            log.info("metrics on %s (this machine only)", self.url)
        else:
            log.warning("metrics on %s: reachable from the network (%s.listen); keep the port behind a firewall",
                        self.url, self._setting)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and release the port. Safe to call twice."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)
        self._server = self._thread = None

    @property
    def address(self) -> tuple[str, int]:
        """The address served (the port the system picked for port 0)."""
        if self._server is None:
            raise RuntimeError("the metrics server is not started")
        host, port = self._server.server_address[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


class DeviceMetrics:
    """The device's registry: the scrape-time collector, the inference latency histogram, the process."""

    def __init__(self, service: EdgeService) -> None:
        self.server = MetricsServer(service.cfg.metrics.listen)
        prom = require_prometheus()
        registry = self.server.registry
        self.inference_seconds = prom.Histogram(
            "edge_infer_inference_seconds", "Time to answer one input locally: preprocessing, invoke and score "
            "(the fallback model's answers included)", buckets=INFERENCE_BUCKETS, registry=registry)
        #: the per-input call (a bound method: no lookups on the input's path)
        self.observe_inference = self.inference_seconds.observe
        registry.register(DeviceCollector(service))
        prom.ProcessCollector(registry=registry)

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


class DeviceCollector:
    """Families built from the service's counters and status at each scrape."""

    def __init__(self, service: EdgeService) -> None:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        self._svc = service
        self._counter, self._gauge = CounterMetricFamily, GaugeMetricFamily

    def collect(self) -> Iterator[Any]:
        svc = self._svc
        st = svc.status()   # O(1): the counters, the store's counts table, the classifier's state
        c: dict[str, int] = st["counters"]
        yield from self._counters(c)
        g = self._gauge
        yield _labelled(g("edge_infer_outbox_samples", "Outbox rows by state (queued, inflight and delivered "
                                                       "await a correction)", labels=["state"]),
                        st["outbox"].items())
        waiting = _store_read(svc.store.waiting_since)
        if waiting is not None:
            now = time.time()
            yield _labelled(g("edge_infer_outbox_oldest_age_seconds", "Age of the oldest sample in each waiting "
                                                                      "state (0 when none)", labels=["state"]),
                            ((s, max(0.0, now - t) if t is not None else 0.0) for s, t in waiting.items()))
        counts = _store_read(svc.store.counts)
        if counts is not None:
            yield g("edge_infer_outbox_bytes", "Payload bytes held in the outbox (budget: outbox.max_bytes)",
                    value=counts.get("outbox.bytes", 0))
        yield g("edge_infer_outbox_max_bytes", "The outbox byte budget (outbox.max_bytes)",
                value=svc.cfg.outbox.max_bytes)
        yield g("edge_infer_results_unpublished", "Results not yet acknowledged by the broker",
                value=st["results_unpublished"])
        yield g("edge_infer_broker_connected", "1 while connected to the broker", value=int(st["broker_connected"]))
        store = st["store"]
        yield g("edge_infer_store_ok", "1 while the state database commits", value=int(store["ok"]))
        yield g("edge_infer_store_pending_writes", "Answered inputs waiting in memory for the store writer",
                value=store["pending_writes"])
        inference = st["inference"]
        yield _labelled(g("edge_infer_inference_state", "1 for the inference backend's current state: healthy, "
                                                        "recovering, degraded (the fallback answers) or lost",
                          labels=["state"]),
                        ((s.value, int(s.value == inference["state"])) for s in BackendState))
        yield g("edge_infer_threshold", "The offload threshold on the confidence score", value=st["threshold"])
        info = g("edge_infer_info", "The service's version, device, model and backend (value 1)",
                 labels=["version", "device", "model", "backend"])
        info.add_metric([st["version"], st["device"], st["model"], svc.cfg.model.backend], 1)
        yield info
        yield g("edge_infer_start_time_seconds", "When the service started (Unix time)", value=st["started_at"])

    def _counters(self, c: dict[str, int]) -> Iterator[Any]:
        k = self._counter
        yield k("edge_infer_inputs", "Inputs answered and recorded", value=c["classified"])
        yield k("edge_infer_fallback_answers", "Inputs answered by the fallback model ([model] fallback)",
                value=c["fallback_answers"])
        yield _labelled(k("edge_infer_offloads", "Samples sent to the cloud, by reason", labels=["reason"]),
                        [("below_threshold", c["offloaded"] - c["offloaded_audit"]), ("audit", c["offloaded_audit"])])
        yield _labelled(k("edge_infer_offloads_skipped", "Samples the policy wanted offloaded that stayed local, by "
                                                         "reason (payload too large, over the offload budget)",
                          labels=["reason"]),
                        _suffixed(c, "offload_skipped_", ("too_large", "budget_samples", "budget_bytes")))
        yield _labelled(k("edge_infer_corrections", "Corrections applied, by whether the cloud kept the edge "
                                                    "label (agreed) or changed it", labels=["outcome"]),
                        [("agreed", c["corrections_agreed"]), ("changed_label", c["corrections_changed_label"])])
        yield _labelled(k("edge_infer_audit_corrections", "Corrections of audited (confident) inputs, by outcome",
                          labels=["outcome"]),
                        [("agreed", c["audit_agreed"]), ("changed_label", c["audit_corrected"] - c["audit_agreed"])])
        yield k("edge_infer_cloud_error_replies", "Error replies from a worker (the local answer stands)",
                value=c["cloud_errors"])
        yield k("edge_infer_samples_expired", "Samples not corrected within outbox.max_age_s", value=c["expired"])
        yield k("edge_infer_samples_evicted", "Samples evicted by the outbox byte budget", value=c["evicted"])
        yield k("edge_infer_samples_resent", "Samples sent again after outbox.resend_after_s without a reply",
                value=c["resent"])
        yield k("edge_infer_samples_refused", "Samples the broker refused", value=c["samples_refused"])
        rejected = [("bad_input", c["spool_rejected"]), *_suffixed(c, "spool_rejected_", ()),
                    ("inference_unavailable", c["inference_unavailable"]),
                    ("store_unavailable", c["store_unavailable"])]
        yield _labelled(k("edge_infer_inputs_rejected", "Inputs not answered, by reason (spool files moved to "
                                                        "failed/, no backend or store to answer them)",
                          labels=["reason"]), rejected)
        yield _labelled(k("edge_infer_replies_rejected", "Messages on the corrections topic refused, by reason",
                          labels=["reason"]), _suffixed(c, "replies_rejected_", ("bad_topic", *REPLY_ERROR_CODES)))
        yield _labelled(k("edge_infer_replies_ignored", "Valid replies not applied: duplicate, late, unknown",
                          labels=["reason"]),
                        [(r, c[f"replies_{r}"]) for r in ("duplicate", "late", "unknown")])
        yield k("edge_infer_broker_connects", "Connections made to the broker", value=c["connects"])
        yield _labelled(k("edge_infer_store_errors", "State database errors, by kind", labels=["kind"]),
                        _suffixed(c, "store_errors_", ()))
        yield k("edge_infer_backend_restarts", "Isolated backend children started again", value=c["backend_restarts"])


def _suffixed(c: dict[str, int], prefix: str, known: Iterable[str]) -> list[tuple[str, int]]:
    """(suffix, value) for the counters named ``prefix + suffix``: the known ones (0 until counted) and any other."""
    found = dict.fromkeys(known, 0) | {name[len(prefix):]: n for name, n in c.items() if name.startswith(prefix)}
    return sorted(found.items())


def _labelled(family: Any, values: Iterable[tuple[str, float]]) -> Any:
    for label, value in values:
        family.add_metric([label], value)
    return family


def _store_read(read: Any) -> Any:
    """A store read at scrape time; None when the store cannot be read (status says why) or is closed."""
    try:
        return read()
    except (sqlite3.Error, RuntimeError):
        return None
