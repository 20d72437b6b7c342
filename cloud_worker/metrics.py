"""Prometheus metrics of the cloud worker (``[metrics]``; the ``metrics`` extra: prometheus_client).

Counters and the queue depth are read from the worker at scrape time
(``WorkerCollector``); the two histograms are observed once per batch, not per
sample: the batch size and the model's time for the batch. One registry per
worker, served by the device side's ``MetricsServer`` (one thread, explicit
start/stop).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from edge_infer import protocol
from edge_infer.metrics import MetricsServer, require_prometheus

if TYPE_CHECKING:
    from .worker import CloudWorker

#: seconds the model takes for one batch: 100 us .. 10 s
MODEL_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to and including ``max_batch_size`` (the batcher's own histogram's edges)."""
    out, n = [], 1
    while n < max_batch_size:
        out.append(float(n))
        n *= 2
    out.append(float(max_batch_size))
    return tuple(out)


class WorkerMetrics:
    def __init__(self, worker: CloudWorker) -> None:
        self.server = MetricsServer(worker.cfg.metrics.listen)
        prom = require_prometheus()
        registry = self.server.registry
        self.batch_size = prom.Histogram(
            "edge_infer_worker_batch_size", "Samples per batch run through the model",
            buckets=batch_size_buckets(worker.cfg.worker.batch_size), registry=registry)
        self.model_seconds = prom.Histogram(
            "edge_infer_worker_model_seconds", "The model's time for one batch", buckets=MODEL_BUCKETS,
            registry=registry)
        registry.register(WorkerCollector(worker))
        prom.ProcessCollector(registry=registry)

    def observe_batch(self, size: int, seconds: float) -> None:
        """Once per batch run (the model thread)."""
        self.batch_size.observe(size)
        self.model_seconds.observe(seconds)

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


class WorkerCollector:
    """Families built from the worker's counters, queue and link at each scrape."""

    def __init__(self, worker: CloudWorker) -> None:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        self._w = worker
        self._counter, self._gauge = CounterMetricFamily, GaugeMetricFamily

    def collect(self) -> Iterator[Any]:
        w = self._w
        c = w.counters.snapshot()
        k, g = self._counter, self._gauge
        for name, help_text in (("received", "Samples received from the broker"),
                                ("corrected", "Corrections published"),
                                ("batches", "Batches run through the model"),
                                ("error_replies", "Error replies published (a rejected sample with a usable "
                                                  "reply address)"),
                                ("replies_refused", "Replies the broker refused (check its ACL)"),
                                ("connects", "Connections made to the broker")):
            yield k(f"edge_infer_worker_{name}", help_text, value=c.get(name, 0))
        rejected = k("edge_infer_worker_rejected", "Samples rejected, by error code", labels=["code"])
        codes = dict.fromkeys(protocol.SAMPLE_ERROR_CODES, 0) | {
            name[len("rejected_"):]: n for name, n in c.items() if name.startswith("rejected_")}
        for code, n in codes.items():
            rejected.add_metric([code], n)
        yield rejected
        yield g("edge_infer_worker_queue_depth", "Decoded samples waiting for the model", value=len(w.queue))
        link = w.link
        yield g("edge_infer_worker_broker_connected", "1 while connected to the broker",
                value=int(link is not None and link.connected.is_set()))
        info = g("edge_infer_worker_info", "The worker's id, group and model (value 1)",
                 labels=["worker", "group", "model"])
        info.add_metric([w.worker_id, w.cfg.worker.group, w.model.card.model_id if w.model is not None else ""], 1)
        yield info
