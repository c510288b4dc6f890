"""The `img-helper` command line (root side). Each command lives in the module of its concern."""

from __future__ import annotations

import click

from img_helper import __version__
from img_helper.lazycli import LazyGroup

COMMANDS: dict[str, str] = {
    # "name": "module:click_command",
    "extract": "img_helper.cmd_extract:extract",
    "serve": "img_helper.cmd_serve:serve",
    "pool": "img_helper.cmd_pool:pool",
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="img-helper")
def cli() -> None:
    """Root helper for img: device-mapper, extraction and the authorized socket."""


def main() -> None:
    cli()
