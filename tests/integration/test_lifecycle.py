"""Every thread owner starts once, stops twice safely, and says clearly when used out of order."""
from __future__ import annotations

import threading

import pytest

from edge_infer.service import EdgeService
from edge_infer.writer import StoreWriter

from .helpers import device_config


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


def test_service_used_before_start_twice_started_and_stopped_twice(tmp_path, fmnist):
    from edge_infer.tools.localbroker import free_port
    svc = EdgeService(device_config(tmp_path, free_port()))
    with pytest.raises(RuntimeError, match="not started: call EdgeService.start"):
        svc.classify(fmnist["test"].images[0])
    svc.start(connect=False)
    try:
        with pytest.raises(RuntimeError, match="start\\(\\) called twice"):
            svc.start(connect=False)
        assert sum(t.name == "store-writer" for t in threading.enumerate()) == 1
        assert svc.classify(fmnist["test"].images[0]).label >= 0
    finally:
        svc.stop()
    svc.stop()   # idempotent
    assert "store-writer" not in _threads()


def test_service_and_writer_are_context_managers(tmp_path, fmnist):
    from edge_infer.tools.localbroker import free_port
    cfg = device_config(tmp_path, free_port())
    with EdgeService(cfg) as svc:
        r = svc.classify(fmnist["test"].images[1])
        assert svc.flush()
    assert "store-writer" not in _threads() and "link-worker" not in _threads()
    with EdgeService(cfg) as again:      # the same store, reopened
        assert again.result(r.sample_id).sample_id == r.sample_id
    writer = StoreWriter.__new__(StoreWriter)   # start() guard without a store: only the thread matters
    writer._thread = threading.current_thread()
    with pytest.raises(RuntimeError, match="called twice"):
        writer.start()
