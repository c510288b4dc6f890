"""Applies one OCI layer blob onto a root directory: streaming, confined, verified (C: csrc/extract.c).

Policies:
- Input: bytes [offset, offset+length) of a file descriptor, read with pread (several layers may share one
  archive fd). Tar only (ustar, pax, GNU); compression none, gzip or zstd, sniffed from content.
- Digest: SHA-256 over every byte of the range, including bytes after the tar end marker (GNU tar pads
  to 10 KiB records): those are hashed, never parsed nor decompressed, and counted in `trailing_bytes`
  (approximately for compressed blobs). A range shorter than its declared length is "corrupt"; a
  mismatch with `expect_sha256` is "digest". libarchive does not verify the gzip CRC, so for gzip the
  digest is the integrity check. The check completes after the content is written: on ANY error the
  root holds a partial layer and must be discarded; nothing outside the root is ever touched.
- Threads: SHA-256 runs on a second thread; gzip/zstd are inflated on a third (a raw-format libarchive
  reader feeding the tar reader), so hashing and inflating overlap with writing files.
- Confinement: every path resolves in the root (openat2 RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS|
  RESOLVE_NO_XDEV); symlinks in parent paths are followed *inside* the root (absolute ones too), the
  final component is never followed. A ".." component is refused ("escape"), as is a non-directory
  entry for the root itself. Hardlinks: linkat between the two resolved parent directories (no
  CAP_DAC_READ_SEARCH, no /proc); a link to a symlink links the symlink.
- OCI whiteouts: `.wh.NAME` removes NAME of lower layers, `.wh..wh..opq` all lower children of its
  directory, whatever their order in the tar; paths this layer wrote are never removed by its own
  whiteouts (a whiteout naming a same-layer directory prunes only that directory's lower children).
  Removal never follows symlinks. An entry replaces what is at its path; directory over directory merges
  (the new metadata wins); duplicates: the later entry wins.
- Metadata: numeric uid/gid (as root), mode incl. setuid/setgid/sticky (set after chown), mtime/atime
  (directories at the end of the layer). Hardlinks carry no metadata of their own.
- Devices: only the OCI runtime's default character devices (null, zero, full, random, urandom, tty,
  console, ptmx) are created, and only as root; any other device node is skipped and counted in
  `devices_skipped`. The filesystem is meant to be mounted nodev,nosuid anyway.
- Xattrs: `user.*` and `security.capability` are applied; `security.selinux` and other `security.*`,
  `trusted.*`, `system.*` are dropped and counted (`xattrs_dropped`), as are all xattrs on symlinks and
  nodes, and xattrs the filesystem does not support.
- Names: bytes as archived; newline is legal. A NUL ends a name (libarchive yields C strings). pax names
  must be valid UTF-8; a libarchive warning (ignored pax header, unconvertible name) is "corrupt".
- Limits bound memory and work, not only output: a header is cut off once libarchive has read
  max_header_bytes (+ 2 MiB read-ahead) for it, before it can hold it all (pax records, GNU sparse maps);
  the layer's own index (names it wrote, directories re-timed at the end; a directory archived again
  is kept once) is bounded by max_index_bytes; trailing data after the tar counts against
  max_total_bytes. Removal (whiteouts, replacements) never enters another mount under the root.
- No fsync per file: call `syncfs(root_fd)` once after the last layer.
- Privileges: meant to run as root (the helper). As another user, ownership is not applied, device nodes
  are skipped, and a directory archived without owner write permission cannot receive later children.
- The fd must support pread (a regular file or memfd); several LayerSources may share one fd.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from img_helper.native import ffi, lib

EXTRACTOR_VERSION = 1

# How often the progress callback runs: whichever comes first.
PROGRESS_ENTRIES = 2048
PROGRESS_BYTES = 64 << 20

ERROR_CODES = ("escape", "limit", "corrupt", "format", "digest", "path", "invalid", "io", "cancelled")


@dataclass
class Limits:
    max_entries: int = 2_000_000
    max_total_bytes: int = 64 << 30
    max_file_bytes: int = 16 << 30
    max_path_len: int = 4096
    max_depth: int = 128
    max_xattr_bytes: int = 65536
    max_header_bytes: int = 1 << 20
    # Memory for the layer's own index (names it wrote, paths of directories whose times are set at the
    # end): without it a small compressed blob of long paths could make the helper allocate gigabytes.
    max_index_bytes: int = 256 << 20


@dataclass
class LayerSource:
    """Bytes [offset, offset+length) of fd (length -1: to EOF) are one layer blob: tar, gzip or zstd."""

    fd: int
    offset: int = 0
    length: int = -1
    expect_sha256: str | None = None


@dataclass
class LayerStats:
    entries: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    bytes: int = 0
    blob_sha256: str = ""
    fifos: int = 0
    devices: int = 0
    devices_skipped: int = 0
    xattrs: int = 0
    xattrs_dropped: int = 0
    blob_bytes: int = 0
    trailing_bytes: int = 0


class ExtractError(Exception):
    """A layer was refused or could not be applied. code: one of ERROR_CODES."""

    def __init__(self, code: str, entry: str, reason: str, errno: int = 0) -> None:
        super().__init__(f"{code}: {entry}: {reason}")
        self.code = code
        self.entry = entry
        self.reason = reason
        self.errno = errno


_HEX64 = re.compile(r"[0-9a-f]{64}")
_COUNTERS = [f.name for f in fields(LayerStats) if f.name != "blob_sha256"]


def _stats(c: Any) -> LayerStats:
    st = LayerStats(blob_sha256=ffi.string(c.blob_sha256).decode())
    for name in _COUNTERS:
        setattr(st, name, int(getattr(c, name)))
    return st


def _text(c: Any) -> str:
    return bytes(ffi.string(c)).decode("utf-8", "backslashreplace")


class _Progress:
    def __init__(self, fn: Callable[[LayerStats], None]) -> None:
        self.fn = fn
        self.error: BaseException | None = None


@ffi.def_extern()
def img_extract_progress_py(ctx: Any, stats: Any) -> int:
    p: _Progress = ffi.from_handle(ctx)
    try:
        p.fn(_stats(stats))
    except BaseException as e:  # re-raised by apply_layer once the C side has unwound
        p.error = e
        return 1
    return 0


def normalize_sha256(digest: str | None) -> str | None:
    if digest is None:
        return None
    hexpart = digest.removeprefix("sha256:").lower()
    if not _HEX64.fullmatch(hexpart):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return hexpart


def apply_layer(
    root_fd: int,
    src: LayerSource,
    limits: Limits | None = None,
    progress: Callable[[LayerStats], None] | None = None,
) -> LayerStats:
    """Applies the layer blob `src` onto the directory `root_fd` (see the module docstring)."""
    limits = limits or Limits()
    if src.offset < 0 or src.length < -1:
        raise ValueError(f"bad byte range: offset {src.offset}, length {src.length}")
    if any(getattr(limits, f.name) < 0 for f in fields(Limits)):
        raise ValueError(f"negative limit in {limits}")
    expect = normalize_sha256(src.expect_sha256)
    c_limits = ffi.new("struct img_limits *", {f.name: getattr(limits, f.name) for f in fields(Limits)})
    c_stats = ffi.new("struct img_extract_stats *")
    c_err = ffi.new("struct img_extract_error *")
    c_expect = ffi.new("char[]", expect.encode()) if expect else ffi.NULL
    state = _Progress(progress) if progress else None
    handle = ffi.new_handle(state) if state else ffi.NULL
    callback = lib.img_extract_progress_py if state else ffi.NULL
    rc = lib.img_apply_layer(root_fd, src.fd, src.offset, src.length, c_expect, c_limits, c_stats, c_err,
                             callback, handle, PROGRESS_ENTRIES, PROGRESS_BYTES)
    if rc != 0:
        if state and state.error is not None:
            raise state.error
        raise ExtractError(_text(c_err.code), _text(c_err.entry), _text(c_err.reason), int(c_err.err))
    return _stats(c_stats)


def syncfs(fd: int) -> None:
    """Flushes the filesystem holding fd: the one sync after all layers are applied."""
    err = lib.img_syncfs(fd)
    if err:
        raise OSError(err, os.strerror(err))
