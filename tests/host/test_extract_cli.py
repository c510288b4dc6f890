"""`img-helper extract`, the offline entry point: real subprocesses, real trees, exit codes, the summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.host import formats_build as fb

HELPER = str(Path(sys.executable).parent / "img-helper")
SUMMARY_KEYS = {
    "ok",
    "entries",
    "files",
    "dirs",
    "symlinks",
    "hardlinks",
    "whiteouts",
    "bytes",
    "seconds",
    "chain_ids",
}


def run(
    into: Path, *sources: Path | str, fmt: str | None = None, extra: tuple[str, ...] = ()
) -> tuple[int, Any, str]:
    args = [HELPER, "extract", "--into", str(into), *extra]
    if fmt:
        args += ["--format", fmt]
    r = subprocess.run([*args, *map(str, sources)], capture_output=True, text=True, timeout=120)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, (r.stdout, r.stderr)
    return r.returncode, json.loads(lines[0]), r.stderr


def image_json(into: Path) -> dict[str, Any]:
    return json.loads((into / "image.json").read_text())


def test_family_of_layers_extracts_in_given_order(tmp_path: Path) -> None:
    l1 = fb.tar_bytes([("etc/", None), ("etc/os", b"one\n"), ("a", b"1")])
    l2 = fb.tar_bytes([("etc/", None), ("etc/os", b"two\n"), ("b", b"22")])
    # names sort the other way round: the command-line order decides
    p1, p2 = fb.write(tmp_path / "10.tar", l1), fb.write(tmp_path / "2.tar.gz", l2)
    rc, summary, err = run(tmp_path / "out", p1, p2)
    assert rc == 0, err
    assert SUMMARY_KEYS <= set(summary) and summary["ok"] is True
    root = tmp_path / "out" / "rootfs"
    assert (root / "etc/os").read_bytes() == b"two\n"
    assert (root / "a").read_bytes() == b"1" and (root / "b").read_bytes() == b"22"
    assert summary["files"] == 4 and summary["dirs"] == 2
    assert summary["chain_ids"] == fb_chain([l1, l2])
    meta = image_json(tmp_path / "out")
    assert meta["format"] == "layers"
    assert [x["digest"] for x in meta["layers"]] == [f"sha256:{fb.sha(x)}" for x in (l1, l2)]
    assert [x["size"] for x in meta["layers"]] == [len(l1), len(l2)]
    assert [x["compression"] for x in meta["layers"]] == ["tar", "tar"]
    assert meta["chain_ids"] == summary["chain_ids"]
    assert meta["extractor_version"]
    assert not (tmp_path / "out" / ".failed").exists()


def fb_chain(blobs: list[bytes]) -> list[str]:
    from img_helper.formats import chain_ids

    return chain_ids([f"sha256:{fb.sha(b)}" for b in blobs])


def test_gzip_and_zstd_layers_named_wrongly(tmp_path: Path) -> None:
    l1 = fb.layer(1)
    l2 = fb.layer(2)
    p1 = fb.write(tmp_path / "1.tar", fb.gz(l1))  # gzip named .tar
    p2 = fb.write(tmp_path / "2.tar.gz", fb.zst(l2))  # zstd named .tar.gz
    rc, _summary, err = run(tmp_path / "out", p1, p2)
    assert rc == 0, err
    assert (tmp_path / "out/rootfs/d2/f.txt").read_text() == "layer 2\n"
    assert [x["compression"] for x in image_json(tmp_path / "out")["layers"]] == ["gzip", "zstd"]


def test_docker_archive(tmp_path: Path) -> None:
    layers = [fb.layer(1), fb.layer(2)]
    p = fb.write(tmp_path / "img.tar.gz", fb.docker_archive(layers))  # the name lies
    rc, summary, err = run(tmp_path / "out", p)
    assert rc == 0, err
    assert summary["chain_ids"] == fb_chain(layers)
    meta = image_json(tmp_path / "out")
    assert meta["format"] == "docker-archive"
    assert meta["config_digest"] == f"sha256:{fb.sha(fb.config_for(layers))}"
    assert (tmp_path / "out/rootfs/top2").read_bytes() == b"x" * 200


def test_oci_archive_gzip_layers(tmp_path: Path) -> None:
    raw = [fb.layer(1), fb.layer(3)]
    blobs = [fb.gz(x) for x in raw]
    parts = fb.oci_parts(blobs, media="application/vnd.oci.image.layer.v1.tar+gzip", uncompressed=raw)
    p = fb.write(tmp_path / "img", fb.oci_archive(parts))
    rc, summary, err = run(tmp_path / "out", p)
    assert rc == 0, err
    assert summary["chain_ids"] == fb_chain(blobs)
    assert image_json(tmp_path / "out")["format"] == "oci-archive"
    assert (tmp_path / "out/rootfs/d3/f.txt").read_text() == "layer 3\n"


def test_oci_layout_directory(tmp_path: Path) -> None:
    blobs = [fb.layer(1)]
    d = fb.oci_layout_dir(fb.oci_parts(blobs), tmp_path / "layout")
    rc, _summary, err = run(tmp_path / "out", d)
    assert rc == 0, err
    assert image_json(tmp_path / "out")["format"] == "oci-layout"


def _assert_rejected(tmp_path: Path, rc: int, summary: Any, err: str, code: str) -> None:
    assert rc == 2, err
    assert summary["ok"] is False and summary["error"]["code"] == code
    assert err.startswith(f"error: {code}: "), err
    assert not (tmp_path / "out" / "image.json").exists()


def test_manifest_json_layer_dotdot_exit_2(tmp_path: Path) -> None:
    config = fb.config_for([fb.layer(1)])
    manifest = [{"Config": "c.json", "Layers": ["../x/layer.tar"]}]
    data = fb.archive(
        [("c.json", config), ("x/layer.tar", fb.layer(1)), ("manifest.json", json.dumps(manifest).encode())]
    )
    rc, summary, err = run(tmp_path / "out", fb.write(tmp_path / "a.tar", data))
    _assert_rejected(tmp_path, rc, summary, err, "escape")
    assert "../x/layer.tar" in err


def test_manifest_json_layer_absolute_exit_2(tmp_path: Path) -> None:
    layers = [fb.layer(1)]
    config = fb.config_for(layers)
    manifest = [{"Config": "c.json", "Layers": ["/etc/shadow"]}]
    data = fb.archive([("c.json", config), ("manifest.json", json.dumps(manifest).encode())])
    rc, summary, err = run(tmp_path / "out", fb.write(tmp_path / "a.tar", data))
    _assert_rejected(tmp_path, rc, summary, err, "escape")


def test_manifest_json_layer_missing_member_exit_2(tmp_path: Path) -> None:
    config = fb.config_for([fb.layer(1)])
    manifest = [{"Config": "c.json", "Layers": ["gone/layer.tar"]}]
    data = fb.archive([("c.json", config), ("manifest.json", json.dumps(manifest).encode())])
    rc, summary, err = run(tmp_path / "out", fb.write(tmp_path / "a.tar", data))
    _assert_rejected(tmp_path, rc, summary, err, "missing")


def test_oci_layer_blob_digest_mismatch_exit_2(tmp_path: Path) -> None:
    # the blob is stored under its honest name but with one byte flipped: only streaming verification sees it
    layer = fb.layer(1)
    parts = fb.oci_parts([layer])
    bad = bytearray(layer)
    bad[layer.find(b"layer 1")] ^= 1  # file content, not a header: the tar itself stays well formed
    parts[f"blobs/sha256/{fb.sha(layer)}"] = bytes(bad)
    rc, summary, err = run(tmp_path / "out", fb.write(tmp_path / "a.tar", fb.oci_archive(parts)))
    _assert_rejected(tmp_path, rc, summary, err, "digest")
    failed = json.loads((tmp_path / "out" / ".failed").read_text())
    assert failed["code"] == "digest"


def test_docker_archive_layer_tampered_against_diff_id_exit_2(tmp_path: Path) -> None:
    layers = [fb.layer(1)]
    data = bytearray(fb.docker_archive(layers))
    at = bytes(data).find(b"layer 1\n")
    data[at] = ord("L")
    rc, summary, err = run(tmp_path / "out", fb.write(tmp_path / "a.tar", bytes(data)))
    _assert_rejected(tmp_path, rc, summary, err, "digest")


def test_compressed_outer_archive_exit_2_clear_message(tmp_path: Path) -> None:
    p = fb.write(tmp_path / "img.tar", fb.gz(fb.docker_archive([fb.layer(1)])))
    rc, summary, err = run(tmp_path / "out", p)
    _assert_rejected(tmp_path, rc, summary, err, "compressed")
    assert "decompress" in err


def test_json_bomb_manifest_exit_2(tmp_path: Path) -> None:
    data = fb.archive([("manifest.json", b"[" * 300_000 + b"]" * 300_000)])
    rc, summary, err = run(tmp_path / "out", fb.write(tmp_path / "a.tar", data))
    _assert_rejected(tmp_path, rc, summary, err, "limit")


def test_layer_escape_exit_2_and_nothing_outside(tmp_path: Path) -> None:
    evil = fb.tar_bytes([("ok", b"fine"), ("../../outside-evil", b"pwned")])
    rc, summary, err = run(tmp_path / "out", fb.write(tmp_path / "l.tar", evil))
    assert rc == 2, err
    assert summary["ok"] is False
    assert not (tmp_path / "outside-evil").exists() and not (tmp_path.parent / "outside-evil").exists()
    assert not (tmp_path / "out" / "image.json").exists()
    assert (tmp_path / "out" / ".failed").exists()


def test_entry_limit_exit_2(tmp_path: Path) -> None:
    layer = fb.tar_bytes([(f"f{i}", b"") for i in range(50)])
    rc, summary, err = run(
        tmp_path / "out", fb.write(tmp_path / "l.tar", layer), extra=("--max-entries", "10")
    )
    _assert_rejected(tmp_path, rc, summary, err, "limit")


def test_garbage_input_exit_2(tmp_path: Path) -> None:
    rc, summary, err = run(tmp_path / "out", fb.write(tmp_path / "x.tar", b"not an image at all" * 40))
    _assert_rejected(tmp_path, rc, summary, err, "format")


def test_nonempty_rootfs_exit_1(tmp_path: Path) -> None:
    (tmp_path / "out/rootfs").mkdir(parents=True)
    (tmp_path / "out/rootfs/old").write_text("x")
    rc, summary, err = run(tmp_path / "out", fb.write(tmp_path / "l.tar", fb.layer(1)))
    assert rc == 1 and summary["ok"] is False and err.startswith("error: exists: rootfs:"), err


def test_second_extraction_into_same_dir_exit_1(tmp_path: Path) -> None:
    p = fb.write(tmp_path / "l.tar", fb.layer(1))
    assert run(tmp_path / "out", p)[0] == 0
    rc, summary, _err = run(tmp_path / "out", p)
    assert rc == 1 and summary["error"]["code"] == "exists"


def test_empty_existing_rootfs_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "out/rootfs").mkdir(parents=True)
    rc, _summary, err = run(tmp_path / "out", fb.write(tmp_path / "l.tar", fb.layer(1)))
    assert rc == 0, err


def test_fifo_source_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rc, summary, _err = run(tmp_path / "out", fifo, fmt="layers", extra=())
    assert rc == 2 and summary["ok"] is False and summary["error"]["code"] == "format"


def test_missing_source_is_a_usage_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [HELPER, "extract", "--into", str(tmp_path / "o"), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "does not exist" in r.stderr


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
def test_explicit_format_mismatch_exit_2(tmp_path: Path, fmt: str) -> None:
    rc, summary, err = run(tmp_path / "out", fb.write(tmp_path / "l.tar", fb.layer(1)), fmt=fmt)
    assert rc == 2 and summary["ok"] is False, err
