"""Dynamic batching, as serving systems do it (Triton's dynamic batcher is the model).

A batch runs as soon as the model is free: with nothing else waiting, a lone
sample runs alone at once (no fixed wait added to its latency); while samples
queue behind a running batch, the next batch takes all of them, up to
``max_batch_size``. ``max_queue_delay_us`` (default 0) lets a partial batch
wait that long for more, measured from its oldest sample, only when it is not
already of a preferred size: worth it where a bigger batch is much cheaper per
sample (GPUs), rarely on a CPU.

``BatchPolicy`` and ``batch_size_to_run`` are pure; ``BatchQueue`` is the
thread-safe queue the decode stage fills and the model thread drains.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_queue_delay_us: float = 0.0
    #: sizes worth running at once (e.g. a TensorRT engine's profiles); empty: any size
    preferred_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_queue_delay_us < 0:
            raise ValueError("max_queue_delay_us must not be negative")
        bad = [s for s in self.preferred_batch_sizes if not 1 <= s <= self.max_batch_size]
        if bad:
            raise ValueError(f"preferred batch sizes {bad} are not within 1..max_batch_size ({self.max_batch_size})")


def batch_size_to_run(queued: int, oldest_waited_us: float, policy: BatchPolicy) -> int:
    """How many of the ``queued`` samples to run now; 0 means wait for more.

    Full batches run at once; so does a batch of a preferred size (the largest one queued);
    otherwise a partial batch runs once its oldest sample has waited ``max_queue_delay_us``.
    """
    if queued <= 0:
        return 0
    if queued >= policy.max_batch_size:
        return policy.max_batch_size
    if policy.max_queue_delay_us <= 0 or oldest_waited_us >= policy.max_queue_delay_us:
        return queued
    if policy.preferred_batch_sizes:
        fitting = [s for s in policy.preferred_batch_sizes if s <= queued]
        if fitting and max(fitting) == queued:
            return queued
    return 0


def size_bucket(n: int) -> str:
    """The batch-size histogram's bucket of ``n``: 1, 2-3, 4-7, 8-15, ... (powers of two)."""
    lo = 1 << (n.bit_length() - 1)
    hi = 2 * lo - 1
    return str(lo) if lo == hi else f"{lo}-{hi}"


class BatchQueue(Generic[T]):
    """Items with their arrival time; ``take`` hands out batches by the policy."""

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._items: deque[tuple[float, T]] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: T) -> None:
        with self._cond:
            self._items.append((time.monotonic(), item))
            self._cond.notify()

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        """Wake every taker; later takes return what is left, then nothing."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, timeout: float) -> list[T]:
        """The next batch (empty after ``timeout`` seconds without one, or once closed and drained)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if self._items:
                    waited_us = (now - self._items[0][0]) * 1e6
                    n = batch_size_to_run(len(self._items), waited_us, self.policy)
                    if n or self._closed:
                        n = n or min(len(self._items), self.policy.max_batch_size)
                        return [self._items.popleft()[1] for _ in range(n)]
                    wake = min(deadline, self._items[0][0] + self.policy.max_queue_delay_us / 1e6)
                elif self._closed:
                    return []
                else:
                    wake = deadline
                if now >= deadline:
                    return []
                self._cond.wait(max(0.0, wake - now))
