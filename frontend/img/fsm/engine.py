"""The FSM manager: starts runs, executes them on worker threads, persists every event, resumes runs left
behind by a dead process, and keeps one owner per run across processes with a lease in SQLite."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import codec, metrics, ulid
from .definition import FSM, Builder, Request, RunError, RunInfo, Step
from .errors import (
    Abort,
    AlreadyRunning,
    LeaseLost,
    ManagerClosed,
    RunCancelled,
    RunFailed,
    RunNotFound,
    UnknownQueue,
    Unrecoverable,
    WaitTimeout,
)
from .owner import host_identity, new_owner_id, owner_alive_here, pid_start_time
from .retry import Backoff, RetryPolicy
from .store import ConnectionFactory, Event, FsmStore, RunRecord, utc_day

if TYPE_CHECKING:
    from datetime import datetime

R = TypeVar("R")
W = TypeVar("W")

log = logging.getLogger("img.fsm")
log.addHandler(logging.NullHandler())  # a library: the application decides where logs go
ENGINE_RETRIES = 3  # engine (not step) errors tolerated per run execution before handing the run over
ENGINE_RETRY_DELAY = 1.0


class _Interrupted(Exception):
    """The manager is shutting down: stop executing this run, write nothing."""


class _Stop(Exception):
    def __init__(self, error: RunError, cause: BaseException | None = None) -> None:
        self.error = error
        self.cause = cause
        super().__init__(error.error)


@dataclass(eq=False)
class _RunCtx:
    """Per-run, per-execution state. Lives only in the executing manager (never on the FSM definition)."""

    fsm: FSM[Any, Any]
    version: str
    run_id: str
    msg: Any
    options: dict[str, Any]
    retry: RetryPolicy
    is_restart: bool
    run_at: float | None
    run_after: str | None
    queue: str | None
    parent: str | None
    cancel_event: threading.Event = field(default_factory=threading.Event)  # cancel | shutdown | lease lost
    stop_event: threading.Event = field(default_factory=threading.Event)  # shutdown | lease lost
    cancel_requested: bool = False
    lost: bool = False
    next_check: float = 0.0
    retry_count: int = 0
    last_error: str | None = None
    state: str | None = None
    started: float = field(default_factory=time.monotonic)
    engine_errors: int = 0


def _describe(e: BaseException) -> str:
    if isinstance(e, Abort | Unrecoverable):
        inner = e.error
        return f"{type(inner).__name__}: {inner}" if isinstance(inner, BaseException) else str(inner)
    return f"{type(e).__name__}: {e}"


def _type_label(fsm: FSM[Any, Any]) -> str:
    return str(getattr(fsm.resp_type, "__name__", fsm.resp_type))


def _as_epoch(t: float | datetime | None) -> float | None:
    if t is None:
        return None
    return float(t) if isinstance(t, int | float) else t.timestamp()


class Machine(Generic[R, W]):
    """An FSM bound to a Manager: start runs of it, resume its orphaned runs, wait for them."""

    def __init__(self, manager: Manager, fsm: FSM[R, W]) -> None:
        self.manager = manager
        self.fsm = fsm

    def start(
        self,
        run_id: str,
        msg: R,
        *,
        delay: float | None = None,
        run_at: float | datetime | None = None,
        run_after: str | None = None,
        queue: str | None = None,
        parent: str | None = None,
        max_attempts: int | None = None,
        backoff: Backoff | None = None,
    ) -> str:
        return self.manager.start(
            self.fsm,
            run_id,
            msg,
            delay=delay,
            run_at=run_at,
            run_after=run_after,
            queue=queue,
            parent=parent,
            max_attempts=max_attempts,
            backoff=backoff,
        )

    def start_or_attach(self, run_id: str, msg: R, **options: Any) -> str:
        return self.manager.start_or_attach(self.fsm, run_id, msg, **options)

    def start_child(self, run_id: str, msg: R, parent: str, **options: Any) -> str:
        return self.manager.start_child(self.fsm, run_id, msg, parent, **options)

    def resume(self) -> list[str]:
        return self.manager.resume(fsms=[self.fsm])

    def wait(self, version: str, timeout: float | None = None) -> W | None:
        result: W | None = self.manager.wait(version, timeout)
        return result

    def wait_by_id(self, run_id: str, timeout: float | None = None) -> W | None:
        result: W | None = self.manager.wait_by_id(
            run_id, action=self.fsm.action, type_name=self.fsm.type_name, timeout=timeout
        )
        return result

    def cancel(self, version: str, reason: str = "cancelled") -> bool:
        return self.manager.cancel(version, reason)


class Manager:
    """Executes FSM runs. See the package docstring for the API and an example.

    db: path of the SQLite file (shared with img's store), a connection factory, or an FsmStore.
    workers: max runs executing at once in this process (each on its own thread).
    lease_ttl: seconds a run's lease lasts without renewal; renewed every min(1 s, ttl/3).
    queues: {name: max runs executing at once, across all processes}.
    retry: default RetryPolicy for FSMs that don't set one.
    auto_resume: also pick up orphaned runs (of registered FSMs) periodically, not only on `resume()`.
    """

    def __init__(
        self,
        db: str | Path | ConnectionFactory | FsmStore,
        *,
        workers: int = 64,
        lease_ttl: float = 15.0,
        queues: dict[str, int] | None = None,
        retry: RetryPolicy | None = None,
        poll_interval: float = 0.1,
        auto_resume: bool = False,
        owner: str | None = None,
    ) -> None:
        self.store = db if isinstance(db, FsmStore) else FsmStore(db)
        self.owner = owner or new_owner_id()
        self.workers = workers
        self.lease_ttl = lease_ttl
        self.retry = retry or RetryPolicy()
        self.poll_interval = poll_interval
        self.auto_resume = auto_resume
        self.queues = dict(queues or {})
        self._fsms: dict[tuple[str, str], FSM[Any, Any]] = {}
        self._lock = threading.RLock()
        self._sched_cv = threading.Condition(self._lock)
        self._done_cv = threading.Condition(threading.Lock())
        self._pending: dict[str, _RunCtx] = {}
        self._running: dict[str, tuple[_RunCtx, threading.Thread]] = {}
        self._causes: dict[str, BaseException] = {}
        self._stopping = threading.Event()
        self._closed = False
        now = time.time()
        with self.store.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO fsm_owners (owner, host, pid, pid_start, heartbeat)"
                " VALUES (?,?,?,?,?)",
                (self.owner, host_identity(), os.getpid(), pid_start_time(os.getpid()), now),
            )
            for name, limit in self.queues.items():
                c.execute(
                    "INSERT INTO fsm_queues (name, max_running) VALUES (?, ?)"
                    " ON CONFLICT(name) DO UPDATE SET max_running = excluded.max_running",
                    (name, int(limit)),
                )
        self._scheduler = threading.Thread(target=self._scheduler_loop, name="fsm-scheduler", daemon=True)
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="fsm-heartbeat", daemon=True)
        self._hb_stop = threading.Event()
        self._scheduler.start()
        self._heartbeat.start()
        atexit.register(self._at_exit)  # release leases on a normal exit even without shutdown()

    # --- registration ---------------------------------------------------------------------------------------

    def register(
        self,
        action: str,
        req_type: type[R] | Any,
        resp_type: type[W] | Any,
        *,
        type_name: str | None = None,
        max_attempts: int | None = None,
        backoff: Backoff | None = None,
        queue: str | None = None,
    ) -> Builder[R, W, Machine[R, W]]:
        """Like `img.fsm.register`, but `build()` adds the FSM to this manager and returns a Machine."""
        return Builder(
            action,
            req_type,
            resp_type,
            self.add,
            type_name=type_name,
            max_attempts=max_attempts,
            backoff=backoff,
            queue=queue,
        )

    def add(self, fsm: FSM[R, W]) -> Machine[R, W]:
        with self._lock:
            existing = self._fsms.get(fsm.key)
            if existing is not None and existing is not fsm:
                raise ValueError(
                    f"an FSM for action {fsm.action!r} type {fsm.type_name!r} is already registered"
                )
            self._fsms[fsm.key] = fsm
        return Machine(self, fsm)

    def list_fsms(self) -> list[dict[str, Any]]:
        with self._lock:
            fsms = list(self._fsms.values())
        return [
            {
                "action": f.action,
                "type_name": f.type_name,
                "states": f.states,
                "finalizers": [s.name for s in f.finalizers],
                "queue": f.queue,
                "max_attempts": (f.retry or self.retry).max_attempts,
            }
            for f in fsms
        ]

    # --- admin reads ----------------------------------------------------------------------------------------

    def get_run(self, version: str) -> RunRecord:
        rec = self.store.get_run(version)
        if rec is None:
            raise RunNotFound(f"version {version}")
        return rec

    def list_active(self, action: str | None = None) -> list[RunRecord]:
        return self.store.list_active(action)

    def history(self, version: str) -> list[Event]:
        return self.store.history(version)

    def runs(self, **filters: Any) -> list[RunRecord]:
        return self.store.runs(**filters)

    def children(self, parent: str) -> list[str]:
        return self.store.children(parent)

    # --- start ----------------------------------------------------------------------------------------------

    def start(
        self,
        fsm: FSM[R, W] | Machine[R, W],
        run_id: str,
        msg: R,
        *,
        delay: float | None = None,
        run_at: float | datetime | None = None,
        run_after: str | None = None,
        queue: str | None = None,
        parent: str | None = None,
        max_attempts: int | None = None,
        backoff: Backoff | None = None,
    ) -> str:
        """Persist START and schedule the run; returns its version (ULID). Raises AlreadyRunning if a run of
        the same (type, id, action) is active (in any process)."""
        if isinstance(fsm, Machine):
            fsm = fsm.fsm
        if self._closed:
            raise ManagerClosed()
        self.add(fsm)
        queue = queue or fsm.queue
        base = fsm.retry or self.retry
        retry = RetryPolicy(
            max_attempts if max_attempts is not None else base.max_attempts, backoff or base.backoff
        )
        now = time.time()
        at = _as_epoch(run_at)
        if delay is not None:
            at = now + delay
        version = ulid.new(now)
        msg_text = codec.encode(msg)
        msg_decoded = codec.decode(fsm.req_type, msg_text)  # steps see what a resumed run would see
        options = {
            "max_attempts": retry.max_attempts,
            "backoff": retry.backoff.to_dict(),
            "run_at": at,
            "run_after": run_after,
            "queue": queue,
            "parent": parent,
        }
        with self.store.tx() as c:
            if (
                queue is not None
                and c.execute("SELECT 1 FROM fsm_queues WHERE name = ?", (queue,)).fetchone() is None
            ):
                raise UnknownQueue(queue)
            row = c.execute(
                "SELECT version FROM fsm_active WHERE type_name = ? AND run_id = ? AND action = ?",
                (fsm.type_name, run_id, fsm.action),
            ).fetchone()
            if row is not None:
                raise AlreadyRunning(row[0], run_id, fsm.action, fsm.type_name)
            c.execute(
                "INSERT INTO fsm_runs (version, run_id, type_name, action, parent, queue, status, msg,"
                " options,"
                " run_at, run_after, created_at, day) VALUES (?,?,?,?,?,?,'pending',?,?,?,?,?,?)",
                (
                    version,
                    run_id,
                    fsm.type_name,
                    fsm.action,
                    parent,
                    queue,
                    msg_text,
                    codec.encode(options),
                    at,
                    run_after,
                    now,
                    utc_day(now),
                ),
            )
            c.execute(
                "INSERT INTO fsm_active (version, type_name, run_id, action, queue, owner, lease_expires)"
                " VALUES (?,?,?,?,?,?,?)",
                (version, fsm.type_name, run_id, fsm.action, queue, self.owner, now + self.lease_ttl),
            )
            self._event(c, version, "START", payload=msg_text)
            if parent:
                c.execute(
                    "INSERT OR IGNORE INTO fsm_children (parent, child) VALUES (?, ?)", (parent, version)
                )
        ctx = _RunCtx(
            fsm=fsm,
            version=version,
            run_id=run_id,
            msg=msg_decoded,
            options=options,
            retry=retry,
            is_restart=False,
            run_at=at,
            run_after=run_after,
            queue=queue,
            parent=parent,
        )
        self._logger(ctx).info("run started")
        self._schedule(ctx)
        return version

    def start_or_attach(self, fsm: FSM[R, W] | Machine[R, W], run_id: str, msg: R, **options: Any) -> str:
        """Start the run, or return the version of the active run with the same (type, id, action) — claiming
        it first if its owner is dead, so that waiting on it makes progress. For deterministic run ids: two
        processes asking for the same work end up waiting on one run."""
        if isinstance(fsm, Machine):
            fsm = fsm.fsm
        try:
            return self.start(fsm, run_id, msg, **options)
        except AlreadyRunning as e:
            parent = options.get("parent")
            if parent:  # the run another parent started is now also this parent's child (wait_children)
                with self.store.tx() as c:
                    c.execute(
                        "INSERT OR IGNORE INTO fsm_children (parent, child) VALUES (?, ?)",
                        (parent, e.version),
                    )
            self.resume(fsms=[fsm])  # claims it only if its owner is gone
            return e.version

    def start_child(
        self, fsm: FSM[R, W] | Machine[R, W], run_id: str, msg: R, parent: str, **options: Any
    ) -> str:
        """Idempotent child start for a parent step that may run again after a restart: if `parent` already
        has a child run of this (type, id, action) that is active or succeeded, return it (nothing re-runs);
        otherwise `start_or_attach(..., parent=parent)`. A failed or cancelled child is started again."""
        if isinstance(fsm, Machine):
            fsm = fsm.fsm
        row = (
            self.store.conn()
            .execute(
                "SELECT r.version FROM fsm_children c JOIN fsm_runs r ON r.version = c.child"
                " WHERE c.parent = ? AND r.type_name = ? AND r.run_id = ? AND r.action = ?"
                " AND r.status NOT IN ('failed', 'cancelled') ORDER BY r.version DESC LIMIT 1",
                (parent, fsm.type_name, run_id, fsm.action),
            )
            .fetchone()
        )
        if row is not None:
            self.resume(fsms=[fsm])  # if it is active and orphaned, make it progress
            return str(row[0])
        return self.start_or_attach(fsm, run_id, msg, parent=parent, **options)

    # --- resume ---------------------------------------------------------------------------------------------

    def resume(self, fsms: list[FSM[Any, Any]] | None = None) -> list[str]:
        """Claim and schedule the active runs of registered FSMs (matched by type AND action) that nobody
        owns: no owner, an expired lease, or an owner process on this host that is gone. Returns their
        versions."""
        if self._closed:
            raise ManagerClosed()
        with self._lock:
            wanted = {f.key: f for f in (fsms or list(self._fsms.values()))}
            mine = set(self._pending) | set(self._running)
        self.reap_dead_owners()
        now = time.time()
        rows = (
            self.store.conn()
            .execute(
                "SELECT version, type_name, action, owner, lease_expires FROM fsm_active ORDER BY version"
            )
            .fetchall()
        )
        claimed: list[str] = []
        for version, type_name, action, owner, lease in rows:
            fsm = wanted.get((type_name, action))
            if fsm is None or version in mine or owner == self.owner:
                continue
            if owner is not None and lease > now:
                continue  # a live owner holds it
            ctx = self._claim(fsm, version, owner, lease)
            if ctx is not None:
                claimed.append(version)
                self._logger(ctx).info("run resumed (previous owner %s)", owner)
                self._schedule(ctx)
        return claimed

    def _owner_dead(self, owner: str) -> bool:
        """An owner on this machine whose process is gone (owners elsewhere: never, their lease decides)."""
        row = (
            self.store.conn()
            .execute("SELECT host, pid, pid_start FROM fsm_owners WHERE owner = ?", (owner,))
            .fetchone()
        )
        return row is not None and row[0] == host_identity() and not owner_alive_here(row[1], row[2])

    def _adopt(self, rec: RunRecord) -> None:
        """Claim an orphaned run we are waiting for, if its FSM is registered here."""
        fsm = self._fsms.get((rec.type_name, rec.action))
        with self._lock:
            if fsm is None or self._closed or rec.version in self._pending or rec.version in self._running:
                return
        ctx = self._claim(fsm, rec.version, rec.owner, rec.lease_expires or 0.0)
        if ctx is not None:
            self._logger(ctx).info("run adopted while waiting for it (previous owner %s)", rec.owner)
            self._schedule(ctx)

    def reap_dead_owners(self) -> list[str]:
        """Owners on this machine (same host, boot and pid namespace) whose process is gone: release their
        runs (no owner, not executing: claimable by any resume(), no longer holding queue slots) and forget
        them. Called by resume() and by the heartbeat. Returns the dead owners."""
        rows = (
            self.store.conn()
            .execute(
                "SELECT owner, pid, pid_start FROM fsm_owners WHERE host = ? AND owner != ?",
                (host_identity(), self.owner),
            )
            .fetchall()
        )
        dead = [owner for owner, pid, pid_start in rows if not owner_alive_here(pid, pid_start)]
        if dead:
            with self.store.tx() as c:
                for owner in dead:
                    c.execute(
                        "UPDATE fsm_active SET owner = NULL, lease_expires = 0, executing = 0"
                        " WHERE owner = ?",
                        (owner,),
                    )
                    c.execute("DELETE FROM fsm_owners WHERE owner = ?", (owner,))
            log.info("fsm: released the runs of dead owners %s", ", ".join(dead))
        return dead

    def _claim(self, fsm: FSM[Any, Any], version: str, owner: str | None, lease: float) -> _RunCtx | None:
        now = time.time()
        with self.store.tx() as c:
            cur = c.execute(
                "UPDATE fsm_active SET owner = ?, lease_expires = ?, executing = 0"
                " WHERE version = ? AND owner IS ? AND lease_expires = ?",
                (self.owner, now + self.lease_ttl, version, owner, lease),
            )
            if cur.rowcount != 1:
                return None  # somebody else claimed (or it finished) in between
            row = c.execute(
                "SELECT run_id, msg, options FROM fsm_runs WHERE version = ?", (version,)
            ).fetchone()
        run_id, msg_text, options_text = row
        try:
            options = codec.decode(dict, options_text)
            retry = RetryPolicy(
                int(options.get("max_attempts") or self.retry.max_attempts),
                Backoff.from_dict(options.get("backoff") or {}),
            )
            msg = codec.decode(fsm.req_type, msg_text)
        except Exception:  # e.g. the request type changed incompatibly: leave the run to someone else
            log.exception("fsm: cannot load run %s (%s %s); not resuming it", version, fsm.action, run_id)
            with self.store.tx() as c:
                c.execute(
                    "UPDATE fsm_active SET owner = NULL, lease_expires = 0 WHERE version = ? AND owner = ?",
                    (version, self.owner),
                )
            return None
        return _RunCtx(
            fsm=fsm,
            version=version,
            run_id=run_id,
            msg=msg,
            options=options,
            retry=retry,
            is_restart=True,
            run_at=options.get("run_at"),
            run_after=options.get("run_after"),
            queue=options.get("queue"),
            parent=options.get("parent"),
        )

    # --- cancel ---------------------------------------------------------------------------------------------

    def cancel(self, version: str, reason: str = "cancelled") -> bool:
        """Write CANCEL and make the run stop: the current step sees `req.cancelled`, remaining steps are
        skipped, finalizers run, FINISH records the cancel. Works for a run owned by another process (its
        heartbeat notices). Returns False if the run is not active."""
        with self.store.tx() as c:
            if c.execute("SELECT 1 FROM fsm_active WHERE version = ?", (version,)).fetchone() is None:
                return False
            done = c.execute("SELECT cancel_requested FROM fsm_runs WHERE version = ?", (version,)).fetchone()
            if not done[0]:
                c.execute("UPDATE fsm_runs SET cancel_requested = 1 WHERE version = ?", (version,))
                self._event(c, version, "CANCEL", error=reason, error_kind="cancel")
        with self._lock:
            ctx = self._pending.get(version) or (
                self._running[version][0] if version in self._running else None
            )
            if ctx is not None:
                ctx.cancel_requested = True
                ctx.cancel_event.set()
                ctx.next_check = 0.0
                self._sched_cv.notify_all()
        return True

    # --- wait -----------------------------------------------------------------------------------------------

    def wait(self, version: str, timeout: float | None = None) -> Any:
        """Block until the run finishes (in any process). Returns the last step's response decoded into the
        FSM's response type; raises RunFailed / RunCancelled; WaitTimeout after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.005
        while True:
            rec = self.store.get_run(version)
            if rec is None:
                raise RunNotFound(f"version {version}")
            if rec.finished:
                return self._outcome(rec)
            if self._closed and rec.owner in (None, self.owner):
                raise ManagerClosed()  # nobody is executing it; the next process's resume() will
            if (
                rec.active
                and rec.owner is not None
                and rec.owner != self.owner
                and self._owner_dead(rec.owner)
            ):
                self.reap_dead_owners()
                rec = self.store.get_run(version) or rec
            if rec.active and (rec.owner is None or (rec.lease_expires or 0) <= time.time()):
                self._adopt(rec)  # its owner is gone (released, reaped or lease expired): carry it on
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WaitTimeout(version, timeout or 0.0)
            with self._done_cv:
                self._done_cv.wait(pause if left is None else min(pause, left))
            pause = min(pause * 2, 0.25)

    def wait_by_id(
        self,
        run_id: str,
        *,
        action: str | None = None,
        type_name: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        version = self.store.latest_version(run_id, action, type_name)
        if version is None:
            raise RunNotFound(f"id {run_id!r}" + (f" action {action!r}" if action else ""))
        return self.wait(version, timeout)

    def wait_children(self, parent: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the child runs of `parent` — for each child (type, id, action) its newest run, so a child
        started again after failing counts once. Returns {child version: result}; raises the first failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        newest: dict[tuple[str, str, str], str] = {}
        for version, type_name, run_id, action in self.store.conn().execute(
            "SELECT r.version, r.type_name, r.run_id, r.action FROM fsm_children c"
            " JOIN fsm_runs r ON r.version = c.child WHERE c.parent = ? ORDER BY r.version",
            (parent,),
        ):
            newest[(type_name, run_id, action)] = version
        out: dict[str, Any] = {}
        for child in newest.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            out[child] = self.wait(child, left)
        return out

    def _outcome(self, rec: RunRecord) -> Any:
        if rec.status == "succeeded":
            fsm = self._fsms.get((rec.type_name, rec.action))
            return codec.from_jsonable(fsm.resp_type if fsm else Any, rec.result)
        cls = RunCancelled if rec.status == "cancelled" else RunFailed
        err = cls(
            rec.version, rec.run_id, rec.action, rec.error_state, rec.error or "", rec.error_kind or "system"
        )
        cause = self._causes.get(rec.version)
        if cause is not None:
            raise err from cause
        raise err

    # --- shutdown -------------------------------------------------------------------------------------------

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop without recording anything: delayed/queued runs are not started, running steps see
        `req.cancelled`, backoff sleeps end, no finalizer runs; leases are released so the next process's
        `resume()` continues the runs at once. Waits up to `timeout` for running steps to return."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        atexit.unregister(self._at_exit)
        with self._lock:
            for ctx in [*self._pending.values(), *(c for c, _ in self._running.values())]:
                ctx.stop_event.set()
                ctx.cancel_event.set()
            self._sched_cv.notify_all()
        self._scheduler.join(timeout)
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = [t for _, t in self._running.values()]
        for t in threads:
            if t is not threading.current_thread():  # shutdown() called from a step
                t.join(max(0.0, deadline - time.monotonic()))
        self._hb_stop.set()
        self._heartbeat.join(timeout)
        with self._lock:
            still = list(self._running)
            self._pending.clear()
        with self.store.tx() as c:
            marks = ",".join("?" * len(still))
            c.execute(
                "UPDATE fsm_active SET owner = NULL, lease_expires = 0, executing = 0 WHERE owner = ?"  # noqa: S608
                + (f" AND version NOT IN ({marks})" if still else ""),
                (self.owner, *still),
            )
            if not still:
                c.execute("DELETE FROM fsm_owners WHERE owner = ?", (self.owner,))
        with self._done_cv:
            self._done_cv.notify_all()

    def _at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.shutdown(timeout=2.0)

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- scheduling -----------------------------------------------------------------------------------------

    def _schedule(self, ctx: _RunCtx, delay: float = 0.0) -> None:
        with self._lock:
            if self._stopping.is_set():
                return  # the run stays in the database, owned by us until shutdown releases it
            ctx.next_check = time.time() + delay if delay else 0.0
            self._pending[ctx.version] = ctx
            self._sched_cv.notify_all()

    def _scheduler_loop(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                now = time.time()
                due = [c for c in self._pending.values() if c.next_check <= now]
                if not due:
                    nxt = min((c.next_check for c in self._pending.values()), default=now + 1.0)
                    self._sched_cv.wait(min(1.0, max(0.001, nxt - now)))
                    continue
            for ctx in due:
                if self._stopping.is_set():
                    return
                try:
                    self._try_admit(ctx)
                except Exception:
                    log.exception("fsm scheduler: admitting run %s failed", ctx.version)
                    ctx.next_check = time.time() + 1.0

    def _try_admit(self, ctx: _RunCtx) -> None:
        now = time.time()
        with self._lock:
            if len(self._running) >= self.workers:
                ctx.next_check = now + self.poll_interval
                return
        c = self.store.conn()
        if not ctx.cancel_requested:  # cheap read-only checks first; the transaction re-checks the queue
            if ctx.run_at is not None and ctx.run_at > now:
                ctx.next_check = ctx.run_at
                return
            if ctx.run_after:
                row = c.execute("SELECT status FROM fsm_runs WHERE version = ?", (ctx.run_after,)).fetchone()
                if row is not None and row[0] not in ("succeeded", "failed", "cancelled"):
                    ctx.next_check = now + self.poll_interval
                    return
            if ctx.queue and self._queue_full(c, ctx, now):
                ctx.next_check = now + self.poll_interval
                return
        with self.store.tx() as c:
            row = c.execute(
                "SELECT a.owner, r.cancel_requested FROM fsm_active a JOIN fsm_runs r"
                " ON r.version = a.version WHERE a.version = ?",
                (ctx.version,),
            ).fetchone()
            if row is None or row[0] != self.owner:
                with self._lock:
                    self._pending.pop(ctx.version, None)
                return
            ctx.cancel_requested = ctx.cancel_requested or bool(row[1])
            if ctx.queue and not ctx.cancel_requested and self._queue_full(c, ctx, now):
                ctx.next_check = now + self.poll_interval
                return
            c.execute("UPDATE fsm_active SET executing = 1 WHERE version = ?", (ctx.version,))
            c.execute(
                "UPDATE fsm_runs SET status = 'running', started_at = COALESCE(started_at, ?)"
                " WHERE version = ?",
                (now, ctx.version),
            )
        with self._lock:
            self._pending.pop(ctx.version, None)
            t = threading.Thread(
                target=self._execute, args=(ctx,), name=f"fsm-{ctx.fsm.action}-{ctx.version}", daemon=True
            )
            self._running[ctx.version] = (ctx, t)
        t.start()

    def _queue_full(self, c: Any, ctx: _RunCtx, now: float) -> bool:
        """Runs of the queue executing anywhere (with a live lease) have reached the queue's limit."""
        limit = c.execute("SELECT max_running FROM fsm_queues WHERE name = ?", (ctx.queue,)).fetchone()
        if limit is None:
            return False
        busy = c.execute(
            "SELECT count(*) FROM fsm_active WHERE queue = ? AND executing = 1 AND lease_expires > ?"
            " AND version != ?",
            (ctx.queue, now, ctx.version),
        ).fetchone()
        return bool(busy[0] >= limit[0])

    # --- heartbeat: leases, cross-process cancels, lost leases ----------------------------------------------

    def _heartbeat_loop(self) -> None:
        tick = max(0.02, min(1.0, self.lease_ttl / 3))
        while not self._hb_stop.wait(tick):
            try:
                self._beat()
            except Exception:
                log.exception("fsm heartbeat failed")

    def _beat(self) -> None:
        now = time.time()
        with self.store.tx() as c:
            c.execute(
                "UPDATE fsm_active SET lease_expires = ? WHERE owner = ?", (now + self.lease_ttl, self.owner)
            )
            c.execute("UPDATE fsm_owners SET heartbeat = ? WHERE owner = ?", (now, self.owner))
        with self._lock:
            ctxs = {**self._pending, **{v: c for v, (c, _) in self._running.items()}}
        if ctxs:
            marks = ",".join("?" * len(ctxs))
            rows = (
                self.store.conn()
                .execute(
                    f"SELECT a.version, a.owner, r.cancel_requested FROM fsm_active a JOIN fsm_runs r"  # noqa: S608
                    f" ON r.version = a.version WHERE a.version IN ({marks})",
                    tuple(ctxs),
                )
                .fetchall()
            )
            seen = {v: (o, bool(cr)) for v, o, cr in rows}
            for version, ctx in ctxs.items():
                if version not in seen:
                    continue  # finished meanwhile
                owner, cancel = seen[version]
                if owner != self.owner:
                    ctx.lost = True
                    ctx.stop_event.set()
                    ctx.cancel_event.set()
                elif cancel and not ctx.cancel_requested:
                    ctx.cancel_requested = True
                    ctx.cancel_event.set()
                    with self._lock:
                        ctx.next_check = 0.0
                        self._sched_cv.notify_all()
        if self._stopping.is_set():
            return
        if self.auto_resume:
            self.resume()
        else:
            self.reap_dead_owners()

    # --- execution ------------------------------------------------------------------------------------------

    def _execute(self, ctx: _RunCtx) -> None:
        try:
            self._drive(ctx)
        except _Interrupted:
            self._logger(ctx).info("run interrupted by shutdown; resumable")
            with contextlib.suppress(Exception), self.store.tx() as c:  # hand it over at once
                c.execute(
                    "UPDATE fsm_active SET owner = NULL, lease_expires = 0, executing = 0"
                    " WHERE version = ? AND owner = ?",
                    (ctx.version, self.owner),
                )
        except LeaseLost as e:
            self._logger(ctx).warning("run abandoned: %s", e)
        except Exception:
            # not a step's error: the engine's own (SQLite busy beyond the timeout, disk full, undecodable
            # stored response…). Try again a few times, then hand the run over to a later resume().
            ctx.engine_errors += 1
            if ctx.engine_errors <= ENGINE_RETRIES and not self._stopping.is_set():
                self._logger(ctx).exception("fsm engine error; retrying the run soon")
                ctx.is_restart = True
                with self._lock:
                    self._running.pop(ctx.version, None)
                with contextlib.suppress(Exception), self.store.tx() as c:
                    c.execute("UPDATE fsm_active SET executing = 0 WHERE version = ?", (ctx.version,))
                self._schedule(ctx, delay=ENGINE_RETRY_DELAY)
            else:
                self._logger(ctx).exception("fsm engine error; releasing the run for a later resume")
                with contextlib.suppress(Exception), self.store.tx() as c:
                    c.execute(
                        "UPDATE fsm_active SET owner = NULL, lease_expires = 0, executing = 0"
                        " WHERE version = ? AND owner = ?",
                        (ctx.version, self.owner),
                    )
        finally:
            with self._lock:
                entry = self._running.get(ctx.version)
                if entry is not None and entry[1] is threading.current_thread():
                    del self._running[ctx.version]
                for other in self._pending.values():  # a queue slot may be free now
                    if other.queue or other.run_after:
                        other.next_check = 0.0
                self._sched_cv.notify_all()
            with self._done_cv:
                self._done_cv.notify_all()

    def _drive(self, ctx: _RunCtx) -> None:
        fsm = ctx.fsm
        c = self.store.conn()
        completed = dict(
            c.execute(
                "SELECT state, payload FROM fsm_events WHERE version = ? AND kind = 'COMPLETE' ORDER BY seq",
                (ctx.version,),
            ).fetchall()
        )
        row = c.execute(
            "SELECT retry_count, last_error, stop_error, stop_kind, stop_state, cancel_requested"
            " FROM fsm_runs WHERE version = ?",
            (ctx.version,),
        ).fetchone()
        ctx.retry_count, ctx.last_error = row[0], row[1]
        stop = RunError(row[2], row[3], row[4]) if row[3] else None
        ctx.cancel_requested = ctx.cancel_requested or bool(row[5])
        if ctx.cancel_requested:
            ctx.cancel_event.set()
        w: Any = None
        w_text: str | None = None
        if stop is None:
            for step in fsm.steps:
                if step.name in completed:  # done by this very run version before a restart
                    w_text = completed[step.name]
                    w = codec.decode(fsm.resp_type, w_text)
                    continue
                try:
                    w, w_text = self._run_step(ctx, step, w)
                except _Stop as s:
                    stop = s.error
                    if s.cause is not None:
                        self._remember_cause(ctx.version, s.cause)
                    self._record_stop(ctx, stop)
                    break
        for fin in fsm.finalizers:
            if fin.name not in completed:
                self._run_finalizer(ctx, fin, w, stop)
        self._finish(ctx, stop, w_text)

    def _request(self, ctx: _RunCtx, state: str, w: Any, event: threading.Event) -> Request[Any, Any]:
        info = RunInfo(
            id=ctx.run_id,
            version=ctx.version,
            action=ctx.fsm.action,
            type_name=ctx.fsm.type_name,
            state=state,
            parent=ctx.parent,
            queue=ctx.queue,
            retry_count=ctx.retry_count,
            is_restart=ctx.is_restart,
        )
        return Request(ctx.msg, w, info, event, self._logger(ctx, state), self._span_recorder(ctx))

    def _begin_step(self, ctx: _RunCtx, state: str) -> tuple[bool, str]:
        """Publish current_state (visible to observers while the step runs).
        Returns (cancel requested, reason)."""
        if self._stopping.is_set() or ctx.lost:
            raise _Interrupted()
        ctx.state = state
        with self.store.tx() as c:
            self._check_owner(c, ctx)
            c.execute("UPDATE fsm_runs SET current_state = ? WHERE version = ?", (state, ctx.version))
            cancel = c.execute(
                "SELECT cancel_requested FROM fsm_runs WHERE version = ?", (ctx.version,)
            ).fetchone()
            reason = ""
            if cancel[0]:
                r = c.execute(
                    "SELECT error FROM fsm_events WHERE version = ? AND kind = 'CANCEL'"
                    " ORDER BY seq DESC LIMIT 1",
                    (ctx.version,),
                ).fetchone()
                reason = r[0] if r and r[0] else "cancelled"
        return bool(cancel[0]), reason

    def _cancel_stop(self, ctx: _RunCtx, state: str) -> _Stop:
        r = (
            self.store.conn()
            .execute(
                "SELECT error FROM fsm_events WHERE version = ? AND kind = 'CANCEL'"
                " ORDER BY seq DESC LIMIT 1",
                (ctx.version,),
            )
            .fetchone()
        )
        return _Stop(RunError(r[0] if r and r[0] else "cancelled", "cancel", state))

    def _run_step(self, ctx: _RunCtx, step: Step, w: Any) -> tuple[Any, str]:
        fsm = ctx.fsm
        while True:
            cancel, reason = self._begin_step(ctx, step.name)
            if cancel:
                ctx.cancel_requested = True
                ctx.cancel_event.set()
                raise _Stop(RunError(reason, "cancel", step.name))
            req = self._request(ctx, step.name, w, ctx.cancel_event)
            t0 = time.monotonic()
            try:
                resp = step.fn(req)
                try:  # what the next step (or a resumed run) will see: fail now if it can't round-trip
                    text = codec.encode(resp)
                    decoded = codec.decode(fsm.resp_type, text)
                except Exception as e:
                    raise Unrecoverable(
                        f"response of {step.name} is not a valid {_type_label(fsm)}: {e}"
                    ) from e
            except (Abort, Unrecoverable) as e:
                kind = "abort" if isinstance(e, Abort) else e.kind
                self._transition_metric(ctx, step.name, kind, time.monotonic() - t0)
                raise _Stop(RunError(_describe(e), kind, step.name), e) from e
            except Exception as e:
                dt = time.monotonic() - t0
                self._transition_metric(ctx, step.name, "error", dt)
                if self._stopping.is_set() or ctx.lost:
                    raise _Interrupted() from e
                if ctx.cancel_requested:
                    raise self._cancel_stop(ctx, step.name) from e
                self._retry_or_stop(ctx, step.name, e, dt, ctx.cancel_event)
                continue
            dt = time.monotonic() - t0
            self._transition_metric(ctx, step.name, "ok", dt)
            with self.store.tx() as c:
                self._check_owner(c, ctx)
                self._event(
                    c,
                    ctx.version,
                    "COMPLETE",
                    state=step.name,
                    payload=text,
                    retry_count=ctx.retry_count,
                    duration=dt,
                )
                c.execute(
                    "UPDATE fsm_runs SET retry_count = 0, last_error = NULL WHERE version = ?", (ctx.version,)
                )
            ctx.retry_count, ctx.last_error, ctx.is_restart = 0, None, False
            self._logger(ctx, step.name).debug("step complete in %.3fs", dt)
            return decoded, text

    def _retry_or_stop(
        self, ctx: _RunCtx, state: str, e: Exception, dt: float, sleeper: threading.Event
    ) -> None:
        """Record a failed attempt (ERROR only when the message changed); raise _Stop when attempts are
        exhausted, else sleep the backoff (woken early by cancel/shutdown)."""
        ctx.retry_count += 1
        message = _describe(e)
        exhausted = ctx.retry_count >= ctx.retry.max_attempts
        with self.store.tx() as c:
            self._check_owner(c, ctx)
            if message != ctx.last_error:
                self._event(
                    c,
                    ctx.version,
                    "ERROR",
                    state=state,
                    error=message,
                    error_kind="retryable",
                    retry_count=ctx.retry_count,
                    duration=dt,
                )
            c.execute(
                "UPDATE fsm_runs SET retry_count = ?, last_error = ? WHERE version = ?",
                (ctx.retry_count, message, ctx.version),
            )
        ctx.last_error = message
        self._logger(ctx, state).warning(
            "attempt %d/%d failed: %s", ctx.retry_count, ctx.retry.max_attempts, message
        )
        if exhausted:
            raise _Stop(
                RunError(f"{message} (gave up after {ctx.retry_count} attempts)", "retries", state), e
            )
        sleeper.wait(ctx.retry.backoff.delay(ctx.retry_count))

    def _run_finalizer(self, ctx: _RunCtx, fin: Step, w: Any, stop: RunError | None) -> None:
        """Finalizers run on success, failure and cancel (not on shutdown), with the same bounded retries; a
        finalizer that fails for good is recorded (ERROR, kind "finalizer") and doesn't change the outcome."""
        ctx.retry_count, ctx.last_error = 0, None
        while True:
            if self._stopping.is_set() or ctx.lost:
                raise _Interrupted()
            ctx.state = fin.name
            with self.store.tx() as c:
                self._check_owner(c, ctx)
                c.execute("UPDATE fsm_runs SET current_state = ? WHERE version = ?", (fin.name, ctx.version))
            req = self._request(ctx, fin.name, w, ctx.stop_event)
            t0 = time.monotonic()
            try:
                fin.fn(req, stop)
            except Exception as e:
                dt = time.monotonic() - t0
                self._transition_metric(ctx, fin.name, "error", dt)
                if self._stopping.is_set() or ctx.lost:
                    raise _Interrupted() from e
                try:
                    if isinstance(e, Abort | Unrecoverable):
                        raise _Stop(RunError(_describe(e), "finalizer", fin.name), e) from e
                    self._retry_or_stop(ctx, fin.name, e, dt, ctx.stop_event)
                    continue
                except _Stop as s:
                    self._logger(ctx, fin.name).error("finalizer failed: %s", s.error.error)
                    with self.store.tx() as c:
                        self._check_owner(c, ctx)
                        self._event(
                            c,
                            ctx.version,
                            "ERROR",
                            state=fin.name,
                            error=s.error.error,
                            error_kind="finalizer",
                            retry_count=ctx.retry_count,
                        )
                        self._event(c, ctx.version, "COMPLETE", state=fin.name, retry_count=ctx.retry_count)
                    return
            dt = time.monotonic() - t0
            self._transition_metric(ctx, fin.name, "ok", dt)
            with self.store.tx() as c:
                self._check_owner(c, ctx)
                self._event(
                    c, ctx.version, "COMPLETE", state=fin.name, retry_count=ctx.retry_count, duration=dt
                )
            return

    def _record_stop(self, ctx: _RunCtx, stop: RunError) -> None:
        with self.store.tx() as c:
            self._check_owner(c, ctx)
            c.execute(
                "UPDATE fsm_runs SET stop_error = ?, stop_kind = ?, stop_state = ? WHERE version = ?",
                (stop.error, stop.kind, stop.state, ctx.version),
            )
            if stop.kind not in ("retries", "cancel") and stop.error != ctx.last_error:
                self._event(
                    c,
                    ctx.version,
                    "ERROR",
                    state=stop.state,
                    error=stop.error,
                    error_kind=stop.kind,
                    retry_count=ctx.retry_count,
                )
        self._logger(ctx, stop.state).warning("run stopped [%s]: %s", stop.kind, stop.error)

    def _finish(self, ctx: _RunCtx, stop: RunError | None, result: str | None) -> None:
        fsm = ctx.fsm
        status = "succeeded" if stop is None else ("cancelled" if stop.kind == "cancel" else "failed")
        now = time.time()
        with self.store.tx() as c:
            self._check_owner(c, ctx)
            # FINISH carries the final error (upstream defect 3: it didn't, so a failed run read as a success)
            self._event(
                c,
                ctx.version,
                "FINISH",
                state=fsm.end_state if stop is None else stop.state,
                payload=result if stop is None else None,
                error=stop.error if stop else None,
                error_kind=stop.kind if stop else None,
                duration=time.monotonic() - ctx.started,
            )
            c.execute(
                "UPDATE fsm_runs SET status = ?, finished_at = ?, result = ?, current_state = ?"
                " WHERE version = ?",
                (
                    status,
                    now,
                    result if stop is None else None,
                    fsm.end_state if stop is None else stop.state,
                    ctx.version,
                ),
            )
            c.execute("DELETE FROM fsm_active WHERE version = ?", (ctx.version,))
        labels = {
            "action": fsm.action,
            "resource": fsm.type_name,
            "status": status,
            "kind": stop.kind if stop else "",
        }
        metrics.REGISTRY.inc("fsm_action_count", labels)
        metrics.REGISTRY.observe("fsm_action_duration_seconds", labels, time.monotonic() - ctx.started)
        self._logger(ctx, fsm.end_state).info(
            "run finished: %s%s", status, f" ({stop.error})" if stop else ""
        )

    # --- helpers --------------------------------------------------------------------------------------------

    def _remember_cause(self, version: str, cause: BaseException) -> None:
        with self._lock:
            self._causes[version] = cause
            while len(self._causes) > 1000:  # only for chaining in wait(); keep memory bounded
                del self._causes[next(iter(self._causes))]

    def _check_owner(self, c: Any, ctx: _RunCtx) -> None:
        row = c.execute("SELECT owner FROM fsm_active WHERE version = ?", (ctx.version,)).fetchone()
        if row is None or row[0] != self.owner:
            ctx.lost = True
            ctx.stop_event.set()
            ctx.cancel_event.set()
            raise LeaseLost(ctx.version, row[0] if row else None)

    def _event(
        self,
        c: Any,
        version: str,
        kind: str,
        *,
        state: str | None = None,
        payload: str | None = None,
        error: str | None = None,
        error_kind: str | None = None,
        retry_count: int = 0,
        duration: float | None = None,
    ) -> None:
        c.execute(
            "INSERT INTO fsm_events (version, kind, state, payload, error, error_kind, retry_count, duration,"
            " ts, owner) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                version,
                kind,
                state,
                payload,
                error,
                error_kind,
                retry_count,
                duration,
                time.time(),
                self.owner,
            ),
        )

    def _span_recorder(self, ctx: _RunCtx) -> Callable[[str, str, float, str | None], None]:
        def record(state: str, name: str, duration: float, error: str | None) -> None:
            with self.store.tx() as c:
                self._event(
                    c,
                    ctx.version,
                    "SPAN",
                    state=state,
                    payload=codec.encode({"name": name}),
                    error=error,
                    retry_count=ctx.retry_count,
                    duration=duration,
                )

        return record

    def _transition_metric(self, ctx: _RunCtx, state: str, status: str, dt: float) -> None:
        labels = {"action": ctx.fsm.action, "state": state, "resource": ctx.fsm.type_name, "status": status}
        metrics.REGISTRY.inc("fsm_transition_count", labels)
        metrics.REGISTRY.observe("fsm_transition_duration_seconds", labels, dt)

    def _logger(self, ctx: _RunCtx, state: str | None = None) -> logging.LoggerAdapter[logging.Logger]:
        return logging.LoggerAdapter(
            log,
            {
                "run_id": ctx.run_id,
                "run_version": ctx.version,
                "action": ctx.fsm.action,
                "transition": state or ctx.state,
                "retry_count": ctx.retry_count,
            },
        )
