"""Progress of the tools' long loops: a tqdm bar on a terminal, one summary line otherwise."""
from __future__ import annotations

import os
import sys
import time


def _size(stream) -> tuple[int, int]:
    """The terminal's (columns, lines) for tqdm; 80 x 24 where it reports none (a serial console,
    a pty without a size), where tqdm would hide the bar."""
    try:
        size = os.get_terminal_size(stream.fileno())
        columns, lines = size.columns, size.lines
    except (AttributeError, OSError, ValueError):
        columns, lines = 0, 0
    return (columns or 80) - 1, (lines or 24) - 1


class Progress:
    """``update(n)`` takes the count done so far. The bar shows only on a TTY (or when
    ``enabled``) and when tqdm is installed; otherwise ``close()`` writes
    ``"<label>: <n>/<total> in <s>s"``."""

    def __init__(self, total: int, label: str, *, stream=sys.stderr, enabled: bool | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream
        self.n = 0
        self._t0 = time.monotonic()
        self._bar = None
        if stream.isatty() if enabled is None else enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass   # the summary line only
            else:
                ncols, nrows = _size(stream)
                self._bar = tqdm(total=self.total, desc=label, file=stream, mininterval=0.1, ncols=ncols, nrows=nrows)

    def update(self, n: int) -> None:
        if self._bar is not None and n != self.n:
            self._bar.update(n - self.n)
        self.n = n

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            elapsed = time.monotonic() - self._t0
            self.stream.write(f"{self.label}: {self.n}/{self.total} in {elapsed:.1f}s\n")
