"""The extractor on the real Debian families (tests/images/build.py): applying each family's layer tars in
order gives exactly `umoci raw unpack` of the same image (types, modes, owners, sizes, content, symlink
targets, link counts, xattrs), and each blob's digest is the one the builder recorded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from img_helper.extract import LayerSource, apply_layer, syncfs
from tests.fixtures.images import RealImages
from tests.fixtures.trees import assert_same_tree


@pytest.mark.slow
@pytest.mark.parametrize("family", ["alpha", "beta", "gamma"])
def test_family_layers_equal_umoci_unpack(real_images: RealImages, family: str, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    root = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        layers = zip(real_images.families[family], real_images.layer_digests[family], strict=True)
        for layer, digest in layers:
            fd = os.open(layer, os.O_RDONLY)
            try:
                st = apply_layer(root, LayerSource(fd, expect_sha256=digest))
            finally:
                os.close(fd)
            assert f"sha256:{st.blob_sha256}" == digest and st.blob_bytes == layer.stat().st_size
        syncfs(root)
    finally:
        os.close(root)
    assert_same_tree(real_images.references[family], rootfs, ignore_root=True)
