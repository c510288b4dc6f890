"""One timed extraction, run by `img bench extract` in a child process:

    python -m img.bench.worker ENGINE DEST SOURCE...   ->  stdout: {"seconds": ..., "entries": ...}

The parent starts it inside a private mount namespace whose `/` is remounted read-only, so an engine without
confinement (GNU tar, tarfile) that follows an absolute symlink of the image writes nowhere but the target
filesystem. The clock covers the extraction plus one syncfs of the target, for every engine alike."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def run_ours(dest: str, sources: list[str]) -> dict[str, Any]:
    from img_helper.formats import open_image
    from img_helper.layout import extract_image

    fds = [os.open(s, os.O_RDONLY) for s in sources]
    dfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        image = open_image(fds)
        summary = extract_image(image, dfd)
        image.close()
    finally:
        for fd in [*fds, dfd]:
            os.close(fd)
    return {"entries": summary["entries"]}


def run_cmd(argv: Callable[[str, str], list[str]]) -> Callable[[str, list[str]], dict[str, Any]]:
    """A tar binary per layer. Without whiteout semantics some entries of later layers fail (a directory
    replaced by a file): the tools report and go on; failures are counted, not fatal."""

    def run(dest: str, sources: list[str]) -> dict[str, Any]:
        root = os.path.join(dest, "rootfs")
        os.mkdir(root)
        failed_layers = 0
        for layer in sources:
            rc = subprocess.run(
                argv(layer, root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            ).returncode
            if rc > 2:  # 1 (bsdtar) / 2 (GNU tar): some entries failed, the rest was extracted
                raise RuntimeError(f"{argv(layer, root)[0]} exited {rc} on {layer}")
            failed_layers += rc != 0
        return {"layers_with_errors": failed_layers}

    return run


def run_tarfile(dest: str, sources: list[str]) -> dict[str, Any]:
    root = os.path.join(dest, "rootfs")
    os.mkdir(root)
    for layer in sources:
        with tarfile.open(layer, "r:*") as tf:
            tf.errorlevel = 0  # log-and-continue, like the tar binaries
            if hasattr(tarfile, "tar_filter"):  # Python >= 3.11.4 / 3.12
                tf.extractall(root, numeric_owner=True, filter="tar")
            else:
                tf.extractall(root, numeric_owner=True)  # noqa: S202 -- sandboxed, see module docstring
    return {}


def run_libarchive_c(dest: str, sources: list[str]) -> dict[str, Any]:
    """libarchive-c's extract_entries loop, continuing past entries libarchive refuses (as bsdtar does)."""
    import ctypes as c

    import libarchive
    import libarchive.extract as lx
    from libarchive import ffi
    from libarchive.exception import ArchiveError

    root = os.path.join(dest, "rootfs")
    os.mkdir(root)
    flags = (
        lx.EXTRACT_OWNER
        | lx.EXTRACT_PERM
        | lx.EXTRACT_TIME
        | lx.EXTRACT_XATTR
        | lx.EXTRACT_SECURE_SYMLINKS
        | lx.EXTRACT_SECURE_NODOTDOT
        | lx.EXTRACT_SECURE_NOABSOLUTEPATHS
        | lx.EXTRACT_UNLINK
    )
    buff, size, offset = c.c_void_p(), c.c_size_t(), c.c_longlong()
    refused = 0
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with lx.new_archive_write_disk(flags) as write_p:
            for layer in sources:
                with libarchive.file_reader(layer) as archive:
                    for entry in archive:
                        try:
                            ffi.write_header(write_p, entry._entry_p)
                        except ArchiveError:
                            refused += 1
                            continue
                        while (
                            ffi.read_data_block(
                                entry._archive_p, c.byref(buff), c.byref(size), c.byref(offset)
                            )
                            != ffi.ARCHIVE_EOF
                        ):
                            ffi.write_data_block(write_p, buff, size, offset)
                        ffi.write_finish_entry(write_p)
    finally:
        os.chdir(cwd)
    return {"refused_entries": refused}


def run_cp_floor(dest: str, sources: list[str]) -> dict[str, Any]:
    """The floor: `cp -a` of an already-extracted tree (sources[0]) on the same filesystem."""
    subprocess.run(["cp", "-a", sources[0], os.path.join(dest, "rootfs")], check=True)
    return {}


ENGINES: dict[str, Callable[[str, list[str]], dict[str, Any]]] = {
    "ours": run_ours,
    "bsdtar": run_cmd(lambda layer, root: ["bsdtar", "--numeric-owner", "-xpf", layer, "-C", root]),
    "gnu-tar": run_cmd(
        lambda layer, root: [
            "tar",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-xpf",
            layer,
            "-C",
            root,
        ]
    ),
    "tarfile": run_tarfile,
    "libarchive-c": run_libarchive_c,
    "cp-a-floor": run_cp_floor,
}


def main() -> None:
    engine, dest, *sources = sys.argv[1:]
    fn = ENGINES[engine]
    # imports outside the clock
    if engine == "libarchive-c":
        import libarchive  # noqa: F401
    if engine == "ours":
        import img_helper.formats
        import img_helper.layout  # noqa: F401
    c0 = _cpu()
    t0 = time.perf_counter()
    extra = fn(dest, sources)
    syncfs(dest)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "cpu_seconds": _cpu() - c0, **extra}))


def _cpu() -> float:
    """user + system CPU of this process and its finished children (tar binaries, cp): unlike wall time it
    hardly moves when other work competes for the CPUs."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


if __name__ == "__main__":
    main()
