"""How long a delivered sample waits for its reply before the device sends it again.

A worker that dies holds up to its receive maximum of samples unacknowledged,
and the broker does not hand a clean session's samples to another worker: only
the device's resend brings them back. A fixed wait (``outbox.resend_after_s``,
120 s) makes those inputs wait two minutes for a correction that normally takes
tens of milliseconds; a wait far below the real round trip would resend samples
that are merely queued behind a busy worker (each resend costs an upload and an
inference; the correction is applied once either way). So the wait follows the
round trips the device observes: ``factor`` times their recent p99, never below
``floor_s`` (a pause of the worker fleet, a broker restart) and never above the
configured ``resend_after_s``.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ResendPolicy:
    ceiling_s: float          # outbox.resend_after_s
    floor_s: float            # outbox.resend_after_min_s
    factor: float = 8.0
    #: round trips needed before the estimate replaces the ceiling
    min_samples: int = 20


def resend_after(round_trips_s: np.ndarray, policy: ResendPolicy) -> float:
    """The wait before a resend, from recent sample -> reply round trips (seconds)."""
    if len(round_trips_s) < policy.min_samples:
        return policy.ceiling_s
    p99 = float(np.percentile(round_trips_s, 99))
    return min(policy.ceiling_s, max(policy.floor_s, policy.factor * p99))


class RoundTrips:
    """The last ``size`` round trips (bounded memory whatever the traffic)."""

    def __init__(self, size: int = 256) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        if seconds >= 0:
            self._values.append(seconds)

    def array(self) -> np.ndarray:
        return np.fromiter(self._values, dtype=np.float64, count=len(self._values))
