"""atheris fuzzing of the layer extractor entry point (img_helper.extract.apply_layer).

    .venv/bin/python tests/fuzz/fuzz_extract.py -max_total_time=40      # what `make fuzz` runs

Each input is split into up to two layers applied onto a fixed lower layer (so whiteouts have something
to hide) in a fresh tmpfs root. An ExtractError is an expected outcome; any other exception, a crash, or a
change outside the root is a finding. The seed corpus is the hostile corpus's tars plus a few plain ones,
written to a temporary directory at start.

Note: the C extension is not built with libFuzzer instrumentation (no clang here). To still steer the
mutations, every outcome (error code, reason, which kinds of entries were made, size buckets) is turned into
a distinct branch of an instrumented Python function, so inputs that make the C code do something new are
kept in the corpus. Coarser than real edge coverage, much better than blind mutation.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import atheris

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

with atheris.instrument_imports():
    from img_helper.extract import ExtractError, LayerSource, Limits, apply_layer

from tests.host.hostile import tarbuild as t  # noqa: E402

LIMITS = Limits(max_entries=5000, max_total_bytes=8 << 20, max_file_bytes=1 << 20, max_path_len=1024,
                max_depth=32, max_xattr_bytes=4096, max_header_bytes=64 << 10)
# libFuzzer ends the process with exit(): no Python cleanup runs, so a parent process owns the scratch dir
SCRATCH = Path(os.environ.get("IMG_FUZZ_SCRATCH", "/nonexistent/img-fuzz"))
OUTSIDE = SCRATCH / "outside"
LOWER = t.tar(t.directory("etc/"), t.file("etc/passwd", b"root:x:0:0\n"), t.directory("d/"),
              t.file("d/keep", b"k"), t.symlink("d/up", "../.."), t.symlink("abs", str(OUTSIDE)),
              t.hardlink("d/passwd", "etc/passwd"), t.fifo("pipe"))


STAT_FIELDS = ("files", "dirs", "symlinks", "hardlinks", "whiteouts", "fifos", "devices", "devices_skipped",
               "xattrs", "xattrs_dropped", "trailing_bytes")
REASON_BUCKETS = 256


def _feedback_source() -> str:
    lines = ["def feedback(f):"]
    names = [f"stat:{n}" for n in STAT_FIELDS] + [f"entries:{b}" for b in range(24)]
    names += [f"code:{c}" for c in ("ok", "escape", "limit", "corrupt", "format", "path", "invalid")]
    names += [f"reason:{b}" for b in range(REASON_BUCKETS)] + [f"layer:{i}" for i in range(3)]
    lines += [f"    if {n!r} in f:\n        f.discard({n!r})" for n in names]
    return "\n".join(lines) + "\n"


_ns: dict[str, object] = {}
exec(compile(_feedback_source(), "<fuzz-feedback>", "exec"), _ns)  # one code location per outcome feature
feedback = atheris.instrument_func(_ns["feedback"])


def features(layer: int, st: object | None, err: ExtractError | None) -> set[str]:
    f = {f"layer:{layer}"}
    if err is not None:
        f.add(f"code:{err.code}")
        f.add(f"reason:{zlib.crc32(err.reason.split(':')[0].encode()) % REASON_BUCKETS}")
    else:
        f.add("code:ok")
        f |= {f"stat:{n}" for n in STAT_FIELDS if getattr(st, n)}
        f.add(f"entries:{min(int(st.entries).bit_length(), 23)}")
    return f


def outside_state() -> list[tuple[str, int, bytes]]:
    out = []
    for p in sorted(OUTSIDE.rglob("*")):
        st = p.lstat()
        out.append((str(p), st.st_mode, p.read_bytes() if p.is_file() and not p.is_symlink() else b""))
    return out


def seeds() -> list[bytes]:
    o = str(OUTSIDE)
    plain = [
        t.tar(t.file("a", b"hello"), t.directory("b/"), t.symlink("b/c", "/etc/passwd"),
              t.hardlink("h", "a")),
        t.tar(t.whiteout("etc", "passwd"), t.opaque("d"), t.file("d/new", b"n")),
        t.tar(t.pax({"path": "p" * 150, "SCHILY.xattr.user.x": "v"}), t.file("short", b"x")),
        t.tar(t.gnu_longname("L" * 300), t.file("short", b"x"), t.chardev("null", 1, 3)),
        t.tar(t.symlink("evil", o), t.file("evil/secret", b"x"), t.file("abs/secret", b"x")),
        t.tar(t.file("../x", b"x"), t.symlink(".", "/"), t.hardlink("hh", "../x")),
        t.tar(t.symlink("loop", "loop"), t.file("loop/x"), t.file("d/up/x", b"x")),
        t.tar(t.file("etc", b"replace dir"), t.directory("pipe/"), t.file("pipe/x")),
    ]
    return [*plain, t.gz(plain[0]), t.zst(plain[1])]


def one_input(data: bytes) -> None:
    root = SCRATCH / "root"
    if root.exists():
        shutil.rmtree(root)  # fd-based: never follows symlinks
    root.mkdir()
    split = data[0] * len(data) // 256 if data and data[0] & 1 else len(data)
    layers = [LOWER, data[1:split] if data else b"", data[split:]]
    blob = b"".join(layers)
    fd = os.memfd_create("layers")
    os.write(fd, blob)
    rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        offset = 0
        for i, layer in enumerate(layers):
            if i and not layer:
                continue
            expect = hashlib.sha256(layer).hexdigest() if i == 1 and data and data[0] & 2 else None
            try:
                st = apply_layer(rfd, LayerSource(fd, offset, len(layer), expect), LIMITS)
                assert st.blob_bytes == len(layer)
                feedback(features(i, st, None))
            except ExtractError as e:
                assert i > 0, f"the fixed lower layer failed: {e}"
                assert e.code in ("escape", "limit", "corrupt", "format", "path", "invalid"), e
                feedback(features(i, None, e))
                break
            finally:
                offset += len(layer)
    finally:
        os.close(rfd)
        os.close(fd)
    assert outside_state() == BEFORE, "something outside the root changed"


def main() -> None:
    global BEFORE
    OUTSIDE.mkdir()
    (OUTSIDE / "secret").write_bytes(b"secret")
    (OUTSIDE / "dir").mkdir()
    BEFORE = outside_state()
    corpus = SCRATCH / "corpus"
    corpus.mkdir()
    for i, s in enumerate(seeds()):
        (corpus / f"seed-{i}").write_bytes(b"\x00" + s)  # first byte: layer split / digest switches
    args = [*sys.argv, str(corpus)] if not any(not a.startswith("-") for a in sys.argv[1:]) else sys.argv
    atheris.Setup(args, one_input)
    atheris.Fuzz()


def supervise() -> int:
    """Runs the fuzzer in a child with a fresh scratch directory, and removes it afterwards."""
    scratch = tempfile.mkdtemp(prefix="img-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        env = {**os.environ, "IMG_FUZZ_SCRATCH": scratch}
        return subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env).returncode
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


BEFORE: list[tuple[str, int, bytes]] = []

if __name__ == "__main__":
    if "IMG_FUZZ_SCRATCH" in os.environ:
        main()
    else:
        sys.exit(supervise())
