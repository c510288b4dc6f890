"""`img-helper extract`: the offline entry point (tests, benchmarks, operators). The daemon receives fds over
its socket instead; here the command opens the SOURCE paths itself, read-only."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import time
from typing import Any

import click

EXIT_REJECTED = 2
EXIT_FAILED = 1
NOT_REJECTIONS = frozenset(
    {"io", "cancelled", "internal"}
)  # extractor error codes that are not about the input


def _open_source(path: str) -> int:
    """Read-only fd of a regular file or a directory (an OCI image layout); O_NONBLOCK so that a FIFO or a
    device cannot hang the open."""
    from img_helper.formats import FormatError

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        os.close(fd)
        raise FormatError("format", path, "not a regular file or directory")
    os.set_blocking(fd, True)
    return fd


class _Progress:
    """One rewritten line on a tty stderr, at most 5 updates a second."""

    def __init__(self) -> None:
        self.last = 0.0
        self.t0 = time.monotonic()

    def __call__(self, p: Any) -> None:
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        mb = p.get("bytes", 0) / 1e6
        sys.stderr.write(
            f"\rlayer {p.get('layer', 0) + 1}/{p.get('layers', '?')}: {p.get('entries', 0)} entries, "
            f"{mb:.1f} MB, {mb / max(now - self.t0, 1e-6):.0f} MB/s "
        )
        sys.stderr.flush()

    def done(self) -> None:
        if self.last:
            sys.stderr.write("\n")


def _emit(summary: dict[str, Any]) -> None:
    click.echo(json.dumps(summary, sort_keys=True))


@click.command("extract")
@click.option(
    "--into",
    "into",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory that gets the canonical layout (DIR/rootfs, DIR/image.json); created if missing.",
)
@click.option(
    "--format",
    "fmt",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "layers", "docker-archive", "oci-archive", "oci-layout"]),
    help="Input format; auto sniffs content (names are never trusted).",
)
@click.option(
    "--ref", default=None, help="Which image of an archive/layout holding several (tag or ref name)."
)
@click.option("--max-entries", type=int, default=None, help="Limit: entries per layer.")
@click.option("--max-total-bytes", type=int, default=None, help="Limit: bytes per layer.")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=True))
def extract(
    into: str,
    fmt: str,
    ref: str | None,
    max_entries: int | None,
    max_total_bytes: int | None,
    sources: tuple[str, ...],
) -> None:
    """Extract SOURCE (one archive, an OCI layout dir, or an ordered list of layer blobs) into DIR.

    Prints a one-line JSON summary. Exit 0: done; 2: input rejected (error: CODE: ENTRY: REASON on stderr);
    1: any other failure."""
    from img_helper import extract as extract_mod
    from img_helper.formats import FormatError, open_image
    from img_helper.layout import LayoutError, extract_image

    rejected: tuple[type[BaseException], ...] = (FormatError, extract_mod.ExtractError)
    t0 = time.monotonic()
    fds: list[int] = []
    progress = _Progress() if sys.stderr.isatty() else None
    image = None
    try:
        os.makedirs(into, exist_ok=True)
        dir_fd = os.open(into, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fds.append(dir_fd)
        srcs = []
        for p in sources:
            srcs.append(_open_source(p))
            fds.append(srcs[-1])
        image = open_image(srcs, fmt, ref=ref, allow_directory=True)
        image.source = " ".join(os.path.abspath(p) for p in sources)
        limits = None
        if max_entries is not None or max_total_bytes is not None:
            limits = extract_mod.Limits()
            if max_entries is not None:
                limits.max_entries = max_entries
            if max_total_bytes is not None:
                limits.max_total_bytes = max_total_bytes
        summary = extract_image(image, dir_fd, limits, progress)
        summary["seconds"] = round(time.monotonic() - t0, 3)
    except rejected as e:
        # the input was refused -- unless the extractor failed for reasons of its own (I/O, cancelled)
        _fail(progress, t0, e, EXIT_FAILED if getattr(e, "code", "") in NOT_REJECTIONS else EXIT_REJECTED)
    except LayoutError as e:
        _fail(progress, t0, e, EXIT_FAILED)
    except OSError as e:
        _fail(progress, t0, e, EXIT_FAILED, code="io", entry=e.filename or "", reason=e.strerror or str(e))
    finally:
        if image is not None:
            image.close()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    if progress:
        progress.done()
    _emit(summary)


def _fail(
    progress: _Progress | None,
    t0: float,
    e: BaseException,
    rc: int,
    code: str | None = None,
    entry: str | None = None,
    reason: str | None = None,
) -> None:
    if progress:
        progress.done()
    code = code or str(getattr(e, "code", "internal"))
    entry = entry if entry is not None else str(getattr(e, "entry", ""))
    reason = reason or str(getattr(e, "reason", e))
    _emit(
        {
            "ok": False,
            "error": {"code": code, "entry": entry, "reason": reason},
            "seconds": round(time.monotonic() - t0, 3),
        }
    )
    click.echo(f"error: {code}: {entry}: {reason}", err=True)
    sys.exit(rc)
