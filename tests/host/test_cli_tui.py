"""`img tui` renders the store's images and runs (driven headless through Textual's test pilot)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from img.store import Store
from img.tui import make_app


def test_tui_shows_images_and_quits(tmp_path: Path) -> None:
    from textual.widgets import DataTable

    store = Store(tmp_path / "img.db")
    store.upsert_image("s3://b/images/x/", "family", "x")
    store.record_activation("x", "s3://b/images/x/", "sha256:" + "0" * 64, "/dev/mapper/img-act-x", 1)

    async def drive() -> tuple[int, str]:
        app = make_app(str(tmp_path / "img.db"))
        async with app.run_test() as pilot:
            await pilot.pause(0.3)
            table = app.query_one("#images", DataTable)
            row = table.get_row_at(0)
            await pilot.press("q")
            return table.row_count, str(row[4])

    count, acts = asyncio.run(drive())
    assert count == 1 and acts == "x -> /dev/mapper/img-act-x"
