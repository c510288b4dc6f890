"""The hostile corpus: every test is an attack on the layer extractor, named after it. Each asserts the
typed outcome AND that nothing outside the root changed (the sandbox snapshots root-evil/ and outside/,
and checks host canaries such as /etc/img-hostile-pwned); many also assert the exact resulting tree."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from img_helper.extract import ExtractError, LayerSource, LayerStats, Limits, apply_layer
from tests.host.hostile import tarbuild as t
from tests.host.hostile.sandbox import Sandbox


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Sandbox]:
    sb = Sandbox(tmp_path)
    yield sb
    sb.assert_untouched()


def refused(box: Sandbox, code: str, *layers: bytes, limits: Limits | None = None) -> ExtractError:
    with pytest.raises(ExtractError) as info:
        box.apply(*layers, limits=limits)
    assert info.value.code == code, info.value
    box.assert_untouched()
    return info.value


def applied(box: Sandbox, *layers: bytes, limits: Limits | None = None) -> list[LayerStats]:
    stats = box.apply(*layers, limits=limits)
    box.assert_untouched()
    return stats


# ---------- names that leave the root ----------


def test_dotdot_name_is_refused(box: Sandbox) -> None:
    e = refused(box, "escape", t.tar(t.file("../outside/secret", b"pwned")))
    assert e.entry == "../outside/secret"
    assert box.tree() == {}


def test_dotdot_in_the_middle_of_a_name_is_refused(box: Sandbox) -> None:
    refused(box, "escape", t.tar(t.directory("a/"), t.file("a/../../outside/pwned", b"x")))
    assert box.tree() == {"a": "dir"}


def test_dotdot_after_many_components_is_refused_even_if_it_stays_inside(box: Sandbox) -> None:
    refused(box, "escape", t.tar(t.file("a/b/c/../d", b"x")))


def test_absolute_name_lands_inside_the_root(box: Sandbox) -> None:
    target = f"{box.outside}/secret"  # /tmp/.../outside/secret on the host
    applied(box, t.tar(t.file(target, b"pwned"), t.file("/img-hostile-pwned", b"x")))
    inside = box.root / target.lstrip("/")
    assert inside.read_bytes() == b"pwned"
    assert (box.root / "img-hostile-pwned").read_bytes() == b"x"


def test_sibling_prefix_escape_dest_vs_dest_evil(box: Sandbox) -> None:
    refused(box, "escape", t.tar(t.file("../root-evil/sentinel", b"pwned")))
    # through a symlink: "../root-evil" is clamped at the root, so it names root/root-evil
    e = refused(box, "path", t.tar(t.symlink("link", "../root-evil"), t.file("link/sentinel", b"inside")))
    assert "dangling" in e.reason
    applied(box, t.tar(t.directory("root-evil/"), t.file("link/sentinel", b"inside")))
    assert (box.root / "root-evil" / "sentinel").read_bytes() == b"inside"


# ---------- symlinks, then writes through them ----------


def test_symlink_to_etc_then_write_through_stays_inside(box: Sandbox) -> None:
    applied(box, t.tar(t.directory("etc/"), t.symlink("evil", "/etc"),
                       t.file("evil/img-hostile-pwned", b"pwned")))
    assert (box.root / "etc" / "img-hostile-pwned").read_bytes() == b"pwned"
    assert box.tree() == {"evil": "symlink:/etc", "etc": "dir", "etc/img-hostile-pwned": "file"}


def test_write_through_a_dangling_symlink_is_a_path_error(box: Sandbox) -> None:
    e = refused(box, "path", t.tar(t.symlink("evil", "/etc"), t.file("evil/img-hostile-pwned", b"pwned")))
    assert "dangling" in e.reason
    assert box.tree() == {"evil": "symlink:/etc"}


def test_symlink_to_absolute_outside_then_write_through_stays_inside(box: Sandbox) -> None:
    applied(box, t.tar(t.directory(f"{box.outside}/"), t.symlink("evil", str(box.outside)),
                       t.file("evil/secret", b"pwned")))
    assert (box.root / str(box.outside).lstrip("/") / "secret").read_bytes() == b"pwned"


def test_relative_symlink_climbing_above_the_root_is_clamped(box: Sandbox) -> None:
    applied(box, t.tar(t.directory("outside/"), t.directory("a/"),
                       t.symlink("a/up", "../../../../../../outside"),
                       t.file("a/up/secret", b"pwned")))
    assert (box.root / "outside" / "secret").read_bytes() == b"pwned"


def test_symlink_then_write_through_in_a_later_layer(box: Sandbox) -> None:
    applied(box, t.tar(t.directory(f"{box.outside}/"), t.symlink("evil", str(box.outside))),
            t.tar(t.file("evil/secret", b"pwned")))
    assert (box.root / str(box.outside).lstrip("/") / "secret").read_bytes() == b"pwned"


def test_symlink_chain_to_outside_stays_inside(box: Sandbox) -> None:
    applied(box, t.tar(t.directory(f"{box.outside}/"), t.symlink("a", "b"), t.symlink("b", "c/d"),
                       t.directory("c/"),
                       t.symlink("c/d", "/../.." + str(box.outside)), t.file("a/secret", b"pwned")))
    assert (box.root / str(box.outside).lstrip("/") / "secret").read_bytes() == b"pwned"


def test_symlink_loop_then_write_through_is_a_path_error(box: Sandbox) -> None:
    e = refused(box, "path", t.tar(t.symlink("loop", "loop"), t.file("loop/x", b"x")))
    assert e.entry == "loop/x"


def test_symlink_mutual_loop_then_write_through_is_a_path_error(box: Sandbox) -> None:
    refused(box, "path", t.tar(t.symlink("a", "b"), t.symlink("b", "/a"), t.file("a/x", b"x")))


def test_file_over_a_symlink_replaces_the_link_not_its_target(box: Sandbox) -> None:
    applied(box, t.tar(t.symlink("f", f"{box.outside}/secret")), t.tar(t.file("f", b"pwned")))
    assert box.tree() == {"f": "file"}


def test_directory_over_a_symlink_replaces_the_link(box: Sandbox) -> None:
    applied(box, t.tar(t.symlink("d", str(box.outside))), t.tar(t.directory("d/", mode=0o700)))
    assert box.tree() == {"d": "dir"}
    assert stat.S_IMODE((box.root / "d").stat().st_mode) == 0o700


def test_directory_replaced_by_a_symlink_then_written_through_in_a_later_layer(box: Sandbox) -> None:
    applied(box,
            t.tar(t.directory("d/"), t.file("d/old", b"old"), t.directory(f"{box.outside}/dir/")),
            t.tar(t.symlink("d", str(box.outside))),
            t.tar(t.file("d/secret", b"pwned"), t.file("d/dir/keep", b"pwned")))
    inside = box.root / str(box.outside).lstrip("/")
    assert (inside / "secret").read_bytes() == b"pwned"
    assert (inside / "dir" / "keep").read_bytes() == b"pwned"
    assert os.readlink(box.root / "d") == str(box.outside)


def test_root_entry_as_a_symlink_cve_2021_29136(box: Sandbox) -> None:
    e = refused(box, "escape", t.tar(t.symlink(".", "/"), t.file("etc/img-hostile-pwned", b"x")))
    assert "root" in e.reason
    assert box.tree() == {}
    assert not box.root.is_symlink()


@pytest.mark.parametrize("name", [".", "./", "/", "./.", "//", "./././"])
def test_root_entry_as_a_non_directory_is_refused(box: Sandbox, name: str) -> None:
    # libarchive itself calls a regular file named "x/" with data damaged
    assert refused_any(box, t.tar(t.file(name, b"x"))).code in ("escape", "corrupt")
    refused(box, "escape", t.tar(t.symlink(name, str(box.outside))))
    refused(box, "escape", t.tar(t.hardlink(name, "x")))


def test_root_entry_as_a_directory_only_changes_the_roots_metadata(box: Sandbox) -> None:
    applied(box, t.tar(t.directory("./", mode=0o751)))
    assert stat.S_IMODE(box.root.stat().st_mode) == 0o751


# ---------- hardlinks ----------


def test_hardlink_to_an_absolute_outside_path_resolves_inside(box: Sandbox) -> None:
    e = refused(box, "path", t.tar(t.hardlink("h", f"{box.outside}/secret")))
    assert "hardlink target" in e.reason
    assert (box.outside / "secret").stat().st_nlink == 1


def test_hardlink_with_dotdot_target_is_refused(box: Sandbox) -> None:
    refused(box, "escape", t.tar(t.hardlink("h", "../outside/secret")))
    assert (box.outside / "secret").stat().st_nlink == 1


def test_hardlink_through_a_symlink_to_outside_resolves_inside(box: Sandbox) -> None:
    refused(box, "path", t.tar(t.symlink("evil", str(box.outside)), t.hardlink("h", "evil/secret")))
    assert (box.outside / "secret").stat().st_nlink == 1


def test_hardlink_through_a_symlink_to_an_inside_file_links_that_file(box: Sandbox) -> None:
    applied(box, t.tar(t.file("etc/passwd", b"root:x:0:0"), t.symlink("evil", "/etc"),
                       t.hardlink("h", "evil/passwd")))
    assert (box.root / "h").stat().st_ino == (box.root / "etc" / "passwd").stat().st_ino


def test_hardlink_to_a_symlink_links_the_symlink_and_a_later_write_replaces_it(box: Sandbox) -> None:
    applied(box, t.tar(t.symlink("s", f"{box.outside}/secret"), t.hardlink("h", "s")),
            t.tar(t.file("h", b"pwned")))
    assert box.tree() == {"s": f"symlink:{box.outside}/secret", "h": "file"}


def test_file_over_a_hardlink_does_not_write_into_the_linked_inode(box: Sandbox) -> None:
    applied(box, t.tar(t.file("etc/shadow", b"root:*:")),
            t.tar(t.hardlink("h", "etc/shadow"), t.file("h", b"root::0:")))
    assert (box.root / "etc/shadow").read_bytes() == b"root:*:"
    assert (box.root / "h").read_bytes() == b"root::0:" and (box.root / "etc/shadow").stat().st_nlink == 1


def test_hardlink_carrying_data_does_not_write_into_its_target(box: Sandbox) -> None:
    data = b"root::0:0"
    link_with_data = t.header("h", t.LNK, size=len(data), linkname="etc/shadow") + t.pad(data)
    # pax archives may carry data on a hardlink (libarchive reads it then); ustar ones may not
    applied(box, t.tar(t.file("etc/shadow", b"root:*:"), t.pax({"size": str(len(data))}), link_with_data))
    assert (box.root / "etc/shadow").read_bytes() == b"root:*:"
    assert (box.root / "h").stat().st_ino == (box.root / "etc/shadow").stat().st_ino


def test_hardlink_to_the_root_is_refused(box: Sandbox) -> None:
    refused(box, "escape", t.tar(t.hardlink("h", "./")))


def test_hardlink_to_a_directory_is_a_path_error(box: Sandbox) -> None:
    refused(box, "path", t.tar(t.directory("d/"), t.hardlink("h", "d")))


def test_hardlink_to_a_missing_target_is_a_path_error(box: Sandbox) -> None:
    refused(box, "path", t.tar(t.hardlink("h", "nothing/here")))


def test_hardlink_via_pax_linkpath_with_dotdot_is_refused(box: Sandbox) -> None:
    refused(box, "escape", t.tar(t.pax({"linkpath": "../outside/secret"}), t.hardlink("h", "safe")))


# ---------- whiteouts ----------


def test_whiteout_with_an_empty_name_is_refused(box: Sandbox) -> None:
    applied(box, t.tar(t.file("d/keep", b"k")))
    refused(box, "escape", t.tar(t.file("d/.wh.")))
    assert box.tree() == {"d": "dir", "d/keep": "file"}


def test_whiteout_of_dot_is_refused(box: Sandbox) -> None:
    applied(box, t.tar(t.file("d/keep", b"k")))
    refused(box, "escape", t.tar(t.file("d/.wh..")))
    assert box.tree() == {"d": "dir", "d/keep": "file"}


def test_whiteout_of_dotdot_is_refused(box: Sandbox) -> None:
    applied(box, t.tar(t.file("d/keep", b"k")))
    refused(box, "escape", t.tar(t.file("d/.wh...")))
    assert box.tree() == {"d": "dir", "d/keep": "file"}


def test_whiteout_with_an_escaping_parent_is_refused(box: Sandbox) -> None:
    refused(box, "escape", t.tar(t.whiteout("..", "outside")))
    refused(box, "escape", t.tar(t.whiteout("a/../..", "root-evil")))


def test_whiteout_through_a_symlinked_parent_stays_inside(box: Sandbox) -> None:
    applied(box, t.tar(t.symlink("evil", str(box.outside)), t.file(f"{box.outside}/secret", b"in")),
            t.tar(t.whiteout("evil", "secret"), t.whiteout("evil", "dir")))
    assert not (box.root / str(box.outside).lstrip("/") / "secret").exists()


def test_whiteout_under_a_symlink_loop_is_a_path_error(box: Sandbox) -> None:
    refused(box, "path", t.tar(t.symlink("loop", "loop")), t.tar(t.whiteout("loop", "x")))


def test_whiteout_of_a_symlink_removes_the_link_not_its_target(box: Sandbox) -> None:
    applied(box, t.tar(t.file("data/keep", b"k"), t.symlink("l", "/data"), t.symlink("o", str(box.outside))),
            t.tar(t.whiteout("", "l"), t.whiteout("", "o")))
    assert box.tree() == {"data": "dir", "data/keep": "file"}


def test_opaque_under_a_symlinked_dir_stays_inside(box: Sandbox) -> None:
    applied(box, t.tar(t.symlink("link", str(box.outside)), t.file(f"{box.outside}/secret", b"in")),
            t.tar(t.opaque("link")))
    assert (box.root / str(box.outside).lstrip("/")).is_dir()
    assert not (box.root / str(box.outside).lstrip("/") / "secret").exists()


def test_opaque_of_a_symlink_to_a_real_dir_never_follows_deeper_symlinks(box: Sandbox) -> None:
    applied(box, t.tar(t.file("real/f", b"f"), t.symlink("real/out", str(box.outside)),
                       t.symlink("link", "real")),
            t.tar(t.opaque("link")))
    assert box.tree() == {"real": "dir", "link": "symlink:real"}


# ---------- devices, setuid, xattrs: the policies ----------


def test_device_nodes_only_the_harmless_defaults(box: Sandbox) -> None:
    [st] = applied(box, t.tar(t.chardev("dev/null", 1, 3), t.chardev("dev/mem", 1, 1),
                              t.chardev("dev/kmsg", 1, 11), t.blockdev("dev/sda", 8, 0),
                              t.chardev("dev/zero", 1, 5), t.chardev("wh", 0, 0)))
    assert st.devices == 2 and st.devices_skipped == 4
    assert box.tree() == {"dev": "dir", "dev/null": "chr", "dev/zero": "chr"}
    assert os.major((box.root / "dev/null").stat().st_rdev) == 1


def test_setuid_and_setgid_files_keep_their_bits_and_owner(box: Sandbox) -> None:
    applied(box, t.tar(t.file("bin/su", b"\x7fELF", mode=0o4755, uid=0, gid=0),
                       t.file("bin/wall", b"\x7fELF", mode=0o2755, uid=0, gid=5),
                       t.directory("tmp/", mode=0o1777),
                       t.file("bin/own", b"x", mode=0o6750, uid=1000, gid=1000)))
    assert stat.S_IMODE((box.root / "bin/su").stat().st_mode) == 0o4755
    assert stat.S_IMODE((box.root / "bin/wall").stat().st_mode) == 0o2755
    assert (box.root / "bin/wall").stat().st_gid == 5
    assert stat.S_IMODE((box.root / "tmp").stat().st_mode) == 0o1777
    own = (box.root / "bin/own").stat()
    assert (stat.S_IMODE(own.st_mode), own.st_uid, own.st_gid) == (0o6750, 1000, 1000)


def test_security_xattrs_other_than_capabilities_are_dropped(box: Sandbox) -> None:
    cap = bytes.fromhex("0000000200200000000000000000000000000000")  # cap_net_raw+ep, v2
    [st] = applied(box, t.tar(t.pax({"SCHILY.xattr.security.capability": cap,
                                      "SCHILY.xattr.security.selinux": "system_u:object_r:shadow_t:s0",
                                      "SCHILY.xattr.trusted.overlay.opaque": "y",
                                      "SCHILY.xattr.user.note": "kept"}),
                              t.file("bin/ping", b"\x7fELF", mode=0o755)))
    names = set(os.listxattr(box.root / "bin/ping"))
    assert "security.capability" in names and "user.note" in names
    assert "trusted.overlay.opaque" not in names
    assert os.getxattr(box.root / "bin/ping", "security.capability") == cap
    assert st.xattrs == 2 and st.xattrs_dropped >= 2  # selinux may be refused by the fs or by us


@pytest.mark.parametrize("name,value", [("user." + "n" * 300, b"v"), ("security.capability", b"\x01garbage")],
                         ids=["name-too-long", "malformed-capability"])
def test_unusable_xattr_from_a_hostile_header_is_invalid(box: Sandbox, name: str, value: bytes) -> None:
    """The kernel refuses an over-long name or a malformed capability: that is the input's fault
    ("invalid", never retried), not a failing system ("io")."""
    e = refused(box, "invalid", t.tar(t.pax({f"SCHILY.xattr.{name}": value}), t.file("f", b"x")))
    assert name[:20] in e.reason


def test_xattrs_on_a_symlink_are_dropped(box: Sandbox) -> None:
    [st] = applied(box, t.tar(t.pax({"SCHILY.xattr.user.x": "v"}), t.symlink("l", "/etc")))
    assert st.xattrs_dropped == 1 and os.listxattr(box.root / "l", follow_symlinks=False) == []


# ---------- sizes, limits, bombs ----------


def test_huge_size_in_header_is_a_limit_before_any_read(box: Sandbox) -> None:
    e = refused(box, "limit", t.tar(t.header("big", t.REG, size=1 << 50)))
    assert e.entry == "big" and "max_file_bytes" in e.reason
    assert box.tree() == {}


def test_huge_size_in_header_with_missing_data_is_corrupt(box: Sandbox) -> None:
    refused(box, "corrupt", t.tar(t.header("big", t.REG, size=1 << 30), end=False),
            limits=Limits(max_file_bytes=1 << 40, max_total_bytes=1 << 40))


def test_negative_base256_size_is_corrupt(box: Sandbox) -> None:
    e = refused_any(box, t.tar(t.header("neg", t.REG, raw_size=b"\xff" * 12)))
    assert e.code in ("corrupt", "limit")


def refused_any(box: Sandbox, *layers: bytes) -> ExtractError:
    with pytest.raises(ExtractError) as info:
        box.apply(*layers)
    box.assert_untouched()
    return info.value


def sparse_member(name: str, realsize: int, offset: int) -> bytes:
    """A GNU sparse 1.0 member (pax): one 512-byte data region at offset, logical size realsize."""
    meta = t.pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                  "GNU.sparse.realsize": str(realsize)})
    body = t.pad(b"1\n%d\n512\n" % offset) + b"A" * 512
    return meta + t.header(f"GNUSparseFile.0/{name}", t.REG, size=len(body)) + body


def test_sparse_file_with_a_huge_logical_size_is_a_limit(box: Sandbox) -> None:
    e = refused(box, "limit", t.tar(sparse_member("s", 1 << 50, 0)))
    assert e.entry == "s"


def test_sparse_map_pointing_beyond_the_file_is_corrupt(box: Sandbox) -> None:
    e = refused(box, "corrupt", t.tar(sparse_member("s", 1024, 1 << 40)))
    assert "beyond" in e.reason
    assert not (box.root / "s").exists() or (box.root / "s").stat().st_size <= 1024


def test_total_bytes_limit_names_the_entry(box: Sandbox) -> None:
    e = refused(box, "limit", t.tar(t.file("a", b"x" * 600), t.file("b", b"y" * 600)),
                limits=Limits(max_total_bytes=1000))
    assert e.entry == "b" and "max_total_bytes" in e.reason


def test_entry_count_bomb_is_bounded(box: Sandbox) -> None:
    bomb = t.tar(*(t.file(f"f{i}") for i in range(500)))
    e = refused(box, "limit", bomb, limits=Limits(max_entries=100))
    assert e.entry == "f100" and "max_entries" in e.reason
    assert len(box.tree()) == 100


def test_deep_path_bomb_is_bounded(box: Sandbox) -> None:
    deep = "/".join(["d"] * 200)
    refused(box, "limit", t.tar(t.pax({"path": deep + "/f"}), t.file("short")))
    assert box.tree() == {}


def test_long_name_bomb_is_bounded(box: Sandbox) -> None:
    e = refused(box, "limit", t.tar(t.gnu_longname("n" * 5000), t.file("short")))
    assert e.entry == "n" * 511  # the error names the entry, truncated safely
    refused(box, "limit", t.tar(t.pax({"path": "a/" * 100 + "x"}), t.file("short")),
            limits=Limits(max_path_len=64))


def test_long_symlink_target_is_bounded(box: Sandbox) -> None:
    refused(box, "limit", t.tar(t.pax({"linkpath": "/x" * 3000}), t.symlink("l", "short")))


def test_oversized_pax_header_is_bounded(box: Sandbox) -> None:
    e = refused(box, "limit", t.tar(t.pax({"comment": "c" * 20000}), t.file("x")),
                limits=Limits(max_header_bytes=8192))
    assert "max_header_bytes" in e.reason


def test_huge_pax_header_beyond_libarchive_is_corrupt(box: Sandbox) -> None:
    refused(box, "corrupt", t.tar(t.pax({"comment": "c" * (3 << 20)}), t.file("x")))


def test_xattr_bomb_is_bounded(box: Sandbox) -> None:
    many = {f"SCHILY.xattr.user.{i}": "v" * 1000 for i in range(10)}
    refused(box, "limit", t.tar(t.pax(many), t.file("x")),
            limits=Limits(max_xattr_bytes=4096))
    assert box.tree() == {}


def test_gzip_bomb_is_bounded_by_the_file_limit(box: Sandbox) -> None:
    size = 256 << 20
    bomb = t.gz(t.header("zeros", t.REG, size=size) + bytes(size) + bytes(1024))
    assert len(bomb) < 512 << 10
    e = refused(box, "limit", bomb, limits=Limits(max_file_bytes=1 << 20))
    assert e.entry == "zeros"
    assert box.tree() == {}


def test_gzip_bomb_of_many_files_is_bounded_by_the_total(box: Sandbox) -> None:
    one = 4 << 20
    members = b"".join(t.header(f"z{i}", t.REG, size=one) + bytes(one) for i in range(16))
    refused(box, "limit", t.gz(members + bytes(1024)), limits=Limits(max_total_bytes=10 << 20))
    assert len(box.tree()) <= 3


def test_zstd_bomb_is_bounded(box: Sandbox) -> None:
    size = 256 << 20
    bomb = t.zst(t.header("zeros", t.REG, size=size) + bytes(size) + bytes(1024))
    assert len(bomb) < 512 << 10
    refused(box, "limit", bomb, limits=Limits(max_file_bytes=1 << 20))


# ---------- malformed archives ----------


def test_truncated_archive_mid_data_is_corrupt(box: Sandbox) -> None:
    whole = t.tar(t.file("a", b"x" * 5000))
    e = refused(box, "corrupt", whole[:2048])
    assert e.entry == "a"


def test_truncated_header_is_corrupt(box: Sandbox) -> None:
    refused(box, "corrupt", t.tar(t.file("a", b"x")) [:512 + 512 + 100])


def test_corrupt_header_checksum_is_refused(box: Sandbox) -> None:
    good = t.tar(t.file("a", b"x"), t.file("b", b"y"))
    bad = bytearray(good)
    bad[1024 + 10] ^= 0xFF  # inside b's name: its checksum no longer matches
    e = refused_any(box, bytes(bad))
    assert e.code == "corrupt"
    assert box.tree() == {"a": "file"}


def test_corrupt_gzip_stream_is_refused(box: Sandbox) -> None:
    blob = bytearray(t.gz(t.tar(*(t.file(f"f{i}", b"compressible text %d\n" % i * 200) for i in range(20)))))
    blob[len(blob) // 2] ^= 0xFF
    refused(box, "corrupt", bytes(blob))


def test_truncated_gzip_stream_is_corrupt(box: Sandbox) -> None:
    blob = t.gz(t.tar(*(t.file(f"f{i}", b"text %d\n" % i * 3000) for i in range(20))))
    refused(box, "corrupt", blob[: len(blob) // 2])


def test_corrupt_zstd_stream_is_refused(box: Sandbox) -> None:
    blob = bytearray(t.zst(t.tar(*(t.file(f"f{i}", b"text %d\n" % i * 3000) for i in range(20)))))
    blob[len(blob) // 2] ^= 0xFF
    refused(box, "corrupt", bytes(blob))


def test_compressed_garbage_after_the_tar_end_is_hashed_never_inflated(box: Sandbox) -> None:
    """A gzip bomb after the end marker: the tar is complete, the rest is only hashed."""
    import hashlib

    blob = t.gz(t.tar(t.file("a", b"x")) + bytes(64 << 20)) + b"garbage"
    [st] = box.apply(blob, expect=[hashlib.sha256(blob).hexdigest()])
    assert box.tree() == {"a": "file"} and st.blob_bytes == len(blob) and st.trailing_bytes > 0


def test_corrupt_gzip_stored_block_is_caught_by_the_digest(box: Sandbox) -> None:
    """libarchive does not check the gzip CRC: a flipped byte in a stored (incompressible) block decodes
    to different content. The layer digest is what catches it."""
    import hashlib
    import random

    noise = random.Random(20261204)  # fixed: which byte the flip hits must not vary between runs
    good = t.gz(t.tar(*(t.file(f"f{i}", noise.randbytes(2000)) for i in range(20))))
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(ExtractError) as info:
        box.apply(bytes(bad), expect=[hashlib.sha256(good).hexdigest()])
    assert info.value.code == "digest"


def test_not_a_tar_is_a_format_error(box: Sandbox) -> None:
    refused(box, "format", b"PK\x03\x04 this is a zip" + bytes(2000))
    refused(box, "format", b"")


@pytest.mark.parametrize("tool", ["bzip2", "xz"])
def test_compressions_other_than_gzip_and_zstd_are_refused(box: Sandbox, tool: str) -> None:
    data = t.tar(t.file("a", b"x"))
    packed = subprocess.run([tool, "-c"], input=data, capture_output=True, check=True).stdout
    refused(box, "format", packed)


def test_blob_shorter_than_its_declared_length_is_corrupt(box: Sandbox) -> None:
    layer = t.tar(t.file("a", b"x"))
    blob = box.blobs / "short"
    blob.write_bytes(layer)
    fd, root = os.open(blob, os.O_RDONLY), os.open(box.root, os.O_RDONLY)
    try:
        from img_helper.extract import LayerSource, apply_layer

        with pytest.raises(ExtractError) as info:
            apply_layer(root, LayerSource(fd, 0, len(layer) + 4096))
        assert info.value.code == "corrupt" and "declared length" in info.value.reason
    finally:
        os.close(fd)
        os.close(root)


def test_digest_mismatch_is_refused(box: Sandbox) -> None:
    layer = t.tar(t.file("a", b"x"))
    with pytest.raises(ExtractError) as info:
        box.apply(layer, expect=["sha256:" + "0" * 64])
    assert info.value.code == "digest"
    box.assert_untouched()


def test_trailing_garbage_is_hashed_not_extracted(box: Sandbox) -> None:
    import hashlib

    layer = t.tar(t.file("a", b"x")) + t.file("hidden", b"never extracted") + b"junk"
    [st] = box.apply(layer, expect=[hashlib.sha256(layer).hexdigest()])
    assert st.trailing_bytes > 0 and box.tree() == {"a": "file"}


def test_endless_trailing_data_is_bounded_attack(box: Sandbox) -> None:
    """The bytes after the tar end are hashed, never parsed: without a bound a blob that ends its tar at
    once and then runs on (a huge sparse file, or one the client keeps appending to, read to EOF) kept
    the helper hashing forever. Trailing data counts against max_total_bytes."""
    layer = t.tar(t.file("a", b"x")) + b"\0" * (3 << 20)
    e = refused(box, "limit", layer, limits=Limits(max_total_bytes=1 << 20))
    assert "max_total_bytes" in e.reason and "trailing" in e.reason
    blob = box.blobs / "sparse-tail"
    with open(blob, "wb") as f:  # 1 TiB apparent size, read to EOF
        f.write(t.tar(t.file("a", b"x")))
        f.truncate(1 << 40)
    fd, root = os.open(blob, os.O_RDONLY), os.open(box.root, os.O_RDONLY)
    try:
        with pytest.raises(ExtractError) as info:
            apply_layer(root, LayerSource(fd), limits=Limits(max_total_bytes=4 << 20))
        assert info.value.code == "limit"
    finally:
        os.close(fd)
        os.close(root)


# ---------- names ----------


def test_pax_path_overrides_ustar_name_and_is_checked(box: Sandbox) -> None:
    refused(box, "escape", t.tar(t.pax({"path": "../outside/secret"}), t.file("innocent", b"pwned")))
    assert box.tree() == {}


def test_dotdot_ustar_name_hidden_by_a_safe_pax_path_is_harmless(box: Sandbox) -> None:
    applied(box, t.tar(t.pax({"path": "safe"}), t.file("../outside/secret", b"x")))
    assert box.tree() == {"safe": "file"}


def test_ustar_prefix_field_with_dotdot_is_refused(box: Sandbox) -> None:
    refused(box, "escape", t.tar(t.file("secret", b"x", prefix="../outside")))


def test_gnu_longname_with_dotdot_is_refused(box: Sandbox) -> None:
    refused(box, "escape", t.tar(t.gnu_longname("x/" * 60 + "../" * 62 + "outside/secret"), t.file("short")))


def test_pax_name_with_nul_ends_at_the_nul(box: Sandbox) -> None:
    applied(box, t.tar(t.pax({"path": b"a\0/../../outside/secret"}), t.file("short", b"x")))
    assert box.tree() == {"a": "file"}


def test_ustar_name_with_nul_ends_at_the_nul(box: Sandbox) -> None:
    applied(box, t.tar(t.file(b"b\0/../../outside/secret", b"x")))
    assert box.tree() == {"b": "file"}


def test_name_with_newline_is_a_literal_name(box: Sandbox) -> None:
    applied(box, t.tar(t.file("evil\n/etc/img-hostile-pwned", b"x"), t.file("x\n..", b"y")))
    assert box.tree() == {"evil\n": "dir", "evil\n/etc": "dir", "evil\n/etc/img-hostile-pwned": "file",
                          "x\n..": "file"}


def test_name_with_newline_then_dotdot_component_is_refused(box: Sandbox) -> None:
    refused(box, "escape", t.tar(t.file("a\n/../../outside/secret", b"x")))


def test_pax_path_with_invalid_utf8_is_corrupt(box: Sandbox) -> None:
    refused(box, "corrupt", t.tar(t.pax({"path": b"caf\xe9"}), t.file("short")))


def test_file_under_a_regular_file_is_a_path_error(box: Sandbox) -> None:
    refused(box, "path", t.tar(t.file("f", b"x"), t.file("f/child", b"y")))


def test_symlink_with_an_empty_target_is_invalid(box: Sandbox) -> None:
    refused(box, "invalid", t.tar(t.symlink("l", "")))


def test_cancel_from_the_progress_callback_stops_the_layer(box: Sandbox) -> None:
    import img_helper.extract as ex

    blob = box.blobs / "many"
    blob.write_bytes(t.tar(*(t.file(f"f{i}") for i in range(5000))))
    fd, root = os.open(blob, os.O_RDONLY), os.open(box.root, os.O_RDONLY)

    class Stop(Exception):
        pass

    def progress(st: LayerStats) -> None:
        raise Stop(st.entries)

    try:
        with pytest.raises(Stop):
            ex.apply_layer(root, ex.LayerSource(fd), progress=progress)
    finally:
        os.close(fd)
        os.close(root)
    assert len(box.tree()) < 5000


def test_refusals_leak_no_file_descriptors(box: Sandbox) -> None:
    attacks = [t.tar(t.file("../x")), t.tar(t.symlink("loop", "loop"), t.file("loop/x")),
               t.tar(t.file("a/b/c", b"x"), t.whiteout("a", ".."), t.file("a/d")),
               t.tar(t.file("f", b"x"), t.hardlink("f/h", "f")), t.tar(t.file("a", b"x" * 5000))[:2048],
               t.gz(t.tar(t.file("a/b", b"x" * 100_000)))[:300], b"not a tar at all" * 64]
    box.apply(t.tar(t.directory("a/"), t.file("a/keep", b"k")))
    before = len(os.listdir("/proc/self/fd"))
    for attack in attacks * 3:
        with pytest.raises(ExtractError):
            box.apply(attack)
    assert len(os.listdir("/proc/self/fd")) == before


# ---------- memory of the extractor's own bookkeeping (a small blob must not make the helper huge) ----------


def _long_dir(n_components: int, leaf: str = "") -> str:
    return "/".join(["d" * 200] * n_components) + (f"/{leaf}" if leaf else "") + "/"


def test_repeated_directory_entry_bomb_does_not_grow_memory(box: Sandbox) -> None:
    # The same 4 KB directory path archived 2000 times compresses to a few KB; each entry used to keep its own
    # copy of the path until the end of the layer (100k entries: ~400 MB of helper memory from a 47 KB blob).
    one = t.pax({"path": _long_dir(19)}) + t.directory("x/")
    stats = applied(box, t.zst(t.tar(*([one] * 2000))), limits=Limits(max_index_bytes=256 << 10))
    assert stats[0].dirs == 2000


def test_many_long_directory_paths_bomb_is_bounded_by_max_index_bytes(box: Sandbox) -> None:
    # Distinct directories with long paths: their mtimes are set at the end of the layer, so their paths are
    # kept; the memory for that is a limit, not whatever the blob asks for.
    dirs = [t.pax({"path": _long_dir(5, f"s{i}")}) + t.directory("x/") for i in range(400)]
    e = refused(box, "limit", t.tar(*dirs), limits=Limits(max_index_bytes=64 << 10))
    assert "max_index_bytes" in e.reason and e.entry.startswith("d" * 200)


def test_many_names_written_bomb_is_bounded_by_max_index_bytes(box: Sandbox) -> None:
    # Every name the layer writes is remembered (its own whiteouts never remove it): long names cost memory.
    files = [t.pax({"path": f"{i:04d}" + "n" * 240}) + t.file("x") for i in range(600)]
    e = refused(box, "limit", t.tar(*files), limits=Limits(max_index_bytes=64 << 10))
    assert "max_index_bytes" in e.reason


# ---------- removal never leaves the root's filesystem ----------

_MOUNTED = r'''
import json, os, subprocess, sys
sys.path.insert(0, os.getcwd())
from img_helper.extract import ExtractError, LayerSource, apply_layer
root, blob = sys.argv[1], sys.argv[2]
os.makedirs(root + "/mnt")
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", root + "/mnt"], check=True)
open(root + "/mnt/other-fs-file", "w").write("precious")
r, f = os.open(root, os.O_RDONLY), os.open(blob, os.O_RDONLY)
try:
    apply_layer(r, LayerSource(f))
    out = {"ok": True}
except ExtractError as e:
    out = {"code": e.code, "reason": e.reason}
out["left"] = sorted(os.listdir(root + "/mnt"))
print(json.dumps(out))
'''


@pytest.mark.parametrize("layer", [t.tar(t.whiteout("", "mnt")), t.tar(t.file("mnt", b"x")),
                                   t.tar(t.opaque(""))], ids=["whiteout", "replaced", "root-opaque"])
def test_whiteout_into_a_mounted_filesystem_attack(box: Sandbox, layer: bytes) -> None:
    """A directory of the root that is a mount point (another filesystem): a whiteout or a replacement must
    not empty it, as writes can't enter it (RESOLVE_NO_XDEV)."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespaces here")
    blob = box.blobs / "layer"
    blob.write_bytes(layer)
    r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", _MOUNTED,
                        str(box.root), str(blob)], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["left"] == ["other-fs-file"], out
    assert out.get("code") == "path" and "another filesystem" in out["reason"], out


# ---------- headers libarchive would hold in memory before our limits see them ----------

_GROWTH = r'''
import os, sys
sys.path.insert(0, os.getcwd())
from img_helper.extract import ExtractError, LayerSource, Limits, apply_layer
def peak_kb():  # VmHWM: this process's own peak (ru_maxrss carries the forking parent's over exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
root, blob = sys.argv[1], sys.argv[2]
r, f = os.open(root, os.O_RDONLY), os.open(blob, os.O_RDONLY)
before = peak_kb()
try:
    apply_layer(r, LayerSource(f), Limits(max_header_bytes=64 << 10))
    print("ok")
except ExtractError as e:
    print(e.code, e.reason)
print((peak_kb() - before) >> 10)
'''


def test_sparse_map_bomb_is_bounded_before_libarchive_holds_it(box: Sandbox) -> None:
    """A GNU sparse 1.0 map is read by libarchive as part of the header, one allocation per region:
    a 0.6 MB zstd blob of 2M regions cost 160 MB (8M regions: 620 MB) before max_header_bytes was checked.
    The bytes libarchive may consume for one header are now capped while it reads them (~50 MB at most)."""
    n = 2_000_000
    regions = (f"{n}\n" + "".join(f"{2 * i}\n1\n" for i in range(n))).encode()
    body = t.pad(regions) + b"x" * n
    meta = t.pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s",
                  "GNU.sparse.realsize": str(2 * n)})
    blob = box.blobs / "sparse-bomb"
    blob.write_bytes(t.zst(t.tar(meta + t.header("GNUSparseFile.0/s", t.REG, size=len(body)) + t.pad(body))))
    r = subprocess.run([sys.executable, "-c", _GROWTH, str(box.root), str(blob)], capture_output=True,
                       text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    outcome, growth_mb = r.stdout.splitlines()
    assert outcome.startswith("limit") and "max_header_bytes" in outcome, outcome
    assert int(growth_mb) < 80, f"{growth_mb} MB"
