"""The FSM engine in one process: steps, events, retries, Abort/Unrecoverable, cancel vs shutdown, finalizers,
delays, run-after, queues, parents, resume, metrics, logs, spans, admin reads, schema sharing, import cost."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from img import fsm
from img.fsm import codec, ulid
from tests.host import test_fsm_support as support
from tests.host.test_fsm_support import FAST, Msg, Out, kinds, until

db = support.db
managers = support.managers

Managers = Callable[..., fsm.Manager]


def test_linear_steps_pass_msg_and_previous_response(managers: Managers) -> None:
    seen: list[tuple[str, object, fsm.RunInfo]] = []

    def a(req: fsm.Request[Msg, Out]) -> Out:
        seen.append(("a", req.w, req.run))
        return Out(total=req.msg.n, trail=["a"])

    def b(req: fsm.Request[Msg, Out]) -> Out:
        assert req.w is not None
        seen.append(("b", req.w, req.run))
        return Out(total=req.w.total + 1, trail=[*req.w.trail, "b"])

    m = managers()
    mach = m.register("add", Msg, Out).start("a", a).to("b", b).end("done").build()
    version = mach.start("r1", Msg(41))
    assert ulid.is_ulid(version)
    assert mach.wait(version, timeout=5) == Out(total=42, trail=["a", "b"])
    assert seen[0][1] is None and seen[1][1] == Out(41, ["a"])
    info = seen[1][2]
    assert (info.id, info.version, info.action, info.state, info.retry_count, info.is_restart) == (
        "r1",
        version,
        "add",
        "b",
        0,
        False,
    )
    assert kinds(m, version) == ["START", "COMPLETE", "COMPLETE", "FINISH"]
    hist = m.history(version)
    assert hist[1].payload == {"total": 41, "trail": ["a"]} and hist[-1].error is None
    rec = m.get_run(version)
    assert (rec.status, rec.current_state, rec.active, rec.result) == (
        "succeeded",
        "done",
        False,
        hist[-1].payload,
    )


def test_start_is_persisted_before_it_returns(managers: Managers, db: Path) -> None:
    gate = threading.Event()
    m = managers()
    mach = m.register("hold", Msg, Out).start("a", lambda req: gate.wait(5) and Out()).end("done").build()
    version = mach.start("r1", Msg())
    row = sqlite3.connect(db).execute("SELECT kind FROM fsm_events WHERE version = ?", (version,)).fetchall()
    assert row[0] == ("START",)
    gate.set()
    mach.wait(version, timeout=5)


def test_second_start_of_active_run_raises_already_running_with_its_version(managers: Managers) -> None:
    gate = threading.Event()
    m = managers()
    mach = m.register("hold", Msg, Out).start("a", lambda req: gate.wait(5) and Out()).end("done").build()
    v1 = mach.start("same", Msg())
    with pytest.raises(fsm.AlreadyRunning) as ei:
        mach.start("same", Msg())
    assert ei.value.version == v1
    other = mach.start("other", Msg())  # another id is fine
    gate.set()
    mach.wait(v1, timeout=5)
    mach.wait(other, timeout=5)
    v2 = mach.start("same", Msg())  # finished: a new run (new version) may start
    assert v2 != v1 and v2 > v1
    mach.wait(v2, timeout=5)


def test_retries_are_bounded_and_error_events_only_when_the_message_changes(managers: Managers) -> None:
    attempts: list[int] = []

    def always_fails(req: fsm.Request[Msg, Out]) -> Out:
        attempts.append(req.run.retry_count)
        raise OSError("disk on fire" if req.run.retry_count < 2 else "still on fire")

    m = managers()
    mach = (
        m.register("fail", Msg, Out, max_attempts=4, backoff=FAST.backoff)
        .start("a", always_fails)
        .end("x")
        .build()
    )
    version = mach.start("r", Msg())
    with pytest.raises(fsm.RunFailed) as ei:
        mach.wait(version, timeout=5)
    assert attempts == [0, 1, 2, 3]
    assert (ei.value.kind, ei.value.state) == ("retries", "a")
    assert isinstance(ei.value.__cause__, OSError)
    errors = [(e.error, e.retry_count) for e in m.history(version) if e.kind == "ERROR"]
    assert errors == [("OSError: disk on fire", 1), ("OSError: still on fire", 3)]
    fin = m.history(version)[-1]
    assert (
        fin.kind == "FINISH"
        and fin.error_kind == "retries"
        and "gave up after 4 attempts" in (fin.error or "")
    )


def test_max_attempts_per_start_overrides_the_fsm(managers: Managers) -> None:
    calls = []
    m = managers()
    mach = m.register("fail2", Msg, Out).start("a", lambda req: calls.append(1) or 1 / 0).end("x").build()
    with pytest.raises(fsm.RunFailed):
        mach.wait(mach.start("r", Msg(), max_attempts=2), timeout=5)
    assert len(calls) == 2


def test_backoff_grows_to_its_maximum() -> None:
    b = fsm.Backoff(initial=0.1, maximum=5.0, factor=1.5, jitter=0)
    assert [round(b.delay(i), 4) for i in (1, 2, 3)] == [0.1, 0.15, 0.225]
    assert b.delay(100) == 5.0
    assert fsm.RetryPolicy().max_attempts == 8
    jit = fsm.Backoff(jitter=0.2)
    assert all(0.08 <= jit.delay(1) <= 0.12 for _ in range(50))


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (fsm.Abort("stop it"), "abort"),
        (fsm.Unrecoverable("no such image", kind="user"), "user"),
        (fsm.Unrecoverable(RuntimeError("bug"), kind="system"), "system"),
    ],
)
def test_abort_and_unrecoverable_skip_remaining_steps_and_run_finalizers(
    managers: Managers, exc: Exception, kind: str
) -> None:
    ran: list[str] = []
    finals: list[fsm.RunError | None] = []

    def a(req: fsm.Request[Msg, Out]) -> Out:
        ran.append("a")
        raise exc

    def fin(req: fsm.Request[Msg, Out], err: fsm.RunError | None) -> None:
        finals.append(err)

    m = managers()
    mach = (
        m.register("stop-" + kind, Msg, Out)
        .start("a", a)
        .to("b", lambda r: ran.append("b") or Out())
        .end("done", finalizers=[fin])
        .build()
    )
    version = mach.start("r", Msg())
    with pytest.raises(fsm.RunFailed) as ei:
        mach.wait(version, timeout=5)
    assert ran == ["a"]  # not retried, b skipped
    assert ei.value.kind == kind and finals[0] is not None and finals[0].kind == kind
    rec = m.get_run(version)
    assert (rec.status, rec.error_kind, rec.error_state) == ("failed", kind, "a")
    assert kinds(m, version) == ["START", "ERROR", "COMPLETE", "FINISH"]


def test_unrecoverable_kind_is_checked() -> None:
    with pytest.raises(ValueError):
        fsm.Unrecoverable("x", kind="nobody")  # type: ignore[arg-type]


def test_cancel_writes_cancel_runs_finalizers_and_step_sees_it(managers: Managers) -> None:
    started = threading.Event()
    observed = []
    finals: list[fsm.RunError | None] = []

    def long_step(req: fsm.Request[Msg, Out]) -> Out:
        started.set()
        req.sleep(10)  # raises fsm.Cancelled when cancelled
        return Out()

    def fin(req: fsm.Request[Msg, Out], err: fsm.RunError | None) -> None:
        observed.append(req.cancelled.is_set())  # finalizers are not told to stop on cancel
        finals.append(err)

    m = managers()
    mach = (
        m.register("cancel", Msg, Out)
        .start("a", long_step)
        .to("b", lambda r: Out())
        .end("done", finalizers=[fin])
        .build()
    )
    version = mach.start("r", Msg())
    started.wait(5)
    t0 = time.monotonic()
    assert mach.cancel(version, "user pressed ^C")
    with pytest.raises(fsm.RunCancelled) as ei:
        mach.wait(version, timeout=5)
    assert time.monotonic() - t0 < 2
    assert ei.value.kind == "cancel" and ei.value.error == "user pressed ^C"
    assert finals[0] == fsm.RunError("user pressed ^C", "cancel", "a") and observed == [False]
    assert kinds(m, version) == ["START", "CANCEL", "COMPLETE", "FINISH"]
    assert m.get_run(version).status == "cancelled"
    assert not mach.cancel(version)  # no longer active


def test_cancel_of_a_delayed_run_never_runs_its_steps_but_runs_finalizers(managers: Managers) -> None:
    ran: list[str] = []
    m = managers()
    mach = (
        m.register("cd", Msg, Out)
        .start("a", lambda r: ran.append("a") or Out())
        .end("done", finalizers=[lambda r, e: ran.append(f"fin:{e.kind if e else None}")])
        .build()
    )
    version = mach.start("r", Msg(), delay=30)
    assert m.get_run(version).status == "pending"
    mach.cancel(version)
    with pytest.raises(fsm.RunCancelled):
        mach.wait(version, timeout=5)
    assert ran == ["fin:cancel"]


def test_delayed_start_waits(managers: Managers) -> None:
    m = managers()
    mach = m.register("delay", Msg, Out).start("a", lambda r: Out()).end("done").build()
    version = mach.start("r", Msg(), delay=0.3)
    mach.wait(version, timeout=5)
    rec = m.get_run(version)
    assert rec.started_at is not None and rec.started_at - rec.created_at >= 0.29


def test_run_after_waits_for_the_other_run(managers: Managers) -> None:
    stamps: dict[str, tuple[float, float]] = {}

    def step(req: fsm.Request[Msg, Out]) -> Out:
        t0 = time.time()
        time.sleep(0.15)
        stamps[req.run.id] = (t0, time.time())
        return Out()

    m = managers()
    mach = m.register("after", Msg, Out).start("a", step).end("done").build()
    first = mach.start("first", Msg())
    second = mach.start("second", Msg(), run_after=first)
    mach.wait(second, timeout=5)
    assert stamps["second"][0] >= stamps["first"][1]


def test_queue_limits_concurrency(managers: Managers) -> None:
    lock = threading.Lock()
    running, peak = [0], [0]

    def step(req: fsm.Request[Msg, Out]) -> Out:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return Out()

    m = managers(queues={"dl": 2})
    mach = m.register("q", Msg, Out).start("a", step).end("done").build()
    versions = [mach.start(f"r{i}", Msg(), queue="dl") for i in range(6)]
    for v in versions:
        mach.wait(v, timeout=10)
    assert peak[0] == 2
    with pytest.raises(fsm.UnknownQueue):
        mach.start("x", Msg(), queue="nope")


def test_parent_children_and_wait_children(managers: Managers) -> None:
    m = managers()
    child = m.register("child", Msg, Out).start("a", lambda r: Out(total=r.msg.n * 10)).end("done").build()

    def spawn(req: fsm.Request[Msg, Out]) -> Out:
        for i in (1, 2):
            try:
                child.start(f"{req.run.id}/c{i}", Msg(i), parent=req.run.version)
            except fsm.AlreadyRunning:
                pass
        results = m.wait_children(req.run.version, timeout=5)
        return Out(total=sum(r.total for r in results.values()))

    parent = m.register("parent", Msg, Out).start("spawn", spawn).end("done").build()
    version = parent.start("p", Msg())
    assert parent.wait(version, timeout=5) == Out(total=30)
    kids = m.children(version)
    assert len(kids) == 2 and all(m.get_run(k).parent == version for k in kids)


def test_wait_by_id_and_not_found(managers: Managers) -> None:
    m = managers()
    mach = m.register("byid", Msg, Out).start("a", lambda r: Out(total=7)).end("done").build()
    mach.start("abc", Msg())
    assert mach.wait_by_id("abc", timeout=5) == Out(total=7)
    with pytest.raises(fsm.RunNotFound):
        m.wait_by_id("nope")
    with pytest.raises(fsm.RunNotFound):
        m.wait("01HZZZZZZZZZZZZZZZZZZZZZZZ")
    gate = threading.Event()
    slow = m.register("slow", Msg, Out).start("a", lambda r: gate.wait(5) and Out()).end("done").build()
    v = slow.start("s", Msg())
    with pytest.raises(fsm.WaitTimeout):
        m.wait(v, timeout=0.05)
    gate.set()
    m.wait(v, timeout=5)


def _two_step(
    m: fsm.Manager, log: list[str], gate: threading.Event, action: str = "resumable"
) -> fsm.Machine[Msg, Out]:
    def a(req: fsm.Request[Msg, Out]) -> Out:
        log.append(f"a restart={req.run.is_restart}")
        return Out(total=req.msg.n)

    def b(req: fsm.Request[Msg, Out]) -> Out:
        assert req.w is not None
        log.append(f"b restart={req.run.is_restart} w={req.w.total} retry={req.run.retry_count}")
        if not gate.is_set():
            req.sleep(10)
        return Out(total=req.w.total + 1)

    return m.register(action, Msg, Out).start("a", a).to("b", b).end("done").build()


def test_shutdown_writes_nothing_and_the_next_manager_resumes(managers: Managers) -> None:
    log: list[str] = []
    gate = threading.Event()
    m1 = managers()
    version = _two_step(m1, log, gate).start("r", Msg(5))
    until(lambda: any(x.startswith("b") for x in log), what="step b")
    before = kinds(m1, version)
    m1.shutdown(timeout=5)
    assert kinds(m1, version) == before == ["START", "COMPLETE"]  # no ERROR/CANCEL/FINISH on shutdown
    rec = m1.get_run(version)
    assert rec.active and rec.owner is None and rec.current_state == "b"
    gate.set()
    m2 = managers()
    mach2 = _two_step(m2, log, gate)
    assert m2.resume() == [version]
    assert mach2.wait(version, timeout=5) == Out(total=6)
    assert log == ["a restart=False", "b restart=False w=5 retry=0", "b restart=True w=5 retry=0"]
    assert m2.resume() == []


def test_resume_restores_retry_count_and_options(managers: Managers) -> None:
    log: list[int] = []

    def flaky(req: fsm.Request[Msg, Out]) -> Out:
        log.append(req.run.retry_count)
        raise RuntimeError("flaky")

    m1 = managers()
    mach = m1.register("restore", Msg, Out).start("a", flaky).end("done").build()
    version = mach.start("r", Msg(), max_attempts=3, backoff=fsm.Backoff(initial=0.3, jitter=0))
    until(lambda: len(log) == 2, what="two attempts")
    m1.shutdown(timeout=5)
    assert m1.get_run(version).retry_count == 2
    m2 = managers()
    mach2 = m2.register("restore", Msg, Out).start("a", flaky).end("done").build()
    m2.resume()
    with pytest.raises(fsm.RunFailed) as ei:
        mach2.wait(version, timeout=5)
    assert log == [0, 1, 2]  # 3 attempts in all (max_attempts from the start options), not 3 more
    assert "gave up after 3 attempts" in ei.value.error


def test_resume_after_stop_runs_only_the_finalizers(managers: Managers) -> None:
    ran: list[str] = []
    gate = threading.Event()

    def fin(req: fsm.Request[Msg, Out], err: fsm.RunError | None) -> None:
        ran.append(f"fin {err.kind if err else None} {gate.is_set()}")
        if not gate.is_set():
            req.sleep(10)  # shutdown interrupts the finalizer

    def build(m: fsm.Manager) -> fsm.Machine[Msg, Out]:
        def a(req: fsm.Request[Msg, Out]) -> Out:
            ran.append("a")
            raise fsm.Abort("no")

        return (
            m.register("stopfin", Msg, Out).start("a", a).end("done", finalizers=[("cleanup", fin)]).build()
        )

    m1 = managers()
    version = build(m1).start("r", Msg())
    until(lambda: ran[-1:] == ["fin abort False"], what="finalizer")
    m1.shutdown(timeout=5)
    gate.set()
    m2 = managers()
    mach2 = build(m2)
    m2.resume()
    with pytest.raises(fsm.RunFailed) as ei:
        mach2.wait(version, timeout=5)
    assert ei.value.kind == "abort" and ran == ["a", "fin abort False", "fin abort True"]


def test_finalizer_failure_is_recorded_but_does_not_change_the_outcome(managers: Managers) -> None:
    m = managers()
    mach = (
        m.register("finfail", Msg, Out)
        .start("a", lambda r: Out(total=1))
        .end("done", finalizers=[lambda r, e: 1 / 0])
        .build()
    )
    version = mach.start("r", Msg())
    assert mach.wait(version, timeout=5) == Out(total=1)
    errs = [e for e in m.history(version) if e.kind == "ERROR"]
    assert errs[-1].error_kind == "finalizer" and "ZeroDivisionError" in (errs[-1].error or "")


def test_metrics_logs_and_spans(managers: Managers, caplog: pytest.LogCaptureFixture) -> None:
    def a(req: fsm.Request[Msg, Out]) -> Out:
        with req.span("fetch"):
            time.sleep(0.01)
        if req.run.retry_count == 0:
            raise RuntimeError("once")
        req.log.info("step a ok")
        return Out()

    caplog.set_level(logging.DEBUG, logger="img.fsm")
    m = managers()
    mach = m.register("observed", Msg, Out).start("a", a).end("done").build()
    version = mach.start("r", Msg())
    mach.wait(version, timeout=5)
    assert fsm.metrics.value("fsm_action_count", action="observed", status="succeeded") == 1
    assert fsm.metrics.value("fsm_transition_count", action="observed", state="a", status="error") == 1
    assert fsm.metrics.value("fsm_transition_count", action="observed", state="a", status="ok") == 1
    assert fsm.metrics.value("fsm_transition_duration_seconds", action="observed", state="a") == 2
    text = fsm.metrics.exposition()
    assert 'fsm_action_count{action="observed",resource="Msg",status="succeeded",kind=""} 1' in text
    assert (
        'fsm_action_duration_seconds_bucket{action="observed",resource="Msg",status="succeeded",kind="",'
        'le="+Inf"} 1' in text
    )
    snap = fsm.metrics.snapshot()
    assert {
        "fsm_action_count",
        "fsm_action_duration_seconds",
        "fsm_transition_count",
        "fsm_transition_duration_seconds",
    } <= set(snap)
    rec = next(r for r in caplog.records if r.getMessage() == "step a ok")
    assert (rec.run_id, rec.run_version, rec.transition, rec.retry_count) == ("r", version, "a", 1)  # type: ignore[attr-defined]
    spans = [e for e in m.history(version) if e.kind == "SPAN"]
    assert [s.payload["name"] for s in spans] == ["fetch", "fetch"] and all(
        (s.duration or 0) >= 0.009 for s in spans
    )


def test_admin_reads(managers: Managers, db: Path) -> None:
    gate = threading.Event()
    m = managers()
    mach = (
        m.register("admin", Msg, Out)
        .start("a", lambda r: gate.wait(5) and Out())
        .to("b", lambda r: Out())
        .end("done")
        .build()
    )
    version = mach.start("r", Msg())
    until(lambda: m.get_run(version).current_state == "a", what="state a")
    assert {f["action"]: f["states"] for f in m.list_fsms()}["admin"] == ["a", "b", "done"]
    active = m.list_active()
    assert [r.version for r in active] == [version] and active[0].owner == m.owner and active[0].executing
    gate.set()
    mach.wait(version, timeout=5)
    assert m.list_active() == []
    today = m.get_run(version).day
    assert [r.version for r in m.runs(day=today)] == [version]
    store = fsm.FsmStore(db)  # reads without a manager (e.g. `img runs`)
    assert store.get_run(version).status == "succeeded"  # type: ignore[union-attr]
    assert [e.kind for e in store.history(version)] == ["START", "COMPLETE", "COMPLETE", "FINISH"]


def test_store_shares_one_database_and_creates_only_fsm_tables(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE schema_version (version INTEGER)")
    other.execute("CREATE TABLE images (name TEXT PRIMARY KEY)")
    other.execute("INSERT INTO schema_version VALUES (7)")
    other.commit()
    store = fsm.FsmStore(lambda: sqlite3.connect(path))  # a connection factory
    assert store.schema_version() == 1 and fsm.FsmStore(path).migrate() == 1  # idempotent
    names = {
        r[0]
        for r in other.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'index') AND name NOT LIKE 'sqlite_%'"
        )
    }
    assert names - {"images", "schema_version"} and all(
        n.startswith("fsm_") for n in names - {"images", "schema_version"}
    )
    assert other.execute("SELECT version FROM schema_version").fetchone() == (7,)
    assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    with fsm.Manager(lambda: sqlite3.connect(path), retry=FAST) as m:
        mach = m.register("shared", Msg, Out).start("a", lambda r: Out(total=3)).end("done").build()
        assert mach.wait(mach.start("x", Msg()), timeout=5) == Out(total=3)


@dataclass
class Inner:
    path: Path
    sizes: list[int]


@dataclass
class Outer:
    inner: Inner | None
    by_name: dict[str, Inner]
    note: str = ""


def test_codec_round_trips_nested_dataclasses() -> None:
    value = Outer(Inner(Path("/a"), [1, 2]), {"x": Inner(Path("/b"), [])}, "hi")
    assert codec.decode(Outer, codec.encode(value)) == value
    assert codec.decode(dict, codec.encode({"a": [1]})) == {"a": [1]}
    with pytest.raises(codec.CodecError):
        codec.encode(object())


@dataclass
class Strict:
    must: int


@pytest.mark.parametrize("resp", [object(), {"nope": 1}], ids=["unencodable", "missing-field"])
def test_invalid_response_is_unrecoverable(managers: Managers, resp: object) -> None:
    m = managers()
    mach = m.register("badresp", Msg, Strict).start("a", lambda r: resp).end("done").build()  # type: ignore[arg-type,return-value]
    with pytest.raises(fsm.RunFailed) as ei:
        mach.wait(mach.start("r", Msg()), timeout=5)
    assert ei.value.kind == "system" and "not a valid Strict" in ei.value.error


def test_builder_rejects_bad_definitions() -> None:
    with pytest.raises(fsm.DefinitionError):
        fsm.register("x", Msg, Out).start("a", lambda r: None).to("a", lambda r: None)
    with pytest.raises(fsm.DefinitionError):
        fsm.register("x", Msg, Out).start("a", lambda r: None).build()
    with pytest.raises(fsm.DefinitionError):
        fsm.register("x", Msg, Out).to("a", lambda r: None)


def test_ulids_sort_in_creation_order() -> None:
    ids = [ulid.new() for _ in range(1000)]
    assert ids == sorted(ids) and len(set(ids)) == 1000
    assert abs(ulid.timestamp(ids[0]) - time.time()) < 5


def test_import_is_cheap() -> None:
    code = (
        "import sys, time; t = time.perf_counter(); import img.fsm; dt = time.perf_counter() - t; "
        "heavy = [m for m in ('boto3', 'botocore', 'click', 'asyncio', 'textual', 'cffi',"
        " 'concurrent.futures') if m in sys.modules]; print(dt, heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split(" ", 1)
    assert out[1].strip() == "[]"
    assert float(out[0]) < 0.5  # ~20-60 ms unloaded; generous because CI machines are shared


def test_start_or_attach_joins_a_live_run_and_adopts_an_orphaned_one(managers: Managers) -> None:
    gate = threading.Event()
    calls: list[str] = []

    def build(m: fsm.Manager) -> fsm.Machine[Msg, Out]:
        def a(req: fsm.Request[Msg, Out]) -> Out:
            calls.append(m.owner)
            if not gate.is_set():
                req.sleep(10)
            return Out(total=5)

        return m.register("attach", Msg, Out).start("a", a).end("done").build()

    m1, m2 = managers(), managers()
    mach1, mach2 = build(m1), build(m2)
    v = mach1.start_or_attach("img", Msg())
    until(lambda: calls, what="step a")
    assert mach2.start_or_attach("img", Msg()) == v  # live owner (m1): attach, don't take over
    assert m2.get_run(v).owner == m1.owner
    m1.shutdown(timeout=5)  # now orphaned
    gate.set()
    assert mach2.start_or_attach("img", Msg()) == v
    assert mach2.wait(v, timeout=5) == Out(total=5)
    assert m2.history(v)[-1].owner == m2.owner  # m2 finished it
    assert calls == [m1.owner, m2.owner]


def test_wait_on_a_shut_down_manager_does_not_hang(managers: Managers) -> None:
    m = managers()
    mach = m.register("late", Msg, Out).start("a", lambda r: Out()).end("done").build()
    v = mach.start("x", Msg(), delay=30)
    m.shutdown()
    with pytest.raises(fsm.ManagerClosed):
        m.wait(v)
    with pytest.raises(fsm.ManagerClosed):
        mach.start("y", Msg())


def test_shutdown_from_inside_a_step_does_not_deadlock(managers: Managers) -> None:
    m = managers()
    done = threading.Event()

    def a(req: fsm.Request[Msg, Out]) -> Out:
        m.shutdown(timeout=1)
        done.set()
        raise fsm.Cancelled("shutting down")

    mach = m.register("selfstop", Msg, Out).start("a", a).end("done").build()
    v = mach.start("x", Msg())
    assert done.wait(5)
    until(lambda: m.get_run(v).owner is None, what="lease released by the exiting run thread")
    assert kinds(m, v) == ["START"]


def test_engine_error_is_retried_then_the_run_is_handed_over(
    managers: Managers, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from img.fsm import engine

    monkeypatch.setattr(engine, "ENGINE_RETRY_DELAY", 0.01)
    m1 = managers()
    mach = (
        m1.register("corrupt", Msg, Out)
        .start("a", lambda r: Out(total=1))
        .to("b", lambda r: r.sleep(5) or Out())
        .end("done")
        .build()
    )
    v = mach.start("x", Msg())
    until(lambda: m1.get_run(v).current_state == "b", what="state b")
    m1.shutdown(timeout=5)
    with fsm.FsmStore(db).tx() as c:  # a stored response that no longer decodes into Out
        c.execute("UPDATE fsm_events SET payload = '[1, 2]' WHERE version = ? AND state = 'a'", (v,))
    m2 = managers()
    m2.register("corrupt", Msg, Out).start("a", lambda r: Out()).to("b", lambda r: Out()).end("done").build()
    assert m2.resume() == [v]
    until(lambda: m2.get_run(v).owner is None, what="run handed over after engine errors")
    assert m2.get_run(v).active and kinds(m2, v) == ["START", "COMPLETE"]


def test_per_day_history_and_purge_of_archived_runs(managers: Managers, db: Path) -> None:
    m = managers()
    ok = m.register("hist", Msg, Out).start("a", lambda r: Out()).end("done").build()
    bad = (
        m.register("hist-bad", Msg, Out)
        .start("a", lambda r: (_ for _ in ()).throw(fsm.Abort("x")))
        .end("done")
        .build()
    )
    parent = ok.start("p", Msg())
    ok.wait(parent, timeout=5)
    child = ok.start("c", Msg(), parent=parent)
    ok.wait(child, timeout=5)
    with pytest.raises(fsm.RunFailed):
        bad.wait(bad.start("b", Msg()), timeout=5)
    pending = ok.start("later", Msg(), delay=60)
    store = fsm.FsmStore(db)
    [(day, counts)] = store.days()
    assert day == m.get_run(parent).day and counts == {"succeeded": 2, "failed": 1, "pending": 1}
    assert store.purge(time.time() + 1) == 3
    assert [r.version for r in m.runs()] == [pending] and m.history(parent) == [] and m.children(parent) == []


def test_restarted_parent_reuses_its_children_and_shares_them_with_other_parents(managers: Managers) -> None:
    runs: list[str] = []
    gate = threading.Event()

    def build(m: fsm.Manager) -> tuple[fsm.Machine[Msg, Out], fsm.Machine[Msg, Out]]:
        def work(req: fsm.Request[Msg, Out]) -> Out:
            runs.append(req.run.id)
            while req.run.id == "layer-2" and not gate.is_set():
                req.sleep(0.01)
            return Out(total=req.msg.n)

        child = m.register("layer", Msg, Out).start("work", work).end("done").build()

        def spawn(req: fsm.Request[Msg, Out]) -> Out:
            for n in (1, 2):
                child.start_child(f"layer-{n}", Msg(n), parent=req.run.version)
            return Out(total=sum(o.total for o in m.wait_children(req.run.version).values()))

        return child, m.register("image", Msg, Out).start("spawn", spawn).end("done").build()

    m1 = managers()
    _, image1 = build(m1)
    v = image1.start("img-a", Msg())
    until(lambda: "layer-2" in runs, what="layer-2 running")
    m1.shutdown(timeout=5)  # parent interrupted in spawn, layer-1 done, layer-2 interrupted
    m2 = managers()
    _, image2 = build(m2)
    assert v in m2.resume()
    other = image2.start("img-b", Msg())  # another image sharing both layers, while layer-2 is active
    until(lambda: len(m2.children(other)) == 2, what="img-b children")
    gate.set()
    assert image2.wait(v, timeout=5) == Out(total=3)
    assert image2.wait(other, timeout=5) == Out(total=3)
    # layer-1: once for img-a (its restarted parent reused the finished child), once for img-b (a finished
    # run is not shared across parents: steps check real state); layer-2: interrupted + resumed, and img-b
    # attached to that active run instead of starting another
    assert sorted(runs) == ["layer-1", "layer-1", "layer-2", "layer-2"]
    layer2 = {c for c in m2.children(v) if m2.get_run(c).run_id == "layer-2"}
    assert len(m2.children(v)) == 2 and layer2 <= set(m2.children(other))
