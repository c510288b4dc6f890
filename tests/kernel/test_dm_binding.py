"""img_helper.dm end to end on the real dm-thin target: typed errnos, nodes without udev, status."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time

import pytest

from img_helper import dm
from tests.fixtures.dmpool import ThinPool, dm_names

pytestmark = pytest.mark.kernel

SECTORS = 65536


def _thin(pool: ThinPool, thin_id: int, name: str | None = None) -> str:
    name = name or f"{pool.name}-t{thin_id}"
    dm.create_thin(pool.name, thin_id)
    dm.create_thin_device(name, pool.name, thin_id, SECTORS, uuid=f"IMG-test-{name}")
    return name


def test_create_thin_device_has_node_uuid_and_table(thin_pool: ThinPool) -> None:
    assert os.environ.get("DM_DISABLE_UDEV") == "1"  # the guest runs no udev: nodes are ours
    name = _thin(thin_pool, 1)
    try:
        st = os.stat(dm.device_path(name))
        d = dm.info(name)
        assert d is not None and stat.S_ISBLK(st.st_mode) and st.st_rdev == d.devno
        assert d.uuid == f"IMG-test-{name}" and not d.suspended and d.open_count == 0
        assert name in dm.list_names() and name in dm_names()
        t = dm.table(name)
        pool_info = dm.info(thin_pool.name)
        assert pool_info is not None
        assert (t.target_type, t.length_sectors) == ("thin", SECTORS)
        assert t.params == f"{pool_info.major}:{pool_info.minor} 1"
        assert dm.deps(name) == [pool_info.devno]
        assert dm.thin_status(name).mapped_sectors == 0
    finally:
        assert dm.remove(name) == "removed"
    assert not os.path.exists(dm.device_path(name)), "node left behind without udev"
    assert dm.info(name) is None
    assert dm.remove(name) == "absent"


def test_create_thin_on_existing_id_is_eexist(thin_pool: ThinPool) -> None:
    dm.create_thin(thin_pool.name, 7)
    with pytest.raises(dm.DmExists) as exc:
        dm.create_thin(thin_pool.name, 7)
    assert (exc.value.op, exc.value.errno, exc.value.device) == ("create_thin", errno.EEXIST, thin_pool.name)
    with pytest.raises(dm.DmExists):
        dm.create_snap(thin_pool.name, 7, 7)


def test_delete_unknown_id_is_enodata(thin_pool: ThinPool) -> None:
    with pytest.raises(dm.DmNoData) as exc:
        dm.delete_thin(thin_pool.name, 4242)
    assert (exc.value.op, exc.value.errno) == ("delete", errno.ENODATA)
    with pytest.raises(dm.DmNoData):
        dm.create_snap(thin_pool.name, 5, 4242)
    dm.create_thin(thin_pool.name, 9)
    dm.delete_thin(thin_pool.name, 9)
    with pytest.raises(dm.DmNoData):
        dm.delete_thin(thin_pool.name, 9)


def test_errors_carry_message_and_print_nothing(thin_pool: ThinPool,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(dm.DmError) as exc:
        dm.message(thin_pool.name, "no_such_message 1")
    assert exc.value.errno == errno.EINVAL and exc.value.message
    with pytest.raises(dm.DmNotFound):
        dm.message("img-no-such-pool", "create_thin 1")
    for query in (dm.pool_status, dm.table, dm.status, dm.thin_status):
        with pytest.raises(dm.DmNotFound):
            query("img-no-such-device")
    with pytest.raises(dm.DmError):
        dm.create_thin(thin_pool.name, dm.MAX_THIN_ID + 1)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_pool_status_and_transaction_id(thin_pool: ThinPool) -> None:
    s = dm.pool_status(thin_pool.name)
    assert s.transaction_id == 0 and s.used_data_blocks == 0
    assert s.total_data_blocks == thin_pool.data_sectors // thin_pool.block_sectors
    assert s.length_sectors == thin_pool.data_sectors
    assert not (s.read_only or s.fail or s.needs_check or s.out_of_data_space or s.error_if_no_space)
    assert 0 < s.used_metadata_blocks < s.total_metadata_blocks
    dm.set_transaction_id(thin_pool.name, 0, 5)
    assert dm.pool_status(thin_pool.name).transaction_id == 5
    with pytest.raises(dm.DmError) as exc:
        dm.set_transaction_id(thin_pool.name, 0, 6)  # stale "old": the kernel refuses
    assert exc.value.errno == errno.EINVAL
    name = _thin(thin_pool, 1)
    try:
        with open(dm.device_path(name), "r+b", buffering=0) as f:
            f.write(b"x" * (1 << 20))
            os.fsync(f.fileno())
        after = dm.pool_status(thin_pool.name)
        assert after.used_data_blocks == (1 << 20) // 512 // thin_pool.block_sectors
        assert dm.thin_status(name).mapped_sectors == (1 << 20) // 512
    finally:
        dm.remove(name)


def test_snapshot_with_suspended_origin(thin_pool: ThinPool) -> None:
    origin = _thin(thin_pool, 1)
    try:
        with open(dm.device_path(origin), "r+b", buffering=0) as f:
            f.write(b"origin!" * 512)
        with dm.suspended(origin):
            d = dm.info(origin)
            assert d is not None and d.suspended
            dm.create_snap(thin_pool.name, 2, 1)
        d = dm.info(origin)
        assert d is not None and not d.suspended
        snap = f"{thin_pool.name}-t2"
        dm.create_thin_device(snap, thin_pool.name, 2, SECTORS, uuid=f"IMG-test-{snap}", read_only=True)
        try:
            with open(dm.device_path(snap), "rb") as f:
                assert f.read(7 * 512) == b"origin!" * 512
            snap_info = dm.info(snap)
            assert snap_info is not None and snap_info.read_only
        finally:
            dm.remove(snap)
        # An exception inside the block still resumes the origin.
        with pytest.raises(dm.DmExists), dm.suspended(origin):
            dm.create_snap(thin_pool.name, 2, 1)
        d = dm.info(origin)
        assert d is not None and not d.suspended
    finally:
        dm.remove(origin)


def test_create_existing_name_is_eexist(thin_pool: ThinPool) -> None:
    name = _thin(thin_pool, 1)
    try:
        with pytest.raises(dm.DmExists):
            dm.create_thin_device(name, thin_pool.name, 1, SECTORS, uuid="IMG-test-other")
        assert dm.list_names().count(name) == 1
    finally:
        dm.remove(name)


def test_remove_busy_retries_then_defers(thin_pool: ThinPool) -> None:
    name = _thin(thin_pool, 1)
    fd = os.open(dm.device_path(name), os.O_RDONLY)
    try:
        with pytest.raises(dm.DmBusy) as exc:
            dm.remove(name, retries=2, delay=0.01)
        assert exc.value.op == "remove"
        assert dm.remove(name, retries=1, delay=0.01, deferred=True) == "deferred"
        assert dm.info(name) is not None  # still open: the kernel keeps it until the last close
    finally:
        os.close(fd)
    for _ in range(100):  # the kernel removes it from a work queue after the last close
        if dm.info(name) is None:
            break
        time.sleep(0.01)
    assert dm.info(name) is None


def test_remove_succeeds_when_opener_goes_away_during_retries(thin_pool: ThinPool) -> None:
    name = _thin(thin_pool, 1)
    holder = subprocess.Popen(["sh", "-c", f"exec 3<{dm.device_path(name)}; sleep 0.3"])
    try:
        for _ in range(100):
            d = dm.info(name)
            if d is not None and d.open_count:
                break
            os.sched_yield()
        assert dm.remove(name, retries=20, delay=0.1) == "removed"
    finally:
        holder.wait()


def test_list_larger_than_first_buffer() -> None:
    names = [f"img-test-list-{i:03d}-" + "x" * 100 for i in range(45)]
    try:
        for n in names:
            dm.create(n, 8, "error", "", uuid=f"IMG-test-{n[:100]}")
        listed = dm.list_names()
        assert set(names) <= set(listed)
        assert sum(len(n) + 1 for n in listed) > 4096
    finally:
        for n in names:
            dm.remove(n)
