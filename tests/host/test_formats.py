"""img_helper.formats: content sniffing, outer archive walking, docker-archive and OCI parsing, chain ids.
Every hostile case is a named regression test."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from img_helper.formats import (
    ArchiveLimits,
    FormatError,
    ImageSource,
    chain_ids,
    detect_format,
    open_image,
    sniff_blob,
    walk_tar,
)
from tests.host import formats_build as fb

DEFAULT_LIMITS = ArchiveLimits()


@pytest.fixture
def opened() -> Iterator[list[int]]:
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def _open(opened: list[int], *paths: Path) -> list[int]:
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    opened.extend(fds)
    return fds


def _image(
    opened: list[int],
    tmp_path: Path,
    data: bytes,
    fmt: str = "auto",
    name: str = "in.tar",
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> ImageSource:
    return open_image(_open(opened, fb.write(tmp_path / name, data)), fmt, limits)


def _reject(
    opened: list[int],
    tmp_path: Path,
    data: bytes,
    code: str,
    fmt: str = "auto",
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> FormatError:
    with pytest.raises(FormatError) as ei:
        _image(opened, tmp_path, data, fmt, limits=limits)
    assert ei.value.code == code, str(ei.value)
    return ei.value


# ------------------------------------------------------------------------------------------ sniffing


def test_sniff_gzip_layer_named_tar_is_gzip(tmp_path: Path, opened: list[int]) -> None:
    (fd,) = _open(opened, fb.write(tmp_path / "layer.tar", fb.gz(fb.layer(1))))
    assert sniff_blob(fd) == "gzip"
    img = open_image([fd])
    assert img.format == "layers" and img.layers[0].compression == "gzip"


def test_sniff_plain_tar_named_tar_gz_is_tar(tmp_path: Path, opened: list[int]) -> None:
    (fd,) = _open(opened, fb.write(tmp_path / "layer.tar.gz", fb.layer(1)))
    assert sniff_blob(fd) == "tar"
    assert open_image([fd]).layers[0].compression == "tar"


def test_sniff_zstd_layer_named_tgz_is_zstd(tmp_path: Path, opened: list[int]) -> None:
    (fd,) = _open(opened, fb.write(tmp_path / "x.tgz", fb.zst(fb.layer(1))))
    assert sniff_blob(fd) == "zstd"


def test_sniff_rejects_xz_and_garbage(tmp_path: Path, opened: list[int]) -> None:
    _reject(opened, tmp_path, b"\xfd7zXZ\x00" + bytes(600), "format")
    _reject(opened, tmp_path, b"hello world" * 100, "format")
    _reject(opened, tmp_path, b"", "format")


def test_sniff_docker_archive_named_layer_tar(tmp_path: Path, opened: list[int]) -> None:
    img = _image(opened, tmp_path, fb.docker_archive([fb.layer(1), fb.layer(2)]), name="1.tar")
    assert img.format == "docker-archive"


def test_sniff_oci_archive_named_tar_gz(tmp_path: Path, opened: list[int]) -> None:
    img = _image(opened, tmp_path, fb.oci_archive(fb.oci_parts([fb.layer(1)])), name="img.tar.gz")
    assert img.format == "oci-archive"


def test_several_files_are_ordered_layers_of_a_family(tmp_path: Path, opened: list[int]) -> None:
    # names sort the other way round ("10" < "2"): the order given is the order used
    paths = [
        fb.write(tmp_path / n, d)
        for n, d in [("2.tar", fb.layer(1)), ("10.tar", fb.gz(fb.layer(2))), ("1.tar", fb.zst(fb.layer(3)))]
    ]
    fds = _open(opened, *paths)
    img = open_image(fds)
    assert img.format == "layers"
    assert [la.source.fd for la in img.layers] == fds
    assert [la.compression for la in img.layers] == ["tar", "gzip", "zstd"]
    assert all(la.digest is None and la.source.offset == 0 and la.source.length == -1 for la in img.layers)


def test_single_layer_with_duplicate_entries_is_still_a_layer(tmp_path: Path, opened: list[int]) -> None:
    # duplicates are legal inside a layer (the later one wins); only an outer archive must have unique names
    data = fb.archive([("a", b"1"), ("a", b"2"), ("manifest.txt", b"")])
    assert _image(opened, tmp_path, data).format == "layers"


def test_empty_tar_is_an_empty_layer(tmp_path: Path, opened: list[int]) -> None:
    assert _image(opened, tmp_path, bytes(10240)).format == "layers"


def test_compressed_docker_archive_is_a_clear_error(tmp_path: Path, opened: list[int]) -> None:
    e = _reject(opened, tmp_path, fb.gz(fb.docker_archive([fb.layer(1)], legacy=False)), "compressed")
    assert "decompress" in e.reason


def test_compressed_legacy_docker_archive_is_a_clear_error(tmp_path: Path, opened: list[int]) -> None:
    _reject(opened, tmp_path, fb.zst(fb.docker_archive([fb.layer(1)])), "compressed")


def test_compressed_oci_archive_is_a_clear_error(tmp_path: Path, opened: list[int]) -> None:
    _reject(opened, tmp_path, fb.gz(fb.oci_archive(fb.oci_parts([fb.layer(1)]))), "compressed")


def test_compressed_outer_archive_with_explicit_format(tmp_path: Path, opened: list[int]) -> None:
    e = _reject(opened, tmp_path, fb.gz(fb.layer(1)), "compressed", fmt="docker-archive")
    assert "uncompressed tar" in e.reason


# ------------------------------------------------------------------------------------ docker-archive


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy-id-layer-tar", "blobs-sha256"])
def test_docker_archive_layers_in_manifest_order(tmp_path: Path, opened: list[int], legacy: bool) -> None:
    layers = [fb.layer(i) for i in (1, 2, 3)]
    data = fb.docker_archive(layers, legacy=legacy)
    img = _image(opened, tmp_path, data)
    assert img.format == "docker-archive"
    assert [la.digest for la in img.layers] == [f"sha256:{fb.sha(x)}" for x in layers]
    for la, x in zip(img.layers, layers, strict=True):
        assert data[la.source.offset : la.source.offset + la.source.length] == x
        assert la.source.expect_sha256 == fb.sha(x)
    assert img.config is not None and img.config["os"] == "linux"
    assert img.config_digest == f"sha256:{fb.sha(fb.config_for(layers))}"


def test_docker_archive_manifest_order_not_member_order(tmp_path: Path, opened: list[int]) -> None:
    layers = [fb.layer(1), fb.layer(2)]
    names = ["zzz/layer.tar", "aaa/layer.tar"]
    data = fb.docker_archive(layers, layer_names=names)
    img = _image(opened, tmp_path, data)
    assert [data[la.source.offset : la.source.offset + la.source.length] for la in img.layers] == layers


def test_docker_archive_symlinked_duplicate_layer(tmp_path: Path, opened: list[int]) -> None:
    # old docker save writes a repeated layer as a symlink to the first copy
    layers = [fb.layer(1), fb.layer(1)]
    link = fb.symlink_member("b/layer.tar", "../a/layer.tar")
    data = fb.docker_archive(layers, layer_names=["a/layer.tar", "b/layer.tar"], extra=[link])
    # the builder wrote b/layer.tar as a file too; rebuild without it
    config = fb.config_for(layers)
    manifest = [
        {"Config": f"{fb.sha(config)}.json", "RepoTags": None, "Layers": ["a/layer.tar", "b/layer.tar"]}
    ]
    data = fb.archive(
        [
            (f"{fb.sha(config)}.json", config),
            ("a/layer.tar", layers[0]),
            link,
            ("manifest.json", json.dumps(manifest).encode()),
        ]
    )
    img = _image(opened, tmp_path, data)
    assert img.layers[0].source.offset == img.layers[1].source.offset


def test_docker_archive_symlink_member_to_outside_is_escape(tmp_path: Path, opened: list[int]) -> None:
    layers = [fb.layer(1)]
    config = fb.config_for(layers)
    link = fb.symlink_member("a/layer.tar", "../../etc/passwd")
    manifest = [{"Config": f"{fb.sha(config)}.json", "Layers": ["a/layer.tar"]}]
    data = fb.archive(
        [(f"{fb.sha(config)}.json", config), link, ("manifest.json", json.dumps(manifest).encode())]
    )
    _reject(opened, tmp_path, data, "escape")


def test_docker_archive_symlink_member_absolute_is_escape(tmp_path: Path, opened: list[int]) -> None:
    layers = [fb.layer(1)]
    config = fb.config_for(layers)
    link = fb.symlink_member("a/layer.tar", "/etc/passwd")
    manifest = [{"Config": f"{fb.sha(config)}.json", "Layers": ["a/layer.tar"]}]
    data = fb.archive(
        [(f"{fb.sha(config)}.json", config), link, ("manifest.json", json.dumps(manifest).encode())]
    )
    _reject(opened, tmp_path, data, "escape")


def test_docker_archive_symlink_loop_is_bounded(tmp_path: Path, opened: list[int]) -> None:
    layers = [fb.layer(1)]
    config = fb.config_for(layers)
    manifest = [{"Config": f"{fb.sha(config)}.json", "Layers": ["a"]}]
    data = fb.archive(
        [
            (f"{fb.sha(config)}.json", config),
            fb.symlink_member("a", "b"),
            fb.symlink_member("b", "a"),
            ("manifest.json", json.dumps(manifest).encode()),
        ]
    )
    _reject(opened, tmp_path, data, "limit")


@pytest.mark.parametrize(
    "ref,code",
    [
        ("../x/layer.tar", "escape"),
        ("/etc/passwd", "escape"),
        ("a/../../layer.tar", "escape"),
        ("nothere/layer.tar", "missing"),
    ],
    ids=["dotdot", "absolute", "inner-dotdot", "missing-member"],
)
def test_manifest_json_naming_layers_outside_the_archive(
    tmp_path: Path, opened: list[int], ref: str, code: str
) -> None:
    layers = [fb.layer(1)]
    config = fb.config_for(layers)
    manifest = [{"Config": f"{fb.sha(config)}.json", "Layers": [ref]}]
    data = fb.archive(
        [
            (f"{fb.sha(config)}.json", config),
            ("x/layer.tar", layers[0]),
            ("manifest.json", json.dumps(manifest).encode()),
        ]
    )
    e = _reject(opened, tmp_path, data, code)
    assert e.entry == ref


def test_manifest_json_config_outside_the_archive(tmp_path: Path, opened: list[int]) -> None:
    data = fb.docker_archive([fb.layer(1)], manifest=[{"Config": "../config.json", "Layers": []}])
    _reject(opened, tmp_path, data, "escape")


def test_archive_member_with_dotdot_name_is_escape(tmp_path: Path, opened: list[int]) -> None:
    data = fb.docker_archive([fb.layer(1)], extra=[("../evil", b"x")])
    _reject(opened, tmp_path, data, "escape")


def test_archive_member_with_absolute_name_is_escape(tmp_path: Path, opened: list[int]) -> None:
    data = fb.docker_archive([fb.layer(1)], extra=[("/abs/evil", b"x")])
    _reject(opened, tmp_path, data, "escape")


def test_archive_duplicate_manifest_json_is_rejected(tmp_path: Path, opened: list[int]) -> None:
    # two manifest.json members: which one wins depends on the reader; refuse instead of guessing
    data = fb.docker_archive([fb.layer(1)], extra=[("manifest.json", b"[]")])
    _reject(opened, tmp_path, data, "duplicate")


def test_archive_duplicate_layer_member_is_rejected(tmp_path: Path, opened: list[int]) -> None:
    layers = [fb.layer(1)]
    data = fb.docker_archive(layers, layer_names=["a/layer.tar"], extra=[("./a/layer.tar", fb.layer(2))])
    _reject(opened, tmp_path, data, "duplicate")


def test_docker_archive_layer_content_disagrees_with_diff_id(tmp_path: Path, opened: list[int]) -> None:
    layers = [fb.layer(1)]
    name = f"blobs/sha256/{fb.sha(layers[0])}"
    config = fb.config_for([fb.layer(2)])  # diff_id of a different layer
    manifest = [{"Config": f"blobs/sha256/{fb.sha(config)}", "Layers": [name]}]
    data = fb.archive(
        [
            (f"blobs/sha256/{fb.sha(config)}", config),
            (name, layers[0]),
            ("manifest.json", json.dumps(manifest).encode()),
        ]
    )
    _reject(opened, tmp_path, data, "digest")


def test_docker_archive_config_digest_mismatch(tmp_path: Path, opened: list[int]) -> None:
    layers = [fb.layer(1)]
    config = fb.config_for(layers)
    fake = "0" * 64
    manifest = [{"Config": f"{fake}.json", "Layers": ["a/layer.tar"]}]
    data = fb.archive(
        [
            (f"{fake}.json", config),
            ("a/layer.tar", layers[0]),
            ("manifest.json", json.dumps(manifest).encode()),
        ]
    )
    _reject(opened, tmp_path, data, "digest")


def test_docker_archive_diff_ids_count_mismatch(tmp_path: Path, opened: list[int]) -> None:
    layers = [fb.layer(1)]
    config = fb.config_for([*layers, fb.layer(2)])
    manifest = [{"Config": "c.json", "Layers": ["a/layer.tar"]}]
    data = fb.archive(
        [("c.json", config), ("a/layer.tar", layers[0]), ("manifest.json", json.dumps(manifest).encode())]
    )
    _reject(opened, tmp_path, data, "corrupt")


@pytest.mark.parametrize(
    "manifest",
    [
        {"Config": "c.json", "Layers": []},
        [],
        [{"Config": 5, "Layers": []}],
        [{"Config": "c.json", "Layers": "a/layer.tar"}],
        [{"Config": "c.json", "Layers": [1]}],
        [{"Layers": []}],
    ],
    ids=["object-not-array", "empty", "config-int", "layers-string", "layer-int", "no-config"],
)
def test_manifest_json_strict_types(tmp_path: Path, opened: list[int], manifest: object) -> None:
    data = fb.archive([("c.json", b"{}"), ("manifest.json", json.dumps(manifest).encode())])
    _reject(opened, tmp_path, data, "corrupt", fmt="docker-archive")


def test_manifest_json_with_two_images_is_refused(tmp_path: Path, opened: list[int]) -> None:
    m = [{"Config": "c.json", "Layers": []}, {"Config": "c.json", "Layers": []}]
    data = fb.archive([("c.json", b"{}"), ("manifest.json", json.dumps(m).encode())])
    _reject(opened, tmp_path, data, "format")


def test_manifest_json_duplicate_keys_refused(tmp_path: Path, opened: list[int]) -> None:
    raw = b'[{"Config": "c.json", "Layers": [], "Layers": ["../x"]}]'
    data = fb.archive([("c.json", b"{}"), ("manifest.json", raw)])
    _reject(opened, tmp_path, data, "corrupt")


def test_json_bomb_manifest_over_size_cap(tmp_path: Path, opened: list[int]) -> None:
    raw = b"[" + b'"' + b"a" * (5 << 20) + b'"]'
    data = fb.archive([("manifest.json", raw)])
    _reject(opened, tmp_path, data, "limit")


def test_json_bomb_deep_nesting(tmp_path: Path, opened: list[int]) -> None:
    raw = b"[" * 200_000 + b"]" * 200_000
    data = fb.archive([("manifest.json", raw)])
    _reject(opened, tmp_path, data, "limit")


def test_json_bomb_small_cap_is_configurable(tmp_path: Path, opened: list[int]) -> None:
    data = fb.docker_archive([fb.layer(1)])
    _reject(opened, tmp_path, data, "limit", limits=ArchiveLimits(max_json_bytes=64))


def test_outer_archive_member_count_limit(tmp_path: Path, opened: list[int]) -> None:
    data = fb.docker_archive([fb.layer(1)], extra=[(f"pad/{i}", b"") for i in range(50)])
    _reject(opened, tmp_path, data, "limit", fmt="docker-archive", limits=ArchiveLimits(max_members=20))


def test_outer_archive_long_member_name_limit(tmp_path: Path, opened: list[int]) -> None:
    data = fb.docker_archive([fb.layer(1)], extra=[("a" * 300, b"")])
    _reject(opened, tmp_path, data, "limit", fmt="docker-archive", limits=ArchiveLimits(max_name_bytes=255))


def test_outer_archive_huge_pax_header_limit(tmp_path: Path, opened: list[int]) -> None:
    ti = tarfile.TarInfo("x")
    ti.pax_headers = {"comment": "y" * 4096}
    data = fb.docker_archive([fb.layer(1)], extra=[ti])
    _reject(
        opened, tmp_path, data, "limit", fmt="docker-archive", limits=ArchiveLimits(max_header_bytes=1024)
    )


def test_outer_archive_truncated(tmp_path: Path, opened: list[int]) -> None:
    data = fb.docker_archive([fb.layer(1), fb.layer(2)])
    _reject(opened, tmp_path, data[: len(data) // 2 + 7], "corrupt", fmt="docker-archive")


def test_outer_archive_bad_checksum(tmp_path: Path, opened: list[int]) -> None:
    data = bytearray(fb.docker_archive([fb.layer(1)]))
    data[0] ^= 0x20  # first header's name byte; checksum no longer matches
    _reject(opened, tmp_path, bytes(data), "corrupt", fmt="docker-archive")


def test_outer_archive_member_size_past_eof(tmp_path: Path, opened: list[int]) -> None:
    ti = tarfile.TarInfo("manifest.json")
    ti.size = 1 << 40
    hdr = ti.tobuf(tarfile.GNU_FORMAT)
    _reject(opened, tmp_path, hdr + bytes(1024), "corrupt", fmt="docker-archive")


def test_walk_tar_maps_gnu_longnames_and_pax_paths(tmp_path: Path, opened: list[int]) -> None:
    long = "d/" + "n" * 200
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        data = fb.archive([(long, b"hello"), ("./short", b"xy")], fmt=fmt)
        (fd,) = _open(opened, fb.write(tmp_path / f"w{fmt}", data))
        members = walk_tar(fd)
        assert set(members) == {long, "short"}
        m = members[long]
        assert data[m.offset : m.offset + m.size] == b"hello"


# -------------------------------------------------------------------------------------------- OCI


@pytest.mark.parametrize("comp", ["tar", "gzip", "zstd"])
def test_oci_archive_layers_and_digests(tmp_path: Path, opened: list[int], comp: str) -> None:
    raw = [fb.layer(1), fb.layer(2)]
    blobs = {"tar": raw, "gzip": [fb.gz(x) for x in raw], "zstd": [fb.zst(x) for x in raw]}[comp]
    media = {
        "tar": "application/vnd.oci.image.layer.v1.tar",
        "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
        "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    }[comp]
    data = fb.oci_archive(fb.oci_parts(blobs, media=media, uncompressed=raw))
    img = _image(opened, tmp_path, data)
    assert img.format == "oci-archive"
    assert [la.digest for la in img.layers] == [f"sha256:{fb.sha(b)}" for b in blobs]
    assert [la.compression for la in img.layers] == [comp, comp]
    assert [la.source.expect_sha256 for la in img.layers] == [fb.sha(b) for b in blobs]
    assert img.manifest is not None and img.manifest["schemaVersion"] == 2


def test_oci_layout_directory(tmp_path: Path, opened: list[int]) -> None:
    blobs = [fb.gz(fb.layer(1)), fb.layer(2)]
    d = fb.oci_layout_dir(
        fb.oci_parts(blobs, media="application/vnd.oci.image.layer.v1.tar+gzip"), tmp_path / "lay"
    )
    (fd,) = _open(opened, d)
    assert detect_format([fd]) == "oci-layout"
    img = open_image([fd], allow_directory=True)
    try:
        assert len(img.owned_fds) == 2
        assert [os.pread(la.source.fd, 1 << 20, 0) for la in img.layers] == blobs
    finally:
        img.close()


def test_oci_layout_blob_symlink_not_followed(tmp_path: Path, opened: list[int]) -> None:
    blobs = [fb.layer(1)]
    d = fb.oci_layout_dir(fb.oci_parts(blobs), tmp_path / "lay")
    target = d / "blobs" / "sha256" / fb.sha(blobs[0])
    (tmp_path / "elsewhere").write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(tmp_path / "elsewhere")
    (fd,) = _open(opened, d)
    with pytest.raises(FormatError) as ei:
        open_image([fd], allow_directory=True)
    assert ei.value.code == "format"


def test_oci_layout_directory_fd_refused_unless_offline(tmp_path: Path, opened: list[int]) -> None:
    """The daemon gets fds from clients: a directory fd would make root open files relative to it."""
    d = fb.oci_layout_dir(fb.oci_parts([fb.layer(1)]), tmp_path / "lay")
    (fd,) = _open(opened, d)
    with pytest.raises(FormatError) as ei:
        open_image([fd])
    assert ei.value.code == "format" and "offline" in ei.value.reason


def test_oci_blob_digest_mismatch_manifest(tmp_path: Path, opened: list[int]) -> None:
    parts = fb.oci_parts([fb.layer(1)])
    mname = next(
        n for n, b in parts.items() if n.startswith("blobs/") and b"schemaVersion" in b and b"layers" in b
    )
    parts[mname] = parts[mname].replace(b'"schemaVersion": 2', b'"schemaVersion":  2')[: len(parts[mname])]
    _reject(opened, tmp_path, fb.oci_archive(parts), "digest")


def test_oci_blob_digest_mismatch_config(tmp_path: Path, opened: list[int]) -> None:
    parts = fb.oci_parts([fb.layer(1)])
    cname = next(n for n, b in parts.items() if n.startswith("blobs/") and b"diff_ids" in b)
    parts[cname] = parts[cname].replace(b"amd64", b"arm64")
    _reject(opened, tmp_path, fb.oci_archive(parts), "digest")


def test_oci_layer_size_disagrees_with_descriptor(tmp_path: Path, opened: list[int]) -> None:
    layer = fb.layer(1)
    parts = fb.oci_parts([layer])
    parts[f"blobs/sha256/{fb.sha(layer)}"] = layer + bytes(512)
    _reject(opened, tmp_path, fb.oci_archive(parts), "digest")


def test_oci_layer_blob_missing(tmp_path: Path, opened: list[int]) -> None:
    layer = fb.layer(1)
    parts = fb.oci_parts([layer])
    del parts[f"blobs/sha256/{fb.sha(layer)}"]
    _reject(opened, tmp_path, fb.oci_archive(parts), "missing")


def test_oci_unknown_layer_media_type(tmp_path: Path, opened: list[int]) -> None:
    parts = fb.oci_parts([fb.layer(1)], media="application/vnd.example.evil")
    _reject(opened, tmp_path, fb.oci_archive(parts), "mediatype")


def test_oci_index_selects_linux_amd64(tmp_path: Path, opened: list[int]) -> None:
    parts = fb.oci_parts([fb.layer(1)])
    index = json.loads(parts["index.json"])
    good = index["manifests"][0]
    arm = dict(good, platform={"os": "linux", "architecture": "arm64"}, digest="sha256:" + "1" * 64)
    index["manifests"] = [arm, good]
    parts["index.json"] = json.dumps(index).encode()
    img = _image(opened, tmp_path, fb.oci_archive(parts))
    assert len(img.layers) == 1


def test_oci_index_without_linux_amd64(tmp_path: Path, opened: list[int]) -> None:
    parts = fb.oci_parts([fb.layer(1)])
    index = json.loads(parts["index.json"])
    m = index["manifests"][0]
    index["manifests"] = [dict(m, platform={"os": "linux", "architecture": a}) for a in ("arm64", "s390x")]
    parts["index.json"] = json.dumps(index).encode()
    _reject(opened, tmp_path, fb.oci_archive(parts), "missing")


def test_oci_digest_with_path_traversal_is_malformed(tmp_path: Path, opened: list[int]) -> None:
    parts = fb.oci_parts([fb.layer(1)])
    index = json.loads(parts["index.json"])
    index["manifests"][0]["digest"] = "sha256:../../../etc/passwd"
    parts["index.json"] = json.dumps(index).encode()
    _reject(opened, tmp_path, fb.oci_archive(parts), "corrupt")


def test_oci_descriptor_strict_types(tmp_path: Path, opened: list[int]) -> None:
    parts = fb.oci_parts([fb.layer(1)])
    index = json.loads(parts["index.json"])
    index["manifests"][0]["size"] = "12"
    parts["index.json"] = json.dumps(index).encode()
    _reject(opened, tmp_path, fb.oci_archive(parts), "corrupt")


def test_oci_bad_layout_version(tmp_path: Path, opened: list[int]) -> None:
    parts = fb.oci_parts([fb.layer(1)])
    parts["oci-layout"] = b'{"imageLayoutVersion": "2.0.0"}'
    _reject(opened, tmp_path, fb.oci_archive(parts), "format")


def test_oci_json_bomb_index(tmp_path: Path, opened: list[int]) -> None:
    parts = fb.oci_parts([fb.layer(1)])
    parts["index.json"] = b'{"manifests": [' + b",".join([b"{}"] * 1_500_000) + b"]}"
    _reject(opened, tmp_path, fb.oci_archive(parts), "limit")


# ------------------------------------------------------------------------------------------ chain ids


def test_chain_ids_formula() -> None:
    d = [f"sha256:{hashlib.sha256(bytes([i])).hexdigest()}" for i in range(3)]
    c = chain_ids(d)
    assert c[0] == d[0]
    assert c[1] == "sha256:" + hashlib.sha256(f"{d[0]} {d[1]}".encode()).hexdigest()
    assert c[2] == "sha256:" + hashlib.sha256(f"{c[1]} {d[2]}".encode()).hexdigest()
    assert chain_ids([]) == []


def test_chain_ids_known_vector() -> None:
    # OCI image-spec config.md example: ChainID(A|B) = Digest(ChainID(A) + " " + DiffID(B))
    a = "sha256:" + "a" * 64
    b = "sha256:" + "b" * 64
    assert chain_ids([a, b])[1] == "sha256:" + hashlib.sha256((a + " " + b).encode()).hexdigest()


def test_chain_ids_reject_malformed_digest() -> None:
    with pytest.raises(FormatError):
        chain_ids(["sha256:xyz"])


# ---------------------------------------------------------------------------------- decompression bombs

_BOMB_CHECK = """
import os, sys
from img_helper.formats import detect_format
fd = os.open(sys.argv[1], os.O_RDONLY)
fmt = detect_format([fd])
hwm = next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))  # this exec
print(fmt, hwm)
"""


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_bomb_single_compressed_file_sniff_is_bounded(tmp_path: Path, kind: str) -> None:
    """Sniffing a compressed single file (layer or compressed archive?) decompresses a bounded head only."""
    import subprocess
    import sys
    import zlib

    import zstandard

    zero = bytes(1 << 20)
    ti = tarfile.TarInfo("big")
    ti.size = 1 << 30
    head = ti.tobuf(tarfile.GNU_FORMAT)
    path = tmp_path / "bomb"
    with open(path, "wb") as f:
        if kind == "gzip":
            c = zlib.compressobj(1, zlib.DEFLATED, 31)
            f.write(c.compress(head))
            for _ in range(1024):
                f.write(c.compress(zero))
            f.write(c.flush())
        else:
            with zstandard.ZstdCompressor(level=1).stream_writer(f, closefd=False) as w:
                w.write(head)
                for _ in range(1024):
                    w.write(zero)
    assert path.stat().st_size < 8 << 20  # 1 GiB of zeros behind a tar header
    r = subprocess.run(
        [sys.executable, "-c", _BOMB_CHECK, str(path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    fmt, maxrss_kib = r.stdout.split()
    assert fmt == "layers"
    assert int(maxrss_kib) < 150_000, f"sniffing used {maxrss_kib} KiB"


# ---------------------------------------------------------------------------------- nested indexes, refs


def _nest(parts: dict[str, bytes], levels: int) -> dict[str, bytes]:
    """Wrap index.json's manifest list in `levels` nested image indexes (as buildx writes multi-arch)."""
    index = json.loads(parts["index.json"])
    for _ in range(levels):
        inner = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": index["manifests"],
            }
        ).encode()
        parts[f"blobs/sha256/{fb.sha(inner)}"] = inner
        index["manifests"] = [
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": f"sha256:{fb.sha(inner)}",
                "size": len(inner),
            }
        ]
    parts["index.json"] = json.dumps(index).encode()
    return parts


def test_oci_nested_index_is_followed(tmp_path: Path, opened: list[int]) -> None:
    parts = _nest(fb.oci_parts([fb.layer(1)]), 2)
    assert len(_image(opened, tmp_path, fb.oci_archive(parts)).layers) == 1


def test_oci_index_nesting_bomb_is_bounded(tmp_path: Path, opened: list[int]) -> None:
    parts = _nest(fb.oci_parts([fb.layer(1)]), 5)
    _reject(opened, tmp_path, fb.oci_archive(parts), "limit")


def test_oci_nested_index_digest_mismatch(tmp_path: Path, opened: list[int]) -> None:
    parts = _nest(fb.oci_parts([fb.layer(1)]), 1)
    inner = next(n for n, b in parts.items() if n.startswith("blobs/") and b"image.index" in b)
    parts[inner] = parts[inner].replace(b'"schemaVersion": 2', b'"schemaVersion": 3')
    _reject(opened, tmp_path, fb.oci_archive(parts), "digest")


def test_oci_ref_selects_a_tagged_manifest(tmp_path: Path, opened: list[int]) -> None:
    a, b = fb.oci_parts([fb.layer(1)]), fb.oci_parts([fb.layer(2), fb.layer(3)])
    ia, ib = json.loads(a["index.json"]), json.loads(b["index.json"])
    ia["manifests"][0]["annotations"] = {"org.opencontainers.image.ref.name": "one"}
    ib["manifests"][0]["annotations"] = {"org.opencontainers.image.ref.name": "two"}
    parts = {
        **a,
        **b,
        "index.json": json.dumps(
            {"schemaVersion": 2, "manifests": ia["manifests"] + ib["manifests"]}
        ).encode(),
    }
    (fd,) = _open(opened, fb.write(tmp_path / "multi.tar", fb.oci_archive(parts)))
    assert len(open_image([fd], ref="two").layers) == 2
    assert len(open_image([fd], ref="one").layers) == 1
    with pytest.raises(FormatError) as ei:
        open_image([fd], ref="three")
    assert ei.value.code == "missing"


def test_docker_archive_ref_selects_by_repo_tag(tmp_path: Path, opened: list[int]) -> None:
    layers = [fb.layer(1)]
    config = fb.config_for(layers)
    manifest = [
        {"Config": "c.json", "RepoTags": ["docker.io/library/a:1"], "Layers": ["l.tar"]},
        {"Config": "c.json", "RepoTags": ["b:2"], "Layers": ["l.tar", "l.tar"]},
    ]
    data = fb.archive(
        [("c.json", config), ("l.tar", layers[0]), ("manifest.json", json.dumps(manifest).encode())]
    )
    (fd,) = _open(opened, fb.write(tmp_path / "multi.tar", data))
    with pytest.raises(FormatError) as ei:
        open_image([fd], "docker-archive")
    assert ei.value.code == "format"  # two images: which one is ambiguous
    assert len(open_image([fd], ref="library/a:1").layers) == 1


# ---------------------------------------------------------------------------------- mixed-up inputs


def test_archive_in_a_list_of_layers_is_named(tmp_path: Path, opened: list[int]) -> None:
    paths = [
        fb.write(tmp_path / "1.tar", fb.layer(1)),
        fb.write(tmp_path / "2.tar", fb.docker_archive([fb.layer(2)])),
    ]
    with pytest.raises(FormatError) as ei:
        open_image(_open(opened, *paths))
    assert ei.value.code == "format" and ei.value.entry.endswith("2.tar") and "alone" in ei.value.reason
    # an explicit format is obeyed
    assert open_image(_open(opened, *paths), "layers").format == "layers"


def test_compressed_archive_in_a_list_of_layers_is_named(tmp_path: Path, opened: list[int]) -> None:
    paths = [
        fb.write(tmp_path / "1.tar", fb.layer(1)),
        fb.write(tmp_path / "2.tar", fb.gz(fb.oci_archive(fb.oci_parts([fb.layer(2)])))),
    ]
    with pytest.raises(FormatError) as ei:
        open_image(_open(opened, *paths))
    assert ei.value.entry.endswith("2.tar")


def test_gzip_layer_with_only_a_root_entry_is_a_layer(tmp_path: Path, opened: list[int]) -> None:
    data = fb.gz(fb.tar_bytes([("./", None)]))
    assert _image(opened, tmp_path, data).format == "layers"


def test_layer_whose_first_entry_is_dot_slash_then_rootfs_paths(tmp_path: Path, opened: list[int]) -> None:
    data = fb.tar_bytes([("./", None), ("./etc/", None), ("./etc/hosts", b"127.0.0.1 localhost\n")])
    paths = [fb.write(tmp_path / "a", data), fb.write(tmp_path / "b", fb.zst(data))]
    assert open_image(_open(opened, *paths)).format == "layers"


def test_big_layer_is_sniffed_from_its_first_members(tmp_path: Path, opened: list[int]) -> None:
    """A layer is not walked twice: sniffing stops after SNIFF_MAX_MEMBERS headers. The price, documented: a
    tar whose manifest.json comes later than that is read as a layer unless --format says otherwise."""
    from img_helper.formats import SNIFF_MAX_MEMBERS

    members = [(f"f{i}", b"") for i in range(SNIFF_MAX_MEMBERS + 10)] + [("manifest.json", b"[]")]
    (fd,) = _open(opened, fb.write(tmp_path / "big.tar", fb.archive(members)))
    assert detect_format([fd]) == "layers"
    small = [(f"f{i}", b"") for i in range(10)] + [("manifest.json", b"[]")]
    (fd2,) = _open(opened, fb.write(tmp_path / "small.tar", fb.archive(small)))
    assert detect_format([fd2]) == "docker-archive"
