"""A dependency-free progress bar for terminals (silent when not a TTY unless forced)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, *, stream=sys.stderr, enabled: bool | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.n = 0
        self._t0 = time.monotonic()
        self._last = 0.0

    def update(self, n: int, extra: str = "") -> None:
        self.n = n
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.1 and n < self.total):
            return
        self._last = now
        frac = min(n / self.total, 1.0)
        bar = "#" * int(frac * 30)
        rate = n / (now - self._t0) if now > self._t0 else 0.0
        self.stream.write(f"\r{self.label:<12} [{bar:<30}] {n:>6}/{self.total} {rate:8.0f}/s {extra}   ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(self.n)
            self.stream.write("\n")
            self.stream.flush()
        else:
            elapsed = time.monotonic() - self._t0
            self.stream.write(f"{self.label}: {self.n}/{self.total} in {elapsed:.1f}s\n")
