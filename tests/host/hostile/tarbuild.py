"""Raw tar construction: ustar/GNU/pax headers from bytes, so tests can say exactly what an attacker can.

Python's tarfile normalizes and refuses much of what these tests need (".." names, NUL in pax records,
disagreeing names, absurd sizes), so every header here is laid out by hand.
"""

from __future__ import annotations

import gzip
import io

import zstandard

BLOCK = 512

REG, LNK, SYM, CHR, BLK, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
PAX, GNU_LONGNAME = b"x", b"L"


def _b(s: str | bytes) -> bytes:
    return s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s


def _octal(value: int, width: int) -> bytes:
    digits = f"{value:o}".encode()
    if len(digits) > width - 1:
        raise ValueError(f"{value} does not fit in {width} octal digits")
    return digits.rjust(width - 1, b"0") + b"\0"


def _base256(value: int, width: int) -> bytes:
    """GNU base-256 numbers: how tar writes sizes beyond 8 GiB."""
    return bytes([0x80]) + value.to_bytes(width - 1, "big")


def header(
    name: str | bytes,
    typeflag: bytes = REG,
    size: int = 0,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 1_700_000_000,
    linkname: str | bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    prefix: str | bytes = b"",
    raw_size: bytes | None = None,
    magic: bytes = b"ustar\x0000",
) -> bytes:
    name, linkname, prefix = _b(name), _b(linkname), _b(prefix)
    if len(name) > 100 or len(linkname) > 100 or len(prefix) > 155:
        raise ValueError("field too long for ustar: use pax() or gnu_longname()")
    size_field = raw_size if raw_size is not None else (
        _octal(size, 12) if size < 8**11 else _base256(size, 12))
    h = bytearray(BLOCK)
    h[0:100] = name.ljust(100, b"\0")
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(uid, 8)
    h[116:124] = _octal(gid, 8)
    h[124:136] = size_field
    h[136:148] = _octal(mtime, 12)
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157:257] = linkname.ljust(100, b"\0")
    h[257:265] = magic
    h[265:297] = b"root".ljust(32, b"\0")
    h[297:329] = b"root".ljust(32, b"\0")
    h[329:337] = _octal(devmajor, 8)
    h[337:345] = _octal(devminor, 8)
    h[345:500] = prefix.ljust(155, b"\0")
    h[148:156] = _octal(sum(h), 7) + b" "
    return bytes(h)


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def member(name: str | bytes, typeflag: bytes = REG, data: bytes = b"", **kw: object) -> bytes:
    return header(name, typeflag, size=len(data), **kw) + pad(data)  # type: ignore[arg-type]


def file(name: str | bytes, data: bytes = b"", mode: int = 0o644, **kw: object) -> bytes:
    return member(name, REG, data, mode=mode, **kw)


def directory(name: str | bytes, mode: int = 0o755, **kw: object) -> bytes:
    return member(name, DIR, mode=mode, **kw)


def symlink(name: str | bytes, target: str | bytes, **kw: object) -> bytes:
    return member(name, SYM, linkname=target, mode=0o777, **kw)


def hardlink(name: str | bytes, target: str | bytes, **kw: object) -> bytes:
    return member(name, LNK, linkname=target, **kw)


def fifo(name: str | bytes, mode: int = 0o644, **kw: object) -> bytes:
    return member(name, FIFO, mode=mode, **kw)


def chardev(name: str | bytes, major: int, minor: int, mode: int = 0o666) -> bytes:
    return member(name, CHR, mode=mode, devmajor=major, devminor=minor)


def blockdev(name: str | bytes, major: int, minor: int, mode: int = 0o660) -> bytes:
    return member(name, BLK, mode=mode, devmajor=major, devminor=minor)


def whiteout(dirpath: str, name: str) -> bytes:
    return file(f"{dirpath}/.wh.{name}" if dirpath else f".wh.{name}")


def opaque(dirpath: str) -> bytes:
    return file(f"{dirpath}/.wh..wh..opq" if dirpath else ".wh..wh..opq")


def pax_record(key: str | bytes, value: str | bytes) -> bytes:
    body = b" " + _b(key) + b"=" + _b(value) + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n = len(str(n).encode()) + len(body)
    return str(n).encode() + body


def pax(records: list[tuple[str | bytes, str | bytes]] | dict[str, str | bytes], name: str = "pax") -> bytes:
    """A pax extended header applying to the member that follows it."""
    items = records.items() if isinstance(records, dict) else records
    data = b"".join(pax_record(k, v) for k, v in items)
    return header(f"PaxHeaders/{name}"[:100], PAX, size=len(data)) + pad(data)


def gnu_longname(name: str | bytes) -> bytes:
    data = _b(name) + b"\0"
    return header("././@LongLink", GNU_LONGNAME, size=len(data)) + pad(data)


def tar(*members: bytes, end: bool = True) -> bytes:
    return b"".join(members) + (b"\0" * (2 * BLOCK) if end else b"")


def gz(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def zst(data: bytes, checksum: bool = True) -> bytes:
    """zstd with a content checksum, as the zstd CLI writes by default."""
    return zstandard.ZstdCompressor(write_checksum=checksum).compress(data)
