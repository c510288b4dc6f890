"""The `img` command line. Commands are imported lazily: `img process X` on an active image must stay fast."""

from __future__ import annotations

import click

from img import __version__
from img_helper.lazycli import LazyGroup

COMMANDS: dict[str, str] = {
    # "name": "module:click_command",
    "bench": "img.bench:bench",
    "process": "img.cli_process:process",
    "list": "img.cli_list:list_images",
    "images": "img.cli_list:images",
    "runs": "img.cli_runs:runs",
    "run": "img.cli_runs:run",
    "resume": "img.cli_runs:resume",
    "gc": "img.cli_gc:gc",
    "daemon": "img.cli_daemon:daemon",
    "status": "img.cli_status:status",
    "tui": "img.tui:tui",
    "rm": "img.cli_rm:rm",
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="img")
def cli() -> None:
    """Pull container images from S3 into a device-mapper thin pool and activate them."""


def main() -> None:
    cli()
