"""Image formats: recognise what a set of file descriptors holds, from content only (names lie), and map it to
an ordered list of layer blobs, each a byte range of an fd that `img_helper.extract.apply_layer` streams.

Formats:
- a bucket-style family: one or more layer blobs (plain tar, gzip or zstd), in the order given;
- docker-archive: an uncompressed tar with `manifest.json` (its `Layers` order is the layer order);
- OCI image archive: an uncompressed tar with `oci-layout` + `index.json` (index -> manifest -> layers);
- OCI image layout: a directory fd holding `oci-layout` (offline CLI only).

Outer archives are hostile input: their tar headers are walked here with limits (member count, name and header
sizes), member names must stay inside the archive and be unique, JSON documents are size-capped and strictly
typed, manifest and config blobs are verified against their digests when read, and layer blobs carry the
expected sha256 into `apply_layer`, which verifies it while streaming.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from img_helper.extract import LayerSource
from img_helper.strictjson import no_duplicate_keys

FORMATS = ("auto", "layers", "docker-archive", "oci-archive", "oci-layout")

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"
BLOCK = 512

OCI_LAYOUT_FILE = "oci-layout"
REF_NAME = "org.opencontainers.image.ref.name"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST})
MANIFEST_TYPES = frozenset({MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST})
CONFIG_TYPES = frozenset(
    {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
)
LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


class FormatError(Exception):
    """The input is not a well-formed image we accept. Same shape as `extract.ExtractError`.

    Codes: "format" (unrecognised or unsupported), "compressed" (compressed outer archive), "corrupt",
    "limit", "escape" (a name pointing outside the archive), "missing", "duplicate", "digest", "mediatype"."""

    def __init__(self, code: str, entry: str, reason: str) -> None:
        super().__init__(f"{code}: {entry}: {reason}")
        self.code = code
        self.entry = entry
        self.reason = reason


# Members read while guessing whether a tar is an image archive; pass --format for a bigger archive.
SNIFF_MAX_MEMBERS = 2048


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 100_000
    max_name_bytes: int = 4096
    max_header_bytes: int = 1 << 20  # one PAX / GNU long-name record
    max_json_bytes: int = 4 << 20
    max_layers: int = 1000
    max_link_hops: int = 16


@dataclass
class Layer:
    source: LayerSource
    digest: str | None  # "sha256:<hex>" of the blob if known before extraction (verified while streaming)
    compression: str = ""  # "tar" | "gzip" | "zstd", sniffed from content
    size: int = -1  # blob size in bytes, when known


@dataclass
class ImageSource:
    format: str
    layers: list[Layer]
    config: dict[str, Any] | None
    manifest: dict[str, Any] | None
    config_digest: str | None = None
    source: str = ""  # free text for image.json (paths, an S3 URL)
    owned_fds: list[int] = field(
        default_factory=list
    )  # fds opened here (OCI layout blobs); close() closes them

    def close(self) -> None:
        fds, self.owned_fds = self.owned_fds, []
        for fd in fds:
            os.close(fd)


# ---------------------------------------------------------------------------------------------- sniffing


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.pread(fd, n - len(out), offset + len(out))
        if not chunk:
            break
        out += chunk
    return out


def _is_tar_header(block: bytes) -> bool:
    if len(block) < BLOCK:
        return False
    if block[257:262] == b"ustar":
        return True
    return block == bytes(BLOCK)  # an empty tar (end-of-archive blocks only) is a valid empty layer


def _magic_kind(head: bytes) -> str | None:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if _is_tar_header(head[:BLOCK]):
        return "tar"
    return None


def sniff_blob(fd: int, offset: int = 0, entry: str = "") -> str:
    """Return "tar", "gzip" or "zstd" for the blob starting at offset; FormatError otherwise."""
    head = _pread_exact(fd, BLOCK, offset)
    kind = _magic_kind(head)
    if kind:
        return kind
    if head.startswith(XZ_MAGIC) or head.startswith(BZIP2_MAGIC):
        raise FormatError("format", entry, "xz/bzip2 layers are not supported (plain tar, gzip or zstd only)")
    if not head:
        raise FormatError("format", entry, "empty input")
    raise FormatError("format", entry, "not a tar, gzip or zstd blob")


def _decompressed_head(fd: int, kind: str, want: int = 64 << 10) -> bytes:
    """At most `want` bytes from the start of a compressed blob, decompressing at most 1 MiB of input: enough
    to read its first tar headers, bounded whatever the compression ratio (a bomb yields `want` bytes)."""
    data = _pread_exact(fd, 1 << 20, 0)
    try:
        if kind == "gzip":
            return zlib.decompressobj(wbits=31).decompress(data, want)
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=False)
        out = b""
        while len(out) < want:
            chunk = reader.read(want - len(out))
            if not chunk:
                break
            out += chunk
        return out
    except Exception:  # a corrupt stream is apply_layer's to report; here it is just "not an archive"
        return b""


_ARCHIVE_TOP = frozenset({"manifest.json", "oci-layout", "index.json", "repositories", "blobs"})


def _looks_like_outer_archive_name(name: str) -> bool:
    top = name.split("/", 1)[0]
    return top in _ARCHIVE_TOP or bool(re.fullmatch(r"[0-9a-f]{64}(\.json|\.tar)?", top))


def _first_member_names(head: bytes, most: int = 4) -> list[str]:
    names: list[str] = []
    pos = 0
    while pos + BLOCK <= len(head) and len(names) < most:
        block = head[pos : pos + BLOCK]
        if block == bytes(BLOCK) or block[257:262] != b"ustar":
            break
        name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        names.append("/".join(p for p in name.split("/") if p not in ("", ".")))
        try:
            size = _parse_number(block[124:136], "", "size")
        except FormatError:
            break
        pos += BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
    return [n for n in names if n]


def looks_like_outer_archive(fd: int, kind: str) -> bool:
    """Whether a blob is an image archive (plain, or compressed: `docker save | gzip`) rather than a layer,
    judged by the names of its first members (a layer starts with rootfs paths; an archive with blobs/,
    manifest.json, oci-layout, <64 hex>/ ...)."""
    head = _pread_exact(fd, 64 << 10, 0) if kind == "tar" else _decompressed_head(fd, kind)
    names = _first_member_names(head)
    return bool(names) and all(_looks_like_outer_archive_name(n) for n in names)


# ---------------------------------------------------------------------------------- outer tar header walk


@dataclass(frozen=True)
class Member:
    name: str  # normalised: no leading "./" or "/", no "." components, no trailing "/"
    kind: str  # "file" | "dir" | "symlink" | "hardlink" | "other"
    offset: int  # of the data, in the outer fd
    size: int
    linkname: str = ""


def _parse_number(field_: bytes, entry: str, what: str) -> int:
    if field_ and field_[0] & 0x80:  # GNU base-256
        if field_[0] & 0x40:
            raise FormatError("corrupt", entry, f"negative {what}")
        return int.from_bytes(bytes([field_[0] & 0x3F]) + field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise FormatError("corrupt", entry, f"bad {what} field {text[:16]!r}") from None


def _checksum_ok(block: bytes) -> bool:
    stored = block[148:156].split(b"\0", 1)[0].strip(b" ")
    try:
        want = int(stored, 8)
    except ValueError:
        return False
    raw = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(raw)
    signed = sum(b - 256 if b > 127 else b for b in raw)
    return want in (unsigned, signed)


def _parse_pax(data: bytes, entry: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:].strip(b"\0") == b"":
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise FormatError("corrupt", entry, "bad PAX record")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise FormatError("corrupt", entry, "bad PAX record length") from None
        if length <= sp - pos or pos + length > len(data) or data[pos + length - 1 : pos + length] != b"\n":
            raise FormatError("corrupt", entry, "bad PAX record length")
        key, eq, value = data[sp + 1 : pos + length - 1].partition(b"=")
        if not eq:
            raise FormatError("corrupt", entry, "bad PAX record")
        if b"\0" in value and key in (b"path", b"linkpath"):
            raise FormatError("corrupt", entry, "NUL in a PAX name")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def normalize_member_name(raw: str, entry: str | None = None) -> str:
    """Archive-relative name; FormatError("escape") for absolute names and `..` components."""
    shown = raw if entry is None else entry
    if "\0" in raw or "\n" in raw:
        raise FormatError("escape", shown, "NUL or newline in a member name")
    if raw.startswith("/"):
        raise FormatError("escape", shown, "absolute member name")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FormatError("escape", shown, "member name with a '..' component")
    return "/".join(parts)


def walk_tar(fd: int, limits: ArchiveLimits = ArchiveLimits(), strict: bool = True) -> dict[str, Member]:
    """Map member names to data ranges of an uncompressed tar, reading only headers (pread).

    Directories are not recorded. Strict: rejects duplicate and escaping names, corrupt and oversize headers.
    Not strict (sniffing a tar that may be a layer, where duplicates are legal): skips what it cannot use and
    stops at the first corrupt header or limit."""
    members: dict[str, Member] = {}
    try:
        _walk(fd, limits, members, strict)
    except FormatError:
        if strict:
            raise
    return members


def _walk(fd: int, limits: ArchiveLimits, members: dict[str, Member], strict: bool) -> None:
    size_total = os.fstat(fd).st_size
    pos = 0
    count = 0
    pax: dict[str, str] = {}
    long_name: str | None = None
    long_link: str | None = None
    while True:
        block = _pread_exact(fd, BLOCK, pos)
        if len(block) == 0:
            break  # EOF without end-of-archive blocks: tolerated (many writers omit them)
        if len(block) < BLOCK:
            raise FormatError("corrupt", f"@{pos}", "truncated tar header")
        if block == bytes(BLOCK):
            break
        if not _checksum_ok(block):
            raise FormatError("corrupt", f"@{pos}", "tar header checksum mismatch")
        count += 1
        if count > limits.max_members:
            raise FormatError("limit", f"@{pos}", f"more than {limits.max_members} archive members")
        raw_name = block[:100].split(b"\0", 1)[0]
        if block[257:263] == b"ustar\x00":
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                raw_name = prefix + b"/" + raw_name
        name = raw_name.decode("utf-8", "surrogateescape")
        entry = name or f"@{pos}"
        size = _parse_number(block[124:136], entry, "size")
        typeflag = block[156:157]
        data = pos + BLOCK
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if data + size > size_total:
            raise FormatError("corrupt", entry, "member data runs past the end of the archive")
        if typeflag in (b"x", b"g", b"L", b"K"):
            if size > limits.max_header_bytes:
                raise FormatError("limit", entry, f"extended header of {size} bytes")
            payload = _pread_exact(fd, size, data)
            if typeflag == b"x":
                pax = _parse_pax(payload, entry)
            elif typeflag == b"L":
                long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif typeflag == b"K":
                long_link = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            pos = data + padded
            continue
        linkname = block[157:257].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if long_name is not None:
            name = long_name
        if long_link is not None:
            linkname = long_link
        if "path" in pax:
            name = pax["path"]
        if "linkpath" in pax:
            linkname = pax["linkpath"]
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise FormatError("corrupt", name, "bad PAX size") from None
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
            if size < 0 or data + size > size_total:
                raise FormatError("corrupt", name, "member data runs past the end of the archive")
        pax, long_name, long_link = {}, None, None
        if len(name.encode("utf-8", "surrogateescape")) > limits.max_name_bytes:
            raise FormatError("limit", name[:200], "member name too long")
        try:
            norm = normalize_member_name(name)
        except FormatError:
            if strict:
                raise
            norm = ""
        kind = {
            b"0": "file",
            b"\0": "file",
            b"7": "file",
            b"1": "hardlink",
            b"2": "symlink",
            b"5": "dir",
        }.get(typeflag, "other")
        if kind == "dir" or not norm:
            pos = data + (0 if kind == "dir" else padded)
            continue
        if kind in ("symlink", "hardlink"):
            size, padded = 0, 0
        if norm in members:
            if strict:
                raise FormatError("duplicate", norm, "member name appears twice in the archive")
        else:
            members[norm] = Member(norm, kind, data, size, linkname)
        pos = data + padded


def _join_link(member: str, target: str, ref: str) -> str:
    """A relative symlink target, joined lexically to the member's directory; climbing above the archive root
    is an escape."""
    if "\0" in target or "\n" in target:
        raise FormatError("escape", ref, "NUL or newline in a symlink target")
    stack = member.split("/")[:-1]
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                raise FormatError("escape", ref, f"symlink {member!r} -> {target!r} leaves the archive")
            stack.pop()
        else:
            stack.append(part)
    return "/".join(stack)


def resolve_member(members: dict[str, Member], ref: str, limits: ArchiveLimits = ArchiveLimits()) -> Member:
    """The regular-file member a manifest names, following in-archive symlinks and hardlinks (old
    `docker save` links duplicate layers); anything pointing outside the archive is an escape."""
    if not isinstance(ref, str) or not ref:
        raise FormatError("corrupt", repr(ref)[:200], "member reference is not a non-empty string")
    name = normalize_member_name(ref)
    for _ in range(limits.max_link_hops):
        m = members.get(name)
        if m is None:
            raise FormatError("missing", ref, "not present in the archive")
        if m.kind == "file":
            return m
        if m.kind == "hardlink":
            name = normalize_member_name(m.linkname, ref)
        elif m.kind == "symlink":
            if m.linkname.startswith("/"):
                raise FormatError("escape", ref, f"symlink to absolute path {m.linkname!r}")
            name = _join_link(m.name, m.linkname, ref)
        else:
            raise FormatError("format", ref, "not a regular file")
    raise FormatError("limit", ref, "too many link hops")


# ------------------------------------------------------------------------------------------------ JSON


def _bad_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def parse_json(data: bytes, entry: str, limits: ArchiveLimits = ArchiveLimits()) -> Any:
    if len(data) > limits.max_json_bytes:
        raise FormatError("limit", entry, f"JSON document of {len(data)} bytes (cap {limits.max_json_bytes})")
    try:
        return json.loads(
            data.decode("utf-8"), object_pairs_hook=no_duplicate_keys, parse_constant=_bad_constant
        )
    except RecursionError:
        raise FormatError("limit", entry, "JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError("corrupt", entry, f"invalid JSON: {e}") from None


def _read_member(fd: int, m: Member, entry: str, limits: ArchiveLimits) -> bytes:
    if m.size > limits.max_json_bytes:
        raise FormatError("limit", entry, f"JSON document of {m.size} bytes (cap {limits.max_json_bytes})")
    data = _pread_exact(fd, m.size, m.offset)
    if len(data) != m.size:
        raise FormatError("corrupt", entry, "short read")
    return data


def _want(obj: Any, key: str, typ: type | tuple[type, ...], entry: str, optional: bool = False) -> Any:
    if not isinstance(obj, dict):
        raise FormatError("corrupt", entry, "expected a JSON object")
    if key not in obj or obj[key] is None:
        if optional:
            return None
        raise FormatError("corrupt", entry, f"missing field {key!r}")
    v = obj[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise FormatError("corrupt", entry, f"field {key!r} has the wrong type")
    return v


def _digest_hex(digest: Any, entry: str) -> str:
    if not isinstance(digest, str):
        raise FormatError("corrupt", entry, "digest is not a string")
    m = _DIGEST.fullmatch(digest)
    if not m:
        if digest.split(":", 1)[0] in ("sha512", "sha384"):
            raise FormatError("format", entry, f"unsupported digest algorithm in {digest[:80]!r}")
        raise FormatError("corrupt", entry, f"malformed digest {digest[:80]!r}")
    return m.group(1)


def _verify(data: bytes, hex_: str, entry: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != hex_:
        raise FormatError("digest", entry, f"sha256 is {got}, expected {hex_}")


# ------------------------------------------------------------------------------------------ open_image


def _fd_desc(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def _layer(fd: int, offset: int, length: int, hex_: str | None, entry: str) -> Layer:
    kind = sniff_blob(fd, offset, entry)
    size = length if length >= 0 else os.fstat(fd).st_size - offset
    return Layer(
        source=LayerSource(fd=fd, offset=offset, length=length, expect_sha256=hex_),
        digest=f"sha256:{hex_}" if hex_ else None,
        compression=kind,
        size=size,
    )


def _sniff_single(fd: int, limits: ArchiveLimits) -> str:
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        try:
            os.stat(OCI_LAYOUT_FILE, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            raise FormatError("format", _fd_desc(fd), "a directory without an oci-layout file") from None
        return "oci-layout"
    if not stat.S_ISREG(st.st_mode):
        raise FormatError("format", _fd_desc(fd), "not a regular file")
    kind = sniff_blob(fd, 0, _fd_desc(fd))
    if kind != "tar":
        if looks_like_outer_archive(fd, kind):
            raise FormatError(
                "compressed",
                _fd_desc(fd),
                f"a {kind}-compressed image archive: decompress it "
                "first (docker save / skopeo copy write uncompressed tars)",
            )
        return "layers"
    # Lenient: a layer tar may legally hold duplicates or exceed the archive member cap; open_image then walks
    # an archive strictly. An image archive has a few members per layer (docker caps images at 127 layers), so
    # a tar with more than SNIFF_MAX_MEMBERS members is a layer: big layers are not walked twice in Python.
    members = walk_tar(fd, replace(limits, max_members=min(limits.max_members, SNIFF_MAX_MEMBERS)),
                       strict=False)
    if "manifest.json" in members:
        return "docker-archive"
    if OCI_LAYOUT_FILE in members and "index.json" in members:
        return "oci-archive"
    return "layers"


def detect_format(fds: list[int], limits: ArchiveLimits = ArchiveLimits()) -> str:
    if not fds:
        raise FormatError("format", "", "no input")
    if len(fds) > 1:
        # a family of layers; an image archive in the list is a mistake worth naming (--format layers
        # overrides this guess)
        for fd in fds:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FormatError("format", _fd_desc(fd), "a layer must be a regular file")
            kind = sniff_blob(fd, 0, _fd_desc(fd))
            if looks_like_outer_archive(fd, kind):
                raise FormatError(
                    "format", _fd_desc(fd), "an image archive in a list of layers: give it alone"
                )
        return "layers"
    return _sniff_single(fds[0], limits)


def open_image(
    fds: list[int],
    format: str = "auto",
    limits: ArchiveLimits = ArchiveLimits(),
    ref: str | None = None,
    allow_directory: bool = False,
) -> ImageSource:
    """Sniff (format="auto") or check the given format, and return the ordered layers. The fds stay owned by
    the caller, except those in `ImageSource.owned_fds` (OCI layout blobs; call close()).

    `ref` picks one image of an archive or layout holding several: an OCI `org.opencontainers.image.ref.name`
    annotation, or a docker-archive RepoTag (`name:tag`, with or without a `docker.io/` prefix).

    `allow_directory`: accept a directory fd (an OCI image layout). Only the offline CLI sets it: the daemon
    must not open files, as root, relative to a directory a client handed over."""
    if format not in FORMATS:
        raise FormatError("format", format, f"unknown format (one of {', '.join(FORMATS)})")
    fmt = detect_format(fds, limits) if format == "auto" else format
    if fmt == "layers":
        return _open_layers(fds, limits)
    if len(fds) != 1:
        raise FormatError("format", fmt, "expects exactly one source")
    fd = fds[0]
    if fmt == "oci-layout":
        if not allow_directory:
            raise FormatError("format", _fd_desc(fd), "OCI layout directories are accepted offline only")
        return _open_oci_layout(fd, limits, ref)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise FormatError("format", _fd_desc(fd), f"{fmt} must be a regular file")
    kind = sniff_blob(fd, 0, _fd_desc(fd))
    if kind != "tar":
        raise FormatError(
            "compressed",
            _fd_desc(fd),
            f"{fmt} is {kind}-compressed: decompress it first "
            "(the outer archive must be an uncompressed tar, as docker save and skopeo write it)",
        )
    members = walk_tar(fd, limits)
    if fmt == "docker-archive":
        return _open_docker_archive(fd, members, limits, ref)
    return _open_oci_archive(fd, members, limits, ref)


def _open_layers(fds: list[int], limits: ArchiveLimits) -> ImageSource:
    if len(fds) > limits.max_layers:
        raise FormatError("limit", "", f"more than {limits.max_layers} layers")
    layers = []
    for fd in fds:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError("format", _fd_desc(fd), "a layer must be a regular file")
        layers.append(_layer(fd, 0, -1, None, _fd_desc(fd)))
    return ImageSource(format="layers", layers=layers, config=None, manifest=None)


# -------------------------------------------------------------------------------------- docker-archive


def _open_docker_archive(
    fd: int, members: dict[str, Member], limits: ArchiveLimits, ref: str | None = None
) -> ImageSource:
    if "manifest.json" not in members:
        raise FormatError("missing", "manifest.json", "not a docker-archive: no manifest.json")
    mj = resolve_member(members, "manifest.json", limits)
    manifest = parse_json(_read_member(fd, mj, "manifest.json", limits), "manifest.json", limits)
    if not isinstance(manifest, list) or not manifest:
        raise FormatError("corrupt", "manifest.json", "expected a non-empty JSON array")
    if ref is not None:
        manifest = [m for m in manifest if _has_tag(m, ref)]
        if not manifest:
            raise FormatError("missing", "manifest.json", f"no image tagged {ref!r}")
    if len(manifest) != 1:
        raise FormatError("format", "manifest.json", f"holds {len(manifest)} images; choose one by tag")
    item = manifest[0]
    config_ref = _want(item, "Config", str, "manifest.json")
    layer_refs = _want(item, "Layers", list, "manifest.json")
    if len(layer_refs) > limits.max_layers:
        raise FormatError("limit", "manifest.json", f"more than {limits.max_layers} layers")
    if not all(isinstance(r, str) for r in layer_refs):
        raise FormatError("corrupt", "manifest.json", "Layers must be strings")

    cm = resolve_member(members, config_ref, limits)
    config_bytes = _read_member(fd, cm, config_ref, limits)
    config_hex = _hex_in_name(config_ref)
    if config_hex:
        _verify(config_bytes, config_hex, config_ref)
    config = parse_json(config_bytes, config_ref, limits)
    diff_ids = _diff_ids(config, config_ref)
    if diff_ids is not None and len(diff_ids) != len(layer_refs):
        raise FormatError("corrupt", config_ref, f"{len(diff_ids)} diff_ids for {len(layer_refs)} layers")

    layers = []
    for i, ref in enumerate(layer_refs):
        m = resolve_member(members, ref, limits)
        kind = sniff_blob(fd, m.offset, ref)
        name_hex = _hex_in_name(ref)
        diff_hex = diff_ids[i] if diff_ids is not None and kind == "tar" else None
        if name_hex and diff_hex and name_hex != diff_hex:
            raise FormatError(
                "digest", ref, f"blob name says sha256:{name_hex}, config diff_id says sha256:{diff_hex}"
            )
        layers.append(_layer(fd, m.offset, m.size, name_hex or diff_hex, ref))
    return ImageSource(
        format="docker-archive",
        layers=layers,
        config=config,
        manifest={"manifest.json": manifest},
        config_digest=f"sha256:{hashlib.sha256(config_bytes).hexdigest()}",
    )


def _has_tag(item: Any, ref: str) -> bool:
    tags = item.get("RepoTags") if isinstance(item, dict) else None
    if not isinstance(tags, list):
        return False
    want = {ref, ref.removeprefix("docker.io/"), f"docker.io/{ref}"}
    return any(isinstance(t, str) and t in want for t in tags)


def _hex_in_name(ref: str) -> str | None:
    """The sha256 a docker-archive member name carries: blobs/sha256/<hex>, <hex>.json, <hex>.tar."""
    base = ref.rsplit("/", 1)[-1]
    stem = base.removesuffix(".json").removesuffix(".tar")
    if _HEX64.fullmatch(stem) and (ref.startswith("blobs/sha256/") or stem != base):
        return stem
    return None


def _diff_ids(config: Any, entry: str) -> list[str] | None:
    if not isinstance(config, dict):
        raise FormatError("corrupt", entry, "image config is not a JSON object")
    rootfs = config.get("rootfs")
    if rootfs is None:
        return None
    ids = _want(rootfs, "diff_ids", list, entry, optional=True)
    if ids is None:
        return None
    return [_digest_hex(d, entry) for d in ids]


# ----------------------------------------------------------------------------------------- OCI archive

BlobReader = Callable[[str], tuple[int, int, int]]  # hex -> (fd, offset, length)


def _open_oci_archive(
    fd: int, members: dict[str, Member], limits: ArchiveLimits, ref: str | None = None
) -> ImageSource:
    def blob(hex_: str) -> tuple[int, int, int]:
        m = resolve_member(members, f"blobs/sha256/{hex_}", limits)
        return fd, m.offset, m.size

    def small(name: str) -> bytes:
        return _read_member(fd, resolve_member(members, name, limits), name, limits)

    return _open_oci(small, blob, "oci-archive", limits, ref)


def _open_oci(
    small: Callable[[str], bytes], blob: BlobReader, fmt: str, limits: ArchiveLimits, ref: str | None = None
) -> ImageSource:
    layout = parse_json(small(OCI_LAYOUT_FILE), OCI_LAYOUT_FILE, limits)
    version = _want(layout, "imageLayoutVersion", str, OCI_LAYOUT_FILE)
    if not version.startswith("1."):
        raise FormatError("format", OCI_LAYOUT_FILE, f"unsupported imageLayoutVersion {version[:40]!r}")
    index = parse_json(small("index.json"), "index.json", limits)
    manifest_desc = _choose_manifest(index, "index.json", blob, limits, depth=0, ref=ref)
    manifest_hex = _digest_hex(manifest_desc["digest"], "index.json")
    manifest_bytes = _read_blob(blob, manifest_desc, limits)
    manifest = parse_json(manifest_bytes, f"sha256:{manifest_hex}", limits)
    mentry = f"manifest sha256:{manifest_hex}"
    mt = _want(manifest, "mediaType", str, mentry, optional=True)
    if mt is not None and mt not in MANIFEST_TYPES:
        raise FormatError("mediatype", mentry, f"unexpected manifest media type {mt[:100]!r}")
    config_desc = _descriptor(_want(manifest, "config", dict, mentry), mentry)
    if config_desc["mediaType"] not in CONFIG_TYPES:
        raise FormatError(
            "mediatype", mentry, f"unexpected config media type {config_desc['mediaType'][:100]!r}"
        )
    config_bytes = _read_blob(blob, config_desc, limits)
    config = parse_json(config_bytes, config_desc["digest"], limits)
    descs = [_descriptor(d, mentry) for d in _want(manifest, "layers", list, mentry)]
    if len(descs) > limits.max_layers:
        raise FormatError("limit", mentry, f"more than {limits.max_layers} layers")
    diff_ids = _diff_ids(config, config_desc["digest"])
    if diff_ids is not None and len(diff_ids) != len(descs):
        raise FormatError(
            "corrupt", config_desc["digest"], f"{len(diff_ids)} diff_ids for {len(descs)} layers"
        )
    layers = []
    for d in descs:
        if d["mediaType"] not in LAYER_TYPES:
            raise FormatError(
                "mediatype", d["digest"], f"unsupported layer media type {d['mediaType'][:100]!r}"
            )
        hex_ = _digest_hex(d["digest"], mentry)
        bfd, off, length = blob(hex_)
        if length != d["size"]:
            raise FormatError("digest", d["digest"], f"blob is {length} bytes, descriptor says {d['size']}")
        layers.append(_layer(bfd, off, length, hex_, d["digest"]))
    return ImageSource(
        format=fmt, layers=layers, config=config, manifest=manifest, config_digest=config_desc["digest"]
    )


def _descriptor(d: Any, entry: str) -> dict[str, Any]:
    mt = _want(d, "mediaType", str, entry)
    digest = _want(d, "digest", str, entry)
    size = _want(d, "size", int, entry)
    _digest_hex(digest, entry)
    if size < 0:
        raise FormatError("corrupt", entry, "negative descriptor size")
    annotations = d.get("annotations")
    return {
        "mediaType": mt,
        "digest": digest,
        "size": size,
        "platform": d.get("platform"),
        "annotations": annotations if isinstance(annotations, dict) else None,
    }


def _read_blob(blob: BlobReader, desc: dict[str, Any], limits: ArchiveLimits) -> bytes:
    hex_ = _digest_hex(desc["digest"], desc["digest"])
    fd, off, length = blob(hex_)
    if length != desc["size"]:
        raise FormatError("digest", desc["digest"], f"blob is {length} bytes, descriptor says {desc['size']}")
    if length > limits.max_json_bytes:
        raise FormatError(
            "limit", desc["digest"], f"JSON blob of {length} bytes (cap {limits.max_json_bytes})"
        )
    data = _pread_exact(fd, length, off)
    _verify(data, hex_, desc["digest"])
    return data


def _choose_manifest(
    index: Any, entry: str, blob: BlobReader, limits: ArchiveLimits, depth: int, ref: str | None = None
) -> dict[str, Any]:
    """index.json -> the image manifest: the only one or the linux/amd64 one; follows nested indexes twice."""
    descs = [_descriptor(d, entry) for d in _want(index, "manifests", list, entry)]
    if ref is not None:
        descs = [d for d in descs if (d.get("annotations") or {}).get(REF_NAME) == ref]
        if not descs:
            raise FormatError("missing", entry, f"no manifest named {ref!r}")
    if not descs:
        raise FormatError("missing", entry, "no manifests")
    if len(descs) > 1:
        matching = [d for d in descs if _is_linux_amd64(d.get("platform"))]
        if not matching:
            raise FormatError("missing", entry, f"{len(descs)} manifests and none for linux/amd64")
        descs = matching[:1]
    d = descs[0]
    if d["mediaType"] in INDEX_TYPES:
        if depth >= 2:
            raise FormatError("limit", d["digest"], "image indexes nested too deeply")
        nested = parse_json(_read_blob(blob, d, limits), d["digest"], limits)
        return _choose_manifest(nested, d["digest"], blob, limits, depth + 1)
    if d["mediaType"] not in MANIFEST_TYPES:
        raise FormatError("mediatype", d["digest"], f"unexpected media type {d['mediaType'][:100]!r}")
    return d


def _is_linux_amd64(platform: Any) -> bool:
    return (
        isinstance(platform, dict)
        and platform.get("os") == "linux"
        and platform.get("architecture") == "amd64"
    )


# ------------------------------------------------------------------------------------------ OCI layout


def _open_nofollow(dir_fd: int, relpath: str, directory: bool = False) -> int:
    """Open relpath under dir_fd without following any symlink on the way (component by component)."""
    parts = relpath.split("/")
    fd = dir_fd
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = (
                os.O_RDONLY
                | os.O_CLOEXEC
                | os.O_NOFOLLOW
                | (os.O_DIRECTORY if (directory or not last) else 0)
            )
            nfd = os.open(part, flags, dir_fd=fd)
            if fd != dir_fd:
                os.close(fd)
            fd = nfd
    except FileNotFoundError:
        if fd != dir_fd:
            os.close(fd)
        raise FormatError("missing", relpath, "not present in the OCI layout") from None
    except OSError as e:
        if fd != dir_fd:
            os.close(fd)
        raise FormatError(
            "format", relpath, f"cannot open: {e.strerror} (symlinks are not followed)"
        ) from None
    return fd


def _open_oci_layout(dir_fd: int, limits: ArchiveLimits, ref: str | None = None) -> ImageSource:
    opened: dict[str, int] = {}

    def blob(hex_: str) -> tuple[int, int, int]:
        if hex_ not in opened:
            fd = _open_nofollow(dir_fd, f"blobs/sha256/{hex_}")
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise FormatError("format", f"blobs/sha256/{hex_}", "not a regular file")
            opened[hex_] = fd
        fd = opened[hex_]
        return fd, 0, os.fstat(fd).st_size

    def small(name: str) -> bytes:
        fd = _open_nofollow(dir_fd, name)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FormatError("format", name, "not a regular file")
            if st.st_size > limits.max_json_bytes:
                raise FormatError("limit", name, f"JSON document of {st.st_size} bytes")
            return _pread_exact(fd, st.st_size, 0)
        finally:
            os.close(fd)

    try:
        image = _open_oci(small, blob, "oci-layout", limits, ref)
    except BaseException:
        for fd in opened.values():
            os.close(fd)
        raise
    used = {layer.source.fd for layer in image.layers}
    for fd in opened.values():
        if fd not in used:
            os.close(fd)
    image.owned_fds = sorted(used)
    return image


# ------------------------------------------------------------------------------------------- chain ids


def chain_ids(blob_digests: list[str]) -> list[str]:
    """OCI ChainID over verified blob digests: chain[0] = d[0]; chain[n] = sha256(chain[n-1] + " " + d[n])."""
    out: list[str] = []
    for d in blob_digests:
        _digest_hex(d, d)
        if not out:
            out.append(d)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def extract_image(
    image: ImageSource, into_dir_fd: int, limits: Any = None, progress: Callable[[Any], None] | None = None
) -> dict[str, Any]:
    """Canonical layout (into/rootfs + into/image.json); see img_helper.layout.extract_image."""
    from img_helper.layout import extract_image as _extract_image

    return _extract_image(image, into_dir_fd, limits, progress)
