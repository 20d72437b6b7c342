"""The state database as a file: checks before SQLite opens it, error causes, rebuilds.

SQLite opens a zero-length or missing file as a new, empty database, and it
reports a full disk, a read-only mount and a damaged page all as exceptions
of a few classes. An operator needs to know which it is: a store that held
results and is now empty must never be replaced silently, and "disk full"
calls for a different action than "corrupt". These helpers name the cause.
"""
from __future__ import annotations

import errno
import logging
import os
import sqlite3
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError

log = logging.getLogger(__name__)

_HEADER = b"SQLite format 3\x00"
#: Below this much free space the store is treated as full: SQLite needs room for WAL frames.
MIN_FREE_BYTES = 1 << 20
RESET_HINT = "stop the service and run `edge-infer reset-store --yes` to move it aside (it is kept) and start with an empty store"


@dataclass(frozen=True)
class FileCheck:
    exists: bool
    #: something an operator should hear about that does not stop the start
    warning: str | None = None


def check_file(path: Path) -> FileCheck:
    """Look at the database (and WAL) bytes before SQLite does. Raises StoreError(kind="corrupt")."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return FileCheck(False)
    if size == 0:
        raise StoreError(f"state database {path} is empty (0 bytes) although it exists: it was truncated "
                         f"(a failed disk, or a copy cut short); its results and queued samples are gone. "
                         f"Restore it from a backup, or {RESET_HINT}.", kind="corrupt")
    with open(path, "rb") as f:
        head = f.read(100)
    if len(head) < 100 or not head.startswith(_HEADER):
        raise StoreError(f"state database {path} is not a SQLite database (first bytes overwritten?). "
                         f"Restore it from a backup, or {RESET_HINT}.", kind="corrupt")
    page_size = struct.unpack(">H", head[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    change_counter, pages, valid_for = struct.unpack(">I", head[24:28])[0], struct.unpack(">I", head[28:32])[0], \
        struct.unpack(">I", head[92:96])[0]
    # The in-header page count is only meaningful when it was written with the current change counter.
    if change_counter == valid_for and pages and size < pages * page_size:
        raise StoreError(f"state database {path} is truncated: {size} bytes, its header says "
                         f"{pages * page_size}. Restore it from a backup, or {RESET_HINT}.", kind="corrupt")
    return FileCheck(True, _wal_warning(path))


def _wal_warning(path: Path) -> str | None:
    wal = Path(f"{path}-wal")
    try:
        size = wal.stat().st_size
        with open(wal, "rb") as f:
            head = f.read(32)
    except FileNotFoundError:
        return None
    if size == 0 or len(head) < 32:
        return None
    page_size = struct.unpack(">I", head[8:12])[0]
    if page_size and (size - 32) % (24 + page_size):
        # SQLite ignores the torn tail; this is what a power cut during a write leaves behind.
        return (f"the write-ahead log {wal} ends in an incomplete frame ({size} bytes): the last write before "
                "the previous stop was cut short (a power cut?); SQLite keeps every complete transaction")
    return None


#: The state database holds sample images and results: readable by the service's user only.
#: SQLite creates the -wal and -shm files with the database file's mode, so setting it on the
#: database before its first write covers them; files left by an older release are set too.
PRIVATE_MODE = 0o600


def make_private(path: Path) -> None:
    """The database (and its -wal/-shm, where present) set to mode 0600. A file system without
    permissions (or a file of another user) gets a warning, not a failure."""
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{path}{suffix}")
        try:
            if (p.stat().st_mode & 0o777) != PRIVATE_MODE:
                os.chmod(p, PRIVATE_MODE)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not make %s private (mode 0600): %s", p, exc)


def free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def preflight_writable(path: Path) -> None:
    """Fail with the cause when the state directory cannot take writes (read-only, full)."""
    directory = path.parent
    if not os.access(directory, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise StoreError(f"state directory {directory} is read-only for this user: the results and outbox "
                         "cannot be written. Check the mount (read-only after a file-system error?) and the "
                         "ownership of the directory (StateDirectory= in the unit).", kind="read_only")
    left = free_bytes(directory)
    if left < MIN_FREE_BYTES:
        raise StoreError(f"the file system of {directory} is full ({left} bytes free): free some space "
                         "(old logs, done/ spool files) and start again", kind="disk_full")


def classify(exc: BaseException, path: Path) -> StoreError:
    """Name the cause of a SQLite (or OS) error on the state database, with what to do."""
    text = str(exc).lower()
    os_errno = getattr(exc, "errno", None)
    try:
        full = free_bytes(path.parent) < MIN_FREE_BYTES
    except OSError:
        full = False
    if "full" in text or os_errno == errno.ENOSPC or full:
        return StoreError(f"the file system of {path} is full: results cannot be stored. Free some space; the "
                          "service resumes by itself", kind="disk_full", transient=True)
    if "readonly" in text or "read-only" in text or os_errno == errno.EROFS:
        return StoreError(f"state database {path} is read-only: results cannot be stored. Check the mount "
                          "(remounted read-only after a file-system error?) and its ownership", kind="read_only")
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return StoreError(f"state database {path} is damaged ({exc})", kind="corrupt")
    if "locked" in text or "busy" in text:
        return StoreError(f"state database {path} is locked by another process ({exc}); is a second edge-infer "
                          "running with the same state_dir?", kind="locked", transient=True)
    return StoreError(f"state database {path}: {exc} (an I/O error: check the storage and `dmesg`)", kind="io",
                      transient=True)


def quick_check(db: sqlite3.Connection) -> list[str]:
    """SQLite's structural check of every page; [] when sound. O(database size): start-up only."""
    try:
        rows = [r[0] for r in db.execute("PRAGMA quick_check(20)")]
    except sqlite3.DatabaseError as exc:
        return [str(exc)]
    return [] if rows == ["ok"] else rows


def rebuild(path: Path, schema: str, tables: tuple[str, ...]) -> Path:
    """Copy every row of ``tables`` into a fresh file with ``schema``; the damaged file is kept aside.

    REINDEX cannot repair an index whose pages are garbage (it must read them to
    free them), but the tables can still be read row by row: the copy rebuilds
    every index from the rows. Raises StoreError when a table itself is damaged.
    Returns where the damaged file was moved.
    """
    fresh = path.with_name(path.name + ".rebuild")
    for p in (fresh, Path(f"{fresh}-wal"), Path(f"{fresh}-shm")):
        p.unlink(missing_ok=True)
    new = sqlite3.connect(fresh, isolation_level=None)
    try:
        make_private(fresh)   # before the rows are copied in
        new.executescript(schema)
        new.execute("ATTACH ? AS old", (f"file:{path}?mode=ro",))
        new.execute("BEGIN")
        for table in tables:
            old_cols = {r[1] for r in new.execute(f"PRAGMA old.table_info({table})")}
            cols = ", ".join(r[1] for r in new.execute(f"PRAGMA main.table_info({table})") if r[1] in old_cols)
            try:
                # NOT INDEXED + WHERE: a plain table scan, never SQLite's page-copy shortcut,
                # which would read the damaged index pages.
                new.execute(f"INSERT INTO main.{table} ({cols}) SELECT {cols} FROM old.{table} NOT INDEXED WHERE 1")
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"state database {path}: table {table} is damaged ({exc}), not only an index. "
                                 f"The service will not start on it: {RESET_HINT}.", kind="corrupt") from None
        new.execute("COMMIT")
        new.execute("DETACH old")
    except BaseException:
        new.close()
        fresh.unlink(missing_ok=True)
        raise
    new.close()
    return replace_with(path, fresh, "damaged")


def move_aside(path: Path, why: str) -> Path:
    """Rename the database and its WAL/SHM out of the way; returns the new name of the database."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.{why}-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            os.replace(src, Path(f"{target}{suffix}"))
    return target


def replace_with(path: Path, fresh: Path, why: str) -> Path:
    aside = move_aside(path, why)
    os.replace(fresh, path)
    fsync_dir(path.parent)
    return aside


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the entry itself is synced, not only the file)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
