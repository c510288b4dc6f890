"""IMG_HOME and S3 settings from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from img.config import ConfigError, load


def test_img_home_wins(tmp_path: Path) -> None:
    cfg = load({"IMG_HOME": str(tmp_path / "h"), "HOME": "/nope"})
    assert cfg.home == tmp_path / "h"
    assert cfg.db_path == tmp_path / "h" / "img.db"
    cfg.ensure_dirs()
    assert cfg.blob_dir.is_dir() and cfg.partial_dir.is_dir() and cfg.spool_dir.is_dir()


def test_per_user_default_follows_xdg(tmp_path: Path) -> None:
    # (/var/lib/img does not exist on the test machine: the per-user location applies)
    assert load({"XDG_STATE_HOME": str(tmp_path)}).home == tmp_path / "img"
    assert load({"HOME": str(tmp_path)}).home == tmp_path / ".local" / "state" / "img"


def test_s3_settings() -> None:
    cfg = load({"IMG_HOME": "/x", "IMG_S3_BUCKET": "b", "IMG_S3_PREFIX": "pfx", "IMG_S3_NO_SIGN_REQUEST": "1",
                "IMG_S3_ENDPOINT_URL": "http://127.0.0.1:9", "IMG_MAX_BLOB_BYTES": "123"})
    assert (cfg.bucket, cfg.prefix, cfg.no_sign_request, cfg.endpoint_url, cfg.max_blob_bytes) == \
        ("b", "pfx/", True, "http://127.0.0.1:9", 123)
    assert load({"IMG_HOME": "/x"}).prefix == "images/"


def test_bad_size_cap_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        load({"IMG_HOME": "/x", "IMG_MAX_BLOB_BYTES": "lots"})
