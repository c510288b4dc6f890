"""`img rm NAME`: deactivate an activation (the helper removes its snapshot and whatever was written to
it) and forget the image if nothing else activates it; `img gc` then frees its layer devices and blobs."""

from __future__ import annotations

import click

from img.cli_common import EXIT_USAGE, config_from, die, emit_json, helper_exit, json_option


@click.command("rm")
@click.argument("name")
@click.option("--keep-image", is_flag=True, help="Only deactivate; keep the image recorded.")
@json_option
def rm(name: str, keep_image: bool, json_out: bool) -> None:
    """Deactivate NAME and forget its image (then `img gc` reclaims the space)."""
    from img.store import Store
    from img_helper.client import HelperClient, HelperError

    cfg = config_from()
    if not cfg.db_path.exists():
        die(EXIT_USAGE, f"no activation {name!r}", "`img list` shows activations")
    store = Store(cfg.db_path)
    act = store.activation(name)
    if act is None:
        die(EXIT_USAGE, f"no activation {name!r}", "`img list` shows activations")
    try:
        res = HelperClient(cfg.helper_socket).call("deactivate", {"name": name})
    except HelperError as e:
        helper_exit(e)
    store.forget_activation(name)
    forgot = False
    if not keep_image and not store.activations(act.ref):
        store.delete_image(act.ref)
        forgot = True
    if json_out:
        emit_json({"name": name, "removed": bool(res.get("removed")), "image_forgotten": forgot,
                   "ref": act.ref})
    else:
        click.echo(f"{name}: deactivated" + (f"; {act.ref} forgotten (`img gc` frees its layers and blobs)"
                                             if forgot else ""))
