"""Fixtures shared by the integration tests (a test module's own fixture of the same name wins)."""
from __future__ import annotations

import pytest

from edge_infer_cloud.worker import CloudWorker

from ..conftest import wait_for
from .helpers import worker_config


@pytest.fixture
def worker(broker):
    """A real cloud worker with the shipped cloud model, connected to the session's broker."""
    w = CloudWorker(worker_config(broker.port))
    w.start()
    wait_for(w.link.connected.is_set, what="worker connected")
    yield w
    w.stop()
