"""atheris fuzzing of the image-format parser (img_helper.formats.open_image): outer tar walking,
docker-archive manifest.json, OCI index/manifest/config, sniffing of compressed files.

    .venv/bin/python tests/fuzz/fuzz_formats.py -max_total_time=30

Each input is one file handed over as an fd, as the daemon would. A FormatError is an expected outcome; any
other exception is a finding, and so is a layer range that lies outside the file. formats.py is pure Python,
so atheris' instrumentation gives real coverage. Seeds: small docker-archives and OCI archives. Mutated tar
headers would almost always fail their checksum; every other input has its header checksums repaired so
that the mutations reach the parsing behind the check.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

with atheris.instrument_imports():
    from img_helper.formats import ArchiveLimits, FormatError, open_image

from tests.host import formats_build as fb  # noqa: E402

LIMITS = ArchiveLimits(max_members=2000, max_json_bytes=256 << 10, max_header_bytes=64 << 10, max_layers=64)


def seeds() -> list[bytes]:
    raw = [fb.layer(1), fb.layer(2)]
    return [
        fb.docker_archive(raw),
        fb.docker_archive(raw, legacy=False),
        fb.oci_archive(fb.oci_parts(raw)),
        fb.oci_archive(
            fb.oci_parts(
                [fb.gz(x) for x in raw], media="application/vnd.oci.image.layer.v1.tar+gzip", uncompressed=raw
            )
        ),
        fb.layer(3),
        fb.gz(fb.layer(3)),
        fb.zst(fb.layer(3)),
    ]


def repair_checksums(data: bytes) -> bytes:
    buf = bytearray(data)
    for pos in range(0, len(buf) - 511, 512):
        if buf[pos + 257 : pos + 262] == b"ustar":
            buf[pos + 148 : pos + 156] = b" " * 8
            buf[pos + 148 : pos + 156] = b"%06o\0 " % sum(buf[pos : pos + 512])
    return bytes(buf)


def one_input(data: bytes) -> None:
    if data and data[-1] & 1:
        data = repair_checksums(data)
    fd = os.memfd_create("fuzz")
    try:
        os.write(fd, data)
        for fmt in ("auto", "docker-archive", "oci-archive"):
            try:
                image = open_image([fd], fmt, LIMITS)
            except FormatError:
                continue
            for layer in image.layers:
                src = layer.source
                end = len(data) if src.length < 0 else src.offset + src.length
                if not (0 <= src.offset <= end <= len(data)):
                    raise AssertionError(
                        f"layer range {src.offset}+{src.length} outside a {len(data)}-byte file"
                    )
                if layer.compression not in ("tar", "gzip", "zstd"):
                    raise AssertionError(f"unsniffed layer {layer.compression!r}")
    finally:
        os.close(fd)


def main() -> None:
    corpus = Path(os.environ.get("FUZZ_CORPUS", "/tmp/img-fuzz-formats-corpus"))
    corpus.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(seeds()):
        (corpus / f"seed-{i}").write_bytes(s)
    atheris.Setup([sys.argv[0], *sys.argv[1:], str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
