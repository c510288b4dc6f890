"""`img-helper pool create|status`: set up a (loop-backed) thin pool for demos and tests, and show its usage.

create is idempotent: an existing pool of that name is reported, not touched; a file already attached
to a loop device reuses that loop device. Metadata on a fresh (new or --wipe-metadata) device starts
zeroed, so the kernel formats it; an existing pool's metadata is reopened as is.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import click

from img_helper import dm

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in SIZE_UNITS else ""
    try:
        n = int(t[: len(t) - len(unit)])
    except ValueError:
        raise click.BadParameter(f"not a size: {text!r} (e.g. 2G, 64M)") from None
    if n <= 0:
        raise click.BadParameter(f"size must be positive: {text!r}")
    return n * SIZE_UNITS[unit]


def _loop_of(path: Path) -> str | None:
    """The loop device already backed by `path`, from sysfs."""
    real = str(path.resolve())
    for b in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (b / "loop/backing_file").read_text().strip()
        except OSError:
            continue
        if backing == real:
            return f"/dev/{b.name}"
    return None


def _block_device(path: Path, size: int | None, what: str) -> tuple[str, bool]:
    """(block device, fresh) for a device or a file (created sparse if missing, then loop-attached)."""
    fresh = False
    if not path.exists():
        if size is None:
            raise click.UsageError(f"{path} does not exist: give --{what}-size to create it")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        fresh = True
    st = path.stat()
    if stat.S_ISBLK(st.st_mode):
        return str(path), fresh
    if not stat.S_ISREG(st.st_mode):
        raise click.UsageError(f"{path} is neither a block device nor a regular file")
    loop = _loop_of(path)
    if loop is None:
        r = subprocess.run(["losetup", "--find", "--show", str(path)], capture_output=True, text=True)
        if r.returncode:
            raise click.ClickException(f"losetup {path}: {r.stderr.strip()}")
        loop = r.stdout.strip()
    return loop, fresh


def _size_bytes(dev: str) -> int:
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _zero_header(dev: str) -> None:
    fd = os.open(dev, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, bytes(4096), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def pool_report(name: str) -> dict[str, Any]:
    from img_helper.service import pool_usage

    try:
        return pool_usage(name)
    except dm.DmNotFound:
        raise click.ClickException(f"no device-mapper device {name!r}") from None
    except dm.DmError as e:
        raise click.ClickException(str(e)) from None


@click.group("pool")
def pool() -> None:
    """Thin pool set-up and usage."""


@pool.command("create")
@click.option("--name", required=True, help="device-mapper name of the pool")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path), help="data device or file")
@click.option("--metadata", "metadata", required=True, type=click.Path(path_type=Path),
              help="metadata device or file")
@click.option("--data-size", default=None, help="create the data file with this size if missing (e.g. 2G)")
@click.option("--metadata-size", default=None, help="create the metadata file if missing (e.g. 64M)")
@click.option("--block-sectors", default=256, show_default=True, type=click.IntRange(128, 2097152),
              help="data block size in 512-byte sectors (multiple of 128)")
@click.option("--low-water-blocks", default=None, type=click.IntRange(1), help="default: 1/16 of the blocks")
@click.option("--no-space", type=click.Choice(["error", "queue"]), default="error", show_default=True,
              help="when the pool is full: fail I/O at once, or queue it (up to 60 s)")
@click.option("--wipe-metadata", is_flag=True, help="zero the metadata header even if the device is not new")
@click.option("--json", "as_json", is_flag=True, help="print the pool's status as JSON")
def create(name: str, data: Path, metadata: Path, data_size: str | None, metadata_size: str | None,
           block_sectors: int, low_water_blocks: int | None, no_space: str, wipe_metadata: bool,
           as_json: bool) -> None:
    """Create a thin pool (loop-backed when given files)."""
    if block_sectors % 128:
        raise click.BadParameter("must be a multiple of 128", param_hint="--block-sectors")
    existing = dm.info(name)
    if existing is not None:
        if dm.table(name).target_type != "thin-pool":
            raise click.ClickException(f"{name} exists and is not a thin-pool")
        _print(pool_report(name), as_json, f"pool {name} already exists")
        return
    meta_dev, meta_fresh = _block_device(metadata, parse_size(metadata_size) if metadata_size else None,
                                         "metadata")
    data_dev, _ = _block_device(data, parse_size(data_size) if data_size else None, "data")
    if meta_fresh or wipe_metadata:
        _zero_header(meta_dev)
    sectors = _size_bytes(data_dev) // 512 // block_sectors * block_sectors
    if sectors == 0:
        raise click.ClickException(f"{data} is smaller than one data block")
    low_water = low_water_blocks or max(1, sectors // block_sectors // 16)
    m, d = os.stat(meta_dev).st_rdev, os.stat(data_dev).st_rdev
    features = ["error_if_no_space"] if no_space == "error" else []
    params = (f"{os.major(m)}:{os.minor(m)} {os.major(d)}:{os.minor(d)} {block_sectors} {low_water} "
              f"{len(features)} {' '.join(features)}").strip()
    try:
        dm.create(name, sectors, "thin-pool", params, uuid=f"IMG-pool-{name}")
    except dm.DmError as e:
        raise click.ClickException(str(e)) from None
    _print(pool_report(name), as_json, f"created pool {name}")


@pool.command("status")
@click.option("--name", default="img-pool", show_default=True, help="device-mapper name of the pool")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def status(name: str, as_json: bool) -> None:
    """Show a thin pool's usage and state."""
    _print(pool_report(name), as_json, None)


def _print(report: dict[str, Any], as_json: bool, headline: str | None) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=1, sort_keys=True))
        return
    if headline:
        click.echo(headline)
    r = report
    flags = [f for f in ("read_only", "fail", "out_of_data_space", "needs_check", "error") if r[f]]
    click.echo(f"pool {r['name']}: data {r['data_used_bytes'] >> 20}/{r['data_total_bytes'] >> 20} MiB "
               f"({r['used_data_blocks']}/{r['total_data_blocks']} blocks of "
               f"{r['data_block_sectors']} sectors), "
               f"metadata {r['used_metadata_blocks']}/{r['total_metadata_blocks']} blocks, "
               f"transaction {r['transaction_id']}, when full: {r['no_space_mode']}, "
               f"state: {', '.join(flags) or 'ok'}")
