"""The store's SQL, built once at import from the outbox state table.

Each statement that changes an outbox state names its target through
``_into``, which checks the change against ``storeschema.TRANSITIONS``: a
change the table lacks fails the import, so the documented state machine
(generated from the same table) cannot drift from what the store does.
"""
from __future__ import annotations

from .storeschema import DONE_STATES, INITIAL_STATE, OPEN_STATES, TRANSITIONS, OutboxState, sql_states

RESULT_COLS = ("sample_id, created_at, source, model, edge_label, edge_conf, label, label_name, confidence, "
                "origin, state, offloaded, corrected_at, cloud_model, offload_error, offload_reason, backend, fallback")
#: reading a store of schema 2 or 3 without upgrading it (``edge-infer status`` on a store an older release wrote)
RESULT_COLS_BEFORE_4 = RESULT_COLS.replace("backend, fallback", "'' AS backend, 0 AS fallback")
#: rows one maintenance transaction touches at most, so the writer never waits long for the lock
CHUNK = 512
RESEND_AT = "? + ? * (1 << MIN(MAX(attempts - 1, 0), 6))"   # the wait doubles per attempt, up to 64x

_S = OutboxState


def _into(target: OutboxState, *sources: OutboxState) -> str:
    """``target`` as an SQL literal, for a statement that moves rows from ``sources`` to it; each
    change must be in ``storeschema.TRANSITIONS`` (checked once, when this module is imported)."""
    for source in sources:
        if target not in TRANSITIONS[source]:
            raise AssertionError(f"outbox change {source.value} -> {target.value} is not in "
                                 "storeschema.TRANSITION_ROWS: add it there (with its reason) first")
    return sql_states(target)


NEW = INITIAL_STATE.value
#: what the byte budget evicts and what expires: not what is in paho's hands
EVICTABLE = (_S.QUEUED, _S.DELIVERED)
EXPIRABLE = (_S.QUEUED, _S.DELIVERED)
#: what the broker can refuse (or the client fail to send)
SENDABLE = (_S.QUEUED, _S.INFLIGHT)
OPEN = tuple(_S(s) for s in OPEN_STATES)
#: where a second correction or error reply finds a sample (else it is late: expired, evicted, refused)
DUPLICATE_CORRECTION = (_S.CORRECTED.value,)
DUPLICATE_ERROR = (_S.CORRECTED.value, _S.FAILED.value)

SQL_REQUEUE = (f"UPDATE outbox SET state={_into(_S.QUEUED, _S.INFLIGHT)}, updated_at=? "
                f"WHERE state={sql_states(_S.INFLIGHT)}")
#: states a sample waits in for its correction; the oldest of each (metrics: age of the oldest waiting sample)
#: is one seek of outbox_state: seq grows with created_at, and a sample keeps its seq when it is queued again
WAITING = (_S.QUEUED, _S.INFLIGHT, _S.DELIVERED)
SQL_OLDEST = {s.value: f"SELECT created_at FROM outbox INDEXED BY outbox_state WHERE state={sql_states(s)} "
                       "ORDER BY seq LIMIT 1" for s in WAITING}
SQL_QUEUED = ("SELECT sample_id, created_at, content_type, payload, user_props, result_seq FROM outbox "
               f"WHERE state={sql_states(_S.QUEUED)} ORDER BY seq LIMIT ?")
SQL_SENT = (f"UPDATE outbox SET state={_into(_S.INFLIGHT, _S.QUEUED)}, attempts=attempts+1, updated_at=? "
             f"WHERE sample_id=? AND state={sql_states(_S.QUEUED)}")
# A shorter resend wait reaches samples already waiting: their resend time, recomputed with it, if
# sooner. The partial index holds only delivered samples, so this touches those and nothing else.
# A shorter resend wait reaches samples already waiting: their resend time, recomputed with it, if
# sooner. Walked through the partial index (delivered samples only) in (resend_at, rowid) order, a
# chunk per transaction: with hours of backlog delivered to a broker with no worker, one UPDATE of
# 100k rows held the write lock 0.6-1.7 s (measured); re-scanning from the start per chunk took 7 s.
SQL_RESEND_PAGE = ("SELECT rowid, resend_at FROM outbox INDEXED BY outbox_resend "
                   f"WHERE state={sql_states(_S.DELIVERED)} AND (resend_at, rowid) > (?, ?) "
                   "ORDER BY resend_at, rowid LIMIT ?")
SQL_SHORTEN_RESEND = ("UPDATE outbox SET resend_at = updated_at + ?1 * (1 << MIN(MAX(attempts - 1, 0), 6)) "
                      "WHERE rowid = ?2 AND resend_at > updated_at + ?1 * (1 << MIN(MAX(attempts - 1, 0), 6))")
SQL_ACKED = (f"UPDATE outbox SET state={_into(_S.DELIVERED, _S.INFLIGHT)}, updated_at=?, resend_at={RESEND_AT} "
              f"WHERE sample_id=? AND state={sql_states(_S.INFLIGHT)}")
SQL_REFUSED = (f"UPDATE outbox SET state={_into(_S.FAILED, *SENDABLE)}, last_error=?, payload=NULL, updated_at=? "
                f"WHERE sample_id=? AND state IN {sql_states(*SENDABLE)}")
SQL_EVICT = (f"UPDATE outbox SET state={_into(_S.EVICTED, *EVICTABLE)}, payload=NULL, updated_at=?, last_error=? "
              "WHERE sample_id=?")
SQL_EXPIRE = f"UPDATE outbox SET state={_into(_S.EXPIRED, *EXPIRABLE)}, payload=NULL, updated_at=? WHERE sample_id=?"
SQL_RESEND = (f"UPDATE outbox SET state={_into(_S.QUEUED, _S.DELIVERED)}, updated_at=? WHERE seq IN (SELECT seq "
               # Named: left to itself the planner takes outbox_state and sorts every
               # delivered row (65 ms a pass at 100k, measured by bench/store_scale_bench.py).
               f"FROM outbox INDEXED BY outbox_resend WHERE state={sql_states(_S.DELIVERED)} AND resend_at <= ? "
               "ORDER BY resend_at LIMIT ?)")
#: A sample in this state with no attempts was never sent: no worker can be answering it, so a reply
#: for it is refused as unknown (a forger guessing ids). The link worker records the samples it hands
#: to the MQTT client as inflight before it applies a reply to one of them.
UNSENT = _S.QUEUED.value
# replies: the state was read (and found open and sent) in the same transaction
SQL_CORRECT = (f"UPDATE outbox SET state={_into(_S.CORRECTED, *OPEN)}, payload=NULL, updated_at=?, "
                "applied=applied+1 WHERE sample_id=?")
#: outbox.keep_payload_after_correction = true: the image stays (for retraining) until its result is
#: pruned (results.keep) or the byte budget needs the room (kept payloads go first, oldest first)
SQL_CORRECT_KEEP = (f"UPDATE outbox SET state={_into(_S.CORRECTED, *OPEN)}, updated_at=?, "
                     "applied=applied+1 WHERE sample_id=?")
_KEPT = f"state={sql_states(_S.CORRECTED)} AND payload IS NOT NULL"
KEPT_INDEX = "outbox_kept"
SQL_KEPT_INDEX = f"CREATE INDEX IF NOT EXISTS {KEPT_INDEX} ON outbox(seq) WHERE {_KEPT}"
SQL_KEPT_OLDEST = f"SELECT seq, size FROM outbox INDEXED BY {KEPT_INDEX} WHERE {_KEPT} ORDER BY seq LIMIT 64"
SQL_DROP_KEPT = "UPDATE outbox SET payload=NULL WHERE seq=?"
SQL_DROP_ALL_KEPT = f"UPDATE outbox INDEXED BY {KEPT_INDEX} SET payload=NULL WHERE {_KEPT}"
SQL_ERROR = (f"UPDATE outbox SET state={_into(_S.FAILED, *OPEN)}, last_error=?, payload=NULL, updated_at=? "
              "WHERE sample_id=?")
SQL_PRUNE_OUTBOX = f"DELETE FROM outbox WHERE sample_id=? AND state IN {sql_states(*(_S(s) for s in DONE_STATES))}"
