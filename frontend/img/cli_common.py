"""Shared pieces of the `img` commands: S3 options, configuration, exit codes, error output.

Exit codes (all commands):
  0  success
  1  failure not covered below (S3 still failing after retries, device-mapper trouble, ...)
  2  usage error or bad image reference
  3  not found or not accessible in S3
  4  the img helper is unavailable, or this user is not authorized (polkit / group img)
  5  the image was rejected (not a format we accept, hostile content, over the size cap)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from img.config import Config, ConfigError, load

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_S3, EXIT_HELPER, EXIT_REJECTED = 0, 1, 2, 3, 4, 5

F = TypeVar("F", bound=Callable[..., Any])


def s3_options(f: F) -> F:
    f = click.option("--no-sign-request", is_flag=True, default=None,
                     help="Anonymous S3 access (public buckets). Env: IMG_S3_NO_SIGN_REQUEST=1")(f)
    f = click.option("--endpoint-url", metavar="URL",
                     help="S3 endpoint (e.g. a local S3). Env: IMG_S3_ENDPOINT_URL or AWS_ENDPOINT_URL")(f)
    f = click.option("--prefix", metavar="PREFIX", help="Key prefix of the families. Env: IMG_S3_PREFIX "
                     "(default images/)")(f)
    f = click.option("--bucket", metavar="BUCKET", help="Bucket of the image families. Env: IMG_S3_BUCKET")(f)
    return f


def json_option(f: F) -> F:
    return click.option("--json", "json_out", is_flag=True, help="Machine-readable output on stdout.")(f)


def config_from(bucket: str | None = None, prefix: str | None = None, endpoint_url: str | None = None,
                no_sign_request: bool | None = None) -> Config:
    try:
        cfg = load()
    except ConfigError as e:
        die(EXIT_USAGE, str(e), "fix the environment variable")
    if prefix is not None and prefix and not prefix.endswith("/"):
        prefix += "/"
    return cfg.with_overrides(bucket=bucket, prefix=prefix, endpoint_url=endpoint_url,
                              no_sign_request=True if no_sign_request else None)


def die(code: int, message: str, hint: str = "") -> NoReturn:
    click.echo(f"img: error: {message}", err=True)
    if hint:
        click.echo(f"img: hint: {hint}", err=True)
    sys.exit(code)


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def helper_exit(e: Exception) -> NoReturn:
    """Report a HelperError raised outside a workflow (status, gc) with the right exit code."""
    import img_helper.client as hc

    if isinstance(e, hc.HelperUnavailable | hc.NotAuthorized):
        die(EXIT_HELPER, e.message if isinstance(e, hc.HelperError) else str(e))
    if isinstance(e, hc.HelperError):
        die(EXIT_FAILED, f"helper: {e.code}: {e.message}")
    raise e
