"""The canonical layout every extracted image gets, whatever its format:

    DIR/rootfs/      the flattened tree (layers applied in order with OCI whiteout semantics)
    DIR/image.json   {source, format, layers:[{digest, size, compression}], chain_ids, config_digest,
                      extractor_version, stats}  -- written last, atomically: its presence means "complete"
    DIR/.failed      written instead of image.json when extraction was refused or failed; rootfs/ is then
                     partial and must not be used

DIR is the caller's directory (a fresh filesystem's root for the daemon, any directory offline): nothing is
ever written outside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Callable
from typing import Any

from img_helper import __version__
from img_helper import extract as extract_mod
from img_helper.formats import ImageSource, chain_ids

ROOTFS = "rootfs"
IMAGE_JSON = "image.json"
FAILED = ".failed"
STAT_FIELDS = ("entries", "files", "dirs", "symlinks", "hardlinks", "whiteouts", "bytes")
# reported too when the extractor provides them
EXTRA_FIELDS = ("fifos", "devices", "devices_skipped", "xattrs", "xattrs_dropped", "blob_bytes")


class LayoutError(Exception):
    """DIR cannot take a fresh extraction (rootfs/ not empty, image.json already there, ...)."""

    def __init__(self, code: str, entry: str, reason: str) -> None:
        super().__init__(f"{code}: {entry}: {reason}")
        self.code = code
        self.entry = entry
        self.reason = reason


def extractor_version() -> str:
    return f"img-helper {__version__} extractor {getattr(extract_mod, 'EXTRACTOR_VERSION', 0)}"


def write_file_atomic(dir_fd: int, name: str, data: bytes) -> None:
    """temp + fsync + rename + fsync(dir): readers see the old state or the whole new file."""
    tmp = f".{name}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd
    )
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def open_fresh_rootfs(into_dir_fd: int) -> int:
    """Create DIR/rootfs (or take an existing empty directory, e.g. a fresh mount point) and return its fd."""
    for name in (IMAGE_JSON, FAILED):
        if _exists(into_dir_fd, name):
            raise LayoutError("exists", name, "the directory already holds an extraction; use a fresh one")
    with contextlib.suppress(FileExistsError):
        os.mkdir(ROOTFS, 0o755, dir_fd=into_dir_fd)
    try:
        fd = os.open(ROOTFS, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=into_dir_fd)
    except OSError as e:
        raise LayoutError("exists", ROOTFS, f"is not a directory ({e.strerror})") from None
    if os.listdir(fd):
        os.close(fd)
        raise LayoutError("exists", ROOTFS, "is not empty; extraction needs a fresh rootfs")
    return fd


def _layer_size(layer: Any) -> int:
    if layer.size >= 0:
        return int(layer.size)
    src = layer.source
    return os.fstat(src.fd).st_size - src.offset if src.length < 0 else int(src.length)


def extract_image(
    image: ImageSource, into_dir_fd: int, limits: Any = None, progress: Callable[[Any], None] | None = None
) -> dict[str, Any]:
    """Apply image.layers in order onto a fresh DIR/rootfs, syncfs once, then write DIR/image.json.

    Returns the summary dict (ok, stats, seconds, chain_ids, ...). On any failure writes DIR/.failed with the
    error and re-raises (ExtractError / FormatError / OSError); rootfs/ is left partial."""
    t0 = time.monotonic()
    root_fd = open_fresh_rootfs(into_dir_fd)
    totals = dict.fromkeys(STAT_FIELDS + EXTRA_FIELDS, 0)
    layers_out: list[dict[str, Any]] = []
    try:
        for i, layer in enumerate(image.layers):

            def on_progress(s: Any, i: int = i) -> None:
                if progress is not None:
                    progress(
                        {
                            "layer": i,
                            "layers": len(image.layers),
                            **{k: totals[k] + getattr(s, k, 0) for k in STAT_FIELDS},
                        }
                    )

            kwargs: dict[str, Any] = {"progress": on_progress if progress else None}
            if limits is not None:
                kwargs["limits"] = limits
            st = extract_mod.apply_layer(root_fd, layer.source, **kwargs)
            for k in totals:
                totals[k] += int(getattr(st, k, 0))
            blob_hex = str(st.blob_sha256).removeprefix("sha256:")
            layers_out.append(
                {"digest": f"sha256:{blob_hex}", "size": _layer_size(layer), "compression": layer.compression}
            )
        extract_mod.syncfs(root_fd)  # the one sync: the extractor never fsyncs per file
        chains = chain_ids([x["digest"] for x in layers_out])
        seconds = time.monotonic() - t0
        record = {
            "source": image.source,
            "format": image.format,
            "layers": layers_out,
            "chain_ids": chains,
            "config_digest": image.config_digest,
            "extractor_version": extractor_version(),
            "stats": totals,
        }
        write_file_atomic(
            into_dir_fd, IMAGE_JSON, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()
        )
    except BaseException as e:
        _mark_failed(into_dir_fd, e, len(layers_out))
        raise
    finally:
        os.close(root_fd)
    return {
        "ok": True,
        **totals,
        "seconds": round(seconds, 3),
        "chain_ids": chains,
        "format": image.format,
        "layers": len(layers_out),
    }


def _mark_failed(into_dir_fd: int, e: BaseException, layers_done: int) -> None:
    info = {
        "code": getattr(e, "code", "internal"),
        "entry": getattr(e, "entry", ""),
        "reason": getattr(e, "reason", str(e)),
        "layers_done": layers_done,
    }
    # best effort: the original error matters more than a failure to record it
    with contextlib.suppress(OSError):
        write_file_atomic(into_dir_fd, FAILED, (json.dumps(info, sort_keys=True) + "\n").encode())


def read_image_json(dir_fd: int) -> dict[str, Any] | None:
    """image.json of a complete extraction, or None (absent, or marked failed)."""
    try:
        fd = os.open(IMAGE_JSON, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        data: dict[str, Any] = json.loads(f.read(1 << 20))
    return None if _exists(dir_fd, FAILED) else data
