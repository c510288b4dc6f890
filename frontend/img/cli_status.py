"""`img status`: is the helper reachable, does polkit authorize this user, how full is the pool."""

from __future__ import annotations

import os
from typing import Any

import click

from img.cli_common import EXIT_HELPER, config_from, emit_json, json_option


def gather() -> dict[str, Any]:
    from img_helper.client import HelperClient, HelperError, HelperUnavailable, NotAuthorized

    cfg = config_from()
    out: dict[str, Any] = {
        "home": str(cfg.home), "db": str(cfg.db_path), "bucket": cfg.bucket, "prefix": cfg.prefix,
        "endpoint_url": cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
        "helper_socket": cfg.helper_socket, "uid": os.getuid(),
        "helper": {"reachable": False}, "authorized": None,
    }
    client = HelperClient(cfg.helper_socket, timeout=30)
    try:
        st = client.call("status", {})
        out["helper"] = {"reachable": True, **st}
    except NotAuthorized as e:
        out["helper"] = {"reachable": True, "error": e.message}
        out["authorized"] = False
    except HelperUnavailable as e:
        out["helper"] = {"reachable": False, "error": e.message}
    except HelperError as e:
        out["helper"] = {"reachable": True, "error": f"{e.code}: {e.message}"}
    if out["helper"].get("reachable") and out["authorized"] is None:
        try:  # "list" needs the polkit verdict for this user
            listed = client.call("list", {})
            out["authorized"] = True
            out["devices"] = {"layers": len(listed.get("layers", [])),
                              "activations": len(listed.get("activations", []))}
        except NotAuthorized as e:
            out["authorized"] = False
            out["authorization_error"] = e.message
        except HelperError as e:
            out["authorization_error"] = f"{e.code}: {e.message}"
    if cfg.db_path.exists():
        from img.fsm import FsmStore
        from img.store import Store

        store = Store(cfg.db_path)
        out["images"] = len(store.images())
        out["activations"] = len(store.activations())
        out["active_runs"] = len(FsmStore(str(cfg.db_path)).list_active())
    return out


@click.command("status")
@json_option
def status(json_out: bool) -> None:
    """Helper reachability, polkit authorization, pool usage, local state."""
    s = gather()
    ok = bool(s["helper"].get("reachable")) and s["authorized"] is True
    if json_out:
        emit_json({**s, "ok": ok})
    else:
        h = s["helper"]
        click.echo(f"state dir:  {s['home']}")
        click.echo(f"bucket:     {s['bucket'] or '(IMG_S3_BUCKET unset)'} prefix {s['prefix']}"
                   + (f" endpoint {s['endpoint_url']}" if s["endpoint_url"] else ""))
        if not h.get("reachable"):
            click.echo(f"helper:     UNREACHABLE at {s['helper_socket']}: {h.get('error', '')}")
        else:
            err = f" ({h['error']})" if "error" in h else ""
            click.echo(f"helper:     reachable at {s['helper_socket']}{err}")
            pool = h.get("pool") or {}
            if "data_total_bytes" in pool:
                from img.progress import human

                used, total = int(pool.get("data_used_bytes", 0)), int(pool["data_total_bytes"]) or 1
                mused = int(pool.get("metadata_used_bytes", 0))
                mtotal = int(pool.get("metadata_total_bytes", 1))
                flags = [k for k in ("fail", "read_only", "needs_check", "out_of_data_space") if pool.get(k)]
                click.echo(f"pool:       {pool.get('name', '?')}: data {human(used)} / {human(total)} "
                           f"({used * 100 / total:.1f}%), metadata {mused * 100 / max(mtotal, 1):.1f}%"
                           + (f" — {', '.join(flags)}" if flags else ""))
            elif pool:
                click.echo("pool:       " + ", ".join(f"{k}={v}" for k, v in sorted(pool.items())
                                                      if not isinstance(v, dict | list)))
        verdict = {True: "yes", False: "NO (join group img; polkit action io.github.img.*)", None: "unknown"}
        click.echo(f"authorized: {verdict[s['authorized']]}"
                   + (f" — {s['authorization_error']}" if s.get("authorization_error") else ""))
        if "images" in s:
            click.echo(f"local:      {s['images']} images, {s['activations']} activations, "
                       f"{s['active_runs']} runs in progress")
    if not ok:
        raise SystemExit(EXIT_HELPER)
