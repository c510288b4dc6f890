"""Small synthetic image builders for the formats tests: layer tars, docker-archives, OCI archives and
layouts, written with Python's tarfile so each test can bend one field at a time."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import zstandard


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_bytes(entries: list[tuple[str, bytes | None]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """entries: (name, data) files, (name/, None) directories, ("name", b"->target") never: keep it simple."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if data is None:
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
                tf.addfile(ti)
            else:
                ti.size = len(data)
                ti.mode = 0o644
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def symlink_member(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.SYMTYPE
    ti.linkname = target
    return ti


def layer(n: int) -> bytes:
    """A small distinct layer: a directory and two files."""
    return tar_bytes(
        [(f"d{n}/", None), (f"d{n}/f.txt", f"layer {n}\n".encode()), (f"top{n}", b"x" * (100 * n))]
    )


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def archive(members: list[tuple[str, bytes] | tarfile.TarInfo], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
                continue
            name, data = m
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def config_for(layers_uncompressed: list[bytes]) -> bytes:
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{sha(x)}" for x in layers_uncompressed]},
        }
    ).encode()


def docker_archive(
    layers: list[bytes],
    layer_names: list[str] | None = None,
    manifest: Any = None,
    extra: list[tuple[str, bytes] | tarfile.TarInfo] | None = None,
    legacy: bool = True,
) -> bytes:
    """docker save style: <id>/layer.tar (legacy) or blobs/sha256/<hex> (docker >= 25) + manifest.json."""
    config = config_for(layers)
    cfg_name = f"{sha(config)}.json" if legacy else f"blobs/sha256/{sha(config)}"
    names = layer_names or [
        f"{sha(x + bytes([i]))}/layer.tar" if legacy else f"blobs/sha256/{sha(x)}"
        for i, x in enumerate(layers)
    ]
    members: list[tuple[str, bytes] | tarfile.TarInfo] = [(cfg_name, config)]
    members += [
        (n, x)
        for n, x in zip(names, layers, strict=False)
        if not n.startswith(("/", "..")) and "/../" not in n
    ]
    members += extra or []
    if manifest is None:
        manifest = [{"Config": cfg_name, "RepoTags": ["t:latest"], "Layers": names}]
    members.append(("manifest.json", json.dumps(manifest).encode()))
    return archive(members)


def oci_parts(
    layers: list[bytes],
    media: str = "application/vnd.oci.image.layer.v1.tar",
    uncompressed: list[bytes] | None = None,
    manifest_patch: dict[str, Any] | None = None,
    index_patch: dict[str, Any] | None = None,
) -> dict[str, bytes]:
    """name -> content of an OCI image layout (oci-layout, index.json, blobs/sha256/*)."""
    config = config_for(uncompressed or layers)
    blobs = {sha(config): config}
    for x in layers:
        blobs[sha(x)] = x
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": f"sha256:{sha(config)}",
            "size": len(config),
        },
        "layers": [{"mediaType": media, "digest": f"sha256:{sha(x)}", "size": len(x)} for x in layers],
    }
    manifest.update(manifest_patch or {})
    mbytes = json.dumps(manifest).encode()
    blobs[sha(mbytes)] = mbytes
    index: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": f"sha256:{sha(mbytes)}",
                "size": len(mbytes),
                "platform": {"os": "linux", "architecture": "amd64"},
            }
        ],
    }
    index.update(index_patch or {})
    parts = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": json.dumps(index).encode()}
    parts.update({f"blobs/sha256/{h}": b for h, b in blobs.items()})
    return parts


def oci_archive(parts: dict[str, bytes]) -> bytes:
    return archive(list(parts.items()))


def oci_layout_dir(parts: dict[str, bytes], root: Path) -> Path:
    for name, data in parts.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
