"""Applies one layer onto a layer device, in a child process with its own private mount namespace.

Run by devices.py as `python -m img_helper.apply_child SPEC_JSON` with the blob fd inherited. The device
is mounted nosuid,nodev,noatime in a namespace nobody else sees; when this process ends (normally, or
killed together with the helper through PR_SET_PDEATHSIG) the namespace and its mount go away with it.

Output, one JSON object per line on stdout: {"mounted": true}, {"progress": {...}} ..., then
{"result": {stats}} or {"error": {"kind": "extract"|"os", "code", "entry", "reason"}}.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any

CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_NOATIME, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x400, 0x4000, 0x40000
PR_SET_PDEATHSIG = 1
IMAGE_JSON = "image.json"
ROOTFS = "rootfs"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def crash_point(name: str) -> None:
    """Test hook: IMG_HELPER_CRASH_AT=<name> kills this process with SIGKILL at that point."""
    if os.environ.get("IMG_HELPER_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _write_image_json(root_fd: int, spec: dict[str, Any], stats: dict[str, Any], version: str) -> None:
    """The filesystem's root describes the stack it holds: layers and chain ids, bottom first."""
    prev: dict[str, Any] = {}
    if not spec["first"]:
        try:
            fd = os.open(IMAGE_JSON, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
            with os.fdopen(fd, "rb") as f:
                prev = json.loads(f.read(1 << 20))
        except (FileNotFoundError, ValueError):
            prev = {}
    layers = [*prev.get("layers", []), {"digest": "sha256:" + spec["sha256"], "size": spec["length"]}]
    doc = {"source": None, "format": "layer-chain", "layers": layers,
           "chain_ids": [*prev.get("chain_ids", []), spec["chain_id"]],
           "extractor_version": version, "stats": stats}
    tmp = ".image.json.tmp"
    try:
        os.unlink(tmp, dir_fd=root_fd)
    except FileNotFoundError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o644, dir_fd=root_fd)
    with os.fdopen(fd, "wb") as f:
        f.write(json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n")
    os.rename(tmp, IMAGE_JSON, src_dir_fd=root_fd, dst_dir_fd=root_fd)


def run(spec: dict[str, Any]) -> int:
    from img_helper import extract  # the extractor (C) loads only in this child

    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
    if os.getppid() != spec["parent_pid"]:
        return 4  # the helper died before we armed PDEATHSIG
    _check(_libc.unshare(CLONE_NEWNS), "unshare")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    mnt = spec["mount_dir"].encode()
    _check(_libc.mount(spec["device"].encode(), mnt, b"ext4", MS_NOSUID | MS_NODEV | MS_NOATIME, None),
           "mount")
    root_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    _emit({"mounted": True})
    try:
        if spec["first"]:
            os.mkdir(ROOTFS, 0o755, dir_fd=root_fd)
        dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        rootfs_fd = os.open(ROOTFS, dir_flags, dir_fd=root_fd)
        last = [0.0]

        def progress(stats: Any) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.25:
                last[0] = now
                _emit({"progress": dataclasses.asdict(stats)})

        crash_point("apply:before-extract")
        try:
            src = extract.LayerSource(spec["fd"], spec["offset"], spec["length"], spec["sha256"])
            stats = extract.apply_layer(rootfs_fd, src, progress=progress)
        except extract.ExtractError as e:
            _emit({"error": {"kind": "extract", "code": e.code, "entry": e.entry, "reason": e.reason}})
            return 3
        finally:
            os.close(rootfs_fd)
        crash_point("apply:after-extract")
        stats_d = dataclasses.asdict(stats)
        version = str(getattr(extract, "EXTRACTOR_VERSION", "") or getattr(extract, "__version__", "") or "")
        _write_image_json(root_fd, spec, stats_d, version)
        _check(_libc.syncfs(root_fd), "syncfs")
    finally:
        os.close(root_fd)
        _check(_libc.umount2(mnt, 0), "umount")
    _emit({"result": stats_d})
    return 0


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        rc = run(spec)
    except OSError as e:
        _emit({"error": {"kind": "os", "code": "io", "entry": "", "reason": str(e)}})
        rc = 2
    sys.exit(rc)


if __name__ == "__main__":
    main()
