"""`img tui`: a small live view (Textual) of local images, activations and workflow runs; refreshes every
second from the store, read-only. Keys: q quits, r refreshes now."""

from __future__ import annotations

import datetime
from typing import Any

import click

from img.cli_common import config_from


def _rows(db_path: str) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    from img.fsm import FsmStore
    from img.store import Store

    store = Store(db_path)
    images: list[tuple[str, ...]] = []
    for im in store.images():
        acts = ", ".join(f"{a.name} -> {a.device}" for a in store.activations(im.ref)) or "-"
        images.append((im.name, im.state, str(len(store.image_layers(im.ref))), f"{im.size >> 20} MiB", acts,
                       (im.error or "")[:60]))
    runs: list[tuple[str, ...]] = []
    for r in sorted(FsmStore(db_path).runs(limit=40), key=lambda r: r.version, reverse=True):
        when = datetime.datetime.fromtimestamp(r.created_at).strftime("%H:%M:%S") if r.created_at else "-"
        runs.append((when, r.action, r.status, r.current_state or "-", r.run_id[:50], (r.error or "")[:50]))
    return images, runs


def make_app(db_path: str) -> Any:
    from textual.app import App, ComposeResult
    from textual.widgets import DataTable, Footer, Header, Label

    class ImgTui(App[None]):
        TITLE = "img"
        BINDINGS = [("q", "quit", "Quit"), ("r", "refresh", "Refresh")]

        def compose(self) -> ComposeResult:
            yield Header()
            yield Label("Images")
            yield DataTable(id="images")
            yield Label("Runs (newest first)")
            yield DataTable(id="runs")
            yield Footer()

        def on_mount(self) -> None:
            self.query_one("#images", DataTable).add_columns("name", "state", "layers", "size", "activations",
                                                             "error")
            self.query_one("#runs", DataTable).add_columns("started", "action", "status", "state", "run id",
                                                           "error")
            self.action_refresh()
            self.set_interval(1.0, self.action_refresh)

        def action_refresh(self) -> None:
            images, runs = _rows(db_path)
            for table_id, rows in (("#images", images), ("#runs", runs)):
                table = self.query_one(table_id, DataTable)
                table.clear()
                table.add_rows(rows)

    return ImgTui()


@click.command("tui")
def tui() -> None:
    """A live view of images, activations and workflow runs."""
    cfg = config_from()
    cfg.ensure_dirs()
    from img.store import Store

    Store(cfg.db_path)
    make_app(str(cfg.db_path)).run()
