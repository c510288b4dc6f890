"""The `img` command line. Commands are imported lazily: `img process X` on an active image must stay fast."""

from __future__ import annotations

import click
from img_helper.lazycli import LazyGroup

from img import __version__

COMMANDS: dict[str, str] = {
    # "name": "module:click_command",
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="img")
def cli() -> None:
    """Pull container images from S3 into a device-mapper thin pool and activate them."""


def main() -> None:
    cli()
