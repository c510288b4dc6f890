"""Where img keeps its state and which S3 bucket it reads, from the environment.

State directory (``IMG_HOME``), in order:
  1. ``$IMG_HOME`` if set;
  2. ``/var/lib/img`` if it exists and this user can write it — the group-shared location: create it
     once as root with ``install -d -m 2775 -g img /var/lib/img`` so every member of group ``img``
     shares one blob cache, one store and one set of runs;
  3. otherwise per user: ``$XDG_STATE_HOME/img``, i.e. ``~/.local/state/img`` by default.

Inside it: ``img.db`` (SQLite, WAL; img's tables plus the FSM's ``fsm_*`` tables), ``blobs/sha256/<hex>``
(verified blobs, content-addressed), ``blobs/partial/`` (interrupted downloads, never used as blobs) and
``spool/`` (the daemon's drop directory).

S3: ``IMG_S3_BUCKET`` (bucket of the image families), ``IMG_S3_PREFIX`` (default ``images/``; families are
``<prefix><family>/<n>.tar``), ``IMG_S3_ENDPOINT_URL`` (else boto3's own ``AWS_ENDPOINT_URL``/profile
configuration applies), ``IMG_S3_NO_SIGN_REQUEST=1`` for anonymous access, ``IMG_MAX_BLOB_BYTES`` (size cap
per downloaded object, default 16 GiB). Helper: ``IMG_HELPER_SOCKET`` (default ``/run/img/helper.sock``).

This module must stay cheap to import (the idempotent ``img process`` fast path uses it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

SHARED_HOME = Path("/var/lib/img")
DEFAULT_PREFIX = "images/"
DEFAULT_SOCKET = "/run/img/helper.sock"
DEFAULT_MAX_BLOB_BYTES = 16 << 30


class ConfigError(Exception):
    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"{setting}: {reason}")
        self.setting = setting
        self.reason = reason


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def default_home(env: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    if env.get("IMG_HOME"):
        return Path(env["IMG_HOME"]).expanduser()
    if SHARED_HOME.is_dir() and os.access(SHARED_HOME, os.W_OK | os.X_OK):
        return SHARED_HOME
    state = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local" / "state")
    return Path(state) / "img"


@dataclass(frozen=True)
class Config:
    home: Path
    bucket: str | None = None
    prefix: str = DEFAULT_PREFIX
    endpoint_url: str | None = None
    no_sign_request: bool = False
    helper_socket: str = DEFAULT_SOCKET
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES

    @property
    def db_path(self) -> Path:
        return self.home / "img.db"

    @property
    def blob_dir(self) -> Path:
        return self.home / "blobs" / "sha256"

    @property
    def partial_dir(self) -> Path:
        return self.home / "blobs" / "partial"

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    def blob_path(self, sha256_hex: str) -> Path:
        return self.blob_dir / sha256_hex

    def with_overrides(self, **kw: object) -> Config:
        """CLI options override the environment; None means "not given"."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})  # type: ignore[arg-type]

    def ensure_dirs(self) -> None:
        if self.home == SHARED_HOME:
            # members of group img share the cache and the store: new files stay group-writable
            os.umask(0o007)
        mode = 0o2770 if self.home == SHARED_HOME else 0o700
        for d in (self.home, self.blob_dir, self.partial_dir, self.spool_dir):
            d.mkdir(parents=True, exist_ok=True, mode=mode)


def load(env: dict[str, str] | os._Environ[str] = os.environ) -> Config:
    prefix = env.get("IMG_S3_PREFIX", DEFAULT_PREFIX)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    max_bytes = DEFAULT_MAX_BLOB_BYTES
    if env.get("IMG_MAX_BLOB_BYTES"):
        try:
            max_bytes = int(env["IMG_MAX_BLOB_BYTES"])
        except ValueError:
            raise ConfigError("IMG_MAX_BLOB_BYTES", "must be an integer number of bytes") from None
        if max_bytes <= 0:
            raise ConfigError("IMG_MAX_BLOB_BYTES", "must be positive")
    return Config(
        home=default_home(env),
        bucket=env.get("IMG_S3_BUCKET") or None,
        prefix=prefix.lstrip("/"),
        endpoint_url=env.get("IMG_S3_ENDPOINT_URL") or None,
        no_sign_request=_truthy(env.get("IMG_S3_NO_SIGN_REQUEST")),
        helper_socket=env.get("IMG_HELPER_SOCKET") or DEFAULT_SOCKET,
        max_blob_bytes=max_bytes,
    )
