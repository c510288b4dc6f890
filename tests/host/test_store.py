"""The SQLite store: migrations, WAL, rows read back from the file."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from img.store import MIGRATIONS, ImageLayer, Store, StoreError, peek_activation

H = "a" * 64


def test_fresh_store_is_wal_and_fully_migrated(tmp_path: Path) -> None:
    s = Store(tmp_path / "img.db")
    assert s.schema_version() == len(MIGRATIONS)
    raw = sqlite3.connect(tmp_path / "img.db")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"blobs", "blob_sources", "images", "image_layers", "layer_devices", "activations"} <= tables
    assert not any(t.startswith("fsm_") for t in tables)  # the FSM owns those


def test_reopen_does_not_remigrate(tmp_path: Path) -> None:
    Store(tmp_path / "img.db").add_blob(H, 10)
    s = Store(tmp_path / "img.db")
    assert [b.sha256 for b in s.blobs()] == [H]
    raw = sqlite3.connect(tmp_path / "img.db")
    assert raw.execute("SELECT count(*) FROM img_migrations").fetchone()[0] == 1


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "img.db")
    raw = sqlite3.connect(tmp_path / "img.db")
    raw.execute("INSERT INTO img_migrations VALUES (999, 0)")
    raw.commit()
    with pytest.raises(StoreError, match="upgrade img"):
        Store(tmp_path / "img.db")


def _open(path: str) -> None:
    Store(path).add_blob(H, 1)


def test_concurrent_first_open_migrates_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_open, args=(str(tmp_path / "img.db"),)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    raw = sqlite3.connect(tmp_path / "img.db")
    assert raw.execute("SELECT count(*) FROM img_migrations").fetchone()[0] == len(MIGRATIONS)


def test_blob_sources_map_s3_objects_to_blobs(tmp_path: Path) -> None:
    s = Store(tmp_path / "img.db")
    s.add_blob_source("b", "images/py/1.tar", '"etag1"', 100, H)
    assert s.blob_for_source("b", "images/py/1.tar", '"etag1"', 100) == H
    assert s.blob_for_source("b", "images/py/1.tar", '"etag2"', 100) is None  # object changed
    assert s.blob_for_source("b", "images/py/1.tar", '"etag1"', 101) is None
    s.forget_blob(H)  # cascades
    assert s.blob_for_source("b", "images/py/1.tar", '"etag1"', 100) is None


def test_images_layers_devices_activations_roundtrip(tmp_path: Path) -> None:
    s = Store(tmp_path / "img.db")
    ref = "s3://b/images/py/"
    s.upsert_image(ref, "family", "py")
    s.upsert_image(ref, "family", "py")  # idempotent
    s.update_image(ref, state="ready", chain_id="sha256:" + H, size=5, format="layers")
    s.add_blob(H, 5)
    s.set_image_layers(ref, [ImageLayer(ref, 0, H, 0, 5, "sha256:" + H, "sha256:" + H, "images/py/1.tar")])
    s.record_layer_device("sha256:" + H, None, "sha256:" + H, "/dev/mapper/img-l-1", 1, 1 << 20)
    s.record_activation("py", ref, "sha256:" + H, "/dev/mapper/img-a-py", 2)
    img = s.image(ref)
    assert img is not None and img.state == "ready" and img.size == 5
    assert s.image_layers(ref)[0].source_key == "images/py/1.tar"
    assert s.referenced_chain_ids() == {"sha256:" + H} and s.referenced_blobs() == {H}
    assert peek_activation(tmp_path / "img.db", "py") == s.activation("py")
    assert peek_activation(tmp_path / "img.db", "nope") is None
    assert peek_activation(tmp_path / "missing.db", "py") is None
    s.delete_image(ref)
    assert s.image_layers(ref) == []
    with pytest.raises(ValueError):
        s.update_image(ref, name="x")


def test_sql_injection_through_field_names_is_refused(tmp_path: Path) -> None:
    s = Store(tmp_path / "img.db")
    s.upsert_image("r", "family", "n")
    with pytest.raises(ValueError):
        s.update_image("r", **{"state = 'x', name": "y"})
