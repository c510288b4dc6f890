"""A full pool: refused up front when the blob alone does not fit; when an extraction runs out of space
mid-way (a small gzip blob that expands), the step fails with a typed error, the half-built layer is
discarded, its blocks come back and the pool keeps working."""

from __future__ import annotations

import gzip
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from img_helper import dm
from img_helper.cmd_pool import _loop_of
from img_helper.devices import DeviceError
from img_helper.service import Service
from tests.kernel.test_devices_support import make_tar, write_blob

pytestmark = pytest.mark.kernel


@pytest.fixture
def small_pool(tmp_path: Path) -> Iterator[str]:
    """A 48 MiB pool that errors (instead of queueing I/O for 60 s) when full."""
    name = f"imgtest-full-{uuid.uuid4().hex[:6]}"
    data, meta = tmp_path / "data", tmp_path / "meta"
    exe = Path(sys.executable).parent / "img-helper"
    subprocess.run([str(exe), "pool", "create", "--name", name, "--data", str(data), "--metadata", str(meta),
                    "--data-size", "48M", "--metadata-size", "4M", "--block-sectors", "128"], check=True)
    yield name
    pool = dm.info(name)
    assert pool is not None
    for n in dm.list_names():
        if n != name and pool.devno in dm.deps(n):
            dm.remove(n)
    dm.remove(name)
    for f in (data, meta):
        loop = _loop_of(f)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=True)


def test_blob_larger_than_free_space_is_refused_up_front(small_pool: str, tmp_path: Path) -> None:
    svc = Service(small_pool, tmp_path / "state", virtual_size=256 << 20)
    try:
        blob = write_blob(tmp_path, make_tar([("file", "big", b"x" * (60 << 20))]))
        with open(blob.path, "rb") as f, pytest.raises(DeviceError) as exc:
            svc.ensure_layer(blob.digest, None, f.fileno(), 0, blob.size, blob.sha256, None)
        assert exc.value.code == "no_space" and exc.value.details["need_bytes"] == blob.size
        assert svc.record.thins() == []  # nothing was allocated
    finally:
        svc.close()


def test_running_out_mid_extraction_discards_and_recovers(small_pool: str, tmp_path: Path) -> None:
    svc = Service(small_pool, tmp_path / "state", virtual_size=256 << 20)
    try:
        bomb = write_blob(tmp_path, gzip.compress(make_tar([("file", "zeros", bytes(80 << 20))])))
        assert bomb.size < 1 << 20
        with open(bomb.path, "rb") as f, pytest.raises(DeviceError) as exc:
            svc.ensure_layer(bomb.digest, None, f.fileno(), 0, bomb.size, bomb.sha256, None)
        assert exc.value.code in ("apply", "extract", "no_space"), exc.value.to_dict()
        assert svc.record.layers() == []
        assert [n for n in dm.list_names() if n.startswith("img-")] == []
        s = dm.pool_status(small_pool)
        assert s.used_data_blocks == 0 and not s.out_of_data_space and not s.fail
        small = write_blob(tmp_path, make_tar([("file", "ok", b"fine\n")]))
        with open(small.path, "rb") as f:
            r = svc.ensure_layer(small.digest, None, f.fileno(), 0, small.size, small.sha256, None)
        assert r["created"]
    finally:
        svc.close()
