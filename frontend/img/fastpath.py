"""The `img` entry point, with a fast path for the idempotent rerun.

`img process REF [--activate NAME] [--json]` when REF is already active under NAME must answer in a few
tens of milliseconds, so this module imports only the standard library's sqlite3 and reads one row before
anything else (click, boto3, the FSM engine) is imported. It mirrors img.config's IMG_HOME choice and
img.refs' canonical references (tests check they agree); whenever it is unsure it hands over to the full
CLI, which decides everything again.
"""

from __future__ import annotations

import os
import sys

SHARED_HOME = "/var/lib/img"


def _home() -> str:
    env = os.environ
    if env.get("IMG_HOME"):
        return os.path.expanduser(env["IMG_HOME"])
    if os.path.isdir(SHARED_HOME) and os.access(SHARED_HOME, os.W_OK | os.X_OK):
        return SHARED_HOME
    state = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"),
                                                      ".local", "state")
    return os.path.join(state, "img")


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _plain_name(s: str) -> bool:
    return 0 < len(s) <= 64 and s[0].isascii() and s[0].isalnum() and all(c in _NAME_CHARS for c in s)


def _canonical(ref: str) -> tuple[str, str] | None:
    """(canonical ref, default activation name) for a plain family name; None = let the full CLI decide."""
    if not _plain_name(ref):
        return None
    bucket = os.environ.get("IMG_S3_BUCKET")
    if not bucket:
        return None
    prefix = os.environ.get("IMG_S3_PREFIX", "images/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return f"s3://{bucket}/{prefix.lstrip('/')}{ref}/", ref


def _parse(argv: list[str]) -> tuple[str, str | None, bool] | None:
    ref, name, as_json = None, None, False
    it = iter(argv)
    for a in it:
        if a == "--json":
            as_json = True
        elif a == "--activate":
            name = next(it, None)
            if name is None:
                return None
        elif a.startswith("--activate="):
            name = a.split("=", 1)[1]
        elif a.startswith("-") or ref is not None:
            return None  # any other option: the full CLI
        else:
            ref = a
    return (ref, name, as_json) if ref else None


def try_active(argv: list[str]) -> bool:
    """True if `img process` found the image active and printed so; False to run the full command."""
    parsed = _parse(argv)
    if parsed is None:
        return False
    ref, name, as_json = parsed
    canon = _canonical(ref)
    if canon is None:
        return False
    canonical, default_name = canon
    name = name or default_name
    if not _plain_name(name):
        return False
    db = os.path.join(_home(), "img.db")
    if not os.path.exists(db):
        return False
    import sqlite3

    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            # the image's run must have finished too (state ready, set by its last step's finalizer): a run
            # killed after activating is left for the full path to finish
            q = ("SELECT a.ref, a.chain_id, a.device FROM activations a JOIN images i ON i.ref = a.ref "
                 "WHERE a.name = ? AND i.state = 'ready' AND i.chain_id = a.chain_id")
            row = c.execute(q, (name,)).fetchone()
        finally:
            c.close()
    except sqlite3.Error:
        return False
    if row is None or row[0] != canonical or not os.path.exists(row[2]):
        return False
    if as_json:
        import json

        print(json.dumps({"ref": canonical, "name": name, "chain_id": row[1], "device": row[2],
                          "state": "active", "changed": False}, sort_keys=True))
    else:
        print(f"{name}: active at {row[2]} (already up to date)")
    return True


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["process"] and try_active(argv[1:]):
        sys.exit(0)
    from img.cli import main as cli_main

    cli_main()
