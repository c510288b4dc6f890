"""One regression test per upstream FSMv2 defect listed in shared/NOTES.md §1, each named after the defect,
showing that our engine does not have it."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from img import fsm
from tests.host import test_fsm_support as support
from tests.host.test_fsm_support import Msg, Out, kinds, until

db = support.db
managers = support.managers
Managers = Callable[..., fsm.Manager]


def _two_steps(m: fsm.Manager, log: list[str], gate: threading.Event, action: str) -> fsm.Machine[Msg, Out]:
    def a(req: fsm.Request[Msg, Out]) -> Out:
        log.append(f"{action}.a {req.run.version}")
        return Out(total=1)

    def b(req: fsm.Request[Msg, Out]) -> Out:
        log.append(f"{action}.b {req.run.version}")
        if not gate.is_set():
            req.sleep(10)
        return Out(total=2)

    return m.register(action, Msg, Out).start("a", a).to("b", b).end("done").build()


def test_defect1_resumed_run_does_not_skip_steps_another_run_of_the_same_id_completed(
    managers: Managers,
) -> None:
    log: list[str] = []
    gate = threading.Event()
    gate.set()
    m1 = managers()
    mach = _two_steps(m1, log, gate, "job")
    v1 = mach.start("same-id", Msg())
    mach.wait(v1, timeout=5)  # v1 completed a and b
    gate.clear()
    v2 = mach.start("same-id", Msg())  # a new run of the same id: nothing of v1 may leak into it
    until(lambda: f"job.b {v2}" in log, what="v2 in b")
    m1.shutdown(timeout=5)
    gate.set()
    m2 = managers()
    mach2 = _two_steps(m2, log, gate, "job")
    assert m2.resume() == [v2]
    mach2.wait(v2, timeout=5)
    assert log == [f"job.a {v1}", f"job.b {v1}", f"job.a {v2}", f"job.b {v2}", f"job.b {v2}"]
    assert [e.state for e in m2.history(v2) if e.kind == "COMPLETE"] == ["a", "b"]


def test_defect2_resume_selects_runs_by_type_and_action_not_type_alone(managers: Managers) -> None:
    log: list[str] = []
    gate = threading.Event()
    m1 = managers()
    version = _two_steps(m1, log, gate, "install").start("pkg", Msg())
    until(lambda: any(x.startswith("install.b") for x in log), what="install.b")
    m1.shutdown(timeout=5)
    gate.set()
    m2 = managers()
    _two_steps(m2, log, gate, "remove")  # same request type (Msg), other action
    assert m2.resume() == []
    time.sleep(0.1)
    assert not any(x.startswith("remove") for x in log)
    assert m2.get_run(version).active and m2.get_run(version).owner is None
    m3 = managers()
    mach3 = _two_steps(m3, log, gate, "install")
    assert m3.resume() == [version]
    assert mach3.wait(version, timeout=5) == Out(total=2)


def test_defect3_finish_carries_the_error_so_a_failed_run_reads_as_failed_after_restart(
    managers: Managers, db: Path
) -> None:
    m1 = managers()
    mach = (
        m1.register("doomed", Msg, Out)
        .start("a", lambda r: (_ for _ in ()).throw(fsm.Abort("bad input")))
        .end("done")
        .build()
    )
    version = mach.start("x", Msg())
    with pytest.raises(fsm.RunFailed):
        mach.wait(version, timeout=5)
    m1.shutdown()
    row = (
        sqlite3.connect(db)
        .execute("SELECT error, error_kind FROM fsm_events WHERE version = ? AND kind = 'FINISH'", (version,))
        .fetchone()
    )
    assert row == ("bad input", "abort")
    m2 = managers()  # a later process, which never ran it
    rec = m2.get_run(version)
    assert (rec.status, rec.error, rec.error_kind, rec.error_state) == ("failed", "bad input", "abort", "a")
    with pytest.raises(fsm.RunFailed) as ei:
        m2.wait(version, timeout=1)
    assert ei.value.error == "bad input" and ei.value.kind == "abort"


def test_defect4_concurrent_starts_do_not_race_on_shared_mutable_per_fsm_fields(managers: Managers) -> None:
    seen: dict[str, tuple[int, str | None, str | None]] = {}
    lock = threading.Lock()

    def step(req: fsm.Request[Msg, Out]) -> Out:
        time.sleep(0.01)
        with lock:
            seen[req.run.id] = (req.msg.n, req.run.queue, req.run.parent)
        return Out(total=req.msg.n)

    m = managers(queues={"q0": 50, "q1": 50})
    mach = m.register("race", Msg, Out).start("a", step).end("done").build()
    versions: dict[str, str] = {}
    barrier = threading.Barrier(16)

    def starter(i: int) -> None:
        barrier.wait()
        versions[f"r{i}"] = mach.start(f"r{i}", Msg(n=i), queue=f"q{i % 2}", parent=f"P{i}")

    threads = [threading.Thread(target=starter, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rid, v in versions.items():
        assert mach.wait(v, timeout=10) == Out(total=int(rid[1:]))
    assert seen == {f"r{i}": (i, f"q{i % 2}", f"P{i}") for i in range(16)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        mach.fsm.queue = "changed"  # type: ignore[misc]


def test_defect5_current_state_is_updated_for_observers(managers: Managers, db: Path) -> None:
    gates = {"a": threading.Event(), "b": threading.Event()}
    m = managers()
    mach = (
        m.register("observed", Msg, Out)
        .start("a", lambda r: gates["a"].wait(5) and Out())
        .to("b", lambda r: gates["b"].wait(5) and Out())
        .end("done")
        .build()
    )
    version = mach.start("x", Msg())
    observer = sqlite3.connect(db)  # another connection, as another process would read it

    def state() -> str | None:
        return observer.execute(
            "SELECT current_state FROM fsm_runs WHERE version = ?", (version,)
        ).fetchone()[0]

    until(lambda: state() == "a", what="current_state a")
    gates["a"].set()
    until(lambda: state() == "b", what="current_state b")
    gates["b"].set()
    mach.wait(version, timeout=5)
    assert state() == "done"


def test_defect6_delayed_runs_honor_shutdown(managers: Managers) -> None:
    ran: list[str] = []
    m1 = managers()
    mach = m1.register("later", Msg, Out).start("a", lambda r: ran.append("a") or Out()).end("done").build()
    version = mach.start("x", Msg(), delay=0.4)
    t0 = time.monotonic()
    m1.shutdown(timeout=5)
    assert time.monotonic() - t0 < 1
    time.sleep(0.6)  # past the due time: the shut-down manager must not start it
    assert ran == [] and kinds(m1, version) == ["START"]
    assert m1.get_run(version).active
    m2 = managers()
    mach2 = m2.register("later", Msg, Out).start("a", lambda r: ran.append("a") or Out()).end("done").build()
    assert m2.resume() == [version]
    mach2.wait(version, timeout=5)
    assert ran == ["a"]
