"""Image references: family names and s3:// URLs, parsed strictly."""

from __future__ import annotations

from pathlib import Path

import pytest

from img.config import Config
from img.refs import ArchiveRef, FamilyRef, RefError, check_name, layer_number, parse

CFG = Config(home=Path("/nonexistent"), bucket="img-bucket", prefix="images/")


def test_family_name_uses_configured_bucket_and_prefix() -> None:
    ref = parse("python", CFG)
    assert ref == FamilyRef("img-bucket", "images/", "python")
    assert ref.canonical == "s3://img-bucket/images/python/"
    assert ref.default_name == "python"


def test_family_url_with_trailing_slash() -> None:
    ref = parse("s3://other-bucket/some/where/node/", CFG)
    assert ref == FamilyRef("other-bucket", "some/where/", "node")
    assert parse("s3://other-bucket/node/", CFG) == FamilyRef("other-bucket", "", "node")


def test_archive_url() -> None:
    ref = parse("s3://img-bucket/archives/alpine-oci.tar", CFG)
    assert ref == ArchiveRef("img-bucket", "archives/alpine-oci.tar")
    assert ref.default_name == "alpine-oci"
    assert ArchiveRef("b-b", "x/.tar").default_name == "tar"


def test_family_without_bucket_says_what_to_do() -> None:
    with pytest.raises(RefError) as e:
        parse("python", Config(home=Path("/x")))
    assert "IMG_S3_BUCKET" in str(e.value)


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "-x", "x" * 65, "py thon", "http://x/y", "s3://B/x",
                                 "s3://bucket/", "s3://bucket/a/../b", "s3://bucket//a", "s3://bucket/a/./b"])
def test_path_traversal_and_junk_refs_are_rejected(bad: str) -> None:
    with pytest.raises(RefError):
        parse(bad, CFG)


def test_activation_names() -> None:
    assert check_name("python-3.12_x") == "python-3.12_x"
    for bad in ["", ".", "..", "../x", "a/b", "x\x00"]:
        with pytest.raises(RefError):
            check_name(bad)


def test_layer_numbers_sort_numerically_not_lexicographically() -> None:
    keys = ["images/py/10.tar", "images/py/2.tar", "images/py/1.tar", "images/py/README", "images/py/x/3.tar"]
    nums = {k: layer_number(k, "images/py/") for k in keys}
    assert nums == {"images/py/10.tar": 10, "images/py/2.tar": 2, "images/py/1.tar": 1,
                    "images/py/README": None, "images/py/x/3.tar": None}
    assert sorted((n, k) for k, n in nums.items() if n is not None)[-1][1] == "images/py/10.tar"
