"""`img gc [--dry-run]`: remove orphaned blobs (cache files no recorded image needs) and orphaned layer
devices (helper devices no recorded image or activation needs), via the helper's list/delete_layer."""

from __future__ import annotations

from typing import Any

import click

from img.cli_common import EXIT_FAILED, config_from, die, emit_json, helper_exit, json_option


def plan(cfg: Any, store: Any, listed: dict[str, Any] | None) -> dict[str, Any]:
    """What gc would remove. Device deletion goes top-down (snapshots before the layers below them)."""
    keep_blobs = store.referenced_blobs()
    blob_files = sorted(p.name for p in cfg.blob_dir.iterdir()) if cfg.blob_dir.exists() else []
    orphan_blobs = [b for b in blob_files if b not in keep_blobs]
    stale_rows = [b.sha256 for b in store.blobs() if b.sha256 not in blob_files]
    devices: list[dict[str, Any]] = []
    if listed is not None:
        keep_chains = store.referenced_chain_ids()
        keep_chains |= {a.get("chain_id") for a in listed.get("activations", [])}
        layers = listed.get("layers", [])
        parent_of = {ld.chain_id: ld.parent_chain_id for ld in store.layer_devices()}
        # everything below a kept chain is kept too (a snapshot's origin stays useful for reuse)
        for c in list(keep_chains):
            while c is not None and c in parent_of:
                c = parent_of[c]
                if c is not None:
                    keep_chains.add(c)
        devices = [la for la in layers if la.get("chain_id") not in keep_chains]
        depth = {}
        for la in devices:
            d, c = 0, la.get("chain_id")
            while c in parent_of and parent_of[c] is not None:
                d, c = d + 1, parent_of[c]
            depth[la.get("chain_id")] = d
        devices.sort(key=lambda la: -depth.get(la.get("chain_id"), 0))
    return {"blobs": orphan_blobs, "stale_blob_rows": stale_rows, "devices": devices}


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option("--force", is_flag=True, help="Run even while workflow runs are active.")
@click.option("--no-devices", is_flag=True, help="Leave the helper's devices alone (blobs only).")
@json_option
def gc(dry_run: bool, force: bool, no_devices: bool, json_out: bool) -> None:
    """Remove orphaned blobs and layer devices."""
    from img.fsm import FsmStore
    from img.store import Store

    cfg = config_from()
    if not cfg.db_path.exists():
        if json_out:
            emit_json({"blobs": [], "devices": [], "dry_run": dry_run})
        else:
            click.echo("nothing to collect (no store yet)")
        return
    store = Store(cfg.db_path)
    active = FsmStore(str(cfg.db_path)).list_active()
    if active and not force:
        die(EXIT_FAILED, f"{len(active)} workflow run(s) in progress", "wait for them (`img runs --active`), "
            "`img resume` orphaned ones, or pass --force")
    listed = None
    helper = None
    if not no_devices:
        from img_helper.client import HelperClient, HelperError

        helper = HelperClient(cfg.helper_socket)
        try:
            listed = helper.call("list", {})
        except HelperError as e:
            helper_exit(e)
    p = plan(cfg, store, listed)
    removed_devices: list[str] = []
    if not dry_run:
        for sha in p["blobs"]:
            (cfg.blob_dir / sha).unlink(missing_ok=True)
            store.forget_blob(sha)
        for sha in p["stale_blob_rows"]:
            store.forget_blob(sha)
        if helper is not None:
            from img_helper.client import HelperError

            for la in p["devices"]:
                try:
                    helper.call("delete_layer", {"chain_id": la["chain_id"]})
                except HelperError as e:
                    helper_exit(e)
                store.forget_layer_device(la["chain_id"])
                removed_devices.append(la["chain_id"])
    if json_out:
        emit_json({"dry_run": dry_run, "blobs": p["blobs"], "stale_blob_rows": p["stale_blob_rows"],
                   "devices": [la["chain_id"] for la in p["devices"]]})
        return
    verb = "would remove" if dry_run else "removed"
    for sha in p["blobs"]:
        click.echo(f"{verb} blob sha256:{sha}")
    for la in p["devices"]:
        click.echo(f"{verb} layer device {la.get('device')} ({la['chain_id']})")
    if not p["blobs"] and not p["devices"]:
        click.echo("nothing to collect")
