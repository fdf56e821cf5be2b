"""The durable event outbox: SQLite on the standard ``sqlite3`` module.

Why our own and not persist-queue: persist-queue fsyncs every put and every get on its own
and slows to a crawl when acked rows pile up (``bench/events.py`` compares the enqueue rates).
Here one writer task commits *every* waiting write in one transaction (group commit): a
request awaits its own commit, yet a burst of requests shares one fsync.

Schema::

    events(seq, event_id, body, created, committed)
                                                one row per event, the JSON of Event
    deliveries(sink, seq, state, attempts, next_attempt, last_error)
                                                one row per (sink, event) still owed;
                                                state 0 = pending, 2 = dead letter
    sink_counters(sink, delivered, failed_attempts, dead, last_error, last_error_at,
                  last_delivered_at)            totals since the queue was created, and
                                                when the last error and delivery were
    meta(key, value)                            instance id, schema version
    history(...)                                the delivery history, see sqlite_history.py

An event and its delivery rows are written in one transaction, so an event becomes visible to
every sink at once or not at all. A delivered row is deleted, and the event with its last row
unless the delivery history keeps it for a while (pruned to ``history.maxAge`` and
``maxRows``), so the file grows with neither backlog nor history past their limits. "In
flight" is deliberately not stored: after a crash, whatever was being sent is simply still
pending, which is at-least-once by construction.

Durability: WAL with ``synchronous=FULL`` fsyncs the WAL on every commit. :meth:`Outbox.append`
returns only after that commit; the API awaits it before answering 2xx.

One module, though long: the writer thread, the schema and the per-sink queues share one
connection's transactions, and their correctness is argued together above.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from ...config import HistoryConfig, SinkConfig
from ..model import Event
from . import sqlite_history as history
from .base import (
    APPENDED,
    DeadLetter,
    OwedEvent,
    PendingAppend,
    QueueError,
    QueueFull,
    SinkCounts,
    take_limit,
)
from .history import Attempt, EventTrace, HistoryPage, HistoryQuery, Step

__all__ = ["Outbox", "OutboxReader"]

log = logging.getLogger("registry_trio.events.queue")

_T = TypeVar("_T")

# Rows read per query when overtaking is allowed (concurrent mode skips rows not yet due).
READ_AHEAD = 256
# An idle consumer looks at the queue at least this often even without a signal, so work
# committed by another process (`registry-trio events replay` or `gc` on a live queue) is
# picked up without a push to wake it.
IDLE_POLL = 2.0

PENDING = 0
DEAD = 2

# How many queued writes one transaction may take. Large enough that a burst shares one
# fsync, small enough that one commit never holds the writer for long.
MAX_GROUP = 2048

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS events (
    -- AUTOINCREMENT: positions never go back, even when pruning empties the table, so a
    -- dead-letter cursor or an in-flight position can never name a different event later.
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL,
    -- When the event was committed (NULL in rows older than this column).
    committed REAL
);

CREATE TABLE IF NOT EXISTS deliveries (
    sink TEXT NOT NULL,
    seq INTEGER NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (sink, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_by_state ON deliveries (sink, state, seq);
CREATE INDEX IF NOT EXISTS deliveries_by_seq ON deliveries (seq);
CREATE TABLE IF NOT EXISTS sink_counters (
    sink TEXT PRIMARY KEY,
    delivered INTEGER NOT NULL DEFAULT 0,
    failed_attempts INTEGER NOT NULL DEFAULT 0,
    dead INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    last_error_at REAL,
    last_delivered_at REAL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
    + history.HISTORY_SCHEMA
)

# History rows pruned per transaction: a prune never holds the writer for long, and delivery's
# writes queued meanwhile go in between two of them.
PRUNE_BATCH = 1000
# Pruning looks at the history at least this often (more often with a short maxAge) ...
PRUNE_INTERVAL = 60.0
# ... and as soon as this share of maxRows was written since it last did.
PRUNE_SHARE = 0.1


# Columns added since the first schema, each with its definition: CREATE TABLE IF NOT EXISTS
# leaves an existing table as it was, so a queue file from before gets them at open.
_ADDED_COLUMNS = {
    "sink_counters": {"last_delivered_at": "REAL"},
    "events": {"committed": "REAL"},
}


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a queue file written by an older registry up to :data:`_SCHEMA`.

    Inside the caller's write transaction: processes opening the same old file at once (a
    server's workers, an ``events`` command) add each column once, the others finding it.
    """
    for table, columns in _ADDED_COLUMNS.items():
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for column, definition in columns.items():
            if column not in present:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


def _connect(path: Path) -> sqlite3.Connection:
    # check_same_thread=False: trio.to_thread may run each call on a different worker
    # thread; every connection is used by one task at a time, which is what SQLite needs.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


# One event to insert: (event id, JSON body, created, sinks that are owed it).
_Row = tuple[str, bytes, float, Sequence[str]]


@dataclass
class _Write:
    # Either an arbitrary change, or events to append (merged across the group: see _commit).
    apply: Callable[[sqlite3.Connection], Any] | None = None
    rows: Sequence[_Row] = ()
    wakes: Sequence[str] = ()
    # The database file, named when a commit fails for want of space.
    path: Path | None = None
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None

    async def wait(self) -> None:
        """Return once committed; raise :class:`QueueError` if the commit failed."""
        await self.done.wait()
        if self.error is not None:
            if _disk_full(self.error):
                raise QueueFull(f"cannot commit to {self.path}: {self.error}") from self.error
            raise QueueError(f"the event queue could not commit: {self.error}") from self.error


class Outbox:
    """The queue's single writer, and the factory for per-sink readers.

    Run :meth:`run` in a nursery (``await nursery.start(outbox.run)``) before appending;
    :meth:`close` lets it finish what is queued and return.
    """

    def __init__(
        self,
        directory: str | Path,
        on_commit: Callable[[int, float], None] | None = None,
        announce: Callable[[Sequence[str]], None] | None = None,
        history: HistoryConfig | None = None,
    ) -> None:
        self.path = Path(directory) / "events.db"
        # Default: on, with the default limits (a queue opened by a test or a tool).
        self._history = history if history is not None else HistoryConfig()
        # History rows written since the last prune, and the event a prune waits on.
        self._recorded = 0
        self._prune_due = trio.Event()
        # Called after each transaction with (writes committed, seconds): metrics.
        self._on_commit = on_commit
        # Called on the writer thread after each transaction with the sinks it gave new
        # work: tells a consumer in another process (see wakeup.py).
        self._announce = announce
        self.instance_id = ""
        # Writes go to the writer thread through a thread-safe queue; None tells it to stop.
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._closed = False
        self._stop = trio.Event()
        self._signals: dict[str, trio.Event] = {}
        self._conn: sqlite3.Connection | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = _connect(self.path)
            # One write transaction from the start: worker processes open the file together,
            # and a transaction that begins reading and then writes gets "database is
            # locked" at once when another holds the write lock, where BEGIN IMMEDIATE waits.
            conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA}")
            _migrate(conn)
            row = conn.execute("SELECT value FROM meta WHERE key='instance_id'").fetchone()
            if row is None:
                self.instance_id = uuid.uuid4().hex
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('instance_id', ?)", (self.instance_id,)
                )
            else:
                self.instance_id = row[0]
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise QueueError(f"cannot open the event queue at {self.path}: {exc}") from exc
        self._conn = conn

    def prepare(self) -> None:
        """Create the file with its schema and instance id, and close it again (blocking).

        A supervisor does this before its workers open the file together: the first switch
        of a new file to WAL needs the file alone, and SQLite answers "database is locked"
        at once, without waiting, to every other process trying it meanwhile.
        """
        self._open()
        assert self._conn is not None
        self._conn.close()
        self._conn = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer thread until :meth:`close`; it commits what is queued, then stops.

        Why a thread of its own rather than a task that hops to a worker thread per commit:
        the next commit starts the moment the previous one ends, however busy the event loop
        is. With a hop per commit, every commit also waited for the loop to come back to the
        writer task (measured: 7 ms per commit under push load, against 0.3 ms for the
        commit itself).
        """
        await trio.to_thread.run_sync(self._open)
        token = trio.lowlevel.current_trio_token()
        writer = threading.Thread(
            target=self._writer, args=(token,), name="outbox-writer", daemon=True
        )
        writer.start()
        task_status.started()
        try:
            await self._stop.wait()
        finally:
            self._closed = True
            self._queue.put(None)
            # Shielded: the writer finishes what is queued (each waiter must learn the
            # outcome of its write) and closes the database before this task may end.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(writer.join)

    def _writer(self, token: trio.lowlevel.TrioToken) -> None:
        assert self._conn is not None
        try:
            while (first := self._queue.get()) is not None:
                group, stopping = [first], False
                while len(group) < MAX_GROUP:
                    try:
                        write = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if write is None:
                        stopping = True
                        break
                    group.append(write)
                started = time.perf_counter()
                self._commit(group)
                elapsed = time.perf_counter() - started
                if self._announce is not None:
                    # From this thread, not after the hop to the event loop: the consumer
                    # elsewhere learns of the commit a loop turn sooner.
                    self._announce(sorted({s for w in group if w.error is None for s in w.wakes}))
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(self._committed, group, elapsed)
                if stopping:
                    break
        finally:
            self._conn.close()

    def _committed(self, group: list[_Write], elapsed: float) -> None:
        """Back on the event loop: wake each writer's waiter and the sinks with new work."""
        if self._on_commit is not None:
            self._on_commit(len(group), elapsed)
        for write in group:
            write.done.set()
            for sink in write.wakes:
                self._signal(sink)

    def close(self) -> None:
        """Stop accepting writes; :meth:`run` returns once the queued ones are committed."""
        self._closed = True
        self._stop.set()

    def _commit(self, group: list[_Write]) -> None:
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            # Every append of the group in two statements: per-event statements cost more
            # than the fsync they share.
            _insert(conn, [row for write in group for row in write.rows])
            for write in group:
                if write.apply is not None:
                    write.apply(conn)
            conn.execute("COMMIT")
            return
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if len(group) == 1:
                group[0].error = exc
                return
        # One bad write must not fail its neighbours: retry each alone.
        for write in group:
            self._commit([write])

    def _begin(
        self,
        apply: Callable[[sqlite3.Connection], Any] | None = None,
        wakes: Sequence[str] = (),
        rows: Sequence[_Row] = (),
    ) -> _Write:
        """Queue a write for the writer thread, which commits writes in the order queued."""
        if self._closed:
            raise QueueError("the event queue is shut down")
        write = _Write(apply, rows, wakes, self.path)
        self._queue.put(write)
        return write

    async def _write(
        self,
        apply: Callable[[sqlite3.Connection], Any] | None = None,
        wakes: Sequence[str] = (),
        rows: Sequence[_Row] = (),
    ) -> None:
        await self._begin(apply, wakes, rows).wait()

    # -- signals -------------------------------------------------------------------------

    def signal(self, sink: str) -> trio.Event:
        """An event set the next time new work for ``sink`` is committed (or on :meth:`wake`).

        Take it *before* looking for work, so a commit between the look and the wait is
        not missed.
        """
        signal = self._signals.get(sink)
        if signal is None or signal.is_set():
            signal = self._signals[sink] = trio.Event()
        return signal

    def _signal(self, sink: str) -> None:
        if (signal := self._signals.get(sink)) is not None:
            signal.set()

    def wake(self, sink: str) -> None:
        self._signal(sink)

    # -- writes --------------------------------------------------------------------------

    async def append(self, items: Sequence[tuple[Event, Sequence[str]]]) -> None:
        """Commit events, each owed to the given sinks; returns once durable on disk."""
        await self.begin_append(items).wait()

    def begin_append(self, items: Sequence[tuple[Event, Sequence[str]]]) -> PendingAppend:
        """Queue events for the writer; their ``seq`` follows every append begun before.

        The writer thread takes writes first in, first out, and numbers a group's rows in
        that order (a group retried write by write keeps it too).
        """
        rows = [(e.id, e.to_bytes(), e.time.timestamp(), sinks) for e, sinks in items if sinks]
        if not rows:
            return APPENDED
        wakes = sorted({s for *_, sinks in rows for s in sinks})
        return self._begin(wakes=wakes, rows=rows)

    async def ack(
        self, sink: str, deliveries: Sequence[OwedEvent], attempts: Sequence[Attempt]
    ) -> None:
        """Mark deliveries done: delete them, and each event nobody else still owes (unless
        the history keeps it); record the attempts in the same transaction."""
        seqs = [d.seq for d in deliveries]
        rows = self._rows(sink, deliveries, attempts, Step.DELIVERED)

        def apply(conn: sqlite3.Connection) -> None:
            for chunk in _chunks(seqs):
                marks = ", ".join("?" * len(chunk))
                conn.execute(
                    f"DELETE FROM deliveries WHERE sink=? AND seq IN ({marks})", [sink, *chunk]
                )
                if not self._history.enable:
                    conn.execute(
                        f"DELETE FROM events WHERE seq IN ({marks}) AND NOT EXISTS "
                        "(SELECT 1 FROM deliveries WHERE deliveries.seq=events.seq)",
                        list(chunk),
                    )
            _count(conn, sink, "delivered", len(seqs))
            history.record(conn, rows)

        await self._write(apply)
        self._recorded_rows(len(rows))

    async def retry_later(
        self, sink: str, deliveries: Sequence[OwedEvent], next_attempt: float, attempt: Attempt
    ) -> None:
        """Record a failed attempt; the deliveries become due again at ``next_attempt``."""
        error = attempt.error or ""
        rows = self._rows(sink, deliveries, [attempt] * len(deliveries), Step.FAILED, next_attempt)

        def apply(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE deliveries SET attempts=attempts+1, next_attempt=?, last_error=? "
                "WHERE sink=? AND seq=?",
                [(next_attempt, error, sink, d.seq) for d in deliveries],
            )
            _count(conn, sink, "failed_attempts", len(deliveries), error)
            history.record(conn, rows)

        await self._write(apply)
        self._recorded_rows(len(rows))

    async def bury(
        self, sink: str, deliveries: Sequence[OwedEvent], reason: str, attempt: Attempt
    ) -> None:
        """Move deliveries to the dead-letter store, where they wait for a replay."""
        rows = self._rows(sink, deliveries, [attempt] * len(deliveries), Step.DEAD)

        def apply(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE deliveries SET state=?, attempts=attempts+1, last_error=? "
                "WHERE sink=? AND seq=?",
                [(DEAD, reason, sink, d.seq) for d in deliveries],
            )
            _count(conn, sink, "failed_attempts", len(deliveries), reason)
            _count(conn, sink, "dead", len(deliveries), reason)
            history.record(conn, rows)

        await self._write(apply)
        self._recorded_rows(len(rows))

    async def replay(
        self, sink: str, event_ids: Sequence[str] | None = None, by: str | None = None
    ) -> int:
        """Move dead letters of ``sink`` (all, or those events) back to pending.

        They keep their event id, so a receiver that saw an earlier attempt can tell; their
        attempt count starts over, because the replay is a new decision by an operator. The
        history records each replay, with ``by`` when given.
        """
        replayed: list[tuple[int, str]] = []

        def apply(conn: sqlite3.Connection) -> None:
            # No index on event ids (measured: keeping one cost a third of the append
            # rate); the sink's dead letters, found by state, are what is searched.
            letters = (
                "SELECT d.seq, e.event_id FROM deliveries d JOIN events e ON e.seq = d.seq "
                "WHERE d.sink=? AND d.state=?"
            )
            if event_ids is None:
                found = conn.execute(letters, (sink, DEAD)).fetchall()
            else:
                found = []
                for chunk in _chunks(list(event_ids)):
                    marks = ", ".join("?" * len(chunk))
                    found += conn.execute(
                        f"{letters} AND e.event_id IN ({marks})", (sink, DEAD, *chunk)
                    ).fetchall()
            for chunk in _chunks(found):
                marks = ", ".join("?" * len(chunk))
                conn.execute(
                    "UPDATE deliveries SET state=?, attempts=0, next_attempt=0 "
                    f"WHERE sink=? AND seq IN ({marks})",
                    (PENDING, sink, *(seq for seq, _ in chunk)),
                )
            replayed[:] = found
            if self._history.enable:
                history.record(conn, history.replay_rows(sink, found, by))

        await self._write(apply, [sink])
        self._recorded_rows(len(replayed) if self._history.enable else 0)
        return len(replayed)

    def _rows(
        self,
        sink: str,
        deliveries: Sequence[OwedEvent],
        attempts: Sequence[Attempt],
        step: Step,
        retry_at: float | None = None,
    ) -> list[history.HistoryRow]:
        if not self._history.enable:
            return []
        return history.attempt_rows(sink, deliveries, attempts, step, retry_at)

    # -- history -------------------------------------------------------------------------

    def _recorded_rows(self, count: int) -> None:
        self._recorded += count
        if self._recorded >= PRUNE_SHARE * self._history.max_rows:
            self._prune_due.set()

    async def prune_history(self) -> int:
        """Prune the history to its limits now, a batch per transaction; rows deleted."""
        limits = self._history
        async with self._reading() as reader:
            if not await reader.history_overdue(limits.max_age, limits.max_rows):
                return 0  # no write transaction (and no fsync) for nothing
        deleted = 0
        while True:
            count = 0

            def apply(conn: sqlite3.Connection) -> None:
                nonlocal count
                count = history.prune(
                    conn, limits.max_age, limits.max_rows, PRUNE_BATCH, time.time()
                )

            await self._write(apply)
            deleted += count
            if count < PRUNE_BATCH:
                return deleted

    async def keep_history(self) -> None:
        """Prune every PRUNE_INTERVAL (a quarter of maxAge when shorter), and as soon as a
        tenth of maxRows was written since the last prune.

        Pruning goes through the writer a batch at a time, so delivery's acknowledgements
        wait for one small transaction at most. A prune cut short by a cancel leaves the
        history consistent (each batch is a transaction of its own).
        """
        interval = min(PRUNE_INTERVAL, self._history.max_age / 4)
        while True:
            self._recorded = 0
            self._prune_due = trio.Event()
            try:
                deleted = await self.prune_history()
            except QueueError as exc:
                # A full disk, say: the history grows past its limits until the next try.
                log.warning("history: pruning failed: %s; trying again in %.0fs", exc, interval)
            else:
                if deleted:
                    log.debug("history: pruned %d record(s)", deleted)
            with trio.move_on_after(interval):
                await self._prune_due.wait()

    async def history(self, query: HistoryQuery) -> HistoryPage:
        async with self._reading() as reader:
            return await reader.history(query)

    async def trace(self, event_id: str) -> EventTrace | None:
        async with self._reading() as reader:
            return await reader.trace(event_id)

    # -- reads (the EventQueue contract) ------------------------------------------------

    def reader(self) -> OutboxReader:
        return OutboxReader(self.path)

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[OutboxReader]:
        # A connection per operator read: they are rare, and none then outlives the queue.
        reader = self.reader()
        try:
            yield reader
        finally:
            reader.close()

    async def counts(self, sink: str) -> SinkCounts:
        async with self._reading() as reader:
            return await reader.counts(sink)

    async def dead(self, sink: str, limit: int = 100, after: int = 0) -> list[DeadLetter]:
        async with self._reading() as reader:
            return await reader.dead(sink, limit, after)

    @contextlib.asynccontextmanager
    async def consumer(
        self, sink: SinkConfig, *, stopping: trio.Event
    ) -> AsyncIterator[SqliteSinkQueue]:
        reader = self.reader()
        try:
            yield SqliteSinkQueue(self, reader, sink, stopping)
        finally:
            reader.close()


class SqliteSinkQueue:
    """One sink's deliveries in the outbox: reads due rows, writes outcomes through the writer.

    In-flight deliveries are kept in memory only: after a crash they are simply pending.
    """

    def __init__(
        self,
        outbox: Outbox,
        reader: OutboxReader,
        sink: SinkConfig,
        stopping: trio.Event,
    ) -> None:
        self._outbox = outbox
        self._reader = reader
        self._name = sink.name
        self._ordered = sink.ordered
        self._group = sink.events_per_message
        self._max_wait = float(sink.batch.max_wait)
        self._take_limit = take_limit(sink)
        self._stopping = stopping
        self._read_lock = trio.Lock()
        self._in_flight: set[int] = set()
        # Unordered: deliveries settled (acknowledged, rescheduled, buried) while a read was
        # under way. That read's snapshot may predate their commit and show them still due,
        # after they left _in_flight: taken again, they would be sent twice.
        self._settled_during_read: set[int] | None = None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def _read(self) -> list[tuple[OwedEvent, float]]:
        async with self._read_lock:
            if self._ordered:
                # In order, what is in flight is a prefix of the queue: read past it rather
                # than parse its rows again only to skip them.
                after = max(self._in_flight, default=0)
                return await self._reader.pending(self._name, self._take_limit, after)
            settled: set[int] = set()
            self._settled_during_read = settled
            try:
                rows = await self._reader.pending(self._name, READ_AHEAD + len(self._in_flight))
            finally:
                self._settled_during_read = None
            return [(owed, due) for owed, due in rows if owed.seq not in settled]

    async def take(self, *, wait: bool = True) -> list[OwedEvent]:
        filling_until: float | None = None
        while not self._stopping.is_set():
            # Taken before reading, so a commit that lands after the read still wakes us.
            signal = self._outbox.signal(self._name)
            now = time.time()
            due: list[OwedEvent] = []
            next_due = math.inf
            for owed, due_at in await self._read():
                if owed.seq in self._in_flight:
                    continue
                if due_at > now:
                    next_due = min(next_due, due_at)
                    if self._ordered:
                        break  # never overtake an event that waits for its retry
                    continue
                due.append(owed)
                if len(due) >= self._take_limit:
                    break
            wait_for_more = (
                wait
                and due
                and len(due) < self._group
                and self._max_wait > 0
                and (filling_until is None or trio.current_time() < filling_until)
            )
            if due and not wait_for_more:
                self._in_flight.update(o.seq for o in due)
                return due
            if not wait:
                return []
            if wait_for_more:
                # Let the batch fill for the rest of its window without re-reading the queue
                # at every commit (each read parses every pending row again). A stop ends
                # the wait at once.
                if filling_until is None:
                    filling_until = trio.current_time() + self._max_wait
                with trio.move_on_at(filling_until):
                    await self._stopping.wait()
                continue
            deadline = trio.current_time() + min(max(next_due - now, 0.0), IDLE_POLL)
            with trio.move_on_at(deadline):
                await signal.wait()
        return []

    def _done(self, deliveries: Sequence[OwedEvent]) -> list[int]:
        """After an outcome's commit: no longer in flight."""
        seqs = [d.seq for d in deliveries]
        self._in_flight.difference_update(seqs)
        if self._settled_during_read is not None:
            self._settled_during_read.update(seqs)
        return seqs

    def release(self, deliveries: Sequence[OwedEvent]) -> None:
        # Unsent, nothing committed: due again at once (in order, a read-ahead given back).
        self._in_flight.difference_update(d.seq for d in deliveries)

    async def ack(self, deliveries: Sequence[OwedEvent], attempts: Sequence[Attempt]) -> None:
        try:
            await self._outbox.ack(self._name, deliveries, attempts)
        finally:
            self._done(deliveries)

    async def retry_later(
        self, deliveries: Sequence[OwedEvent], next_attempt: float, attempt: Attempt
    ) -> None:
        try:
            await self._outbox.retry_later(self._name, deliveries, next_attempt, attempt)
        finally:
            self._done(deliveries)

    async def bury(self, deliveries: Sequence[OwedEvent], reason: str, attempt: Attempt) -> None:
        try:
            await self._outbox.bury(self._name, deliveries, reason, attempt)
        finally:
            self._done(deliveries)


def _disk_full(error: BaseException) -> bool:
    # SQLite reports a write that failed with ENOSPC (or EDQUOT) as SQLITE_FULL.
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_FULL


# Rows per multi-row statement. executemany steps SQLite once per row, and the sqlite3 module
# releases and re-takes the GIL around every step: with a busy event loop each re-take waits,
# and that made the writer thread the queue's bottleneck (62 µs per event, 18 µs uncontended).
# One statement per chunk takes the GIL back once per chunk. 200 rows x 4 columns stays far
# below SQLite's limit on bound variables.
CHUNK = 200


def _values(columns: int, rows: int) -> str:
    row = "(" + ", ".join("?" * columns) + ")"
    return ", ".join([row] * rows)


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _insert_rows(
    conn: sqlite3.Connection, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]
) -> None:
    for chunk in _chunks(rows):
        conn.execute(
            f"INSERT INTO {table}({', '.join(columns)}) VALUES {_values(len(columns), len(chunk))}",
            [value for row in chunk for value in row],
        )


def _insert(conn: sqlite3.Connection, rows: Sequence[_Row]) -> None:
    if not rows:
        return
    last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='events'").fetchone()
    first = (last[0] if last else 0) + 1
    numbered = list(enumerate(rows, start=first))
    committed = time.time()
    _insert_rows(
        conn,
        "events",
        ("seq", "event_id", "body", "created", "committed"),
        [
            (seq, event_id, body, created, committed)
            for seq, (event_id, body, created, _) in numbered
        ],
    )
    _insert_rows(
        conn,
        "deliveries",
        ("sink", "seq"),
        [(sink, seq) for seq, (*_, sinks) in numbered for sink in sinks],
    )


def _count(
    conn: sqlite3.Connection, sink: str, column: str, n: int, error: str | None = None
) -> None:
    conn.execute("INSERT OR IGNORE INTO sink_counters(sink) VALUES (?)", (sink,))
    if column == "delivered":
        conn.execute(
            "UPDATE sink_counters SET delivered=delivered+?, last_delivered_at=? WHERE sink=?",
            (n, time.time(), sink),
        )
    elif error is None:
        conn.execute(f"UPDATE sink_counters SET {column}={column}+? WHERE sink=?", (n, sink))
    else:
        conn.execute(
            f"UPDATE sink_counters SET {column}={column}+?, last_error=?, last_error_at=? "
            "WHERE sink=?",
            (n, error, time.time(), sink),
        )


class OutboxReader:
    """A read connection of its own (WAL lets it read while the writer commits).

    Owned by one task at a time; blocking calls go through ``trio.to_thread``.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = _connect(self._path)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def history_overdue(self, max_age: float, max_rows: int) -> bool:
        """Whether any history row is past ``max_age`` or the ``max_rows`` budget."""

        def overdue() -> bool:
            span = history.overdue(self._connection(), max_age, max_rows, 1, time.time())
            return span is not None

        return await trio.to_thread.run_sync(overdue)

    def _pending(self, sink: str, limit: int, after: int) -> list[tuple[OwedEvent, float]]:
        rows = (
            self._connection()
            .execute(
                "SELECT d.seq, d.attempts, d.next_attempt, e.body, e.created "
                "FROM deliveries d JOIN events e ON e.seq = d.seq "
                "WHERE d.sink=? AND d.state=? AND d.seq>? ORDER BY d.seq LIMIT ?",
                (sink, PENDING, after, limit),
            )
            .fetchall()
        )
        return [
            (OwedEvent(seq, Event.from_bytes(body), attempts, created), next_attempt)
            for seq, attempts, next_attempt, body, created in rows
        ]

    async def pending(self, sink: str, limit: int, after: int = 0) -> list[tuple[OwedEvent, float]]:
        """Up to ``limit`` pending deliveries in enqueue order, each with its due time."""
        return await trio.to_thread.run_sync(self._pending, sink, limit, after)

    def _dead(self, sink: str, limit: int, after: int) -> list[DeadLetter]:
        rows = (
            self._connection()
            .execute(
                "SELECT d.seq, d.attempts, d.last_error, e.body "
                "FROM deliveries d JOIN events e ON e.seq = d.seq "
                "WHERE d.sink=? AND d.state=? AND d.seq>? ORDER BY d.seq LIMIT ?",
                (sink, DEAD, after, limit),
            )
            .fetchall()
        )
        return [
            DeadLetter(seq, sink, Event.from_bytes(body), attempts, error or "")
            for seq, attempts, error, body in rows
        ]

    async def dead(self, sink: str, limit: int = 100, after: int = 0) -> list[DeadLetter]:
        """Dead letters of ``sink`` in enqueue order, after position ``after`` (a cursor)."""
        return await trio.to_thread.run_sync(self._dead, sink, limit, after)

    def _sinks(self) -> list[str]:
        rows = (
            self._connection()
            .execute("SELECT sink FROM sink_counters UNION SELECT DISTINCT sink FROM deliveries")
            .fetchall()
        )
        return sorted(r[0] for r in rows)

    async def sinks(self) -> list[str]:
        """Every sink the queue has state for (configured now or not)."""
        return await trio.to_thread.run_sync(self._sinks)

    def read_counts(self, sink: str) -> SinkCounts:
        """:meth:`counts`, blocking: for callers already on a worker thread."""
        conn = self._connection()
        states = dict(
            conn.execute(
                "SELECT state, COUNT(*) FROM deliveries WHERE sink=? GROUP BY state", (sink,)
            ).fetchall()
        )
        oldest = conn.execute(
            "SELECT MIN(e.created) FROM deliveries d JOIN events e ON e.seq=d.seq "
            "WHERE d.sink=? AND d.state=?",
            (sink, PENDING),
        ).fetchone()[0]
        counters = conn.execute(
            "SELECT delivered, failed_attempts, last_error, last_error_at, last_delivered_at "
            "FROM sink_counters WHERE sink=?",
            (sink,),
        ).fetchone() or (0, 0, None, None, None)
        return SinkCounts(
            pending=states.get(PENDING, 0),
            dead=states.get(DEAD, 0),
            delivered=counters[0],
            failed_attempts=counters[1],
            oldest_pending=oldest,
            last_error=counters[2],
            last_error_at=counters[3],
            last_delivered_at=counters[4],
        )

    async def counts(self, sink: str) -> SinkCounts:
        return await trio.to_thread.run_sync(self.read_counts, sink)

    def _snapshot(self, read: Callable[[sqlite3.Connection], _T]) -> _T:
        """``read`` on one snapshot of the file (a page's queries must agree)."""
        conn = self._connection()
        conn.execute("BEGIN")
        try:
            return read(conn)
        finally:
            conn.execute("COMMIT")

    async def history(self, query: HistoryQuery) -> HistoryPage:
        """A page of the delivery history, newest first."""
        return await trio.to_thread.run_sync(
            self._snapshot, lambda conn: history.read_page(conn, query)
        )

    async def trace(self, event_id: str) -> EventTrace | None:
        """One event's path; None when the outbox knows nothing of it."""
        return await trio.to_thread.run_sync(
            self._snapshot, lambda conn: history.read_trace(conn, event_id)
        )
