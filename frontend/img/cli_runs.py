"""`img runs [--active]`, `img run show VERSION` and `img resume`: the FSM runs behind the workflows."""

from __future__ import annotations

import datetime
from typing import Any

import click

from img.cli_common import EXIT_USAGE, config_from, die, emit_json, json_option


def _ts(t: float | None) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _rec(r: Any) -> dict[str, Any]:
    return {"version": r.version, "run_id": r.run_id, "action": r.action, "parent": r.parent,
            "status": r.status, "state": r.current_state, "retries": r.retry_count, "error": r.error,
            "error_kind": r.error_kind, "created_at": r.created_at, "finished_at": r.finished_at,
            "active": r.active, "owner": r.owner}


def _fsm_store() -> Any:
    from img.fsm import FsmStore
    from img.store import Store

    cfg = config_from()
    if not cfg.db_path.exists():
        return None
    Store(cfg.db_path)  # migrate img's tables too (a fresh home)
    return FsmStore(str(cfg.db_path))


@click.command("runs")
@click.option("--active", is_flag=True, help="Only runs not finished yet.")
@click.option("--limit", default=50, show_default=True)
@json_option
def runs(active: bool, limit: int, json_out: bool) -> None:
    """Workflow runs, newest first: image pulls and their blob/layer children."""
    st = _fsm_store()
    recs = [] if st is None else (st.list_active() if active else st.runs(limit=limit))
    recs = sorted(recs, key=lambda r: r.version, reverse=True)[:limit]
    if json_out:
        emit_json({"runs": [_rec(r) for r in recs]})
        return
    if not recs:
        click.echo("no runs" + (" in progress" if active else ""))
    for r in recs:
        err = f"  {r.error[:80]}" if r.error else ""
        click.echo(f"{r.version}  {r.action:<10} {r.status:<9} {r.current_state or '-':<9} "
                   f"{_ts(r.created_at)}  {r.run_id[:60]}{err}")


@click.group("run")
def run() -> None:
    """One workflow run."""


@run.command("show")
@click.argument("version")
@json_option
def show(version: str, json_out: bool) -> None:
    """A run's record, its children and its event history (START/COMPLETE/ERROR/CANCEL/FINISH)."""
    st = _fsm_store()
    rec = None if st is None else st.get_run(version)
    if rec is None:
        die(EXIT_USAGE, f"no run {version}", "`img runs` lists run versions")
    events = st.history(version)
    children = st.children(version)
    if json_out:
        emit_json({"run": _rec(rec), "children": children,
                   "events": [{"seq": e.seq, "kind": e.kind, "state": e.state, "error": e.error,
                               "error_kind": e.error_kind, "retry_count": e.retry_count, "ts": e.ts,
                               "duration": e.duration} for e in events]})
        return
    for k, v in _rec(rec).items():
        click.echo(f"{k:>12}: {_ts(v) if k.endswith('_at') else v}")
    for c in children:
        cr = st.get_run(c)
        click.echo(f"{'child':>12}: {c} {cr.action if cr else ''} {cr.status if cr else ''} "
                   f"{cr.run_id[:50] if cr else ''}")
    click.echo("events:")
    for e in events:
        extra = f" error={e.error!r} kind={e.error_kind} retry={e.retry_count}" if e.error else ""
        dur = f" {e.duration * 1000:.0f} ms" if e.duration else ""
        click.echo(f"  {_ts(e.ts)} {e.kind:<8} {e.state or '-':<9}{dur}{extra}")


@click.command("resume")
@json_option
def resume(json_out: bool) -> None:
    """Continue the runs a crashed or killed img process left behind, and wait for them."""
    from img.progress import for_output
    from img.workflows import Runner

    cfg = config_from()
    reporter = for_output(json_out)
    with Runner(cfg, reporter) as runner:
        versions = runner.resume_all()
        recs = [runner.manager.get_run(v) for v in versions]
    reporter.close()
    if json_out:
        emit_json({"resumed": [_rec(r) for r in recs]})
        return
    if not recs:
        click.echo("nothing to resume")
    for r in recs:
        click.echo(f"{r.version} {r.action} {r.status} {r.run_id[:60]}" + (f": {r.error}" if r.error else ""))
