"""img's SQLite store: images, blobs, layer devices, activations.

One database file (``$IMG_HOME/img.db``) in WAL mode, shared with the FSM engine, whose tables are
prefixed ``fsm_``; img's own schema version lives in ``img_migrations`` so neither side touches the
other's ``PRAGMA user_version``. Migrations are append-only and applied under ``BEGIN IMMEDIATE``, so
two processes opening a fresh database concurrently migrate it once.

The store records what img *believes*; the workflows check real state (blob digests on disk, the
helper's device list) before trusting a row. Connections are per thread (sqlite3 objects must not be
shared across threads); every write is its own short transaction.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BUSY_TIMEOUT_MS = 30_000

# Append-only. Never edit a migration that has shipped: add the next one.
MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE blobs (
        sha256      TEXT PRIMARY KEY CHECK (length(sha256) = 64),
        size        INTEGER NOT NULL CHECK (size >= 0),
        created_at  REAL NOT NULL
    );
    -- which S3 object produced which blob: same (bucket, key, ETag, size) again -> no second download
    CREATE TABLE blob_sources (
        bucket      TEXT NOT NULL,
        key         TEXT NOT NULL,
        etag        TEXT NOT NULL,
        size        INTEGER NOT NULL,
        sha256      TEXT NOT NULL REFERENCES blobs(sha256) ON DELETE CASCADE,
        seen_at     REAL NOT NULL,
        PRIMARY KEY (bucket, key, etag, size)
    );
    CREATE INDEX blob_sources_sha256 ON blob_sources(sha256);
    CREATE INDEX blob_sources_etag ON blob_sources(bucket, etag, size);
    CREATE TABLE images (
        ref         TEXT PRIMARY KEY,              -- canonical s3:// reference
        kind        TEXT NOT NULL CHECK (kind IN ('family', 'archive')),
        name        TEXT NOT NULL,                 -- family name / archive base name
        format      TEXT,                          -- layers | docker-archive | oci-archive | ...
        state       TEXT NOT NULL,                 -- pending | downloading | unpacking | ready | failed
        chain_id    TEXT,                          -- top layer's chain id once known
        size        INTEGER NOT NULL DEFAULT 0,    -- bytes downloaded for it
        error       TEXT,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );
    CREATE TABLE image_layers (
        ref         TEXT NOT NULL REFERENCES images(ref) ON DELETE CASCADE,
        position    INTEGER NOT NULL,
        blob_sha256 TEXT NOT NULL,                 -- the downloaded object holding this layer
        offset      INTEGER NOT NULL DEFAULT 0,
        length      INTEGER NOT NULL,
        digest      TEXT NOT NULL,                 -- sha256:<hex> of the layer bytes
        chain_id    TEXT NOT NULL,
        source_key  TEXT,                          -- S3 key it came from
        PRIMARY KEY (ref, position)
    );
    CREATE TABLE layer_devices (
        chain_id        TEXT PRIMARY KEY,
        parent_chain_id TEXT,
        digest          TEXT NOT NULL,
        device          TEXT NOT NULL,
        thin_id         INTEGER,
        size            INTEGER,
        created_at      REAL NOT NULL
    );
    CREATE TABLE activations (
        name        TEXT PRIMARY KEY,
        ref         TEXT NOT NULL,
        chain_id    TEXT NOT NULL,
        device      TEXT NOT NULL,
        thin_id     INTEGER,
        created_at  REAL NOT NULL
    );
    CREATE INDEX activations_ref ON activations(ref);
    """,
]


class StoreError(Exception):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"store {path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Blob:
    sha256: str
    size: int
    created_at: float


@dataclass(frozen=True)
class Image:
    ref: str
    kind: str
    name: str
    format: str | None
    state: str
    chain_id: str | None
    size: int
    error: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class ImageLayer:
    ref: str
    position: int
    blob_sha256: str
    offset: int
    length: int
    digest: str
    chain_id: str
    source_key: str | None = None


@dataclass(frozen=True)
class LayerDevice:
    chain_id: str
    parent_chain_id: str | None
    digest: str
    device: str
    thin_id: int | None
    size: int | None
    created_at: float


@dataclass(frozen=True)
class Activation:
    name: str
    ref: str
    chain_id: str
    device: str
    thin_id: int | None
    created_at: float


class Store:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._local = threading.local()
        self.migrate()

    # -- connections -------------------------------------------------------------------------------

    def conn(self) -> sqlite3.Connection:
        c: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if c is None:
            try:
                c = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            except sqlite3.Error as e:
                raise StoreError(self.path, f"cannot open: {e}") from e
            c.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if c.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                c.execute("PRAGMA journal_mode = WAL")
            c.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints; WAL keeps it consistent
            c.execute("PRAGMA foreign_keys = ON")
            self._local.conn = c
        return c

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (IMMEDIATE): no upgrade deadlocks between processes."""
        c = self.conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def schema_version(self) -> int:
        c = self.conn()
        q = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='img_migrations'"
        if not c.execute(q).fetchone():
            return 0
        return int(c.execute("SELECT coalesce(max(version), 0) FROM img_migrations").fetchone()[0])

    def migrate(self) -> None:
        if self.schema_version() == len(MIGRATIONS):
            return  # the common case: one query
        if self.schema_version() > len(MIGRATIONS):
            raise StoreError(self.path, f"schema version {self.schema_version()} is newer than this img "
                             f"({len(MIGRATIONS)}): upgrade img")
        with self.tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS img_migrations "
                      "(version INTEGER PRIMARY KEY, applied_at REAL)")
            done = int(c.execute("SELECT coalesce(max(version), 0) FROM img_migrations").fetchone()[0])
            for version in range(done + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[version - 1].split(";"):
                    if statement.strip():
                        c.execute(statement)
                c.execute("INSERT INTO img_migrations VALUES (?, ?)", (version, time.time()))

    # -- blobs ---------------------------------------------------------------------------------------

    def add_blob(self, sha256: str, size: int) -> None:
        with self.tx() as c:
            c.execute("INSERT INTO blobs VALUES (?, ?, ?) ON CONFLICT(sha256) DO NOTHING",
                      (sha256, size, time.time()))

    def add_blob_source(self, bucket: str, key: str, etag: str, size: int, sha256: str) -> None:
        with self.tx() as c:
            c.execute("INSERT INTO blobs VALUES (?, ?, ?) ON CONFLICT(sha256) DO NOTHING",
                      (sha256, size, time.time()))
            c.execute("INSERT INTO blob_sources VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE "
                      "SET sha256 = excluded.sha256, seen_at = excluded.seen_at",
                      (bucket, key, etag, size, sha256, time.time()))

    def blob_for_source(self, bucket: str, key: str, etag: str, size: int) -> str | None:
        q = "SELECT sha256 FROM blob_sources WHERE bucket=? AND key=? AND etag=? AND size=?"
        row = self.conn().execute(q, (bucket, key, etag, size)).fetchone()
        return row[0] if row else None

    def blob_for_etag(self, bucket: str, etag: str, size: int) -> str | None:
        """Another key of the same bucket with the same ETag and size: the same bytes (S3 derives ETags from
        the content; forging a match needs a second MD5 preimage). Always re-verified by sha256 on use."""
        if not etag:
            return None
        q = "SELECT sha256 FROM blob_sources WHERE bucket=? AND etag=? AND size=? ORDER BY seen_at LIMIT 1"
        row = self.conn().execute(q, (bucket, etag, size)).fetchone()
        return row[0] if row else None

    def blob(self, sha256: str) -> Blob | None:
        row = self.conn().execute("SELECT * FROM blobs WHERE sha256=?", (sha256,)).fetchone()
        return Blob(*row) if row else None

    def blobs(self) -> list[Blob]:
        return [Blob(*r) for r in self.conn().execute("SELECT * FROM blobs ORDER BY created_at")]

    def forget_blob(self, sha256: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM blobs WHERE sha256=?", (sha256,))

    def referenced_blobs(self) -> set[str]:
        return {r[0] for r in self.conn().execute("SELECT DISTINCT blob_sha256 FROM image_layers")}

    # -- images --------------------------------------------------------------------------------------

    def upsert_image(self, ref: str, kind: str, name: str, state: str = "pending") -> Image:
        now = time.time()
        with self.tx() as c:
            c.execute("INSERT INTO images (ref, kind, name, state, created_at, updated_at) "
                      "VALUES (?,?,?,?,?,?) ON CONFLICT(ref) DO NOTHING", (ref, kind, name, state, now, now))
        image = self.image(ref)
        assert image is not None
        return image

    def update_image(self, ref: str, **fields: object) -> None:
        allowed = {"format", "state", "chain_id", "size", "error"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"update_image: fields must be among {sorted(allowed)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.tx() as c:
            c.execute(f"UPDATE images SET {sets}, updated_at = ? WHERE ref = ?",  # noqa: S608 (names checked)
                      (*fields.values(), time.time(), ref))

    def set_image_layers(self, ref: str, layers: list[ImageLayer]) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM image_layers WHERE ref=?", (ref,))
            c.executemany("INSERT INTO image_layers VALUES (?,?,?,?,?,?,?,?)",
                          [(ref, la.position, la.blob_sha256, la.offset, la.length, la.digest, la.chain_id,
                            la.source_key) for la in layers])

    def image(self, ref: str) -> Image | None:
        row = self.conn().execute("SELECT * FROM images WHERE ref=?", (ref,)).fetchone()
        return Image(*row) if row else None

    def images(self) -> list[Image]:
        return [Image(*r) for r in self.conn().execute("SELECT * FROM images ORDER BY name, ref")]

    def image_layers(self, ref: str) -> list[ImageLayer]:
        return [ImageLayer(*r) for r in
                self.conn().execute("SELECT * FROM image_layers WHERE ref=? ORDER BY position", (ref,))]

    def delete_image(self, ref: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM images WHERE ref=?", (ref,))

    # -- layer devices -------------------------------------------------------------------------------

    def record_layer_device(self, chain_id: str, parent_chain_id: str | None, digest: str, device: str,
                            thin_id: int | None, size: int | None) -> None:
        with self.tx() as c:
            c.execute("INSERT INTO layer_devices VALUES (?,?,?,?,?,?,?) ON CONFLICT(chain_id) DO UPDATE SET "
                      "device=excluded.device, thin_id=excluded.thin_id, size=excluded.size",
                      (chain_id, parent_chain_id, digest, device, thin_id, size, time.time()))

    def layer_device(self, chain_id: str) -> LayerDevice | None:
        row = self.conn().execute("SELECT * FROM layer_devices WHERE chain_id=?", (chain_id,)).fetchone()
        return LayerDevice(*row) if row else None

    def layer_devices(self) -> list[LayerDevice]:
        rows = self.conn().execute("SELECT * FROM layer_devices ORDER BY created_at")
        return [LayerDevice(*r) for r in rows]

    def forget_layer_device(self, chain_id: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM layer_devices WHERE chain_id=?", (chain_id,))

    def referenced_chain_ids(self) -> set[str]:
        """Chain ids some recorded image needs (every layer of every image, not just the top)."""
        return {r[0] for r in self.conn().execute("SELECT DISTINCT chain_id FROM image_layers")}

    # -- activations ---------------------------------------------------------------------------------

    def record_activation(self, name: str, ref: str, chain_id: str, device: str, thin_id: int | None) -> None:
        with self.tx() as c:
            c.execute("INSERT INTO activations VALUES (?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                      "ref=excluded.ref, chain_id=excluded.chain_id, device=excluded.device, "
                      "thin_id=excluded.thin_id", (name, ref, chain_id, device, thin_id, time.time()))

    def activation(self, name: str) -> Activation | None:
        row = self.conn().execute("SELECT * FROM activations WHERE name=?", (name,)).fetchone()
        return Activation(*row) if row else None

    def activations(self, ref: str | None = None) -> list[Activation]:
        if ref is None:
            rows = self.conn().execute("SELECT * FROM activations ORDER BY name")
        else:
            rows = self.conn().execute("SELECT * FROM activations WHERE ref=? ORDER BY name", (ref,))
        return [Activation(*r) for r in rows]

    def forget_activation(self, name: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM activations WHERE name=?", (name,))


def open_store(path: Path | str) -> Store:
    return Store(path)


def peek_activation(db_path: Path | str, name: str) -> Activation | None:
    """The fast path's read: the activation of a finished pull, or None (also if there is no store yet).
    No migration, no write, no WAL switch."""
    try:
        c = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error:
        return None
    try:
        # only a finished pull counts (the image's run sets state ready last)
        row = c.execute("SELECT a.* FROM activations a JOIN images i ON i.ref = a.ref WHERE a.name=? "
                        "AND i.state = 'ready' AND i.chain_id = a.chain_id", (name,)).fetchone()
    except sqlite3.Error:
        return None
    finally:
        c.close()
    return Activation(*row) if row else None
