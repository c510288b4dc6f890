"""`img process REF [--activate NAME]`: download what is missing, unpack it via the helper, activate it."""

from __future__ import annotations

import os

import click

from img.cli_common import EXIT_HELPER, EXIT_USAGE, config_from, die, emit_json, json_option, s3_options


def result_dict(ref: str, name: str, chain_id: str, device: str, changed: bool, layers: int = 0,
                size: int = 0, fmt: str = "") -> dict[str, object]:
    return {"ref": ref, "name": name, "chain_id": chain_id, "device": device, "state": "active",
            "changed": changed, "layers": layers, "size": size, "format": fmt}


@click.command("process")
@click.argument("ref")
@click.option("--activate", "name", metavar="NAME",
              help="Activation name (default: the family name, or the archive's base name).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@s3_options
@json_option
def process(ref: str, name: str | None, quiet: bool, json_out: bool, bucket: str | None, prefix: str | None,
            endpoint_url: str | None, no_sign_request: bool | None) -> None:
    """Pull REF from S3 (only what is missing), unpack it into the thin pool, activate it.

    REF is a family name under the configured bucket and prefix (layers <prefix><family>/<n>.tar, in
    numeric order), s3://bucket/prefix/family/ for a family elsewhere, or s3://bucket/key for a
    docker-archive or OCI archive.
    """
    from img.refs import RefError, check_name, parse
    from img.store import peek_activation

    cfg = config_from(bucket, prefix, endpoint_url, no_sign_request)
    try:
        image_ref = parse(ref, cfg)
        name = check_name(name or image_ref.default_name)
    except RefError as e:
        die(EXIT_USAGE, str(e))
    act = peek_activation(cfg.db_path, name)
    if act is not None and act.ref == image_ref.canonical and os.path.exists(act.device):
        if json_out:
            emit_json(result_dict(act.ref, name, act.chain_id, act.device, False))
        else:
            click.echo(f"{name}: active at {act.device} (already up to date)")
        return

    _preflight(cfg.helper_socket)
    from img.progress import for_output
    from img.workflows import Runner, WorkflowError

    reporter = for_output(json_out, quiet)
    try:
        with Runner(cfg, reporter) as runner:
            resp = runner.process(image_ref, name)
            img = runner.store.image(image_ref.canonical)
    except WorkflowError as e:
        reporter.close()
        die(e.exit_code, e.message, _hint(e.code))
    except KeyboardInterrupt:
        reporter.close()
        die(130, "interrupted; `img process` again (or `img resume`) continues where this stopped")
    reporter.close()
    size = img.size if img else 0
    if json_out:
        emit_json(result_dict(image_ref.canonical, name, resp.chain_id, resp.device, True, len(resp.layers),
                              size, resp.format))
    else:
        what = "family" if resp.format == "layers" else resp.format
        click.echo(f"{name}: active at {resp.device} ({len(resp.layers)} layers, {what}, "
                   f"chain {resp.chain_id[:19]})")


def _preflight(socket_path: str) -> None:
    """Fail before downloading anything if the helper is not there or will not talk to this user."""
    from img_helper.client import HelperClient, HelperUnavailable, NotAuthorized

    try:
        HelperClient(socket_path, timeout=30).call("status", {})
    except (HelperUnavailable, NotAuthorized) as e:
        die(EXIT_HELPER, e.message, _hint("helper-unavailable" if isinstance(e, HelperUnavailable)
                                          else "not-authorized"))


def _hint(code: str) -> str:
    return {
        "s3-not-found": "check the name; `img images --remote` lists the bucket's families",
        "s3-denied": "check AWS credentials (AWS_PROFILE, env) or use --no-sign-request for a public bucket",
        "helper-unavailable": "start the helper as root: `img-helper serve` (see `img status`)",
        "not-authorized": "add the user to group img (`sudo usermod -aG img $USER`, then log in again)",
        "rejected": "the image content is not acceptable; `img run show VERSION` has the details "
                    "(`img runs` lists versions)",
        "too-large": "raise IMG_MAX_BLOB_BYTES if the image is legitimate",
    }.get(code, "`img runs` and `img run show VERSION` show what failed; `img process` again retries")
