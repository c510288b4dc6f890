"""Proves the kernel tier is real: pool, thin device, ext4 and a snapshot on the real dm-thin target."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.fixtures.dmpool import ThinPool, dm_names, sh

pytestmark = pytest.mark.kernel


def test_pool_thin_snapshot_roundtrip(thin_pool: ThinPool) -> None:
    assert thin_pool.name in dm_names()
    fields = thin_pool.status()
    assert fields[2] == "thin-pool", fields
    thin = thin_pool.create_thin(1, 65536)
    sh("mkfs.ext4", "-q", "-E", "nodiscard,assume_storage_prezeroed=1", thin)
    with tempfile.TemporaryDirectory() as mnt:
        sh("mount", thin, mnt)
        try:
            Path(mnt, "x").write_text("hello\n")
        finally:
            sh("umount", mnt)
    sh("dmsetup", "suspend", thin)
    try:
        sh("dmsetup", "message", thin_pool.path, "0", "create_snap 2 1")
    finally:
        sh("dmsetup", "resume", thin)
    snap_name = f"{thin_pool.name}-snap2"
    sh("dmsetup", "create", snap_name, "--table", f"0 65536 thin {thin_pool.path} 2")
    thin_pool.thins.append(snap_name)
    with tempfile.TemporaryDirectory() as mnt:
        sh("mount", "-o", "ro", f"/dev/mapper/{snap_name}", mnt)
        try:
            assert Path(mnt, "x").read_text() == "hello\n"
        finally:
            sh("umount", mnt)
    # The pool really allocated blocks for what we wrote: used data blocks > 0.
    used, _total = thin_pool.status()[5].split("/")
    assert int(used) > 0


def test_thin_create_on_existing_id_fails_with_eexist(thin_pool: ThinPool) -> None:
    thin_pool.create_thin(7, 8192)
    r = subprocess.run(["dmsetup", "message", thin_pool.path, "0", "create_thin 7"],
                       capture_output=True, text=True)
    assert r.returncode != 0
