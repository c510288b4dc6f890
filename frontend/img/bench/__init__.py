"""`img bench`: measurements of the hot paths (see img.bench.extract)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.group("bench")
def bench() -> None:
    """Benchmarks (need root)."""


@bench.command("extract")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout instead of a table.")
@click.option("--target", type=click.Choice(["tmpfs", "ext4", "both"]), default="both", show_default=True)
@click.option(
    "--repeat", "-n", type=click.IntRange(1, 50), default=3, show_default=True, help="Runs per engine."
)
@click.option("--engine", "engines", multiple=True, help="Only these engines (repeatable).")
@click.argument("sources", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def extract(
    as_json: bool, target: str, repeat: int, engines: tuple[str, ...], sources: tuple[Path, ...]
) -> None:
    """Extract the same ordered layer files (default: the real Debian family of the test images) onto the
    same filesystem with ours, bsdtar, GNU tar, Python tarfile, libarchive-c, and the `cp -a` floor."""
    from img.bench.extract import ENGINES, BenchError, default_sources, format_table, run_bench

    chosen = list(engines) or list(ENGINES)
    unknown = [e for e in chosen if e not in ENGINES]
    if unknown:
        raise click.UsageError(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    if "ours" not in chosen:
        chosen.insert(0, "ours")  # ratios are to ours
    try:
        if sources:
            srcs, label = list(sources), " ".join(map(str, sources))
        else:
            srcs, label = default_sources()
        targets = ["tmpfs", "ext4"] if target == "both" else [target]

        def log(msg: str) -> None:
            if not as_json or sys.stderr.isatty():
                click.echo(msg, err=True)

        rep = run_bench(srcs, label, targets, chosen, repeat, log)
    except BenchError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(json.dumps(rep, sort_keys=True) if as_json else format_table(rep))
