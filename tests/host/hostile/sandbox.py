"""A root to extract into, with things around it that an escape would touch, and a tree snapshot.

Layout under the pytest tmp dir:
    root/          the extraction root
    root-evil/     a sibling whose name extends the root's (the `dest` vs `dest-evil` prefix bug)
    outside/       a directory with a secret file: absolute names and symlinks in the tests aim here
Everything outside root/ is snapshotted at setup and must be byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from img_helper.extract import LayerSource, LayerStats, Limits, apply_layer

Tree = dict[str, tuple[object, ...]]

# Host paths a write-through into the real /etc would create: they must never exist.
HOST_CANARIES = [Path("/etc/img-hostile-pwned"), Path("/img-hostile-pwned"), Path("/tmp/img-hostile-pwned")]


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def describe(path: Path, st: os.stat_result, times: bool) -> tuple[object, ...]:
    mode = stat.S_IMODE(st.st_mode)
    common: tuple[object, ...] = (oct(mode), st.st_uid, st.st_gid)
    if times and not stat.S_ISLNK(st.st_mode):
        common += (st.st_mtime_ns,)
    if stat.S_ISREG(st.st_mode):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return ("file", *common, st.st_size, digest, st.st_nlink, tuple(_xattrs(path).items()))
    if stat.S_ISDIR(st.st_mode):
        return ("dir", *common, tuple(_xattrs(path).items()))
    if stat.S_ISLNK(st.st_mode):
        return ("symlink", st.st_uid, st.st_gid, os.readlink(path))
    if stat.S_ISFIFO(st.st_mode):
        return ("fifo", *common)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        kind = "chr" if stat.S_ISCHR(st.st_mode) else "blk"
        return (kind, *common, os.major(st.st_rdev), os.minor(st.st_rdev))
    return ("other", *common)


def snapshot(top: Path, times: bool = True) -> Tree:
    """Every object under top (top itself as "."), never following symlinks."""
    tree: Tree = {".": describe(top, top.lstat(), times)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            tree[str(p.relative_to(top))] = describe(p, p.lstat(), times)
    return tree


def kinds(top: Path) -> dict[str, str]:
    """path -> type (and symlink target): the shape of a tree, for exact-tree assertions."""
    out = {}
    for path, d in snapshot(top, times=False).items():
        if path == ".":
            continue
        out[path] = f"symlink:{d[3]}" if d[0] == "symlink" else str(d[0])
    return out


@dataclass
class Sandbox:
    base: Path
    root: Path = field(init=False)
    evil: Path = field(init=False)
    outside: Path = field(init=False)
    blobs: Path = field(init=False)
    before: dict[str, Tree] = field(init=False)

    def __post_init__(self) -> None:
        self.root = self.base / "root"
        self.evil = self.base / "root-evil"
        self.outside = self.base / "outside"
        self.blobs = self.base / "blobs"
        for d in (self.root, self.evil, self.outside, self.blobs):
            d.mkdir()
        (self.outside / "secret").write_bytes(b"outside secret\n")
        (self.outside / "dir").mkdir()
        (self.outside / "dir" / "keep").write_bytes(b"keep\n")
        (self.evil / "sentinel").write_bytes(b"sibling sentinel\n")
        self.before = self._watched()

    def _watched(self) -> dict[str, Tree]:
        return {"root-evil": snapshot(self.evil), "outside": snapshot(self.outside)}

    def apply(self, *layers: bytes, limits: Limits | None = None, expect: list[str | None] | None = None,
              ) -> list[LayerStats]:
        """Applies the layers in order, all from ONE blob file at increasing offsets."""
        blob = self.blobs / f"layers-{len(list(self.blobs.iterdir()))}"
        blob.write_bytes(b"".join(layers))
        out = []
        fd = os.open(blob, os.O_RDONLY)
        root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            offset = 0
            for i, layer in enumerate(layers):
                src = LayerSource(fd, offset, len(layer), expect[i] if expect else None)
                out.append(apply_layer(root, src, limits))
                offset += len(layer)
        finally:
            os.close(fd)
            os.close(root)
        return out

    def assert_untouched(self) -> None:
        assert self._watched() == self.before, "something outside the root changed"
        for canary in HOST_CANARIES:
            assert not os.path.lexists(canary), f"{canary} was created"

    def tree(self) -> dict[str, str]:
        return kinds(self.root)
