"""JSON from hostile sources (request frames, image manifests): duplicate keys are refused, because JSON
parsers disagree on whether the first or the last one wins, and a document must mean one thing."""

from __future__ import annotations

from typing import Any


class DuplicateKeyError(ValueError):
    pass


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An `object_pairs_hook` for json.loads."""
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise DuplicateKeyError(f"duplicate key {k[:64]!r}")
        obj[k] = v
    return obj
