"""ULIDs: 48-bit millisecond timestamp + 80 random bits, Crockford base32, 26 chars. Lexicographic order is
creation order; within one millisecond in one process they stay monotonic (random part incremented)."""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}
_lock = threading.Lock()
_last_ms = -1
_last_rand = 0


def _encode(value: int) -> str:
    out = []
    for _ in range(26):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new(now: float | None = None) -> str:
    global _last_ms, _last_rand
    ms = int((time.time() if now is None else now) * 1000)
    with _lock:
        if ms <= _last_ms:  # same (or earlier: clock step) millisecond: keep order monotonic
            ms = _last_ms
            rand = (_last_rand + 1) & ((1 << 80) - 1)
        else:
            rand = int.from_bytes(os.urandom(10), "big")
        _last_ms, _last_rand = ms, rand
    return _encode((ms << 80) | rand)


def parse(ulid: str) -> int:
    if len(ulid) != 26:
        raise ValueError(f"not a ULID: {ulid!r}")
    value = 0
    for ch in ulid.upper():
        if ch not in _DECODE:
            raise ValueError(f"not a ULID: {ulid!r}")
        value = (value << 5) | _DECODE[ch]
    return value


def timestamp(ulid: str) -> float:
    """Creation time (seconds since the epoch) encoded in the ULID."""
    return (parse(ulid) >> 80) / 1000.0


def is_ulid(s: str) -> bool:
    try:
        parse(s)
    except ValueError:
        return False
    return True
