"""The FSM engine across real processes sharing one SQLite file: duplicate starts, kill -9 mid-step and
resume, queue limits, cancel from another process, lease expiry and lease loss."""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import textwrap
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

WORKER = textwrap.dedent(
    """
    import os, sys, time
    from img import fsm
    from tests.host.test_fsm_support import FAST, Msg, Out

    db, mode, log, flags = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    run_ids = sys.argv[5:]

    def note(line):
        with open(log, "a") as f:
            f.write(f"{line} pid={os.getpid()} t={time.time():.4f}\\n")

    def s1(req):
        note(f"s1 {req.run.id} restart={req.run.is_restart}")
        return Out(total=req.msg.n)

    def s2(req):
        note(f"s2 {req.run.id} restart={req.run.is_restart}")
        while os.path.exists(os.path.join(flags, "block")):
            req.sleep(0.01)
        if os.path.exists(os.path.join(flags, "slow")):
            time.sleep(0.15)
        note(f"s2-end {req.run.id}")
        return Out(total=req.w.total + 1)

    lease = float(os.environ.get("FSM_LEASE", "0.6"))
    m = fsm.Manager(db, retry=FAST, poll_interval=0.01, lease_ttl=lease, queues={"q": 1})
    mach = m.register("xp", Msg, Out).start("s1", s1).to("s2", s2).end("done").build()
    versions = []
    for rid in run_ids:
        try:
            v = mach.start(rid, Msg(n=10), queue="q" if mode in ("queue", "hold-queue") else None)
            print("STARTED", v, flush=True)
        except fsm.AlreadyRunning as e:
            v = e.version
            print("ALREADY", v, flush=True)
        versions.append(v)
    if mode.startswith("hold"):
        time.sleep(3600)
    if mode == "resume":
        t0 = time.monotonic()
        versions = m.resume()
        print("RESUMED", *versions, f"in={time.monotonic() - t0:.3f}", flush=True)
    for v in versions:
        try:
            print("RESULT", v, mach.wait(v, timeout=20), flush=True)
        except fsm.RunFailed as e:
            print("FAILED", v, e.kind, flush=True)
    m.shutdown()
    """
)


@pytest.fixture
def worker(tmp_path: Path, db: Path) -> Callable[..., subprocess.Popen[str]]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    flags = tmp_path / "flags"
    flags.mkdir()
    procs: list[subprocess.Popen[str]] = []

    def spawn(mode: str, *run_ids: str, lease: float = 0.6) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "FSM_LEASE": str(lease)}
        p = subprocess.Popen(
            [sys.executable, str(script), str(db), mode, str(tmp_path / "log"), str(flags), *run_ids],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _log(tmp_path: Path) -> list[str]:
    path = tmp_path / "log"
    return path.read_text().splitlines() if path.exists() else []


def _line(p: subprocess.Popen[str]) -> list[str]:
    assert p.stdout is not None
    return p.stdout.readline().split()


def test_two_processes_starting_the_same_run_execute_it_once(
    tmp_path: Path, worker: Callable[..., subprocess.Popen[str]]
) -> None:
    (tmp_path / "flags" / "block").touch()  # s2 holds until both processes have tried to start
    a, b = worker("wait", "same"), worker("wait", "same")
    first, second = _line(a), _line(b)
    assert sorted([first[0], second[0]]) == ["ALREADY", "STARTED"] and first[1] == second[1]
    (tmp_path / "flags" / "block").unlink()
    outs = [p.communicate(timeout=30) for p in (a, b)]
    for out, err in outs:
        assert f"RESULT {first[1]} Out(total=11, trail=[])" in out, err
    log = _log(tmp_path)
    assert sum(x.startswith("s1 same") for x in log) == 1 and sum(x.startswith("s2 same") for x in log) == 1


def test_kill_9_mid_step_then_a_new_manager_resumes_skipping_completed_steps(
    tmp_path: Path, worker: Callable[..., subprocess.Popen[str]], managers: Managers
) -> None:
    (tmp_path / "flags" / "block").touch()
    victim = worker("hold", "victim", lease=30)
    version = _line(victim)[1]
    until(lambda: any(x.startswith("s2 victim") for x in _log(tmp_path)), timeout=10, what="s2 started")
    os.kill(victim.pid, signal.SIGKILL)  # mid-step: s1 COMPLETE is persisted, s2 is running
    victim.wait()
    (tmp_path / "flags" / "block").unlink()
    # a long lease (30 s): the takeover must come from seeing the owner's pid dead, not from lease expiry
    heir = worker("resume", lease=30)
    out, err = heir.communicate(timeout=30)
    assert f"RESUMED {version}" in out and f"RESULT {version} Out(total=11, trail=[])" in out, err
    log = [x.split(" pid")[0] for x in _log(tmp_path)]
    assert log == [
        "s1 victim restart=False",
        "s2 victim restart=False",
        "s2 victim restart=True",
        "s2-end victim",
    ]
    assert sum(x.startswith("s1 ") for x in log) == 1 and sum(x.startswith("s2 ") for x in log) <= 2
    m = managers()
    assert [e.state for e in m.history(version) if e.kind == "COMPLETE"] == ["s1", "s2"]
    assert m.get_run(version).status == "succeeded"


def test_queue_limit_holds_across_processes(
    tmp_path: Path, worker: Callable[..., subprocess.Popen[str]]
) -> None:
    (tmp_path / "flags" / "slow").touch()
    procs = [worker("queue", "qa1", "qa2"), worker("queue", "qb1", "qb2")]
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert out.count("RESULT") == 2, err
    spans: dict[str, list[float]] = {}
    for line in _log(tmp_path):
        word, rid = line.split()[:2]
        t = float(line.rsplit("t=", 1)[1])
        if word in ("s1", "s2-end"):
            spans.setdefault(rid, []).append(t)
    intervals = sorted(spans.values())
    assert len(intervals) == 4
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert start >= end, f"two runs of queue q (limit 1) overlapped: {intervals}"


def test_cancel_from_another_process(
    tmp_path: Path, worker: Callable[..., subprocess.Popen[str]], managers: Managers
) -> None:
    (tmp_path / "flags" / "block").touch()
    p = worker("wait", "victim")
    version = _line(p)[1]
    until(lambda: any(x.startswith("s2 victim") for x in _log(tmp_path)), timeout=10, what="s2 started")
    m = managers()
    assert m.cancel(version, "stop that")
    with pytest.raises(fsm.RunCancelled):
        m.wait(version, timeout=10)
    out, _ = p.communicate(timeout=10)
    assert f"FAILED {version} cancel" in out
    assert kinds(m, version) == ["START", "COMPLETE", "CANCEL", "FINISH"]


def test_lease_held_by_a_live_remote_owner_is_respected_until_it_expires(
    managers: Managers, db: Path
) -> None:
    m1 = managers()
    mach = m1.register("remote", Msg, Out).start("a", lambda r: Out(total=1)).end("done").build()
    version = mach.start("x", Msg(), delay=60)
    m1.shutdown()
    store = fsm.FsmStore(db)
    with store.tx() as c:  # pretend a process on another host owns it
        c.execute("INSERT INTO fsm_owners VALUES ('elsewhere:1:ab', 'elsewhere', 1, NULL, ?)", (time.time(),))
        c.execute(
            "UPDATE fsm_active SET owner = 'elsewhere:1:ab', lease_expires = ?, executing = 1",
            (time.time() + 60,),
        )
    m2 = managers()
    mach2 = m2.register("remote", Msg, Out).start("a", lambda r: Out(total=1)).end("done").build()
    assert m2.resume() == []
    with store.tx() as c:
        c.execute("UPDATE fsm_active SET lease_expires = ?", (time.time() - 1,))
        c.execute("UPDATE fsm_runs SET run_at = NULL, options = json_set(options, '$.run_at', NULL)")
    assert m2.resume() == [version]
    assert mach2.wait(version, timeout=5) == Out(total=1)


def test_lost_lease_stops_the_old_owner_writing(managers: Managers, db: Path) -> None:
    started = threading.Event()
    stopped: list[bool] = []

    def step(req: fsm.Request[Msg, Out]) -> Out:
        started.set()
        stopped.append(req.cancelled.wait(5))  # set by the heartbeat when the lease is gone
        return Out(total=1)

    m = managers(lease_ttl=0.3)
    mach = m.register("stolen", Msg, Out).start("a", step).end("done").build()
    version = mach.start("x", Msg())
    started.wait(5)
    with fsm.FsmStore(db).tx() as c:
        c.execute("UPDATE fsm_active SET owner = 'thief' WHERE version = ?", (version,))
    until(lambda: stopped, what="step told to stop")
    time.sleep(0.1)
    assert stopped == [True]
    assert kinds(m, version) == ["START"]  # the old owner wrote neither COMPLETE nor FINISH
    assert m.get_run(version).owner == "thief"


def test_dead_owner_on_this_host_is_detected_by_pid_and_start_time() -> None:
    from img.fsm.owner import owner_alive_here, pid_start_time

    me = pid_start_time(os.getpid())
    assert owner_alive_here(os.getpid(), me)
    assert not owner_alive_here(os.getpid(), "1")  # same pid, other start time: a recycled pid
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not owner_alive_here(p.pid, None)


def test_auto_resume_adopts_orphans_without_an_explicit_resume(managers: Managers, db: Path) -> None:
    m1 = managers()
    mach1 = m1.register("auto", Msg, Out).start("a", lambda r: r.sleep(10) or Out()).end("done").build()
    version = mach1.start("x", Msg())
    until(lambda: m1.get_run(version).current_state == "a", what="state a")
    m1.shutdown(timeout=5)
    m2 = managers(auto_resume=True, lease_ttl=0.3)
    mach2 = m2.register("auto", Msg, Out).start("a", lambda r: Out(total=9)).end("done").build()
    assert mach2.wait(version, timeout=5) == Out(total=9)


def test_dead_owners_are_forgotten(managers: Managers, db: Path) -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    from img.fsm.owner import host_identity

    with fsm.FsmStore(db).tx() as c:
        c.execute("INSERT INTO fsm_owners VALUES ('ghost', ?, ?, '1', 0)", (host_identity(), p.pid))
    m = managers()
    m.resume()
    owners = [r[0] for r in fsm.FsmStore(db).conn().execute("SELECT owner FROM fsm_owners")]
    assert owners == [m.owner]


def test_queue_slot_of_a_killed_process_is_freed_without_waiting_for_its_lease(
    tmp_path: Path, worker: Callable[..., subprocess.Popen[str]], managers: Managers
) -> None:
    (tmp_path / "flags" / "block").touch()
    victim = worker("hold-queue", "hog", lease=60)
    _line(victim)
    until(lambda: any(x.startswith("s2 hog") for x in _log(tmp_path)), timeout=10, what="hog in s2")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    m = managers(lease_ttl=0.6, queues={"q": 1})  # registers only another FSM: it can't resume "xp" runs
    mach = m.register("other", Msg, Out).start("a", lambda r: Out(total=3)).end("done").build()
    t0 = time.monotonic()
    assert mach.wait(mach.start("next", Msg(), queue="q"), timeout=10) == Out(total=3)
    assert time.monotonic() - t0 < 5  # not the victim's 60 s lease
    [hog] = [r for r in m.list_active() if r.run_id == "hog"]
    assert hog.owner is None and not hog.executing  # released, waiting for a manager that knows "xp"


def test_owner_in_another_kernel_or_pid_namespace_is_judged_by_its_lease(
    managers: Managers, db: Path
) -> None:
    from img.fsm.owner import hostname

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # a pid that is dead HERE, but may be alive in the other kernel
    m1 = managers()
    mach = m1.register("guest", Msg, Out).start("a", lambda r: Out()).end("done").build()
    version = mach.start("x", Msg(), delay=60)
    m1.shutdown()
    with fsm.FsmStore(db).tx() as c:
        c.execute(
            "INSERT INTO fsm_owners VALUES ('guest-owner', ?, ?, NULL, ?)",
            (f"{hostname()}/otherboot/1", p.pid, time.time()),
        )
        c.execute("UPDATE fsm_active SET owner = 'guest-owner', lease_expires = ?", (time.time() + 60,))
    m2 = managers()
    m2.register("guest", Msg, Out).start("a", lambda r: Out()).end("done").build()
    assert m2.reap_dead_owners() == [] and m2.resume() == []
    assert m2.get_run(version).owner == "guest-owner"


CHAOS = textwrap.dedent(
    """
    import logging, os, random, sys, time
    from img import fsm

    db, log = sys.argv[1], sys.argv[2]
    if os.environ.get("FSM_CHAOS_LOG"):
        logging.basicConfig(level=logging.INFO, format=f"%(created).3f {os.getpid()} %(message)s")

    def step(req):
        time.sleep(random.random() * 0.04)
        with open(log, "a") as f:
            f.write(f"{req.run.version} {req.run.state}\\n")
        return {"n": (req.w or {}).get("n", 0) + 1}

    backoff = fsm.Backoff(0.001, 0.01)
    m = fsm.Manager(db, retry=fsm.RetryPolicy(10, backoff), queues={"q": 2}, lease_ttl=5, poll_interval=0.01)
    mach = m.register("chaos", dict, dict).start("a", step).to("b", step).to("c", step).end("done").build()
    m.resume()
    versions = [mach.start_or_attach(f"r{i}", {"i": i}, queue="q" if i % 2 else None) for i in range(12)]
    for v in versions:
        mach.wait(v, timeout=60)
    m.shutdown()
    """
)


def test_chaos_concurrent_processes_killed_at_random_lose_and_duplicate_nothing(
    tmp_path: Path, db: Path
) -> None:
    script, log = tmp_path / "chaos.py", tmp_path / "chaos.log"
    script.write_text(CHAOS)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    rng = random.Random(1234)

    def run() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, str(script), str(db), str(log)], env=env)

    for _ in range(4):
        procs = [run(), run()]
        time.sleep(0.15 + rng.random() * 0.5)
        procs[rng.randrange(2)].kill()  # SIGKILL, wherever it is
        for p in procs:
            p.wait(timeout=60)
    assert run().wait(timeout=60) == 0  # a clean pass finishes whatever is left
    store = fsm.FsmStore(db)
    c = store.conn()
    assert c.execute("SELECT count(*) FROM fsm_active").fetchone() == (0,)
    assert {s for (s,) in c.execute("SELECT DISTINCT status FROM fsm_runs")} == {"succeeded"}
    per_run = c.execute(
        "SELECT r.version,"
        " (SELECT count(*) FROM fsm_events e WHERE e.version = r.version AND e.kind = 'FINISH'),"
        " (SELECT count(*) FROM fsm_events e WHERE e.version = r.version AND e.kind = 'COMPLETE'),"
        " (SELECT count(DISTINCT state) FROM fsm_events e"
        "  WHERE e.version = r.version AND e.kind = 'COMPLETE')"
        " FROM fsm_runs r"
    ).fetchall()
    assert all((finish, complete, states) == (1, 3, 3) for _, finish, complete, states in per_run)
    executions: dict[tuple[str, str], int] = {}
    for line in log.read_text().splitlines():
        version, state = line.split()
        executions[(version, state)] = executions.get((version, state), 0) + 1
    assert len(executions) == 3 * len(per_run)  # every step of every run executed
    assert sum(executions.values()) - len(executions) <= 4  # re-executions: at most one per kill


def _never(req: fsm.Request[Msg, Out]) -> Out:
    raise AssertionError("s1 completed before the kill: it must not run again")


def _finish_s2(req: fsm.Request[Msg, Out]) -> Out:
    assert req.w is not None and req.run.is_restart
    return Out(total=req.w.total + 1)


def test_a_process_waiting_on_a_run_adopts_it_when_its_owner_is_killed(
    tmp_path: Path, worker: Callable[..., subprocess.Popen[str]], managers: Managers
) -> None:
    (tmp_path / "flags" / "block").touch()
    owner = worker("hold", "shared", lease=60)
    version = _line(owner)[1]
    until(lambda: any(x.startswith("s2 shared") for x in _log(tmp_path)), timeout=10, what="s2 started")
    m = managers(lease_ttl=60)
    mach = m.register("xp", Msg, Out).start("s1", _never).to("s2", _finish_s2).end("done").build()
    assert (
        mach.start_or_attach("shared", Msg(n=10)) == version
    )  # like a second `img process` of the same image
    assert m.get_run(version).owner != m.owner
    result: list[Out | None] = []
    waiter = threading.Thread(target=lambda: result.append(mach.wait(version, timeout=20)))
    waiter.start()
    time.sleep(0.2)
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    t0 = time.monotonic()
    waiter.join(20)
    assert result == [Out(total=11)] and time.monotonic() - t0 < 5  # not the 60 s lease
    assert m.history(version)[-1].owner == m.owner
