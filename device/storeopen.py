"""Opening the state database: the file checked, damage repaired or refused, the schema upgraded.

What an operator hears about (an upgrade, a rebuilt index, a torn WAL tail)
comes back as notices; what stops the start is a StoreError naming the cause.
"""
from __future__ import annotations

import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from . import dbfile
from .errors import StoreError
from .storeschema import TABLES, TABLES_SQL, VERSION, migrate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Opened:
    db: sqlite3.Connection
    notices: tuple[str, ...]
    repaired: bool


def open_writable(path: Path, resend_after_s: float, *, check: bool = True) -> Opened:
    """Check, connect, verify (``check``), rebuild a damaged index, upgrade. Raises StoreError."""
    notices: list[str] = []
    db = None
    try:
        found = dbfile.check_file(path)
        if found.warning:
            notices.append(found.warning)
        # The unit's StateDirectoryMode is 0750; a directory made here gets the same.
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        dbfile.preflight_writable(path)
        db = connect(path)
        repaired = False
        if check and found.exists and (problems := dbfile.quick_check(db)):
            db.close()
            aside = dbfile.rebuild(path, TABLES_SQL, TABLES)
            repaired = True
            notices.append(f"state database {path} was damaged ({problems[0][:200]}); its tables were "
                           f"intact and have been copied into a rebuilt database (every index rebuilt). "
                           f"The damaged file is kept as {aside}")
            db = connect(path)
        version = migrate(db, resend_after_s)
        if found.exists and version not in (0, VERSION):
            notices.append(f"state database upgraded from schema {version} to {VERSION}")
    except StoreError:
        _close(db)
        raise
    except sqlite3.Error as exc:
        _close(db)
        err = dbfile.classify(exc, path)
        if err.kind == "corrupt":
            err = StoreError(f"{err} It cannot be used: {dbfile.RESET_HINT}.", kind="corrupt")
        raise err from None
    except OSError as exc:
        _close(db)
        raise dbfile.classify(exc, path) from None
    return Opened(db, tuple(notices), repaired)


def open_read_only(path: Path) -> tuple[sqlite3.Connection, int]:
    """For looking at a store (a running service's, or offline): nothing is written.
    Returns the connection and the schema version found (older ones are read as they are)."""
    found = dbfile.check_file(path)
    if not found.exists:
        raise StoreError(f"no state database at {path}", kind="missing", exit_code=1)
    db = connect(path, read_only=True)
    (version,) = db.execute("PRAGMA user_version").fetchone()
    return db, version


def connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        # On a read-only file system SQLite cannot create the WAL index it needs for mode=ro;
        # nobody can write there, so the file is immutable (a WAL left there is not read: said below).
        mode = "mode=ro" if os.access(path.parent, os.W_OK) else "immutable=1"
        if mode != "mode=ro" and Path(f"{path}-wal").exists() and Path(f"{path}-wal").stat().st_size:
            log.warning("%s is on a read-only file system with an unmerged write-ahead log: the last commits "
                        "are not read", path)
        db = sqlite3.connect(f"file:{path}?{mode}", uri=True, check_same_thread=False,
                             isolation_level=None, timeout=10)
        db.execute("PRAGMA query_only=1")
        return db
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
    # Mode 0600 before anything is written: the -wal and -shm SQLite creates take the database's mode.
    dbfile.make_private(path)
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives a process crash (kill -9); a power cut can
    # lose the last commits but never corrupts the file. Commits that precede an
    # acknowledgement to a source (a spool file moved to done/) are made durable.
    db.execute("PRAGMA synchronous=NORMAL")
    dbfile.make_private(path)   # -wal/-shm left by an older release, which did not set the mode
    return db


def _close(db: sqlite3.Connection | None) -> None:
    if db is not None:
        db.close()
