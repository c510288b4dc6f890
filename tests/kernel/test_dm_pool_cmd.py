"""`img-helper pool create|status` on real loop devices and dm-thin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from img_helper import dm
from img_helper.cmd_pool import _loop_of
from tests.fixtures.dmpool import loop_devices

pytestmark = pytest.mark.kernel


def helper(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "img-helper"
    r = subprocess.run([str(exe), *args], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def pool_files(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    name = f"imgtest-cmd-{uuid.uuid4().hex[:6]}"
    data, meta = tmp_path / "data", tmp_path / "meta"
    before = set(loop_devices())
    yield name, data, meta
    dm.remove(name)
    for f in (data, meta):
        loop = _loop_of(f) if f.exists() else None
        if loop:
            subprocess.run(["losetup", "-d", loop], check=True)
    assert set(loop_devices()) == before, "loop devices leaked"


def test_create_status_and_repeat(pool_files: tuple[str, Path, Path]) -> None:
    name, data, meta = pool_files
    loops_before = len(loop_devices())
    out = helper("pool", "create", "--name", name, "--data", str(data), "--metadata", str(meta),
                 "--data-size", "128M", "--metadata-size", "4M", "--json")
    created = json.loads(out.stdout)
    assert created["data_total_bytes"] == 128 << 20 and created["data_block_sectors"] == 256
    assert created["no_space_mode"] == "error" and created["transaction_id"] == 0
    assert data.stat().st_size == 128 << 20 and os.stat(meta).st_mode & 0o777 == 0o600
    d = dm.info(name)
    assert d is not None and d.uuid == f"IMG-pool-{name}"
    assert len(loop_devices()) == loops_before + 2

    again = helper("pool", "create", "--name", name, "--data", str(data), "--metadata", str(meta))
    assert "already exists" in again.stdout
    assert len(loop_devices()) == loops_before + 2

    status = json.loads(helper("pool", "status", "--name", name, "--json").stdout)
    assert status == created
    text = helper("pool", "status", "--name", name).stdout
    assert f"pool {name}: data 0/128 MiB" in text and "state: ok" in text


def test_reassemble_keeps_thins(pool_files: tuple[str, Path, Path]) -> None:
    """Re-creating the pool device on the same files reopens its metadata: thins are still there."""
    name, data, meta = pool_files
    args = ["pool", "create", "--name", name, "--data", str(data), "--metadata", str(meta),
            "--data-size", "64M", "--metadata-size", "4M", "--block-sectors", "128", "--no-space", "queue"]
    helper(*args)
    dm.create_thin(name, 3)
    dm.set_transaction_id(name, 0, 1)
    dm.remove(name)
    helper(*args)
    s = dm.pool_status(name)
    assert s.transaction_id == 1 and not s.error_if_no_space
    with pytest.raises(dm.DmExists):
        dm.create_thin(name, 3)


def test_errors_are_clear(pool_files: tuple[str, Path, Path]) -> None:
    name, data, meta = pool_files
    r = helper("pool", "status", "--name", name, check=False)
    assert r.returncode == 1 and "no device-mapper device" in r.stderr
    r = helper("pool", "create", "--name", name, "--data", str(data), "--metadata", str(meta), check=False)
    assert r.returncode != 0 and "--metadata-size" in r.stderr
    r = helper("pool", "create", "--name", name, "--data", str(data), "--metadata", str(meta),
               "--data-size", "64M", "--metadata-size", "4M", "--block-sectors", "200", check=False)
    assert r.returncode != 0 and "multiple of 128" in r.stderr
