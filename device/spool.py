"""The spool directory input: image files dropped in are classified.

Producers write a file under a dot-name (or elsewhere on the same file
system) and rename it into the spool, so a half-written file is never read.
Each file is classified, then moved to ``done/``; a file that cannot be
classified goes to ``failed/`` with a ``.error`` note beside it saying why.
A file is moved only after its result is stored, so a crash re-reads it
rather than losing it; a file whose result is already stored (same name,
size and modification time) is moved without being classified again.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from .preprocess import ImageError
from .result import Result
from .stats import Counters

log = logging.getLogger(__name__)

Classify = Callable[..., Result]


class SpoolWatcher:
    def __init__(self, directory: Path, classify_bytes: Classify, counters: Counters, *,
                 flush: Callable[[], bool] = lambda: True, seen: Callable[[str], bool] = lambda key: False,
                 poll_interval_s: float = 0.2, max_file_bytes: int = 16 * 1024 * 1024, chunk: int = 32) -> None:
        self.dir = Path(directory)
        self.done = self.dir / "done"
        self.failed = self.dir / "failed"
        self._classify = classify_bytes
        self._flush = flush
        self._seen = seen
        self._chunk = chunk
        self._counters = counters
        self._interval = poll_interval_s
        self._max = max_file_bytes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat = time.monotonic()
        #: called after each file, with no arguments (the service uses it as a progress heartbeat)
        self.on_progress: Callable[[], None] = lambda: None

    def start(self) -> None:
        for d in (self.dir, self.done, self.failed):
            d.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="spool", daemon=True)
        self._thread.start()
        log.info("watching spool directory %s", self.dir)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def pending(self) -> list[Path]:
        try:
            entries = [e for e in os.scandir(self.dir) if e.is_file(follow_symlinks=False) and not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        entries.sort(key=lambda e: (e.stat().st_mtime_ns, e.name))
        return [Path(e.path) for e in entries]

    def process_once(self) -> int:
        """Classify what is waiting, in chunks: classify each file, commit the chunk, then move the files."""
        n = 0
        files = self.pending()
        for i in range(0, len(files), self._chunk):
            if self._stop.is_set():
                break
            done = []
            for path in files[i:i + self._chunk]:
                self._beat = time.monotonic()
                if self._classify_file(path):
                    done.append(path)
                n += 1
            # Moving a file is its acknowledgement: only after its result is committed,
            # so a crash before this point re-reads the file instead of losing it.
            if done and not self._flush():
                log.error("spool: results not committed in time; leaving %d file(s) to be read again", len(done))
                continue
            for path in done:
                self._move(path, self.done)
                self._counters.inc("spool_processed")
                self.on_progress()
        return n

    def alive(self, within_s: float) -> bool:
        """Did the scan loop turn within the last ``within_s`` seconds?"""
        return time.monotonic() - self._beat < within_s

    def _run(self) -> None:
        while not self._stop.is_set():
            self._beat = time.monotonic()
            try:
                if self.process_once() == 0:
                    self._stop.wait(self._interval)
            except Exception:  # keep watching: one bad file or a full disk must not stop the service
                log.exception("spool scan failed; retrying in %.1fs", self._interval)
                self._stop.wait(max(self._interval, 1.0))

    def _classify_file(self, path: Path) -> bool:
        try:
            st = path.stat()
            if st.st_size > self._max:
                raise ImageError(f"file of {st.st_size} bytes exceeds spool.max_file_bytes = {self._max}")
            key = f"{path.name}|{st.st_size}|{st.st_mtime_ns}"
            if self._seen(key):
                # Classified before a crash, not yet moved: acknowledge it without a second result.
                self._counters.inc("spool_already_classified")
                return True
            data = path.read_bytes()
            result = self._classify(data, path.name, source_key=key)
        except FileNotFoundError:
            return False  # taken away by someone else
        except ImageError as exc:
            self._counters.inc("spool_rejected")
            log.warning("spool: rejected %s: %s (moved to %s)", path.name, exc, self.failed)
            self._move(path, self.failed)
            (self.failed / (path.name + ".error")).write_text(f"{exc}\n")
            self.on_progress()
            return False
        log.debug("spool: %s -> %s (%.3f) %s", path.name, result.label_name, result.confidence, result.state)
        return True

    @staticmethod
    def _move(path: Path, target_dir: Path) -> None:
        target = target_dir / path.name
        if target.exists():
            stem, suffix = os.path.splitext(path.name)
            i = 1
            while (target_dir / f"{stem}.{i}{suffix}").exists():
                i += 1
            target = target_dir / f"{stem}.{i}{suffix}"
        os.replace(path, target)
