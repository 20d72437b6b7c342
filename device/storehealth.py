"""Whether the store takes writes now, and since when: what makes the service `degraded`.

Each thread that touches the store reports its own outcome under its own name
(the writer, the link worker, the spool, the status): a read that still works
on a full disk must not clear a writer that cannot write. The log gets one
line when a cause starts, one a minute while it lasts and one when it ends,
never a traceback a second.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import dbfile
from .errors import StoreError
from .stats import Counters

log = logging.getLogger(__name__)

REMIND_S = 60.0


@dataclass(frozen=True)
class Degraded:
    kind: str         # disk_full, read_only, corrupt, io, locked
    reason: str       # the operator's message
    since: float      # monotonic time it began
    where: str        # which part of the service saw it first


class StoreHealth:
    def __init__(self, path: Path, counters: Counters, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._counters = counters
        self._clock = clock
        self._lock = threading.Lock()
        self._failing: dict[str, Degraded] = {}
        self._reminded = 0.0

    def failed(self, where: str, exc: BaseException) -> StoreError:
        err = exc if isinstance(exc, StoreError) else dbfile.classify(exc, self._path)
        now = self._clock()
        with self._lock:
            first = not self._failing
            prev = self._failing.get(where)
            since = prev.since if prev is not None else now
            self._failing[where] = Degraded(err.kind, str(err), since, where)
            remind = now - self._reminded >= REMIND_S
            if first or remind or prev is None or prev.kind != err.kind:
                self._reminded = now
                log_it = True
            else:
                log_it = False
        self._counters.inc("store_errors")
        self._counters.inc(f"store_errors_{err.kind}")
        if log_it:
            log.error("store degraded (%s, seen by the %s for %.0fs): %s", err.kind, where, now - since, err)
        return err

    def ok(self, where: str) -> None:
        with self._lock:
            prev = self._failing.pop(where, None)
            recovered = prev is not None and not self._failing
        if recovered:
            assert prev is not None
            self._counters.inc("store_recoveries")
            log.warning("store recovered (%s) after %.0fs; results are stored again", prev.kind,
                        self._clock() - prev.since)

    def degraded(self) -> Degraded | None:
        """The oldest cause still failing, or None."""
        with self._lock:
            return min(self._failing.values(), key=lambda d: d.since, default=None)

    def degraded_for(self) -> float:
        d = self.degraded()
        return 0.0 if d is None else self._clock() - d.since
