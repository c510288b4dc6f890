"""Image references: what the user names on the command line.

Two kinds:
  * a **family** name, e.g. ``python``: the layers are the objects ``<prefix><family>/<n>.<ext>`` in the
    configured bucket (``IMG_S3_BUCKET``), applied in numeric order of ``n`` (2 before 10).
    ``s3://bucket/some/prefix/python/`` (trailing slash) names a family in another bucket/prefix.
  * an **archive** ``s3://bucket/key``: one object holding a whole image (docker-archive or OCI archive;
    the format is sniffed from the content, never from the name).

Cheap to import: the idempotent ``img process`` fast path parses the reference before anything heavy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from img.config import Config

# Family and activation names end up in S3 keys, device names and file names: keep them boring.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# S3 bucket naming rules (simplified: lowercase, digits, dots, dashes, 3..63)
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
ARCHIVE_SUFFIXES = (".tar.gz", ".tar.zst", ".tgz", ".tar", ".oci", ".docker")


class RefError(Exception):
    """A reference that cannot name an image; ``hint`` says what would."""

    def __init__(self, ref: str, reason: str, hint: str = "") -> None:
        super().__init__(f"bad image reference {ref!r}: {reason}" + (f" ({hint})" if hint else ""))
        self.ref = ref
        self.reason = reason
        self.hint = hint


@dataclass(frozen=True)
class FamilyRef:
    bucket: str
    prefix: str  # "" or ends with "/"
    family: str

    kind = "family"

    @property
    def key_prefix(self) -> str:
        return f"{self.prefix}{self.family}/"

    @property
    def canonical(self) -> str:
        return f"s3://{self.bucket}/{self.key_prefix}"

    @property
    def default_name(self) -> str:
        return self.family


@dataclass(frozen=True)
class ArchiveRef:
    bucket: str
    key: str

    kind = "archive"

    @property
    def canonical(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def default_name(self) -> str:
        base = self.key.rsplit("/", 1)[-1]
        for suffix in ARCHIVE_SUFFIXES:
            if base.endswith(suffix) and len(base) > len(suffix):
                base = base[: -len(suffix)]
                break
        name = re.sub(r"[^A-Za-z0-9._-]", "-", base).lstrip("._-")[:64]
        return name or "image"


ImageRef = FamilyRef | ArchiveRef


def check_name(name: str, what: str = "activation name") -> str:
    if not NAME_RE.match(name) or name in {".", ".."}:
        raise RefError(name, f"invalid {what}",
                       "use 1-64 characters: letters, digits, '.', '_', '-', starting with a letter or digit")
    return name


def _check_key(ref: str, key: str) -> None:
    if not key or len(key.encode()) > 1024:
        raise RefError(ref, "the S3 key is empty or longer than 1024 bytes")
    if any(part in {"", ".", ".."} for part in key.rstrip("/").split("/")) or "\x00" in key:
        raise RefError(ref, "the S3 key has empty, '.' or '..' components")


def parse(ref: str, config: Config) -> ImageRef:
    ref = ref.strip()
    if ref.startswith("s3://"):
        bucket, _, key = ref[len("s3://"):].partition("/")
        if not BUCKET_RE.match(bucket):
            raise RefError(ref, f"invalid bucket name {bucket!r}")
        _check_key(ref, key)
        if key.endswith("/"):
            prefix, _, family = key.rstrip("/").rpartition("/")
            check_name(family, "family name")
            return FamilyRef(bucket, prefix + "/" if prefix else "", family)
        return ArchiveRef(bucket, key)
    if "://" in ref:
        raise RefError(ref, "only s3:// URLs are supported", "use a family name or s3://bucket/key")
    check_name(ref, "family name")
    if not config.bucket:
        raise RefError(ref, "no bucket configured for family names",
                       "set IMG_S3_BUCKET or pass --bucket, or use s3://bucket/prefix/family/")
    return FamilyRef(config.bucket, config.prefix, ref)


def layer_number(key: str, key_prefix: str) -> int | None:
    """The layer index of a family object ``<key_prefix><n>[.ext]``, or None if it is not a layer."""
    if not key.startswith(key_prefix):
        return None
    rest = key[len(key_prefix):]
    m = re.fullmatch(r"(\d{1,9})(\.[A-Za-z0-9.]+)?", rest)
    return int(m.group(1)) if m else None
