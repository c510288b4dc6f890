"""`img bench extract` on a tiny synthetic family: every engine runs on tmpfs and ext4-on-loop, the JSON
report has a median, MB/s, files/s and a ratio to ours per engine, and no mount or loop device is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.host import formats_build as fb

IMG = str(Path(sys.executable).parent / "img")
ENGINES = {"ours", "bsdtar", "gnu-tar", "tarfile", "libarchive-c", "cp-a-floor"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the bench mounts filesystems: needs root")


def _loops() -> str:
    return subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout


def test_bench_extract_json_report_on_tmpfs_and_ext4(tmp_path: Path) -> None:
    l1 = fb.write(tmp_path / "1.tar", fb.layer(1))
    l2 = fb.write(tmp_path / "2.tar", fb.gz(fb.layer(2)))
    r = subprocess.run(
        [IMG, "bench", "extract", "--json", "-n", "1", str(l1), str(l2)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["input_bytes"] == l1.stat().st_size + l2.stat().st_size
    assert rep["entries"] == 6 and rep["layers"] == 2
    assert set(rep["targets"]) == {"tmpfs", "ext4"}
    for rows in rep["targets"].values():
        assert set(rows) == ENGINES
        for name, row in rows.items():
            assert row["error"] is None, (name, row["error"])
            assert row["seconds"] > 0 and row["mb_per_s"] > 0 and row["files_per_s"] > 0
        assert rows["ours"]["ratio_to_ours"] == 1.0
    mounts = Path("/proc/self/mounts").read_text()
    assert "/img-bench-" not in mounts
    assert "/img-bench-" not in _loops()


def test_bench_extract_table_and_engine_choice(tmp_path: Path) -> None:
    l1 = fb.write(tmp_path / "1.tar", fb.layer(1))
    r = subprocess.run(
        [IMG, "bench", "extract", "--target", "tmpfs", "-n", "1", "--engine", "bsdtar", str(l1)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "tmpfs:" in r.stdout and "ours" in r.stdout and "bsdtar" in r.stdout and "gnu-tar" not in r.stdout


def test_bench_extract_unknown_engine_is_usage_error(tmp_path: Path) -> None:
    l1 = fb.write(tmp_path / "1.tar", fb.layer(1))
    r = subprocess.run(
        [IMG, "bench", "extract", "--engine", "nope", str(l1)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "unknown engine" in r.stderr


def test_bench_extract_refuses_an_archive(tmp_path: Path) -> None:
    a = fb.write(tmp_path / "img.tar", fb.docker_archive([fb.layer(1)]))
    r = subprocess.run([IMG, "bench", "extract", str(a)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "docker-archive" in r.stderr and "layer files" in r.stderr
