"""Proves the image fixtures are real: the builder's OCI output unpacked by umoci equals the rootfs it was
made from; bucket layers are plain ustar diffs in numeric order with shared prefixes; the archives are what
skopeo and umoci accept. Also checks the synthetic builders and the tree comparator."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.fixtures.images import RealImages
from tests.fixtures.synth import (
    Device,
    Dir,
    Fifo,
    File,
    Hardlink,
    Opaque,
    Symlink,
    Whiteout,
    make_docker_archive,
    make_layer,
    make_oci_archive,
    sha256_digest,
    write_oci_layout,
)
from tests.fixtures.trees import assert_same_tree, diff_trees, read_spec, tree_spec
from tests.images import build

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def skopeo_inspect(transport_ref: str) -> dict:
    out = subprocess.run(["skopeo", "inspect", transport_ref], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def umoci_raw_unpack(image: str, dest: Path) -> None:
    subprocess.run(["umoci", "raw", "unpack", "--image", image, str(dest)], check=True, capture_output=True)


def oci_config(real_images: RealImages, family: str) -> dict:
    layout = real_images.oci_layout
    index = json.loads((layout / "index.json").read_text())
    [desc] = [m for m in index["manifests"]
              if m["annotations"]["org.opencontainers.image.ref.name"] == real_images.oci_tags[family]]
    manifest = json.loads((layout / "blobs/sha256" / desc["digest"].split(":")[1]).read_text())
    return json.loads((layout / "blobs/sha256" / manifest["config"]["digest"].split(":")[1]).read_text())


# ---------------------------------------------------------------- real images


def test_references_equal_the_rootfs_each_family_was_made_from(real_images: RealImages) -> None:
    for family, reference in real_images.references.items():
        assert_same_tree(read_spec(real_images.source_specs[family]), reference)


def test_oci_layout_unpacked_by_umoci_equals_source_rootfs(real_images: RealImages, tmp_path: Path) -> None:
    umoci_raw_unpack(real_images.oci_image("gamma"), tmp_path / "gamma")
    assert_same_tree(read_spec(real_images.source_specs["gamma"]), tmp_path / "gamma")


def test_reference_rootfs_has_the_awkward_cases(real_images: RealImages) -> None:
    root = real_images.references["alpha"]
    hello = root / "opt/app/hello.txt"
    assert hello.stat().st_mode & 0o7777 == 0o4755 and hello.stat().st_nlink == 2
    assert (root / "opt/app/hello-hardlink.txt").stat().st_ino == hello.stat().st_ino
    blob = root / "opt/app/blob.bin"
    assert (blob.stat().st_uid, blob.stat().st_gid) == (1000, 1000)
    assert os.getxattr(blob, "user.img.test") == b"yes"
    assert os.readlink(root / "opt/app/less-absolute") == "/usr/bin/less"
    assert (root / "usr/share/doc/netbase").is_file()  # a directory replaced by a file
    assert not (root / "etc/motd").exists() and not (root / "usr/share/doc/less").exists()
    assert sorted(p.name for p in (root / "var/log").iterdir()) == ["fresh"]  # opaque
    beta = real_images.references["beta"]
    assert (beta / "etc/issue.net").is_dir()  # a file replaced by a directory
    assert (beta / "usr/bin/jq").is_file() and not (beta / "usr/share/perl").exists()


def test_bucket_layers_are_uncompressed_ustar_diffs(real_images: RealImages) -> None:
    seen: set[Path] = set()
    for family, layers in real_images.families.items():
        assert [file_sha256(p) for p in layers] == real_images.layer_digests[family]
        assert real_images.layer_digests[family] == oci_config(real_images, family)["rootfs"]["diff_ids"]
        for layer in layers:
            real = layer.resolve()
            if (real.stat().st_ino, real.stat().st_dev) in {(s.stat().st_ino, s.stat().st_dev) for s in seen}:
                continue
            seen.add(real)
            head = layer.read_bytes()[:512] if layer.stat().st_size < 1 << 20 else open(layer, "rb").read(512)
            assert head[:2] != GZIP_MAGIC and head[:4] != ZSTD_MAGIC
            assert head[257:263] == b"ustar\x00", f"{layer}: not a POSIX ustar header"
            with tarfile.open(layer, mode="r|") as tar:  # reads to the end: a truncated tar fails here
                assert sum(1 for _ in tar) > 0


def test_long_family_sorts_numerically(real_images: RealImages) -> None:
    layers = real_images.families["gamma"]
    assert len(layers) >= 10
    assert [p.name for p in layers] == [f"{n}.tar" for n in range(1, len(layers) + 1)]
    assert sorted(p.name for p in layers) != [p.name for p in layers]  # "10.tar" < "2.tar" as strings
    # order-sensitive content: layer n >= 4 rewrites the counter, so only numeric order ends with the last
    for n, layer in enumerate(layers, start=1):
        if n <= real_images.shared_layers:
            continue
        with tarfile.open(layer) as tar:
            member = tar.extractfile("opt/order/counter")
            assert member is not None and member.read() == f"{n}\n".encode()
    counter = real_images.references["gamma"] / "opt/order/counter"
    assert counter.read_text() == f"{len(layers)}\n"


def test_families_share_their_first_layers_byte_for_byte(real_images: RealImages) -> None:
    fams = real_images.shared_families
    k = real_images.shared_layers
    assert len(fams) >= 2 and k >= 3
    for n in range(k):
        assert len({file_sha256(real_images.families[f][n]) for f in fams}) == 1
    assert len({real_images.layer_digests[f][k] for f in fams}) == len(fams)  # they diverge after that


def test_docker_archive_is_accepted_by_skopeo(real_images: RealImages) -> None:
    arch = real_images.docker_archive
    info = skopeo_inspect(f"docker-archive:{arch.path}")
    assert info["Layers"] == real_images.layer_digests[arch.family]  # uncompressed: digests are diff_ids
    with tarfile.open(arch.path) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == [arch.ref]


@pytest.mark.parametrize("which", ["oci_archive", "oci_archive_zstd", "oci_archive_mixed"])
def test_oci_archives_are_accepted_by_skopeo(real_images: RealImages, which: str) -> None:
    arch = getattr(real_images, which)
    info = skopeo_inspect(f"oci-archive:{arch.path}")
    assert len(info["Layers"]) == len(real_images.families[arch.family])
    magics = {"gzip": [GZIP_MAGIC] * len(info["Layers"]), "zstd": [ZSTD_MAGIC] * len(info["Layers"]),
              "mixed": [ZSTD_MAGIC if n == 1 else GZIP_MAGIC for n in range(len(info["Layers"]))]}
    with tarfile.open(arch.path) as tar:
        for digest, magic in zip(info["Layers"], magics[arch.compression], strict=True):
            blob = tar.extractfile(f"blobs/sha256/{digest.split(':')[1]}")
            assert blob is not None and blob.read(4).startswith(magic)
            if arch.compression == "mixed":  # the blob's own bytes match its digest
                blob = tar.extractfile(f"blobs/sha256/{digest.split(':')[1]}")
                assert blob is not None and sha256_digest(blob.read()) == digest


def test_bucket_objects_follow_the_real_bucket_layout(real_images: RealImages) -> None:
    objects = real_images.bucket_objects()
    assert objects["images/gamma/10.tar"] == real_images.families["gamma"][9]
    assert len(objects) == sum(len(v) for v in real_images.families.values())


# ---------------------------------------------------------------- the cache


def test_print_dir_names_the_cached_build(real_images: RealImages) -> None:
    out = subprocess.run([sys.executable, "-m", "tests.images.build", "--print-dir"], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert Path(out.stdout.strip()) == real_images.dir
    assert real_images.dir.name == build.builder_hash()


def test_interrupted_build_is_never_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMG_TEST_IMAGES_CACHE", str(tmp_path))
    calls = []

    def failing(self: build.Builder) -> None:
        calls.append("fail")
        (self.out / "images").mkdir()
        raise build.BuildError("layer 2", "interrupted")

    monkeypatch.setattr(build.Builder, "build", failing)
    with pytest.raises(build.BuildError):
        build.ensure_built()
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]  # no final dir, no temp dir left

    def succeeding(self: build.Builder) -> None:
        calls.append("ok")
        (self.out / "manifest.json").write_text("{}")

    monkeypatch.setattr(build.Builder, "build", succeeding)
    first = build.ensure_built()
    assert first == tmp_path / build.builder_hash() and (first / "manifest.json").exists()
    assert build.ensure_built() == first and calls == ["fail", "ok"]  # cached: not built again


def test_no_build_inside_the_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest has no network and its flock()s do not reach the host: it must find a host-made build."""
    monkeypatch.setenv("IMG_TEST_IMAGES_CACHE", str(tmp_path))
    monkeypatch.setenv("IMG_IN_VM", "1")
    with pytest.raises(build.BuildError, match="make fixtures"):
        build.ensure_built()
    assert not (tmp_path / build.builder_hash()).exists()


# ---------------------------------------------------------------- synthetic images


def sample_layers() -> list[bytes]:
    lower = make_layer([
        Dir("etc"), File("etc/hostname", b"synth\n"), File("etc/motd", b"bye\n"),
        Dir("var"), Dir("var/cache"), File("var/cache/old", b"old\n"),
        Dir("bin"), File("bin/tool", b"#!/bin/sh\n", mode=0o4755),
    ])
    upper = make_layer([
        Whiteout("etc/motd"), Opaque("var/cache"), Dir("var/cache"), File("var/cache/new", b"new\n"),
        Hardlink("bin/tool-link", "bin/tool"), Symlink("etc/abs", "/etc/hostname"),
        File("etc/data", b"x" * 3000, uid=1000, gid=1000, xattrs={"user.k": b"v"}),
    ])
    return [lower, upper]


def test_synth_layer_holds_every_entry_kind() -> None:
    blob = make_layer([
        Dir("d", mode=0o1777), File("d/f", b"abc", mode=0o640, uid=7, gid=8, xattrs={"user.a": b"1"}),
        Symlink("d/s", "/d/f"), Hardlink("d/h", "d/f"), Fifo("d/p"), Device("d/null"),
        Whiteout("d/gone"), Opaque("d"),
    ])
    with tarfile.open(fileobj=__import__("io").BytesIO(blob)) as tar:
        members = {m.name: m for m in tar}
    assert list(members) == ["d", "d/f", "d/s", "d/h", "d/p", "d/null", "d/.wh.gone", "d/.wh..wh..opq"]
    assert members["d"].mode == 0o1777 and members["d/f"].pax_headers["SCHILY.xattr.user.a"] == "1"
    assert members["d/s"].linkname == "/d/f" and members["d/h"].islnk() and members["d/p"].isfifo()
    assert members["d/null"].ischr() and (members["d/null"].devmajor, members["d/null"].devminor) == (1, 3)


def test_synth_oci_layout_unpacks_with_umoci(tmp_path: Path) -> None:
    write_oci_layout(tmp_path / "oci", sample_layers(), compression=["gzip", "none"], tag="t")
    umoci_raw_unpack(f"{tmp_path / 'oci'}:t", tmp_path / "root")
    root = tmp_path / "root"
    assert not (root / "etc/motd").exists() and (root / "etc/hostname").read_text() == "synth\n"
    assert sorted(os.listdir(root / "var/cache")) == ["new"]
    assert (root / "bin/tool").stat().st_nlink == 2 and (root / "bin/tool").stat().st_mode & 0o7777 == 0o4755
    assert os.readlink(root / "etc/abs") == "/etc/hostname"
    assert os.getxattr(root / "etc/data", "user.k") == b"v" and (root / "etc/data").stat().st_uid == 1000


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none", ["zstd", "gzip"]])
def test_synth_oci_archive_is_accepted_by_skopeo(tmp_path: Path, compression: str | list[str]) -> None:
    layers = sample_layers()
    path = tmp_path / "img.oci.tar"
    path.write_bytes(make_oci_archive(layers, compression))
    info = skopeo_inspect(f"oci-archive:{path}")
    assert len(info["Layers"]) == 2
    if compression == "none":
        assert info["Layers"] == [sha256_digest(layer) for layer in layers]


def test_synth_docker_archive_is_accepted_by_skopeo(tmp_path: Path) -> None:
    layers = sample_layers()
    path = tmp_path / "img.docker.tar"
    path.write_bytes(make_docker_archive(layers, repo_tag="synth/x:1"))
    info = skopeo_inspect(f"docker-archive:{path}")
    assert info["Layers"] == [sha256_digest(layer) for layer in layers]
    # and skopeo can turn it into an OCI layout that umoci unpacks to the same tree as the OCI builder's
    subprocess.run(["skopeo", "copy", "--quiet", "--insecure-policy", f"docker-archive:{path}",
                    f"oci:{tmp_path / 'via-docker'}:t"], check=True, capture_output=True)
    umoci_raw_unpack(f"{tmp_path / 'via-docker'}:t", tmp_path / "a")
    write_oci_layout(tmp_path / "direct", layers, tag="t")
    umoci_raw_unpack(f"{tmp_path / 'direct'}:t", tmp_path / "b")
    assert_same_tree(tmp_path / "a", tmp_path / "b")


# ---------------------------------------------------------------- the tree comparator


def test_tree_comparator_sees_each_kind_of_difference(tmp_path: Path) -> None:
    a = tmp_path / "a"
    (a / "d").mkdir(parents=True)
    (a / "d/f").write_text("content\n")
    os.symlink("/d/f", a / "d/s")
    b = tmp_path / "b"
    shutil.copytree(a, b, symlinks=True)
    assert diff_trees(a, b) == [] and tree_spec(a) == tree_spec(b)

    def differs(change: object) -> None:
        assert diff_trees(a, b) != [], f"{change} not noticed"
        shutil.rmtree(b)
        shutil.copytree(a, b, symlinks=True)
        assert diff_trees(a, b) == []

    (b / "d/f").write_text("contenT\n")
    differs("content")
    os.chmod(b / "d/f", 0o4644)
    differs("mode")
    os.chown(b / "d/f", 1, 1)
    differs("owner")
    os.link(b / "d/f", tmp_path / "outside")  # same names and content, only the link count differs
    differs("hardlink count")
    (tmp_path / "outside").unlink()
    os.unlink(b / "d/s")
    os.symlink("/d/other", b / "d/s")
    differs("symlink target")
    os.setxattr(b / "d/f", "user.x", b"1")
    differs("xattr")
    with pytest.raises(AssertionError, match="trees differ"):
        os.setxattr(b / "d", "user.y", b"2")
        assert_same_tree(a, b)


def test_tree_comparator_device_numbers_on_request(tmp_path: Path) -> None:
    for name, minor in (("a", 3), ("b", 5)):
        (tmp_path / name).mkdir()
        os.mknod(tmp_path / name / "dev", 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    assert diff_trees(tmp_path / "a", tmp_path / "b") == []
    assert diff_trees(tmp_path / "a", tmp_path / "b", with_devices=True) != []
