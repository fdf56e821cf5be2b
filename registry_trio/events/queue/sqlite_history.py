"""The delivery history in the SQLite outbox: its table, its writes, its reads, its pruning.

Schema (beside the outbox's own tables, see :mod:`.sqlite`)::

    history(id, at, seq, event_id, sink, step, attempt, status, error, latency, batch,
            retry_at, by_whom)          one row per attempt, dead letter or replay

Rows are written by the outbox's writer thread inside the transaction of the
acknowledgement, retry, burial or replay they describe: one commit, no fsync of their own.
``at`` is the commit's time, made to never go back (``max`` with the newest row's), so the
rows are in time order by ``id`` and a time range is an ``id`` range (found through the index
on ``at``).

While the history is on, an event delivered to all its sinks stays in ``events`` for as long
as a history row names it (a trace shows its payload); pruning removes the rows, oldest
first, in small transactions (:func:`prune`), and each event once no row names it and no sink
still owes it.

Indexes: ``event_id`` (a trace), ``(sink, id)`` (a sink's page), ``at`` (a time range). The
other filters (outcome, repository, digest) read at most :data:`~.history.SCAN_MAX` rows per
page and hand out a cursor to go on.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from ..model import Event
from .base import OwedEvent
from .history import (
    SCAN_MAX,
    TRACE_MAX,
    Attempt,
    Commit,
    EventTrace,
    HistoryPage,
    HistoryQuery,
    HistoryRecord,
    Step,
)

__all__ = [
    "HISTORY_SCHEMA",
    "TRACE_SCAN",
    "HistoryRow",
    "attempt_rows",
    "prune",
    "read_page",
    "read_trace",
    "record",
    "replay_rows",
]

HISTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS history (
    -- AUTOINCREMENT: ids never go back, even when pruning empties the table, so a cursor
    -- can never name a different record later.
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    seq INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    sink TEXT NOT NULL,
    step TEXT NOT NULL,
    attempt INTEGER,
    status TEXT,
    error TEXT,
    latency REAL,
    batch INTEGER,
    retry_at REAL,
    by_whom TEXT
);
CREATE INDEX IF NOT EXISTS history_by_event ON history (event_id);
CREATE INDEX IF NOT EXISTS history_by_sink ON history (sink, id);
CREATE INDEX IF NOT EXISTS history_by_time ON history (at);
"""

# An event nobody attempted yet has no history row: a trace looks for it among this many of
# the newest events (a bounded read; an older backlog is found once attempted).
TRACE_SCAN = 10_000

# (at is added when written) seq, event id, sink, step, attempt, status, error, latency,
# batch, retry_at, by.
HistoryRow = tuple[
    int,
    str,
    str,
    str,
    int | None,
    str | None,
    str | None,
    float | None,
    int | None,
    float | None,
    str | None,
]

_COLUMNS = (
    "at",
    "seq",
    "event_id",
    "sink",
    "step",
    "attempt",
    "status",
    "error",
    "latency",
    "batch",
    "retry_at",
    "by_whom",
)


def attempt_rows(
    sink: str,
    deliveries: Sequence[OwedEvent],
    attempts: Sequence[Attempt],
    step: Step,
    retry_at: float | None = None,
) -> list[HistoryRow]:
    return [
        (
            owed.seq,
            owed.event.id,
            sink,
            str(step),
            owed.attempts + 1,
            attempt.status,
            attempt.error,
            attempt.latency,
            attempt.batch,
            retry_at,
            None,
        )
        for owed, attempt in zip(deliveries, attempts, strict=True)
    ]


def replay_rows(sink: str, replayed: Sequence[tuple[int, str]], by: str | None) -> list[HistoryRow]:
    return [
        (seq, event_id, sink, str(Step.REPLAYED), None, None, None, None, None, None, by)
        for seq, event_id in replayed
    ]


def record(conn: sqlite3.Connection, rows: Sequence[HistoryRow], chunk: int = 80) -> None:
    """Insert history rows in the caller's transaction, stamped with the commit's time."""
    if not rows:
        return
    newest = conn.execute("SELECT MAX(at) FROM history").fetchone()[0]
    at = max(time.time(), newest or 0.0)
    marks = "(" + ", ".join("?" * len(_COLUMNS)) + ")"
    # Multi-row statements, for the reason sqlite.CHUNK gives; 80 x 12 stays far below
    # SQLite's limit on bound variables.
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        conn.execute(
            f"INSERT INTO history({', '.join(_COLUMNS)}) VALUES {', '.join([marks] * len(part))}",
            [value for row in part for value in (at, *row)],
        )


_SELECT = (
    "SELECT h.id, h.at, h.sink, h.event_id, h.seq, h.step, h.attempt, h.status, h.error, "
    "h.latency, h.batch, h.retry_at, h.by_whom, e.body"
)


def _records(rows: list[tuple[Any, ...]]) -> list[HistoryRecord]:
    return [
        HistoryRecord(
            id=row[0],
            time=row[1],
            sink=row[2],
            event_id=row[3],
            seq=row[4],
            step=Step(row[5]),
            attempt=row[6],
            status=row[7],
            error=row[8],
            latency=row[9],
            batch=row[10],
            retry_at=row[11],
            by=row[12],
            event=None if row[13] is None else Event.from_bytes(row[13]),
        )
        for row in rows
    ]


def _id_bounds(conn: sqlite3.Connection, query: HistoryQuery) -> tuple[int, int] | None:
    """The id range the query's time range and cursor leave; None when it is empty."""
    low, high = 0, (query.before - 1) if query.before is not None else 2**63 - 1
    if query.since is not None:
        row = conn.execute(
            "SELECT id FROM history WHERE at >= ? ORDER BY at LIMIT 1", (query.since,)
        ).fetchone()
        if row is None:
            return None
        low = row[0]
    if query.until is not None:
        row = conn.execute(
            "SELECT id FROM history WHERE at <= ? ORDER BY at DESC LIMIT 1", (query.until,)
        ).fetchone()
        if row is None:
            return None
        high = min(high, row[0])
    return (low, high) if low <= high else None


def read_page(conn: sqlite3.Connection, query: HistoryQuery, scan: int = SCAN_MAX) -> HistoryPage:
    """One page, newest first: at most ``scan`` rows examined, ``query.limit`` returned."""
    bounds = _id_bounds(conn, query)
    if bounds is None:
        return HistoryPage([], None)
    indexed = ["id BETWEEN ? AND ?"]
    params: list[Any] = list(bounds)
    if query.sink is not None:
        indexed.append("sink = ?")
        params.append(query.sink)
    if query.event_id is not None:
        indexed.append("event_id = ?")
        params.append(query.event_id)
    scanned = (
        f"SELECT * FROM history WHERE {' AND '.join(indexed)} ORDER BY id DESC LIMIT {int(scan)}"
    )
    filters, values = [], []
    if query.steps is not None:
        filters.append(f"h.step IN ({', '.join('?' * len(query.steps))})")
        values += sorted(str(step) for step in query.steps)
    # The event's JSON is stored as bytes (a BLOB), which json_extract takes only as text.
    for field, wanted in (("repository", query.repository), ("digest", query.digest)):
        if wanted is not None:
            filters.append(f"json_extract(CAST(e.body AS TEXT), '$.target.{field}') = ?")
            values.append(wanted)
    where = f"WHERE {' AND '.join(filters)}" if filters else ""
    rows = conn.execute(
        f"{_SELECT} FROM ({scanned}) h LEFT JOIN events e ON e.seq = h.seq {where} "
        f"ORDER BY h.id DESC LIMIT ?",
        [*params, *values, query.limit + 1],
    ).fetchall()
    records = _records(rows[: query.limit])
    if len(rows) > query.limit:
        return HistoryPage(records, records[-1].id)
    # Fewer matches than asked: more may still match below what this page examined.
    examined, lowest = conn.execute(f"SELECT COUNT(*), MIN(id) FROM ({scanned})", params).fetchone()
    return HistoryPage(records, lowest if examined >= scan else None)


def read_trace(conn: sqlite3.Connection, event_id: str) -> EventTrace | None:
    rows = conn.execute(
        f"{_SELECT} FROM history h LEFT JOIN events e ON e.seq = h.seq "
        "WHERE h.event_id = ? ORDER BY h.id DESC LIMIT ?",
        (event_id, TRACE_MAX + 1),
    ).fetchall()
    truncated = len(rows) > TRACE_MAX
    records = _records(rows[:TRACE_MAX])[::-1]
    seqs = sorted({r.seq for r in records})
    if not seqs:
        # Not attempted yet: among the newest events, by a bounded read.
        seqs = [
            row[0]
            for row in conn.execute(
                "SELECT seq FROM (SELECT seq, event_id FROM events ORDER BY seq DESC LIMIT ?) "
                "WHERE event_id = ?",
                (TRACE_SCAN, event_id),
            )
        ]
        if not seqs:
            return None
    marks = ", ".join("?" * len(seqs))
    stored = conn.execute(
        f"SELECT seq, body, committed FROM events WHERE seq IN ({marks}) ORDER BY seq", seqs
    ).fetchall()
    owed = conn.execute(
        f"SELECT sink, state FROM deliveries WHERE seq IN ({marks}) ORDER BY sink", seqs
    ).fetchall()
    event = Event.from_bytes(stored[-1][1]) if stored else None
    committed = {seq: at for seq, _, at in stored}
    return EventTrace(
        event_id,
        event,
        [Commit(seq, committed.get(seq)) for seq in seqs],
        records,
        truncated,
        owed={sink: "dead" if state else "pending" for sink, state in owed},
    )


def prune(conn: sqlite3.Connection, max_age: float, max_rows: int, batch: int, now: float) -> int:
    """Delete up to ``batch`` of the oldest rows past the age or the row budget, and the
    events no row names any more and no sink owes; how many rows went (in the caller's
    transaction)."""
    first, last = conn.execute("SELECT MIN(id), MAX(id) FROM history").fetchone()
    if first is None:
        return 0
    # Rows are only ever deleted oldest first, so ids are contiguous: last - first + 1 rows.
    keep_from = max(first, last + 1 - max_rows)
    young = conn.execute(
        "SELECT id FROM history WHERE at >= ? ORDER BY at LIMIT 1", (now - max_age,)
    ).fetchone()
    keep_from = max(keep_from, young[0] if young is not None else last + 1)
    doomed = (first, min(keep_from - 1, first + batch - 1))
    if doomed[1] < doomed[0]:
        return 0
    # Whole statements, not a statement per row: each step of executemany re-takes the GIL.
    conn.execute(
        "DELETE FROM events WHERE seq IN (SELECT h.seq FROM history h "
        "WHERE h.id BETWEEN ?1 AND ?2 "
        "AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.seq = h.seq) "
        "AND NOT EXISTS (SELECT 1 FROM history o WHERE o.event_id = h.event_id "
        "AND o.seq = h.seq AND o.id > ?2))",
        doomed,
    )
    return conn.execute("DELETE FROM history WHERE id BETWEEN ? AND ?", doomed).rowcount
