"""What a well-formed layer does: OCI whiteout and opaque semantics (order-independent), replacement across
layers, duplicates, hardlinks, metadata (modes, owners, times, xattrs), FIFOs, compression, byte ranges,
progress, and equality with bsdtar on a rich tree made by GNU tar."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from img_helper.extract import LayerSource, LayerStats, apply_layer, syncfs
from tests.host.hostile import tarbuild as t
from tests.host.hostile.sandbox import Sandbox, snapshot


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Sandbox]:
    sb = Sandbox(tmp_path)
    yield sb
    sb.assert_untouched()


LOWER = t.tar(t.directory("etc/"), t.file("etc/passwd", b"root"), t.file("etc/group", b"root"),
              t.directory("d/"), t.file("d/keep", b"k"), t.directory("d/sub/"), t.file("d/sub/old", b"o"),
              t.symlink("d/link", "/etc"), t.file("gone", b"g"))


# ---------- whiteouts ----------


def test_whiteout_removes_a_lower_file(box: Sandbox) -> None:
    _, st = box.apply(LOWER, t.tar(t.whiteout("etc", "group")))
    assert "etc/group" not in box.tree() and "etc/passwd" in box.tree()
    assert st.whiteouts == 1


def test_whiteout_removes_a_lower_tree_without_following_its_symlinks(box: Sandbox) -> None:
    box.apply(LOWER, t.tar(t.whiteout("", "d")))
    assert box.tree() == {"etc": "dir", "etc/passwd": "file", "etc/group": "file", "gone": "file"}


def test_whiteout_of_a_missing_name_does_nothing(box: Sandbox) -> None:
    box.apply(LOWER, t.tar(t.whiteout("nothing/here", "x"), t.whiteout("etc", "nope")))
    assert len(box.tree()) == 9


@pytest.mark.parametrize("whiteout_first", [True, False])
def test_whiteout_never_hides_a_same_layer_file(box: Sandbox, whiteout_first: bool) -> None:
    members = [t.whiteout("", "gone"), t.file("gone", b"new")]
    box.apply(LOWER, t.tar(*(members if whiteout_first else members[::-1])))
    assert (box.root / "gone").read_bytes() == b"new"


@pytest.mark.parametrize("whiteout_first", [True, False])
def test_whiteout_and_same_layer_directory_keep_only_this_layers_children(box: Sandbox,
                                                                         whiteout_first: bool) -> None:
    members = [t.whiteout("", "d"), t.directory("d/"), t.file("d/new", b"n")]
    box.apply(LOWER, t.tar(*(members if whiteout_first else members[1:] + members[:1])))
    assert {k: v for k, v in box.tree().items() if k.startswith("d")} == {"d": "dir", "d/new": "file"}


OPAQUE_MEMBERS = [t.directory("d/"), t.opaque("d"), t.file("d/new", b"n"), t.directory("d/sub/"),
                  t.file("d/sub/fresh", b"f")]


@pytest.mark.parametrize("position", [0, 1, 2, 3, 4, 5])
def test_opaque_hides_lower_children_whatever_its_position(box: Sandbox, position: int) -> None:
    others = [m for m in OPAQUE_MEMBERS if m != t.opaque("d")]
    members = [*others[:position], t.opaque("d"), *others[position:]]
    box.apply(LOWER, t.tar(*members))
    assert {k: v for k, v in box.tree().items() if k.startswith("d")} == {
        "d": "dir", "d/new": "file", "d/sub": "dir", "d/sub/fresh": "file"}
    assert (box.root / "etc/passwd").exists()


@pytest.mark.parametrize("opaque_first", [True, False])
def test_opaque_keeps_this_layers_entries_written_through_a_symlinked_alias(box: Sandbox,
                                                                          opaque_first: bool) -> None:
    members = [t.file("alias/new", b"n"), t.opaque("d")]
    box.apply(LOWER, t.tar(t.symlink("alias", "d"), *(members[::-1] if opaque_first else members)))
    assert {k: v for k, v in box.tree().items() if k.startswith("d")} == {"d": "dir", "d/new": "file"}


def test_opaque_at_the_root_hides_every_lower_object(box: Sandbox) -> None:
    box.apply(LOWER, t.tar(t.file("only", b"x"), t.opaque("")))
    assert box.tree() == {"only": "file"}


def test_opaque_in_a_directory_absent_below_does_nothing(box: Sandbox) -> None:
    box.apply(LOWER, t.tar(t.opaque("fresh"), t.file("fresh/x", b"x")))
    assert box.tree()["fresh/x"] == "file" and len(box.tree()) == 11


def test_whiteout_in_a_later_layer_hides_what_an_earlier_layer_wrote(box: Sandbox) -> None:
    box.apply(LOWER, t.tar(t.file("d/added", b"a")), t.tar(t.whiteout("d", "added"), t.opaque("etc")))
    assert "d/added" not in box.tree() and box.tree()["etc"] == "dir"
    assert not any(k.startswith("etc/") for k in box.tree())


# ---------- replacement and duplicates ----------


def test_file_replaces_a_lower_directory_tree(box: Sandbox) -> None:
    box.apply(LOWER, t.tar(t.file("d", b"now a file")))
    assert box.tree()["d"] == "file" and not any(k.startswith("d/") for k in box.tree())


def test_directory_replaces_a_lower_file(box: Sandbox) -> None:
    box.apply(LOWER, t.tar(t.directory("gone/"), t.file("gone/x", b"x")))
    assert box.tree()["gone"] == "dir" and box.tree()["gone/x"] == "file"


def test_symlink_replaces_a_lower_directory_and_a_directory_replaces_it_back(box: Sandbox) -> None:
    box.apply(LOWER, t.tar(t.symlink("d", "/etc")))
    assert box.tree()["d"] == "symlink:/etc" and (box.root / "etc/passwd").exists()
    box.apply(t.tar(t.directory("d/", mode=0o700)))
    assert box.tree()["d"] == "dir"


def test_directory_over_directory_merges_children_and_takes_the_new_metadata(box: Sandbox) -> None:
    box.apply(LOWER, t.tar(t.directory("d/", mode=0o711, uid=7, gid=8, mtime=1_000_000),
                           t.file("d/new", b"n")))
    st = (box.root / "d").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o711, 7, 8, 1_000_000)
    assert {"d/keep", "d/new", "d/sub/old"} <= set(box.tree())


@pytest.mark.parametrize(("first", "second", "kind"), [
    (t.file("x", b"one"), t.file("x", b"two"), "file"),
    (t.file("x", b"one"), t.directory("x/"), "dir"),
    (t.directory("x/"), t.file("x", b"two"), "file"),
    (t.symlink("x", "/etc"), t.file("x", b"two"), "file"),
    (t.file("x", b"one"), t.symlink("x", "/etc"), "symlink:/etc"),
    (t.fifo("x"), t.file("x", b"two"), "file"),
])
def test_duplicate_entries_the_later_wins(box: Sandbox, first: bytes, second: bytes, kind: str) -> None:
    box.apply(t.tar(first, second))
    assert box.tree() == {"x": kind}
    if kind == "file":
        assert (box.root / "x").read_bytes() == b"two"


def test_implicit_parent_directories_are_created(box: Sandbox) -> None:
    box.apply(t.tar(t.file("a/b/c/d", b"x")))
    assert box.tree() == {"a": "dir", "a/b": "dir", "a/b/c": "dir", "a/b/c/d": "file"}
    assert stat.S_IMODE((box.root / "a/b").stat().st_mode) == 0o755


# ---------- hardlinks ----------


def test_hardlinks_share_an_inode(box: Sandbox) -> None:
    [st] = box.apply(t.tar(t.file("bin/a", b"data", mode=0o755), t.hardlink("bin/b", "bin/a"),
                           t.hardlink("usr/c", "./bin/a"), t.hardlink("/d", "/bin/b")))
    inodes = {(box.root / p).stat().st_ino for p in ("bin/a", "bin/b", "usr/c", "d")}
    assert len(inodes) == 1 and (box.root / "bin/a").stat().st_nlink == 4
    assert st.hardlinks == 3


def test_hardlink_to_a_lower_layer_file_and_over_an_existing_file(box: Sandbox) -> None:
    box.apply(LOWER, t.tar(t.hardlink("gone", "etc/passwd"), t.hardlink("etc/passwd", "etc/passwd")))
    assert (box.root / "gone").stat().st_ino == (box.root / "etc/passwd").stat().st_ino
    assert (box.root / "gone").stat().st_nlink == 2


# ---------- metadata ----------


def test_modes_owners_and_times(box: Sandbox) -> None:
    box.apply(t.tar(
        t.pax({"mtime": "1600000000.123456789", "atime": "1500000000.5"}),
        t.file("f", b"x", mode=0o640, uid=1234, gid=5678),
        t.directory("dir/", mode=0o2775, uid=10, gid=20, mtime=1_234_567_890),
        t.file("dir/child", b"c"),  # adding a child must not leave the directory's mtime at "now"
        t.symlink("dir/link", "../f", uid=33, gid=44, mtime=1_111_111_111),
        t.fifo("dir/pipe", mode=0o620, uid=3, gid=4),
    ))
    f = (box.root / "f").stat()
    assert (stat.S_IMODE(f.st_mode), f.st_uid, f.st_gid) == (0o640, 1234, 5678)
    assert f.st_mtime_ns == 1_600_000_000_123_456_789 and f.st_atime_ns == 1_500_000_000_500_000_000
    d = (box.root / "dir").stat()
    assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid, d.st_mtime) == (0o2775, 10, 20, 1_234_567_890)
    ln = (box.root / "dir/link").lstat()
    assert (ln.st_uid, ln.st_gid, ln.st_mtime) == (33, 44, 1_111_111_111)
    p = (box.root / "dir/pipe").lstat()
    assert stat.S_ISFIFO(p.st_mode) and (stat.S_IMODE(p.st_mode), p.st_uid, p.st_gid) == (0o620, 3, 4)


def test_user_xattrs_and_file_capabilities_are_applied(box: Sandbox) -> None:
    cap = bytes.fromhex("0100000200200000000000000000000000000000")
    box.apply(t.tar(t.pax({"SCHILY.xattr.user.mime": "text/plain", "SCHILY.xattr.security.capability": cap}),
                    t.file("bin/ping", b"x", mode=0o755, uid=0),
                    t.pax({"SCHILY.xattr.user.dir": "1"}), t.directory("var/")))
    assert os.getxattr(box.root / "bin/ping", "user.mime") == b"text/plain"
    assert os.getxattr(box.root / "bin/ping", "security.capability") == cap
    assert os.getxattr(box.root / "var", "user.dir") == b"1"


# ---------- sources ----------


def test_gzip_and_zstd_layers_with_digests_at_offsets_in_one_fd(box: Sandbox) -> None:
    layers = [t.gz(t.tar(t.file("a", b"gzip"))), t.zst(t.tar(t.file("b", b"zstd"))),
              t.tar(t.file("c", b"plain"))]
    digests = [hashlib.sha256(layer).hexdigest() for layer in layers]
    stats = box.apply(*layers, expect=[f"sha256:{digests[0]}", digests[1].upper(), digests[2]])
    assert [s.blob_sha256 for s in stats] == digests
    assert [s.blob_bytes for s in stats] == [len(layer) for layer in layers]
    assert {p: (box.root / p).read_bytes() for p in "abc"} == {"a": b"gzip", "b": b"zstd", "c": b"plain"}


def test_gnu_tar_record_padding_is_trailing_data(box: Sandbox, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x")
    blob = subprocess.run(["tar", "-C", str(tmp_path / "src"), "-cf", "-", "f"], capture_output=True,
                          check=True).stdout
    assert len(blob) == 10240
    [st] = box.apply(blob)
    assert st.trailing_bytes > 0 and st.blob_bytes == 10240 and box.tree() == {"f": "file"}


def test_sparse_file_from_gnu_tar(box: Sandbox, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(5 << 20)
        f.write(b"middle")
        f.truncate(12 << 20)
    for fmt in ("gnu", "posix"):
        blob = subprocess.run(["tar", "-C", str(src), "--sparse", f"--format={fmt}", "-cf", "-", "sparse"],
                              capture_output=True, check=True).stdout
        box.apply(blob)
        out = box.root / "sparse"
        assert out.stat().st_size == 12 << 20 and out.stat().st_blocks * 512 < 1 << 20
        with open(out, "rb") as f:
            f.seek(5 << 20)
            assert f.read(6) == b"middle"


def test_progress_reports_growing_counts_and_the_final_stats(box: Sandbox) -> None:
    blob = box.blobs / "many"
    blob.write_bytes(t.tar(*(t.file(f"d{i % 7}/f{i}", b"x" * 100) for i in range(5000))))
    seen: list[LayerStats] = []
    fd, root = os.open(blob, os.O_RDONLY), os.open(box.root, os.O_RDONLY)
    try:
        final = apply_layer(root, LayerSource(fd), progress=seen.append)
        syncfs(root)
    finally:
        os.close(fd)
        os.close(root)
    assert len(seen) >= 3 and seen[-1] == final
    assert [s.entries for s in seen] == sorted(s.entries for s in seen)
    assert final.entries == final.files == 5000 and final.bytes == 500_000


# ---------- equality with bsdtar on a rich tree ----------


def make_rich_tree(top: Path) -> None:
    top.mkdir()
    (top / "etc").mkdir()
    (top / "etc/passwd").write_text("root:x:0:0\n")
    (top / "bin").mkdir()
    (top / "bin/su").write_bytes(b"\x7fELF" + os.urandom(70_000))
    os.chmod(top / "bin/su", 0o4755)
    os.link(top / "bin/su", top / "bin/su2")
    os.symlink("/etc/passwd", top / "bin/abs")
    os.symlink("../etc", top / "bin/rel")
    os.mkfifo(top / "bin/fifo", 0o600)
    (top / "tmp").mkdir(mode=0o1777)
    os.chmod(top / "tmp", 0o1777)
    deep = top / ("long-directory-name-" * 6) / ("again-" * 20)
    deep.mkdir(parents=True)
    (deep / ("file-" * 30)).write_bytes(b"long name")
    (top / "unicode-é✓").write_text("utf-8 name")
    (top / "owned").write_bytes(b"o")
    os.chown(top / "owned", 4242, 4343)
    os.lchown(top / "bin/abs", 7, 8)
    os.setxattr(top / "etc/passwd", "user.k", b"v")
    cap = bytes.fromhex("0100000200200000000000000000000000000000")
    os.setxattr(top / "bin/su", "security.capability", cap)
    os.utime(top / "etc", ns=(1_000_000_000_000_000_000, 1_000_000_001_000_000_000))
    os.utime(top / "owned", ns=(1_600_000_000_100_000_000, 1_600_000_000_200_000_000))


def test_matches_bsdtar_on_a_rich_tree_made_by_gnu_tar(box: Sandbox, tmp_path: Path) -> None:
    src = tmp_path / "rich"
    make_rich_tree(src)
    blob = subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--format=pax", "-C", str(src),
                           "-cf", "-", "."], capture_output=True, check=True).stdout
    [st] = box.apply(blob)
    ref = tmp_path / "bsdtar"
    ref.mkdir()
    subprocess.run(["bsdtar", "--xattrs", "-xpf", "-", "-C", str(ref)], input=blob, check=True)
    ours, theirs = snapshot(box.root), snapshot(ref)
    # bsdtar leaves the root's own mtime alone; we apply the "./" entry like any directory's
    del theirs["."]
    assert {k: v for k, v in ours.items() if k != "."} == theirs
    assert ours == snapshot(src)  # mtimes included (atime is not compared: reading moves it)
    assert st.hardlinks == 1 and st.fifos == 1 and st.xattrs == 2
    shutil.rmtree(ref)


def test_files_in_a_setgid_directory_get_the_archived_group_not_the_inherited_one(box: Sandbox) -> None:
    box.apply(t.tar(t.directory("var/mail/", mode=0o2775, gid=8), t.file("var/mail/root", b"r", gid=0),
                    t.file("var/mail/mail", b"m", gid=8), t.directory("var/mail/sub/", gid=0)))
    assert (box.root / "var/mail").stat().st_gid == 8
    assert (box.root / "var/mail/root").stat().st_gid == 0
    assert (box.root / "var/mail/mail").stat().st_gid == 8
    assert (box.root / "var/mail/sub").stat().st_gid == 0


def test_the_callers_umask_does_not_change_archived_modes(box: Sandbox) -> None:
    old = os.umask(0o077)
    try:
        box.apply(t.tar(t.file("f", b"x", mode=0o644), t.directory("d/", mode=0o755),
                        t.file("d/g", mode=0o777), t.fifo("p", mode=0o666)))
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE((box.root / p).lstat().st_mode) for p in ("f", "d", "d/g", "p")}
    assert modes == {"f": 0o644, "d": 0o755, "d/g": 0o777, "p": 0o666}


def test_progress_runs_during_a_big_file_and_can_cancel_it(box: Sandbox) -> None:
    from img_helper import extract

    blob = box.blobs / "big"
    blob.write_bytes(t.tar(t.file("big", bytes(200 << 20))))
    calls: list[int] = []

    def progress(st: LayerStats) -> None:
        calls.append(st.bytes)
        if st.bytes >= 128 << 20:
            raise KeyboardInterrupt

    fd, root = os.open(blob, os.O_RDONLY), os.open(box.root, os.O_RDONLY)
    try:
        with pytest.raises(KeyboardInterrupt):
            apply_layer(root, LayerSource(fd), progress=progress)
    finally:
        os.close(fd)
        os.close(root)
    assert len(calls) >= 2 and calls[-1] < 200 << 20
    assert (box.root / "big").stat().st_size < 200 << 20
    assert extract.PROGRESS_BYTES <= 64 << 20
