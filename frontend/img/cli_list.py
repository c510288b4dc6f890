"""`img list` (local images, their layers and activations) and `img images [--remote]` (browse the bucket)."""

from __future__ import annotations

import os
from typing import Any

import click

from img.cli_common import EXIT_S3, EXIT_USAGE, config_from, die, emit_json, json_option, s3_options
from img.config import Config
from img.progress import human


def local_images(cfg: Config) -> list[dict[str, Any]]:
    from img.store import Store

    if not cfg.db_path.exists():
        return []
    store = Store(cfg.db_path)
    out = []
    for im in store.images():
        layers = store.image_layers(im.ref)
        acts = store.activations(im.ref)
        out.append({
            "ref": im.ref, "kind": im.kind, "name": im.name, "format": im.format, "state": im.state,
            "chain_id": im.chain_id, "size": im.size, "error": im.error,
            "layers": [{"position": la.position, "digest": la.digest, "chain_id": la.chain_id,
                        "length": la.length, "source": la.source_key,
                        "device": (d.device if (d := store.layer_device(la.chain_id)) else None)}
                       for la in layers],
            "activations": [{"name": a.name, "device": a.device, "chain_id": a.chain_id,
                             "present": os.path.exists(a.device),
                             "current": a.chain_id == im.chain_id} for a in acts],
        })
    return out


@click.command("list")
@json_option
def list_images(json_out: bool) -> None:
    """Images img knows: state, layers, size and activations (with their device paths)."""
    images = local_images(config_from())
    if json_out:
        emit_json({"images": images})
        return
    if not images:
        click.echo("no images yet; `img process FAMILY` pulls one (`img images --remote` lists them)")
        return
    for im in images:
        click.echo(f"{im['name']:<16} {im['state']:<11} {len(im['layers'])} layers  {human(im['size']):>10}  "
                   f"{im['format'] or '-':<14} {im['ref']}")
        for a in im["activations"]:
            flag = "" if a["present"] else "  (device missing: `img process` again restores it)"
            click.echo(f"    activation {a['name']} -> {a['device']}{flag}")
        if im["error"]:
            click.echo(f"    last error: {im['error']}")


@click.command("images")
@click.option("--remote", is_flag=True, help="List the families in the S3 bucket instead of local images.")
@s3_options
@json_option
def images(remote: bool, json_out: bool, bucket: str | None, prefix: str | None, endpoint_url: str | None,
           no_sign_request: bool | None) -> None:
    """Browse images: local ones, or with --remote the families under the bucket's prefix."""
    cfg = config_from(bucket, prefix, endpoint_url, no_sign_request)
    local = {im["ref"]: im for im in local_images(cfg)}
    if not remote:
        if json_out:
            emit_json({"images": list(local.values())})
        else:
            for im in local.values():
                click.echo(f"{im['name']:<16} {im['state']:<11} {im['ref']}")
        return
    if not cfg.bucket:
        die(EXIT_USAGE, "no bucket configured", "set IMG_S3_BUCKET or pass --bucket")
    from img.refs import FamilyRef
    from img.s3 import S3Error, list_families, make_client

    try:
        fams = list_families(make_client(cfg), cfg.bucket, cfg.prefix)
    except S3Error as e:
        die(EXIT_S3, str(e))
    rows: list[dict[str, Any]] = []
    for f in fams:
        ref = FamilyRef(cfg.bucket, cfg.prefix, f.name).canonical
        rows.append({"name": f.name, "layers": f.layers, "size": f.size, "ref": ref,
                     "local_state": local[ref]["state"] if ref in local else None})
    if json_out:
        emit_json({"bucket": cfg.bucket, "prefix": cfg.prefix, "families": rows})
        return
    if not rows:
        click.echo(f"no families under s3://{cfg.bucket}/{cfg.prefix}")
    for r in rows:
        click.echo(f"{r['name']:<16} {r['layers']:>3} layers {human(r['size']):>10}  "
                   f"{r['local_state'] or 'not pulled'}")
