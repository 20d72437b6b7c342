"""The spool directory input: image files dropped in are classified.

Producers write a file under a dot-name (or elsewhere on the same file
system) and rename it into the spool, so a half-written file is never read.
Each file is classified, then moved to ``done/``; a file that cannot be
classified goes to ``failed/`` with a ``.error`` note beside it saying why.
A file is moved only after its result is stored (durably: the commit
survives a power cut), so a crash re-reads it rather than losing it; a file
whose result is already stored (same name, size and modification time) is
moved without being classified again. While the store cannot commit, the
watcher waits for the chunk it has classified and takes no new files, so no
input is classified twice because of it. A file that no backend can answer
now (an isolated backend restarting, no fallback) stays and is read again.

Only regular files are read, and only through a descriptor opened without
following links: a symbolic link, FIFO, socket or device node dropped in is
moved to ``failed/`` unopened (nothing outside the spool is ever read), and
a sub-directory is left alone and reported once. A file that does not decode
and was modified within ``settle_s`` is taken to be still being written and
is read again on a later pass.
"""
from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Callable

from .errors import InferenceUnavailable, StoreUnavailable
from .preprocess import ImageError
from .result import Result
from .stats import Counters

log = logging.getLogger(__name__)

Classify = Callable[..., Result]


class SpoolWatcher:
    def __init__(self, directory: Path, classify_bytes: Classify, counters: Counters, *,
                 flush: Callable[[float], bool] = lambda timeout: True,
                 seen: Callable[[str], bool] = lambda key: False, poll_interval_s: float = 0.2,
                 max_file_bytes: int = 16 * 1024 * 1024, chunk: int = 32, settle_s: float = 2.0) -> None:
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
        self._settle = settle_s
        self._dirs_reported: set[str] = set()
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
        """Regular files waiting, oldest first; anything else is dealt with here (see the module doc)."""
        try:
            entries = [e for e in os.scandir(self.dir) if not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        files = []
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                files.append((st.st_mtime_ns, e.name, Path(e.path)))
            elif stat.S_ISDIR(st.st_mode):
                if e.name not in ("done", "failed") and e.name not in self._dirs_reported:
                    self._dirs_reported.add(e.name)
                    self._counters.inc("spool_ignored_dirs")
                    log.warning("spool: ignoring directory %s (only files directly in %s are read)", e.name, self.dir)
            else:
                self._reject(Path(e.path), "not_regular", f"not a regular file ({_kind(st.st_mode)}): refused "
                             "unopened; producers must move image files in, not links or device nodes")
        files.sort()
        return [p for _, _, p in files]

    def process_once(self) -> int:
        """Classify what is waiting, in chunks: classify each file, commit the chunk, then move the files."""
        n = 0
        files = self.pending()
        for i in range(0, len(files), self._chunk):
            if self._stop.is_set():
                break
            done = []
            unavailable = None
            for path in files[i:i + self._chunk]:
                self._beat = time.monotonic()
                try:
                    if self._classify_file(path):
                        done.append(path)
                except (StoreUnavailable, InferenceUnavailable) as exc:
                    # No room for more results, or no backend to answer (an isolated one restarting,
                    # no fallback): this file stays for a later pass, but the ones already
                    # classified must be acknowledged first, or they would be read twice.
                    unavailable = exc
                    break
                n += 1
            # Moving a file is its acknowledgement: only after its result is committed,
            # so a crash before this point re-reads the file instead of losing it.
            if done and not self._wait_committed(len(done)):
                return n   # stopping: the files stay and are read again at the next start
            for path in done:
                self._move(path, self.done)
                self._counters.inc("spool_processed")
                self.on_progress()
            if unavailable is not None:
                raise unavailable
        return n

    def _wait_committed(self, count: int) -> bool:
        """Wait for the chunk's results, however long the store needs (it may be degraded):
        re-reading files whose results are still waiting in memory would classify them twice."""
        waited = False
        while not self._flush(1.0):
            self._beat = time.monotonic()   # waiting on the store is not a stalled scan (the store has its own grace)
            if self._stop.is_set():
                log.warning("spool: stopping before %d result(s) were stored; their files stay in the spool", count)
                return False
            if not waited:
                waited = True
                log.warning("spool: waiting for the store to commit %d result(s) before taking more files", count)
        return True

    def alive(self, within_s: float) -> bool:
        """Did the scan loop turn within the last ``within_s`` seconds?"""
        return time.monotonic() - self._beat < within_s

    def _run(self) -> None:
        while not self._stop.is_set():
            self._beat = time.monotonic()
            try:
                if self.process_once() == 0:
                    self._stop.wait(self._interval)
            except (StoreUnavailable, InferenceUnavailable):
                # reported once, by the store's health or the classifier's state change
                self._stop.wait(max(self._interval, 1.0))
            except Exception:  # keep watching: one bad file or a full disk must not stop the service
                log.exception("spool scan failed; retrying in %.1fs", self._interval)
                self._stop.wait(max(self._interval, 1.0))

    def _classify_file(self, path: Path) -> bool:
        st: os.stat_result | None = None
        try:
            data, st = self._read(path)
            key = f"{path.name}|{st.st_size}|{st.st_mtime_ns}"
            if self._seen(key):
                # Classified before a crash, not yet moved: acknowledge it without a second result.
                self._counters.inc("spool_already_classified")
                return True
            result = self._classify(data, path.name, source_key=key)
        except FileNotFoundError:
            return False  # taken away by someone else
        except _NotRegular as exc:
            self._reject(path, "not_regular", str(exc))
            return False
        except ImageError as exc:
            if st is not None and time.time() - st.st_mtime < self._settle:
                # Probably still being written (producers should write elsewhere and rename): next pass.
                self._counters.inc("spool_deferred_incomplete")
                return False
            self._reject(path, "", str(exc))
            return False
        log.debug("spool: %s -> %s (%.3f) %s", path.name, result.label_name, result.confidence, result.state)
        return True

    def _read(self, path: Path) -> tuple[bytes, os.stat_result]:
        """The file's bytes through a descriptor that follows no link and blocks on no FIFO."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise _NotRegular(f"cannot be opened as a regular file ({exc.strerror})") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _NotRegular(f"not a regular file ({_kind(st.st_mode)}): refused unopened")
            if st.st_size > self._max:
                raise ImageError(f"file of {st.st_size} bytes exceeds spool.max_file_bytes = {self._max}")
            return f.read(self._max + 1), st

    def _reject(self, path: Path, why: str, message: str) -> None:
        self._counters.inc(f"spool_rejected_{why}" if why else "spool_rejected")
        log.warning("spool: rejected %s: %s (moved to %s)", path.name, message, self.failed)
        try:
            self._move(path, self.failed)
        except FileNotFoundError:
            return
        (self.failed / (path.name + ".error")).write_text(f"{message}\n")
        self.on_progress()

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


class _NotRegular(Exception):
    pass


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"
