"""Typed device-mapper API over the C binding (helper/csrc/dm.c, libdevmapper ioctls).

Every failure is a DmError carrying the operation, the kernel's errno, the device and libdevmapper's
message; the errnos the callers act on have their own subclasses. libdevmapper is not thread-safe,
so every call holds one process-wide lock.
"""

from __future__ import annotations

import errno as errno_mod
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from img_helper.native import ffi, lib

MAX_THIN_ID = (1 << 24) - 1  # dm-thin device ids are 24 bits
MAPPER_DIR = "/dev/mapper"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+:-]{0,126}$")

_lock = threading.RLock()
_initialized = False


class DmError(Exception):
    """A device-mapper operation failed: `op` (e.g. "create_thin"), kernel `errno`, `device`."""

    def __init__(self, op: str, errno: int, device: str, message: str) -> None:
        self.op, self.errno, self.device, self.message = op, errno, device, message
        super().__init__(f"{op} {device}: {message} ({errno_mod.errorcode.get(errno, errno)})")


class DmExists(DmError):
    """EEXIST: the thin id (or device) already exists."""


class DmNoData(DmError):
    """ENODATA: the thin id does not exist in the pool."""


class DmBusy(DmError):
    """EBUSY: the device is open or in use."""


class DmNotFound(DmError):
    """ENXIO/ENOENT/ENODEV: no such device-mapper device."""


class DmNoSpace(DmError):
    """ENOSPC: the pool is out of data or metadata space."""


_CLASSES: dict[int, type[DmError]] = {
    errno_mod.EEXIST: DmExists,
    errno_mod.ENODATA: DmNoData,
    errno_mod.EBUSY: DmBusy,
    errno_mod.ENXIO: DmNotFound,
    errno_mod.ENOENT: DmNotFound,
    errno_mod.ENODEV: DmNotFound,
    errno_mod.ENOSPC: DmNoSpace,
}


def error_for(op: str, err: int, device: str, message: str) -> DmError:
    return _CLASSES.get(err, DmError)(op, err, device, message)


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    suspended: bool
    live_table: bool
    read_only: bool
    open_count: int
    target_count: int
    major: int
    minor: int
    uuid: str

    @property
    def devno(self) -> int:
        return os.makedev(self.major, self.minor)


@dataclass(frozen=True)
class PoolStatus:
    transaction_id: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    used_data_blocks: int
    total_data_blocks: int
    held_metadata_root: int
    length_sectors: int
    read_only: bool
    fail: bool
    error_if_no_space: bool
    out_of_data_space: bool
    needs_check: bool
    error: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ThinStatus:
    mapped_sectors: int
    highest_mapped_sector: int
    length_sectors: int
    fail: bool


@dataclass(frozen=True)
class Target:
    target_type: str
    length_sectors: int
    params: str


def _init() -> None:
    global _initialized
    if not _initialized:
        lib.img_dm_init()
        _initialized = True


def _check_name(name: str) -> bytes:
    if not _NAME_RE.match(name):
        raise DmError("validate", errno_mod.EINVAL, name, "invalid device-mapper name")
    return name.encode()


def _err() -> Any:
    return ffi.new("struct img_dm_err *")


def _raise(op: str, device: str, e: Any) -> None:
    raise error_for(op, int(e.err), device, ffi.string(e.message).decode(errors="replace"))


def _check_thin_id(thin_id: int) -> int:
    if not isinstance(thin_id, int) or not 0 <= thin_id <= MAX_THIN_ID:
        raise DmError("validate", errno_mod.EINVAL, str(thin_id), "thin id out of range")
    return thin_id


def device_path(name: str) -> str:
    return f"{MAPPER_DIR}/{name}"


# --- pool messages ---------------------------------------------------------------------------------

def message(pool: str, msg: str, op: str = "message") -> str:
    """Sends a target message to sector 0 of `pool`; returns the target's response text."""
    b = _check_name(pool)
    with _lock:
        _init()
        e, resp = _err(), ffi.new("char[]", 4096)
        if lib.img_dm_message(b, msg.encode(), resp, 4096, e):
            _raise(op, pool, e)
        return str(ffi.string(resp).decode())


def create_thin(pool: str, thin_id: int) -> None:
    message(pool, f"create_thin {_check_thin_id(thin_id)}", "create_thin")


def create_snap(pool: str, thin_id: int, origin_id: int) -> None:
    """Snapshot of `origin_id`; the caller suspends the origin's active device first (`suspended`)."""
    message(pool, f"create_snap {_check_thin_id(thin_id)} {_check_thin_id(origin_id)}", "create_snap")


def delete_thin(pool: str, thin_id: int) -> None:
    message(pool, f"delete {_check_thin_id(thin_id)}", "delete")


def set_transaction_id(pool: str, old: int, new: int) -> None:
    message(pool, f"set_transaction_id {int(old)} {int(new)}", "set_transaction_id")


# --- devices ---------------------------------------------------------------------------------------

def create(name: str, length_sectors: int, target: str, params: str, uuid: str | None = None,
           read_only: bool = False) -> str:
    """Creates, loads and resumes a one-target device; returns its /dev/mapper path (node ensured)."""
    b = _check_name(name)
    if uuid is not None and (len(uuid) > 128 or not uuid.isprintable()):
        raise DmError("validate", errno_mod.EINVAL, name, "invalid uuid")
    with _lock:
        _init()
        e = _err()
        if lib.img_dm_create(b, uuid.encode() if uuid else ffi.NULL, length_sectors, target.encode(),
                             params.encode(), 1 if read_only else 0, e):
            if e.err == errno_mod.EBUSY and info(name) is not None:
                raise DmExists("create", errno_mod.EEXIST, name, "device already exists")
            _raise("create", name, e)
        ensure_node(name)
        return device_path(name)


def create_thin_device(name: str, pool: str, thin_id: int, length_sectors: int, uuid: str,
                       read_only: bool = False) -> str:
    pool_info = info(pool)
    if pool_info is None:
        raise DmNotFound("create", errno_mod.ENXIO, pool, "pool device does not exist")
    params = f"{pool_info.major}:{pool_info.minor} {_check_thin_id(thin_id)}"
    return create(name, length_sectors, "thin", params, uuid=uuid, read_only=read_only)


def ensure_node(name: str) -> None:
    """Without udev nobody else makes the node: check it matches the device and remake it if not."""
    d = info(name)
    if d is None:
        return
    try:
        st = os.stat(device_path(name))
        if st.st_rdev == d.devno:
            return
    except FileNotFoundError:
        pass
    with _lock:
        e = _err()
        if lib.img_dm_mknode(_check_name(name), e):
            _raise("mknodes", name, e)


def suspend(name: str) -> None:
    with _lock:
        _init()
        e = _err()
        if lib.img_dm_suspend(_check_name(name), e):
            _raise("suspend", name, e)


def resume(name: str) -> None:
    with _lock:
        _init()
        e = _err()
        if lib.img_dm_resume(_check_name(name), e):
            _raise("resume", name, e)


@contextmanager
def suspended(name: str | None) -> Iterator[None]:
    """Suspends `name` if it is active (flushing its I/O) and resumes it afterwards, whatever happens."""
    d = info(name) if name else None
    if name is None or d is None or d.suspended:
        yield
        return
    suspend(name)
    try:
        yield
    finally:
        resume(name)


def remove(name: str, retries: int = 10, delay: float = 0.1, deferred: bool = False) -> str:
    """Removes a device: "removed", "absent" (there was none), or "deferred" (still open after the
    bounded retries and deferred=True: the kernel removes it on last close). Otherwise DmBusy."""
    b = _check_name(name)
    for attempt in range(retries + 1):
        with _lock:
            _init()
            e = _err()
            rc = lib.img_dm_remove(b, 0, e)
        if rc == 0:
            return "removed"
        if e.err in (errno_mod.ENXIO, errno_mod.ENODEV, errno_mod.ENOENT):
            return "absent"
        if e.err != errno_mod.EBUSY:
            _raise("remove", name, e)
        if attempt < retries:
            time.sleep(delay)
    if deferred:
        with _lock:
            e = _err()
            if lib.img_dm_remove(b, 1, e) == 0:
                return "deferred"
        _raise("deferred_remove", name, e)
    _raise("remove", name, e)
    raise AssertionError("unreachable")


# --- queries ---------------------------------------------------------------------------------------

def info(name: str) -> DeviceInfo | None:
    """The device's info, or None if there is no device of that name."""
    b = _check_name(name)
    with _lock:
        _init()
        e, out = _err(), ffi.new("struct img_dm_info *")
        if lib.img_dm_info(b, out, e):
            _raise("info", name, e)
        if not out.exists:
            return None
        return DeviceInfo(name, bool(out.suspended), bool(out.live_table), bool(out.read_only),
                          int(out.open_count), int(out.target_count), int(out.major), int(out.minor),
                          ffi.string(out.uuid).decode(errors="replace"))


def _first_target(name: str, status: bool) -> Target:
    b = _check_name(name)
    with _lock:
        _init()
        e = _err()
        ttype, params = ffi.new("char[]", 64), ffi.new("char[]", 4096)
        length = ffi.new("uint64_t *")
        if lib.img_dm_first_target(b, 1 if status else 0, ttype, 64, length, params, 4096, e):
            _raise("status" if status else "table", name, e)
        return Target(ffi.string(ttype).decode(), int(length[0]), ffi.string(params).decode())


def table(name: str) -> Target:
    return _first_target(name, False)


def status(name: str) -> Target:
    return _first_target(name, True)


def pool_status(pool: str) -> PoolStatus:
    b = _check_name(pool)
    with _lock:
        _init()
        e, s = _err(), ffi.new("struct img_dm_pool_status *")
        if lib.img_dm_pool_status(b, s, e):
            _raise("pool_status", pool, e)
        return PoolStatus(int(s.transaction_id), int(s.used_metadata_blocks), int(s.total_metadata_blocks),
                          int(s.used_data_blocks), int(s.total_data_blocks), int(s.held_metadata_root),
                          int(s.length), bool(s.read_only), bool(s.fail), bool(s.error_if_no_space),
                          bool(s.out_of_data_space), bool(s.needs_check), bool(s.error))


def thin_status(name: str) -> ThinStatus:
    b = _check_name(name)
    with _lock:
        _init()
        e, s = _err(), ffi.new("struct img_dm_thin_status *")
        if lib.img_dm_thin_status(b, s, e):
            _raise("thin_status", name, e)
        return ThinStatus(int(s.mapped_sectors), int(s.highest_mapped_sector), int(s.length), bool(s.fail))


def list_names() -> list[str]:
    """Names of all device-mapper devices, from the kernel."""
    size = 4096
    with _lock:
        _init()
        while True:
            e, buf, needed = _err(), ffi.new("char[]", size), ffi.new("size_t *")
            if lib.img_dm_list(buf, size, needed, e) == 0:
                raw = bytes(ffi.buffer(buf, needed[0]))
                return [n.decode(errors="replace") for n in raw.split(b"\0") if n]
            if e.err != errno_mod.ENOSPC:
                _raise("list", "", e)
            size = int(needed[0]) + 1024


def deps(name: str) -> list[int]:
    """Device numbers (os.makedev) the device's table uses."""
    b = _check_name(name)
    with _lock:
        _init()
        e, devs, count = _err(), ffi.new("uint64_t[]", 64), ffi.new("uint32_t *")
        if lib.img_dm_deps(b, devs, 64, count, e):
            _raise("deps", name, e)
        # The kernel's encoding is glibc's dev_t layout: os.major()/os.minor() decode it.
        return [int(devs[i]) for i in range(min(int(count[0]), 64))]
