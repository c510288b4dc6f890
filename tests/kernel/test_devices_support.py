"""Shared pieces for the layer-chain tests: tiny layer tars, blobs on disk, chain ids, tree snapshots.
(No tests here.)"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MTIME = 1_700_000_000


def make_tar(entries: list[tuple]) -> bytes:  # type: ignore[type-arg]
    """entries: ("dir", path[, mode]) ("file", path, data[, mode]) ("symlink", path, target)
    ("hardlink", path, target) ("whiteout", path) ("opaque", dirpath)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            kind, path = e[0], e[1]
            data: bytes | None = None
            if kind == "whiteout":
                head, _, leaf = path.rpartition("/")
                ti = tarfile.TarInfo((head + "/" if head else "") + ".wh." + leaf)
                data = b""
            elif kind == "opaque":
                ti = tarfile.TarInfo(path.rstrip("/") + "/.wh..wh..opq")
                data = b""
            else:
                ti = tarfile.TarInfo(path)
            ti.mtime, ti.uid, ti.gid = MTIME, 0, 0
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, e[2] if len(e) > 2 else 0o755
            elif kind == "file":
                data = e[2]
                ti.mode = e[3] if len(e) > 3 else 0o644
            elif kind == "symlink":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, e[2], 0o777
            elif kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, e[2]
            if data is not None:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


@dataclass
class Blob:
    path: Path
    size: int
    sha256: str  # hex

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha256


def write_blob(directory: Path, data: bytes) -> Blob:
    sha = hashlib.sha256(data).hexdigest()
    p = directory / sha
    p.write_bytes(data)
    return Blob(p, len(data), sha)


def chain_ids(digests: list[str]) -> list[str]:
    out: list[str] = []
    for d in digests:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def layer_series(n: int) -> list[bytes]:
    """n layers: each adds a file and a directory, changes one file and whiteouts an earlier one."""
    layers = []
    for i in range(n):
        entries: list[tuple] = [  # type: ignore[type-arg]
            ("dir", "etc"), ("file", f"etc/layer{i}", f"layer {i}\n".encode()),
            ("dir", f"d{i}", 0o750), ("file", f"d{i}/data", os.urandom(3000) + bytes([i])),
            ("file", "etc/current", f"{i}\n".encode(), 0o600)]
        if i == 0:
            entries += [("symlink", "bin", "usr/bin"), ("dir", "usr"), ("dir", "usr/bin"),
                        ("file", "usr/bin/tool", b"#!/bin/sh\n", 0o4755),
                        ("hardlink", "usr/bin/tool2", "usr/bin/tool")]
        if i >= 2:
            entries.append(("whiteout", f"etc/layer{i - 2}"))
        if i == 3:
            entries.append(("opaque", "d1"))
        layers.append(make_tar(entries))
    return layers


def tree(root: Path) -> dict[str, tuple]:  # type: ignore[type-arg]
    """path -> (kind, mode, uid, gid, content sha / link target, nlink, mtime). Directory mtimes are left
    out: a whiteout that empties a directory of lower layers updates it to the time of extraction."""
    out: dict[str, tuple] = {}  # type: ignore[type-arg]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("l", st.st_mode, st.st_uid, st.st_gid, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d", st.st_mode, st.st_uid, st.st_gid)
            else:
                out[rel] = ("f", st.st_mode, st.st_uid, st.st_gid, hashlib.sha256(p.read_bytes()).hexdigest(),
                            st.st_nlink, st.st_mtime_ns)
    return out


def extractor_tree(blobs: list[Blob], into: Path) -> dict[str, tuple]:  # type: ignore[type-arg]
    """The reference: the same layers applied by the extractor into a plain directory."""
    from img_helper import extract

    into.mkdir()
    root_fd = os.open(into, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for b in blobs:
            with open(b.path, "rb") as f:
                extract.apply_layer(root_fd, extract.LayerSource(f.fileno(), 0, b.size, b.sha256))
    finally:
        os.close(root_fd)
    return tree(into)


@contextmanager
def mounted(device: str, read_only: bool = True) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="img-test-mnt.") as mnt:
        subprocess.run(["mount", "-o", "ro" if read_only else "rw", device, mnt], check=True)
        try:
            yield Path(mnt)
        finally:
            subprocess.run(["umount", mnt], check=True)
