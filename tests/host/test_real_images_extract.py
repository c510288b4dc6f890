"""Real Debian images (tests/images/build.py): `img-helper extract` reproduces `umoci raw unpack` byte
for byte -- types, modes, uid/gid, sizes, content, symlink targets, hardlink counts, xattrs -- for the
bucket-style family, the docker-archive, the OCI archives (gzip, zstd) and the OCI layout. Needs root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from img_helper.formats import chain_ids
from tests.fixtures.images import RealImages
from tests.fixtures.trees import assert_same_tree, tree_spec

HELPER = str(Path(sys.executable).parent / "img-helper")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="extracting real images needs root (lchown)")


@cache
def reference_spec(path: Path) -> tuple[str, ...]:
    return tuple(tree_spec(path))


def extract(into: Path, *sources: Path | str, ref: str | None = None) -> dict[str, Any]:
    args = (
        [HELPER, "extract", "--into", str(into)] + (["--ref", ref] if ref else []) + [str(s) for s in sources]
    )
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary: dict[str, Any] = json.loads(r.stdout)
    assert summary["ok"] is True
    return summary


def check(real_images: RealImages, family: str, into: Path, summary: dict[str, Any]) -> dict[str, Any]:
    assert_same_tree(list(reference_spec(real_images.references[family])), into / "rootfs")
    meta: dict[str, Any] = json.loads((into / "image.json").read_text())
    assert meta["chain_ids"] == summary["chain_ids"]
    assert meta["chain_ids"] == chain_ids([x["digest"] for x in meta["layers"]])
    assert len(meta["layers"]) == len(real_images.families[family])
    return meta


@pytest.mark.parametrize("family", ["alpha", "gamma"])
def test_bucket_family_equals_umoci_raw_unpack(real_images: RealImages, tmp_path: Path, family: str) -> None:
    summary = extract(tmp_path / "x", *real_images.families[family])
    meta = check(real_images, family, tmp_path / "x", summary)
    assert meta["format"] == "layers"
    # uncompressed layers: blob digests are the diff_ids, so these are the OCI ChainIDs
    assert [x["digest"] for x in meta["layers"]] == real_images.layer_digests[family]
    assert summary["chain_ids"] == chain_ids(real_images.layer_digests[family])


def test_docker_archive_equals_umoci_raw_unpack(real_images: RealImages, tmp_path: Path) -> None:
    a = real_images.docker_archive
    summary = extract(tmp_path / "x", a.path)
    meta = check(real_images, a.family, tmp_path / "x", summary)
    assert meta["format"] == "docker-archive"
    assert [x["digest"] for x in meta["layers"]] == real_images.layer_digests[a.family]


@pytest.mark.parametrize("which", ["oci_archive", "oci_archive_zstd"])
def test_oci_archive_equals_umoci_raw_unpack(real_images: RealImages, tmp_path: Path, which: str) -> None:
    a = getattr(real_images, which)
    summary = extract(tmp_path / "x", a.path)
    meta = check(real_images, a.family, tmp_path / "x", summary)
    assert meta["format"] == "oci-archive"
    assert {x["compression"] for x in meta["layers"]} == {"gzip" if a.compression == "gzip" else "zstd"}


def test_oci_layout_by_ref_equals_umoci_raw_unpack(real_images: RealImages, tmp_path: Path) -> None:
    summary = extract(tmp_path / "x", real_images.oci_layout, ref=real_images.oci_tags["beta"])
    meta = check(real_images, "beta", tmp_path / "x", summary)
    assert meta["format"] == "oci-layout"


def test_family_and_archives_agree_on_layer_digests(real_images: RealImages, tmp_path: Path) -> None:
    """Identical uncompressed layers have identical chain ids whatever the container: devices are shared."""
    a = real_images.docker_archive
    from img_helper.formats import open_image

    fds = [os.open(p, os.O_RDONLY) for p in [a.path, *real_images.families[a.family]]]
    try:
        archived = open_image(fds[:1])
        family = open_image(fds[1:])
        assert [la.digest for la in archived.layers] == real_images.layer_digests[a.family]
        assert [la.size for la in archived.layers] == [la.size for la in family.layers]
    finally:
        for fd in fds:
            os.close(fd)
