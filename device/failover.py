"""The inference backend's health, and the restart schedule of an isolated backend. Pure: no clock inside.

The states are named once, here; the classifier derives the current one from
what the isolated backend reports (a problem since when, and why), whether a
fallback model is configured, and ``model.failure_grace_s``; the status, the
log lines and the watchdog read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class BackendState(str, Enum):
    #: the configured backend answers
    HEALTHY = "healthy"
    #: it failed and no fallback is configured: its child is being restarted, within model.failure_grace_s
    RECOVERING = "recovering"
    #: it is missing or failing and the fallback model answers (loudly: status, results, one warning)
    DEGRADED = "degraded"
    #: failing for longer than model.failure_grace_s with no fallback: the watchdog stops, systemd restarts
    LOST = "lost"


@dataclass(frozen=True)
class Problem:
    """Why the configured backend cannot answer now, and since when (``time.monotonic()``)."""

    since: float
    reason: str


def state_of(problem: Problem | None, now: float, *, has_fallback: bool, grace_s: float) -> BackendState:
    if problem is None:
        return BackendState.HEALTHY
    if has_fallback:
        return BackendState.DEGRADED
    return BackendState.LOST if now - problem.since > grace_s else BackendState.RECOVERING


def restart_delay(failures: int, min_s: float, max_s: float) -> float:
    """Seconds to wait before starting a fresh child after ``failures`` failed children in a row.

    The first failure of a child that had answered restarts at once (the input
    in flight is retried on the fresh child); each further failure doubles the
    wait from ``min_s``, capped at ``max_s``, so an accelerator that is gone is
    probed every ``max_s`` seconds and not in a tight loop.
    """
    if failures <= 1:
        return 0.0
    # 2 ** large overflows a float only past 1024; the cap is reached long before
    return min(max_s, min_s * 2.0 ** min(failures - 2, 60))


def change_message(old: BackendState, new: BackendState, *, backend: str, fallback: str | None,
                   reason: str, grace_s: float, out_for_s: float | None, fallback_answers: int) -> str:
    """The one log line for a change of state (not one per input)."""
    if new is BackendState.HEALTHY:
        was = f" after {out_for_s:.1f}s" if out_for_s is not None else ""
        via = f"; {fallback_answers} input(s) were answered by the fallback meanwhile" if fallback else ""
        return f"inference: backend {backend} answers again{was}{via}"
    if new is BackendState.DEGRADED:
        return (f"inference DEGRADED: backend {backend} cannot answer ({reason}); the fallback {fallback} answers "
                "until it is back (results say so). Check the accelerator (docs/operations.md, 'Degraded "
                "inference'); the service keeps retrying it")
    if new is BackendState.RECOVERING:
        return (f"inference: backend {backend} failed ({reason}); restarting it. No fallback is configured: inputs "
                f"get an error until it answers, and after {grace_s:.0f}s (model.failure_grace_s) the watchdog "
                "stops so that systemd restarts the service")
    return (f"inference LOST: backend {backend} has not answered for more than {grace_s:.0f}s "
            f"(model.failure_grace_s) and no fallback is configured ({reason}); no longer pinging the watchdog "
            "so that systemd restarts the service. Check the accelerator, or set [model] fallback = \"cpu\"")
