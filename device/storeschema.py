"""The state database's schema, its upgrades, and the counts kept by triggers.

Version 3 adds what keeps every periodic query independent of the store's size:
``outbox.resend_at`` with a partial index (resends seek to what is due instead of
scanning every delivered row), and a ``counts`` table that triggers keep exact in
the same transactions as the rows they count (the status reads a handful of
numbers instead of counting 100k rows).

Version 4 adds ``results.backend`` and ``results.fallback``: which backend produced
each edge answer, and whether it was the fallback model (``[model] fallback``), so
that answers given while the accelerator was out can be told apart afterwards.
Rows of earlier schemas keep ``''`` (not recorded) and 0.
"""
from __future__ import annotations

import sqlite3
from enum import Enum

from .errors import StoreError


class OutboxState(str, Enum):
    """The state of an offloaded sample; how it changes is ``TRANSITION_ROWS`` below."""
    QUEUED = "queued"
    INFLIGHT = "inflight"
    DELIVERED = "delivered"
    CORRECTED = "corrected"
    EXPIRED = "expired"
    EVICTED = "evicted"
    FAILED = "failed"


_S = OutboxState
#: the state of a sample when it is recorded
INITIAL_STATE = _S.QUEUED

#: Every change of state the store makes, and why: (from these states, to, reason). An edge may
#: be listed with more than one reason. ``store.py`` builds its statements from this table (it
#: fails on import otherwise), tests/unit/test_store.py traces the changes the store really
#: makes against it, and scripts/gen_state_docs.py draws the docs' diagram from it.
TRANSITION_ROWS: tuple[tuple[tuple[OutboxState, ...], OutboxState, str], ...] = (
    ((_S.QUEUED,), _S.INFLIGHT, "handed to the MQTT client"),
    ((_S.INFLIGHT,), _S.DELIVERED, "the broker acknowledged it (PUBACK)"),
    ((_S.INFLIGHT,), _S.QUEUED, "at start-up: the process that sent it is gone"),
    ((_S.DELIVERED,), _S.QUEUED, "no reply by resend_at (outbox.resend_after_s, doubling up to 64x)"),
    ((_S.INFLIGHT, _S.DELIVERED), _S.CORRECTED, "a correction was applied (from inflight: it overtook the PUBACK)"),
    ((_S.QUEUED,), _S.CORRECTED, "a correction to an earlier send, the sample queued to be sent again "
                                 "(never one never sent: refused as unknown)"),
    ((_S.QUEUED, _S.DELIVERED), _S.EXPIRED, "not corrected within outbox.max_age_s of its creation"),
    ((_S.QUEUED, _S.DELIVERED), _S.EVICTED, "outbox.max_bytes reached: oldest uncorrected first"),
    ((_S.QUEUED, _S.INFLIGHT), _S.FAILED, "the broker refused it or the client could not send it (reason kept)"),
    ((_S.INFLIGHT, _S.DELIVERED), _S.FAILED, "a worker answered with an error reply (its code kept)"),
    ((_S.QUEUED,), _S.FAILED, "an error reply to an earlier send, the sample queued to be sent again"),
)
#: the reasons of each edge, in the table's order
TRANSITION_REASONS: dict[tuple[OutboxState, OutboxState], tuple[str, ...]] = {}
for _sources, _to, _why in TRANSITION_ROWS:
    for _from in _sources:
        TRANSITION_REASONS[_from, _to] = TRANSITION_REASONS.get((_from, _to), ()) + (_why,)
#: the states each state may change to (done states: none)
TRANSITIONS: dict[OutboxState, frozenset[OutboxState]] = {
    s: frozenset(to for (frm, to) in TRANSITION_REASONS if frm is s) for s in OutboxState}
del _sources, _to, _why, _from

OUTBOX_STATES = tuple(s.value for s in OutboxState)
#: states in which a reply from the cloud may still be applied (in queued, only to a sample sent before:
#: attempts > 0; the link worker records a sample as inflight before it applies a reply to it)
OPEN_STATES = tuple(s.value for s in OutboxState if _S.CORRECTED in TRANSITIONS[s])
#: states whose rows are done with (never left): pruned together with their results
DONE_STATES = tuple(s.value for s in OutboxState if not TRANSITIONS[s])
assert set(OPEN_STATES) | set(DONE_STATES) == set(OUTBOX_STATES), "a state is neither open nor done"


def sql_states(*states: OutboxState) -> str:
    """States as SQL literals: ``'queued'``, or ``('queued','inflight')`` for ``IN``. Literals, not
    parameters: the partial index on delivered rows is used only when the query names the state."""
    if len(states) == 1:
        return f"'{states[0].value}'"
    return "(" + ",".join(f"'{s.value}'" for s in states) + ")"


VERSION = 4
#: the versions this release upgrades in place
UPGRADES_FROM = (2, 3)

_TABLES = """
CREATE TABLE IF NOT EXISTS results (
    sample_id     TEXT PRIMARY KEY,
    created_at    REAL NOT NULL,
    source        TEXT NOT NULL,
    model         TEXT NOT NULL,
    edge_label    INTEGER NOT NULL,
    edge_conf     REAL NOT NULL,
    label         INTEGER NOT NULL,
    label_name    TEXT NOT NULL,
    confidence    REAL NOT NULL,
    origin        TEXT NOT NULL,
    state         TEXT NOT NULL,
    offloaded     INTEGER NOT NULL,
    corrected_at  REAL,
    cloud_model   TEXT,
    offload_error TEXT,
    offload_reason TEXT,
    source_key    TEXT NOT NULL DEFAULT '',
    pub_seq       INTEGER NOT NULL,
    acked_seq     INTEGER NOT NULL DEFAULT 0,
    backend       TEXT NOT NULL DEFAULT '',
    fallback      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS results_unpublished ON results(pub_seq) WHERE pub_seq > acked_seq;
CREATE INDEX IF NOT EXISTS results_created ON results(created_at);
CREATE INDEX IF NOT EXISTS results_source_key ON results(source_key) WHERE source_key != '';
CREATE TABLE IF NOT EXISTS outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id    TEXT NOT NULL UNIQUE,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    state        TEXT NOT NULL,
    content_type TEXT NOT NULL,
    payload      BLOB,
    size         INTEGER NOT NULL DEFAULT 0,
    user_props   BLOB NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    applied      INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    resend_at    REAL,
    -- the publication sequence of its result's first (provisional) version: the sample is sent
    -- only after that version was handed to the broker, so subscribers see provisional, then final
    result_seq   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state, seq);
"""

_V3 = f"""
CREATE INDEX IF NOT EXISTS outbox_resend ON outbox(resend_at) WHERE state = {sql_states(OutboxState.DELIVERED)};
CREATE TABLE IF NOT EXISTS counts (name TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS outbox_ins AFTER INSERT ON outbox BEGIN
    UPDATE counts SET n = n + 1 WHERE name = 'outbox.' || NEW.state;
    UPDATE counts SET n = n + NEW.size WHERE name = 'outbox.bytes' AND NEW.payload IS NOT NULL;
END;
CREATE TRIGGER IF NOT EXISTS outbox_state_upd AFTER UPDATE OF state ON outbox WHEN OLD.state != NEW.state BEGIN
    UPDATE counts SET n = n - 1 WHERE name = 'outbox.' || OLD.state;
    UPDATE counts SET n = n + 1 WHERE name = 'outbox.' || NEW.state;
END;
CREATE TRIGGER IF NOT EXISTS outbox_payload_upd AFTER UPDATE OF payload ON outbox
    WHEN (OLD.payload IS NULL) != (NEW.payload IS NULL) BEGIN
    UPDATE counts SET n = n + CASE WHEN NEW.payload IS NULL THEN -OLD.size ELSE NEW.size END
        WHERE name = 'outbox.bytes';
END;
CREATE TRIGGER IF NOT EXISTS outbox_del AFTER DELETE ON outbox BEGIN
    UPDATE counts SET n = n - 1 WHERE name = 'outbox.' || OLD.state;
    UPDATE counts SET n = n - OLD.size WHERE name = 'outbox.bytes' AND OLD.payload IS NOT NULL;
END;
CREATE TRIGGER IF NOT EXISTS results_ins AFTER INSERT ON results BEGIN
    UPDATE counts SET n = n + 1 WHERE name = 'results';
    UPDATE counts SET n = n + 1 WHERE name = 'results.unpublished' AND NEW.pub_seq > NEW.acked_seq;
END;
CREATE TRIGGER IF NOT EXISTS results_pub_upd AFTER UPDATE OF pub_seq, acked_seq ON results
    WHEN (OLD.pub_seq > OLD.acked_seq) != (NEW.pub_seq > NEW.acked_seq) BEGIN
    UPDATE counts SET n = n + CASE WHEN NEW.pub_seq > NEW.acked_seq THEN 1 ELSE -1 END
        WHERE name = 'results.unpublished';
END;
CREATE TRIGGER IF NOT EXISTS results_del AFTER DELETE ON results BEGIN
    UPDATE counts SET n = n - 1 WHERE name = 'results';
    UPDATE counts SET n = n - 1 WHERE name = 'results.unpublished' AND OLD.pub_seq > OLD.acked_seq;
END;
"""

#: the tables alone, for a rebuild (``migrate`` then adds the rest and counts the rows)
TABLES_SQL = _TABLES
TABLES = ("results", "outbox")


def initial_counts(db: sqlite3.Connection) -> list[tuple[str, int]]:
    """Counted from the rows once, when the counts table is created (an upgrade or a rebuild)."""
    by_state = dict(db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())
    (held,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM outbox WHERE payload IS NOT NULL").fetchone()
    (results,) = db.execute("SELECT COUNT(*) FROM results").fetchone()
    (unpublished,) = db.execute("SELECT COUNT(*) FROM results WHERE pub_seq > acked_seq").fetchone()
    return ([(f"outbox.{s}", by_state.get(s, 0)) for s in OUTBOX_STATES]
            + [("outbox.bytes", held), ("results", results), ("results.unpublished", unpublished)])


def migrate(db: sqlite3.Connection, resend_after_s: float) -> int:
    """Create or upgrade the schema in one transaction; returns the version found (0 = new)."""
    (found,) = db.execute("PRAGMA user_version").fetchone()
    if found == VERSION:
        return found
    if found != 0 and found not in UPGRADES_FROM:
        raise StoreError(f"state database schema version {found} is not one this edge-infer opens (it writes "
                         f"{VERSION} and upgrades {' and '.join(map(str, UPGRADES_FROM))}): a store written by a "
                         "newer release needs that release (or `edge-infer reset-store --yes` to start empty)",
                         kind="version")
    db.execute("BEGIN IMMEDIATE")
    try:
        if found == 2:
            # A release before schema 3 opening this file sets the version back to 2 but keeps
            # the column (and the triggers, which kept counting): upgrade only what is missing.
            columns = {r[1] for r in db.execute("PRAGMA table_info(outbox)")}
            if "resend_at" not in columns:
                db.execute("ALTER TABLE outbox ADD COLUMN resend_at REAL")
            if "result_seq" not in columns:
                # 0: results of a previous release were published (or are republished at start) first anyway
                db.execute("ALTER TABLE outbox ADD COLUMN result_seq INTEGER NOT NULL DEFAULT 0")
            db.execute("UPDATE outbox SET resend_at = updated_at + ? * (1 << MIN(MAX(attempts - 1, 0), 6)) "
                       f"WHERE state = {sql_states(OutboxState.DELIVERED)}", (resend_after_s,))
        if found in (2, 3):
            # Added at the end, as the CREATE TABLE above has them, so a rebuild copies by the same names.
            result_columns = {r[1] for r in db.execute("PRAGMA table_info(results)")}
            for column, decl in (("backend", "TEXT NOT NULL DEFAULT ''"), ("fallback", "INTEGER NOT NULL DEFAULT 0")):
                if column not in result_columns:
                    db.execute(f"ALTER TABLE results ADD COLUMN {column} {decl}")
        for statement in _split(_TABLES + _V3):
            db.execute(statement)
        db.executemany("INSERT OR REPLACE INTO counts (name, n) VALUES (?, ?)", initial_counts(db))
        db.execute(f"PRAGMA user_version = {VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return found


def _split(script: str) -> list[str]:
    """Statements of a script (triggers hold ';' inside BEGIN ... END)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    return [s for s in out if s]
