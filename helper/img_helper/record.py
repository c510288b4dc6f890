"""The helper's own root-owned record (SQLite in state_dir): which thin ids it allocated and their fate,
the intent log of pool changes, the layer chain and the activations.

Rules the record enforces for devices.py:
- thin ids are allocated monotonically and the allocation is committed BEFORE the pool sees the id,
  so an id is never handed out twice, even across crashes;
- an intent row is committed before every pool change (create_thin, create_snap, delete) and marked
  done or failed after it, so a restart knows which changes may have half happened;
- an id whose fate cannot be established is "quarantined": never reused, never deleted automatically.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORD_FILE = "record.sqlite3"
SCHEMA_VERSION = 1

# thin id states
ALLOCATED = "allocated"      # id taken; the pool may or may not have been asked yet (see intents)
LIVE = "live"                # exists in the pool, owned by a layer or an activation
DELETED = "deleted"          # known gone from the pool (or never created)
QUARANTINED = "quarantined"  # fate unknown: never reused, never touched again automatically
FOREIGN = "foreign"          # already existed in the pool when we first asked: not ours, never touched

# layer states
CREATING, APPLYING, COMPLETE = "creating", "applying", "complete"
# activation states
ACTIVATING, ACTIVE = "activating", "active"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS thin_ids (
    thin_id INTEGER PRIMARY KEY,
    owner_kind TEXT NOT NULL,           -- layer | activation
    owner_key TEXT NOT NULL,            -- chain id | activation name
    state TEXT NOT NULL,
    reason TEXT,
    allocated_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS intents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,                   -- create_thin | create_snap | delete
    thin_id INTEGER NOT NULL,
    origin_thin_id INTEGER,
    state TEXT NOT NULL,                -- pending | done | failed
    error TEXT,
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS layers (
    chain_id TEXT PRIMARY KEY,
    parent_chain_id TEXT,
    thin_id INTEGER NOT NULL,
    size_sectors INTEGER NOT NULL,
    device TEXT NOT NULL,
    uuid TEXT NOT NULL,
    state TEXT NOT NULL,                -- creating | applying | complete
    blob_sha256 TEXT NOT NULL,
    stats TEXT,
    created_at REAL NOT NULL,
    completed_at REAL
);
CREATE TABLE IF NOT EXISTS activations (
    name TEXT PRIMARY KEY,
    chain_id TEXT NOT NULL,
    thin_id INTEGER NOT NULL,
    size_sectors INTEGER NOT NULL,
    device TEXT NOT NULL,
    uuid TEXT NOT NULL,
    state TEXT NOT NULL,                -- activating | active
    created_at REAL NOT NULL
);
"""


class RecordError(Exception):
    """The record cannot be used: wrong owner or mode, another pool's record, bad schema."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class LayerRow:
    chain_id: str
    parent_chain_id: str | None
    thin_id: int
    size_sectors: int
    device: str
    uuid: str
    state: str
    blob_sha256: str
    stats: dict[str, Any] | None
    created_at: float
    completed_at: float | None


@dataclass(frozen=True)
class ActivationRow:
    name: str
    chain_id: str
    thin_id: int
    size_sectors: int
    device: str
    uuid: str
    state: str
    created_at: float


@dataclass(frozen=True)
class ThinRow:
    thin_id: int
    owner_kind: str
    owner_key: str
    state: str
    reason: str | None


@dataclass(frozen=True)
class Intent:
    id: int
    op: str
    thin_id: int
    origin_thin_id: int | None
    state: str
    error: str | None


def _secure_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise RecordError("state_dir", f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise RecordError("state_dir", f"{path} is owned by uid {st.st_uid}, not by us")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


class Record:
    """One record per pool. Thread-safe: one connection, one lock, explicit transactions."""

    def __init__(self, state_dir: Path, pool: str) -> None:
        self.state_dir = Path(state_dir)
        self.pool = pool
        _secure_dir(self.state_dir)
        self.path = self.state_dir / RECORD_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
                raise RecordError("record", f"{self.path} is not a regular file owned by us")
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        with self.tx() as db:
            rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not rows:
                db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                               [("schema", str(SCHEMA_VERSION)), ("pool", pool), ("next_thin_id", "1")])
            elif rows.get("pool") != pool:
                raise RecordError("pool", f"{self.path} belongs to pool {rows.get('pool')!r}, not {pool!r}")
            elif rows.get("schema") != str(SCHEMA_VERSION):
                raise RecordError("schema", f"unknown record schema {rows.get('schema')!r}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- thin ids ---------------------------------------------------------------------------------

    def allocate_thin_id(self, owner_kind: str, owner_key: str, max_id: int) -> int:
        """Takes the next id and commits it before anyone can send it to the pool."""
        now = time.time()
        with self.tx() as db:
            nxt = int(db.execute("SELECT value FROM meta WHERE key='next_thin_id'").fetchone()[0])
            if nxt > max_id:
                raise RecordError("thin_ids", "thin id space exhausted")
            db.execute("UPDATE meta SET value=? WHERE key='next_thin_id'", (str(nxt + 1),))
            db.execute("INSERT INTO thin_ids VALUES (?, ?, ?, ?, NULL, ?, ?)",
                       (nxt, owner_kind, owner_key, ALLOCATED, now, now))
        return nxt

    def set_thin_state(self, thin_id: int, state: str, reason: str | None = None) -> None:
        with self.tx() as db:
            db.execute("UPDATE thin_ids SET state=?, reason=?, updated_at=? WHERE thin_id=?",
                       (state, reason, time.time(), thin_id))

    def thin(self, thin_id: int) -> ThinRow | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM thin_ids WHERE thin_id=?", (thin_id,)).fetchone()
        return _thin_row(r) if r else None

    def thins(self, state: str | None = None) -> list[ThinRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM thin_ids WHERE ? IS NULL OR state=? ORDER BY thin_id",
                                    (state, state))
            return [_thin_row(r) for r in rows]

    def meta(self, key: str) -> str | None:
        with self._lock:
            r = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(r[0]) if r else None

    def set_meta(self, key: str, value: str) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=?",
                       (key, value, value))

    def forget_pool_contents(self, reason: str) -> None:
        """The pool was re-created empty: nothing the record describes exists any more. Ids stay taken
        (allocation never goes back), everything else is dropped."""
        now = time.time()
        with self.tx() as db:
            db.execute("UPDATE intents SET state='failed', error=?, finished_at=? WHERE state='pending'",
                       (reason, now))
            db.execute("UPDATE thin_ids SET state=?, reason=?, updated_at=? WHERE state IN (?, ?, ?)",
                       (DELETED, reason, now, ALLOCATED, LIVE, QUARANTINED))
            db.execute("DELETE FROM layers")
            db.execute("DELETE FROM activations")

    def next_thin_id(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE key='next_thin_id'").fetchone()[0])

    # --- intents ----------------------------------------------------------------------------------

    def begin_intent(self, op: str, thin_id: int, origin_thin_id: int | None = None) -> int:
        with self.tx() as db:
            cur = db.execute("INSERT INTO intents(op, thin_id, origin_thin_id, state, created_at) "
                             "VALUES (?, ?, ?, 'pending', ?)", (op, thin_id, origin_thin_id, time.time()))
            return int(cur.lastrowid or 0)

    def finish_intent(self, intent_id: int, thin_state: str, error: str | None = None,
                      reason: str | None = None) -> None:
        """Marks the intent done (or failed, when `error`) and records the thin id's new state, atomically."""
        now = time.time()
        with self.tx() as db:
            db.execute("UPDATE intents SET state=?, error=?, finished_at=? WHERE id=?",
                       ("failed" if error else "done", error, now, intent_id))
            db.execute("UPDATE thin_ids SET state=?, reason=?, updated_at=? WHERE thin_id="
                       "(SELECT thin_id FROM intents WHERE id=?)", (thin_state, reason, now, intent_id))

    def pending_intents(self) -> list[Intent]:
        with self._lock:
            return [Intent(r["id"], r["op"], r["thin_id"], r["origin_thin_id"], r["state"], r["error"])
                    for r in self._db.execute("SELECT * FROM intents WHERE state='pending' ORDER BY id")]

    def intents_for(self, thin_id: int) -> list[Intent]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM intents WHERE thin_id=? ORDER BY id", (thin_id,))
            return [Intent(r["id"], r["op"], r["thin_id"], r["origin_thin_id"], r["state"], r["error"])
                    for r in rows]

    # --- layers -----------------------------------------------------------------------------------

    def layer(self, chain_id: str) -> LayerRow | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM layers WHERE chain_id=?", (chain_id,)).fetchone()
        return _layer_row(r) if r else None

    def layers(self) -> list[LayerRow]:
        with self._lock:
            return [_layer_row(r) for r in self._db.execute("SELECT * FROM layers ORDER BY created_at")]

    def layer_children(self, chain_id: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT chain_id FROM layers WHERE parent_chain_id=? ORDER BY chain_id", (chain_id,))]

    def layer_by_thin(self, thin_id: int) -> LayerRow | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM layers WHERE thin_id=?", (thin_id,)).fetchone()
        return _layer_row(r) if r else None

    def insert_layer(self, row: LayerRow) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO layers VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (row.chain_id, row.parent_chain_id, row.thin_id, row.size_sectors, row.device,
                        row.uuid, row.state, row.blob_sha256,
                        json.dumps(row.stats) if row.stats is not None else None,
                        row.created_at, row.completed_at))

    def set_layer_state(self, chain_id: str, state: str, stats: dict[str, Any] | None = None) -> None:
        with self.tx() as db:
            if state == COMPLETE:
                db.execute("UPDATE layers SET state=?, stats=?, completed_at=? WHERE chain_id=?",
                           (state, json.dumps(stats) if stats is not None else None, time.time(), chain_id))
            else:
                db.execute("UPDATE layers SET state=? WHERE chain_id=?", (state, chain_id))

    def delete_layer_row(self, chain_id: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM layers WHERE chain_id=?", (chain_id,))

    # --- activations ------------------------------------------------------------------------------

    def activation(self, name: str) -> ActivationRow | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM activations WHERE name=?", (name,)).fetchone()
        return ActivationRow(**dict(r)) if r else None

    def activations(self, chain_id: str | None = None) -> list[ActivationRow]:
        with self._lock:
            if chain_id is None:
                rows = self._db.execute("SELECT * FROM activations ORDER BY name")
            else:
                rows = self._db.execute("SELECT * FROM activations WHERE chain_id=? ORDER BY name",
                                        (chain_id,))
            return [ActivationRow(**dict(r)) for r in rows]

    def insert_activation(self, row: ActivationRow) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO activations VALUES (?,?,?,?,?,?,?,?)",
                       (row.name, row.chain_id, row.thin_id, row.size_sectors, row.device, row.uuid,
                        row.state, row.created_at))

    def set_activation_state(self, name: str, state: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE activations SET state=? WHERE name=?", (state, name))

    def delete_activation_row(self, name: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM activations WHERE name=?", (name,))


def _thin_row(r: sqlite3.Row) -> ThinRow:
    return ThinRow(r["thin_id"], r["owner_kind"], r["owner_key"], r["state"], r["reason"])


def _layer_row(r: sqlite3.Row) -> LayerRow:
    d = dict(r)
    d["stats"] = json.loads(d["stats"]) if d["stats"] else None
    return LayerRow(**d)
