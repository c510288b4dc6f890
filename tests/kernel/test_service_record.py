"""The helper's record on its own (host tier: SQLite only, no device-mapper)."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from img_helper.record import ALLOCATED, DELETED, LIVE, QUARANTINED, Record, RecordError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the record is root-owned")


def test_ids_are_monotonic_and_committed_before_use(tmp_path: Path) -> None:
    rec = Record(tmp_path / "s", "p")
    assert [rec.allocate_thin_id("layer", f"c{i}", 100) for i in range(3)] == [1, 2, 3]
    rec.close()
    # Another connection (a restarted helper) sees the allocation at once: it was committed.
    db = sqlite3.connect(tmp_path / "s/record.sqlite3")
    assert db.execute("SELECT value FROM meta WHERE key='next_thin_id'").fetchone() == ("4",)
    assert [r[0] for r in db.execute("SELECT state FROM thin_ids ORDER BY thin_id")] == [ALLOCATED] * 3
    db.close()
    rec = Record(tmp_path / "s", "p")
    assert rec.allocate_thin_id("layer", "c9", 100) == 4
    with pytest.raises(RecordError):
        rec.allocate_thin_id("layer", "x", 4)  # id space exhausted: never wraps around
    rec.close()


def test_intents_finish_with_the_thin_state(tmp_path: Path) -> None:
    rec = Record(tmp_path / "s", "p")
    tid = rec.allocate_thin_id("layer", "c", 100)
    i = rec.begin_intent("create_thin", tid)
    assert [p.id for p in rec.pending_intents()] == [i]
    rec.finish_intent(i, LIVE)
    assert rec.pending_intents() == [] and rec.thin(tid).state == LIVE  # type: ignore[union-attr]
    d = rec.begin_intent("delete", tid)
    rec.finish_intent(d, QUARANTINED, error="EIO", reason="delete failed")
    t = rec.thin(tid)
    assert t is not None and t.state == QUARANTINED and t.reason == "delete failed"
    assert [x.thin_id for x in rec.thins(QUARANTINED)] == [tid] and rec.thins(DELETED) == []
    assert [x.state for x in rec.intents_for(tid)] == ["done", "failed"]
    rec.close()


def test_record_of_another_pool_is_refused(tmp_path: Path) -> None:
    Record(tmp_path / "s", "pool-a").close()
    with pytest.raises(RecordError) as exc:
        Record(tmp_path / "s", "pool-b")
    assert exc.value.code == "pool"


@needs_root
def test_record_is_private_even_if_loosened(tmp_path: Path) -> None:
    state = tmp_path / "s"
    Record(state, "p").close()
    os.chmod(state, 0o755)
    os.chmod(state / "record.sqlite3", 0o644)
    Record(state, "p").close()
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "record.sqlite3").st_mode) == 0o600


@needs_root
def test_state_dir_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    """A state dir a user could have prepared (owned by them) is never trusted by the root helper."""
    state = tmp_path / "s"
    state.mkdir()
    os.chown(state, 65534, 65534)
    with pytest.raises(RecordError) as exc:
        Record(state, "p")
    assert exc.value.code == "state_dir"


def test_record_path_symlink_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    (tmp_path / "target").write_text("")
    (state / "record.sqlite3").symlink_to(tmp_path / "target")
    with pytest.raises(OSError):
        Record(state, "p")
