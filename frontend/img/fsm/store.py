"""SQLite persistence of the FSM engine: schema + migrations for the `fsm_*` tables only, so the engine can
share one database file with img's own store (which keeps its own tables and migration counter).

Tables
    fsm_schema_version  one row: the applied migration number of the fsm_* tables
    fsm_runs            every run (active and archived): identity, options, status, current_state,
                        stop error, result
    fsm_active          the active runs: one row per unfinished run, UNIQUE(type_name, run_id, action) (this
                        makes AlreadyRunning atomic across processes), plus the lease: owner + lease_expires
    fsm_events          append-only history per run: START, COMPLETE, ERROR, CANCEL, FINISH (and SPAN)
    fsm_children        parent run version -> child run version
    fsm_owners          live engine processes: owner id -> host, pid, pid start time, heartbeat
    fsm_queues          named queue -> max executing runs (shared by all processes)

Archived runs are the `fsm_runs` rows without an `fsm_active` row; `day` (UTC date of creation) indexes
per-day history. Connections: one per thread (never shared), WAL, busy_timeout, autocommit with explicit short
`BEGIN IMMEDIATE` transactions for every write.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ConnectionFactory = Callable[[], sqlite3.Connection]

BUSY_TIMEOUT_MS = 10_000
FINAL_STATUSES = ("succeeded", "failed", "cancelled")

MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE fsm_runs (
            version TEXT PRIMARY KEY,
            run_id TEXT NOT NULL,
            type_name TEXT NOT NULL,
            action TEXT NOT NULL,
            parent TEXT,
            queue TEXT,
            status TEXT NOT NULL,               -- pending | running | succeeded | failed | cancelled
            current_state TEXT,
            msg TEXT NOT NULL,                  -- encoded request message
            options TEXT NOT NULL,              -- JSON: max_attempts, backoff, run_at, ...
            retry_count INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,                    -- last ERROR message (dedup)
            stop_error TEXT,                    -- why the run stopped
            stop_kind TEXT,
            stop_state TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            result TEXT,                        -- encoded response of the last step
            run_at REAL,
            run_after TEXT,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            day TEXT NOT NULL
        )""",
        "CREATE INDEX fsm_runs_by_id ON fsm_runs(run_id, action, version)",
        "CREATE INDEX fsm_runs_by_day ON fsm_runs(day, version)",
        "CREATE INDEX fsm_runs_by_parent ON fsm_runs(parent)",
        """CREATE TABLE fsm_active (
            version TEXT PRIMARY KEY REFERENCES fsm_runs(version),
            type_name TEXT NOT NULL,
            run_id TEXT NOT NULL,
            action TEXT NOT NULL,
            queue TEXT,
            executing INTEGER NOT NULL DEFAULT 0,
            owner TEXT,
            lease_expires REAL NOT NULL DEFAULT 0,
            UNIQUE (type_name, run_id, action)
        )""",
        "CREATE INDEX fsm_active_by_queue ON fsm_active(queue, executing)",
        "CREATE INDEX fsm_active_by_owner ON fsm_active(owner)",
        """CREATE TABLE fsm_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            version TEXT NOT NULL,
            kind TEXT NOT NULL,                 -- START | COMPLETE | ERROR | CANCEL | FINISH | SPAN
            state TEXT,
            payload TEXT,
            error TEXT,
            error_kind TEXT,
            retry_count INTEGER NOT NULL DEFAULT 0,
            duration REAL,
            ts REAL NOT NULL,
            owner TEXT
        )""",
        "CREATE INDEX fsm_events_by_version ON fsm_events(version, seq)",
        """CREATE TABLE fsm_children (
            parent TEXT NOT NULL,
            child TEXT NOT NULL,
            PRIMARY KEY (parent, child)
        )""",
        """CREATE TABLE fsm_owners (
            owner TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            pid_start TEXT,
            heartbeat REAL NOT NULL
        )""",
        """CREATE TABLE fsm_queues (
            name TEXT PRIMARY KEY,
            max_running INTEGER NOT NULL
        )""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class RunRecord:
    version: str
    run_id: str
    type_name: str
    action: str
    parent: str | None
    queue: str | None
    status: str
    current_state: str | None
    retry_count: int
    error: str | None
    error_kind: str | None
    error_state: str | None
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    run_at: float | None
    run_after: str | None
    day: str
    options: dict[str, Any]
    msg: Any  # the request message as JSON (dicts/lists)
    result: Any  # the final response as JSON
    active: bool
    owner: str | None
    lease_expires: float | None
    executing: bool

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES


@dataclass(frozen=True)
class Event:
    seq: int
    version: str
    kind: str
    state: str | None
    payload: Any
    error: str | None
    error_kind: str | None
    retry_count: int
    duration: float | None
    ts: float
    owner: str | None


_RUN_COLUMNS = (
    "r.version, r.run_id, r.type_name, r.action, r.parent, r.queue, r.status, r.current_state, r.retry_count,"
    " r.stop_error, r.stop_kind, r.stop_state, r.cancel_requested, r.created_at, r.started_at, r.finished_at,"
    " r.run_at, r.run_after, r.day, r.options, r.msg, r.result,"
    " a.version IS NOT NULL, a.owner, a.lease_expires, a.executing"
)


def _run(row: tuple[Any, ...]) -> RunRecord:
    (
        version,
        run_id,
        type_name,
        action,
        parent,
        queue,
        status,
        current_state,
        retry_count,
        stop_error,
        stop_kind,
        stop_state,
        cancel_requested,
        created_at,
        started_at,
        finished_at,
        run_at,
        run_after,
        day,
        options,
        msg,
        result,
        active,
        owner,
        lease_expires,
        executing,
    ) = row
    return RunRecord(
        version=version,
        run_id=run_id,
        type_name=type_name,
        action=action,
        parent=parent,
        queue=queue,
        status=status,
        current_state=current_state,
        retry_count=retry_count,
        error=stop_error,
        error_kind=stop_kind,
        error_state=stop_state,
        cancel_requested=bool(cancel_requested),
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        run_at=run_at,
        run_after=run_after,
        day=day,
        options=json.loads(options),
        msg=json.loads(msg),
        result=json.loads(result) if result else None,
        active=bool(active),
        owner=owner,
        lease_expires=lease_expires,
        executing=bool(executing),
    )


def _event(row: tuple[Any, ...]) -> Event:
    seq, version, kind, state, payload, error, error_kind, retry_count, duration, ts, owner = row
    return Event(
        seq=seq,
        version=version,
        kind=kind,
        state=state,
        payload=json.loads(payload) if payload else None,
        error=error,
        error_kind=error_kind,
        retry_count=retry_count,
        duration=duration,
        ts=ts,
        owner=owner,
    )


class FsmStore:
    """The FSM tables in one SQLite file. `db` is a path, or a factory returning a new connection to the
    shared database (called once per thread; the engine switches the connection to autocommit mode and
    issues its own BEGIN IMMEDIATE / COMMIT). Creating the store applies pending migrations.
    Read-only admin queries (get_run, list_active, history, runs, children) need no Manager."""

    def __init__(self, db: str | Path | ConnectionFactory, *, migrate: bool = True) -> None:
        if callable(db):
            self._factory: ConnectionFactory = db
            self.path: str | None = None
        else:
            self.path = str(db)
            path = self.path
            self._factory = lambda: sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=True
            )
        self._local = threading.local()
        if migrate:
            self.migrate()

    # --- connections and transactions -----------------------------------------------------------------------

    def conn(self) -> sqlite3.Connection:
        c: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if c is None:
            c = self._factory()
            c.isolation_level = None  # autocommit; we issue BEGIN IMMEDIATE ourselves
            c.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            mode = c.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: survives process crashes (kill -9)
            self._local.conn = c
        return c

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction, serialized across processes from its start (BEGIN IMMEDIATE)."""
        c = self.conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:  # never leave this thread's connection inside a transaction
                c.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Closes this thread's connection (other threads' connections close when their threads end)."""
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    # --- migrations -----------------------------------------------------------------------------------------

    def migrate(self) -> int:
        with self.tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS fsm_schema_version (version INTEGER NOT NULL)")
            row = c.execute("SELECT version FROM fsm_schema_version").fetchone()
            current = row[0] if row else 0
            if row is None:
                c.execute("INSERT INTO fsm_schema_version (version) VALUES (0)")
            if current > SCHEMA_VERSION:
                raise RuntimeError(f"fsm schema version {current} is newer than this code ({SCHEMA_VERSION})")
            for n in range(current, SCHEMA_VERSION):
                for stmt in MIGRATIONS[n]:
                    c.execute(stmt)
            c.execute("UPDATE fsm_schema_version SET version = ?", (SCHEMA_VERSION,))
        return SCHEMA_VERSION

    def schema_version(self) -> int:
        row = self.conn().execute("SELECT version FROM fsm_schema_version").fetchone()
        return int(row[0]) if row else 0

    # --- admin reads ----------------------------------------------------------------------------------------

    def get_run(self, version: str) -> RunRecord | None:
        row = (
            self.conn()
            .execute(
                f"SELECT {_RUN_COLUMNS} FROM fsm_runs r LEFT JOIN fsm_active a ON a.version = r.version"  # noqa: S608
                " WHERE r.version = ?",
                (version,),
            )
            .fetchone()
        )
        return _run(row) if row else None

    def list_active(self, action: str | None = None) -> list[RunRecord]:
        q = (
            f"SELECT {_RUN_COLUMNS} FROM fsm_active a JOIN fsm_runs r ON a.version = r.version"  # noqa: S608
            + (" WHERE a.action = ?" if action else "")
            + " ORDER BY r.version"
        )
        return [_run(row) for row in self.conn().execute(q, (action,) if action else ())]

    def runs(
        self,
        *,
        day: str | None = None,
        run_id: str | None = None,
        action: str | None = None,
        status: str | None = None,
        limit: int = 100,
    ) -> list[RunRecord]:
        """Runs newest first, filtered; `day` is a UTC date 'YYYY-MM-DD' (per-day history)."""
        where, args = [], []
        for col, val in (("r.day", day), ("r.run_id", run_id), ("r.action", action), ("r.status", status)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        q = (
            f"SELECT {_RUN_COLUMNS} FROM fsm_runs r LEFT JOIN fsm_active a ON a.version = r.version"  # noqa: S608
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY r.version DESC LIMIT ?"
        )
        return [_run(row) for row in self.conn().execute(q, (*args, limit))]

    def history(self, version: str) -> list[Event]:
        return [
            _event(row)
            for row in self.conn().execute(
                "SELECT seq, version, kind, state, payload, error, error_kind, retry_count, duration, ts,"
                " owner"
                " FROM fsm_events WHERE version = ? ORDER BY seq",
                (version,),
            )
        ]

    def children(self, parent: str) -> list[str]:
        return [
            r[0]
            for r in self.conn().execute(
                "SELECT child FROM fsm_children WHERE parent = ? ORDER BY child", (parent,)
            )
        ]

    def days(self, limit: int = 30) -> list[tuple[str, dict[str, int]]]:
        """Per-day history: [(UTC day, {status: count})], newest day first."""
        out: dict[str, dict[str, int]] = {}
        for day, status, n in self.conn().execute(
            "SELECT day, status, count(*) FROM fsm_runs WHERE day IN"
            " (SELECT DISTINCT day FROM fsm_runs ORDER BY day DESC LIMIT ?) GROUP BY day, status",
            (limit,),
        ):
            out.setdefault(day, {})[status] = n
        return sorted(out.items(), reverse=True)

    def purge(self, finished_before: float) -> int:
        """Delete archived (finished) runs that finished before the given time, with their events and child
        links. Active runs are never touched. Returns the number of runs deleted."""
        with self.tx() as c:
            versions = [
                r[0]
                for r in c.execute(
                    "SELECT version FROM fsm_runs WHERE finished_at < ?"
                    " AND version NOT IN (SELECT version FROM fsm_active)",
                    (finished_before,),
                )
            ]
            for v in versions:
                c.execute("DELETE FROM fsm_events WHERE version = ?", (v,))
                c.execute("DELETE FROM fsm_children WHERE parent = ? OR child = ?", (v, v))
                c.execute("DELETE FROM fsm_runs WHERE version = ?", (v,))
        return len(versions)

    def latest_version(
        self, run_id: str, action: str | None = None, type_name: str | None = None
    ) -> str | None:
        """The active run for this id if any, else the newest archived one."""
        c = self.conn()
        where = (
            "run_id = ?" + (" AND action = ?" if action else "") + (" AND type_name = ?" if type_name else "")
        )
        args = tuple(a for a in (run_id, action, type_name) if a)
        row = c.execute(
            f"SELECT version FROM fsm_active WHERE {where} ORDER BY version DESC LIMIT 1",  # noqa: S608
            args,
        ).fetchone()
        if row is None:
            row = c.execute(
                f"SELECT version FROM fsm_runs WHERE {where} ORDER BY version DESC LIMIT 1",  # noqa: S608
                args,
            ).fetchone()
        return row[0] if row else None


def utc_day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))
