"""The guard around a backend's invoke: one call at a time, timed for the watchdog.

Every backend is invoked through this, so the lock (interpreters are not
thread-safe), the "how long has the current invoke run" that the systemd
watchdog reads (a hung USB Edge TPU is a known failure) and the tests'
failpoint live in one place instead of in each backend.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np

from . import Backend

log = logging.getLogger(__name__)

FAILPOINT_ENV = "EDGE_INFER_TEST_FAILPOINT"


class InvokeGuard:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self._started = 0.0
        self._invokes = 0
        self._hang_after = _test_failpoint_hang_after()

    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        with self._lock:
            self._started = time.monotonic()
            try:
                if self._hang_after is not None:
                    self._maybe_hang(1)
                return self.backend.invoke(tensor)
            finally:
                self._started = 0.0

    def invoke_batch(self, tensor: np.ndarray) -> np.ndarray:
        """(N, ...) inputs -> (N, classes) outputs, under the same lock and watchdog timing."""
        with self._lock:
            self._started = time.monotonic()
            try:
                if self._hang_after is not None:
                    self._maybe_hang(len(tensor))
                return self.backend.invoke_batch(tensor)
            finally:
                self._started = 0.0

    @property
    def max_batch(self) -> int:
        return self.backend.max_batch

    def stuck_for(self) -> float:
        """Seconds the invoke in progress has been running (0 when none is)."""
        started = self._started
        return time.monotonic() - started if started else 0.0

    def close(self) -> None:
        """Close the backend once no invoke is running (backends' close() is idempotent)."""
        with self._lock:
            self.backend.close()

    def _maybe_hang(self, inputs: int) -> None:
        self._invokes += inputs
        if self._invokes > (self._hang_after or 0):
            log.warning("test failpoint: inference hangs now (%s)", FAILPOINT_ENV)
            threading.Event().wait()


def _test_failpoint_hang_after() -> int | None:
    """Tests only: ``EDGE_INFER_TEST_FAILPOINT=hang_invoke_after=N`` hangs inference after N inputs.

    Read from the environment at construction, never at import; a value that
    does not match this exact form is ignored.
    """
    value = os.environ.get(FAILPOINT_ENV, "")
    if value.startswith("hang_invoke_after="):
        count = value.split("=", 1)[1]
        if count.isdigit():
            return int(count)
    return None
