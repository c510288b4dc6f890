"""img.fsm — durable, crash-resumable finite state machines on SQLite (a Python port of Fly.io's FSMv2).

A run is a linear sequence of steps executed on a worker thread of a `Manager`. Every step's response is
persisted, so a run interrupted by a crash, kill -9 or shutdown continues in the next process from the first
step it had not completed (delivery is at least once: steps must be idempotent — check real state first).

Example::

    from dataclasses import dataclass
    from img import fsm

    @dataclass
    class PullReq:
        ref: str

    @dataclass
    class PullResp:
        digest: str | None = None
        device: str | None = None

    def download(req: fsm.Request[PullReq, PullResp]) -> PullResp:
        if req.run.is_restart:           # this step may already have run (partly) in a dead process
            ...
        if not_found:
            raise fsm.Unrecoverable("no such image", kind="user")   # no retry: finalizers, then the run fails
        return PullResp(digest="sha256:…")

    def unpack(req: fsm.Request[PullReq, PullResp]) -> PullResp:
        assert req.w is not None         # previous step's response (restored from SQLite after a restart)
        for chunk in ...:
            req.check_cancelled()        # raises fsm.Cancelled on cancel / shutdown
        return PullResp(digest=req.w.digest, device="/dev/mapper/…")

    def cleanup(req: fsm.Request[PullReq, PullResp], err: fsm.RunError | None) -> None:
        ...                              # runs on success (err None), failure and cancel; not on shutdown

    pull = (fsm.register("pull", PullReq, PullResp, max_attempts=5)     # module-level definition
            .start("download", download).to("unpack", unpack)
            .end("done", finalizers=[cleanup]).build())

    with fsm.Manager("/path/img.db", queues={"downloads": 2}) as mgr:   # shares the DB with other tables
        machine = mgr.add(pull)                  # or: mgr.register(...)....build() returns the Machine
        mgr.resume()                             # pick up runs a dead process left behind
        try:
            version = machine.start("alpine:3", PullReq("alpine:3"), queue="downloads")
        except fsm.AlreadyRunning as e:
            version = e.version                  # same (type, id, action) active here or in another process
        resp = machine.wait(version)             # PullResp, or raises fsm.RunFailed / fsm.RunCancelled
    # leaving the `with` = shutdown(): writes nothing, unfinished runs stay resumable

Public API
----------
Definitions
    register(action, ReqType, RespType, *, type_name=ReqType.__name__, max_attempts=None, backoff=None,
             queue=None) -> Builder
    Builder.start(name, fn).to(name, fn)….end(name, finalizers=[fn | (name, fn)]).build() -> FSM
             A step is `fn(req: Request[R, W]) -> W | dict | None`; a finalizer is
             `fn(req, err: RunError | None) -> None`. Messages are dataclasses (nested ok), dicts, lists,
             scalars, or classes with to_dict()/from_dict(); each step gets the previous response decoded
             from JSON, identical whether or not the run was restarted.
    Request: .msg (request message), .w (previous response or None), .run (RunInfo),
             .cancelled (threading.Event: set on cancel, shutdown or lease loss), .log (LoggerAdapter with
             run_id, run_version, transition, retry_count), .check_cancelled(), .sleep(seconds)
             (interruptible), .span(name) (timed block recorded as a SPAN event).
    RunInfo: id, version, action, type_name, state, parent, queue, retry_count, is_restart, attempt.
    RunError: error (message), kind ("abort" | "user" | "system" | "retries" | "cancel"), state.
Steps raise
    any Exception -> retried with backoff (Backoff(initial=0.1, maximum=5.0, factor=1.5, jitter=0.2)) up to
    max_attempts attempts per step (default 8, per FSM or per start), then the run fails with kind "retries".
    Abort(err) -> stop now (kind "abort");  Unrecoverable(err, kind="user"|"system") -> stop now.
    Cancelled (from req.check_cancelled) -> the run is being cancelled or shut down; let it propagate.
Manager(db, *, workers=64, lease_ttl=15.0, queues={name: limit}, retry=RetryPolicy(), poll_interval=0.1,
        auto_resume=False, owner=None)   db = path, connection factory (called once per thread) or FsmStore
    .register(...) -> Builder whose build() returns a Machine;  .add(fsm) -> Machine
    .start(fsm | machine, run_id, msg, *, delay=None, run_at=None (epoch or datetime),
           run_after=None (version), queue=None, parent=None (version), max_attempts=None, backoff=None)
           -> version (ULID str); START is committed before it returns;
           raises AlreadyRunning(.version) / UnknownQueue / ManagerClosed.
    .start_or_attach(fsm | machine, run_id, msg, **start_options) -> version: start, or on AlreadyRunning
           return the active run's version after claiming it if its owner is dead (deterministic run ids:
           two processes asking for the same work wait on one run).
    .start_child(fsm | machine, run_id, msg, parent, **start_options) -> version: for a parent step that may
           run again after a restart: returns the parent's existing active/succeeded child of that
           (type, id, action), else start_or_attach(parent=...) (attaching links the run to this parent too).
    .resume(fsms=None) -> [versions] claimed: active runs of registered FSMs (type AND action) with no
           live owner.  .reap_dead_owners() -> [owner ids] (resume() and the heartbeat call it).
    .owner (this manager's owner id), .store (FsmStore)
    .wait(version, timeout=None) -> response | raises RunFailed(.kind, .state, .error) / RunCancelled /
           WaitTimeout / RunNotFound / ManagerClosed (this manager is shut down and nobody owns the run).
           Works for runs executed by other processes (polls SQLite). The response is decoded into the
           FSM's response type if that FSM is registered with this manager, else returned as plain JSON.
    .wait_by_id(run_id, *, action=None, type_name=None, timeout=None)
    .wait_children(parent, timeout=None) -> {child version: response} (newest run per child id; raises the
           first failure)
    .cancel(version, reason="cancelled") -> bool (False if not active)
    .shutdown(timeout=10.0)  (also the context manager's exit)
    Admin: .list_fsms() -> [dict], .list_active(action=None) -> [RunRecord], .get_run(version) -> RunRecord,
           .history(version) -> [Event], .runs(day=, run_id=, action=, status=, limit=) -> [RunRecord],
           .children(parent) -> [version].  The same reads without threads: FsmStore(db).get_run(...) etc.;
           FsmStore.days() -> [(day, {status: n})] (per-day history), FsmStore.purge(finished_before) -> n.
Machine(manager, fsm): .start(run_id, msg, **options), .start_or_attach(run_id, msg, **options),
    .start_child(run_id, msg, parent, **options), .resume(), .wait(version), .wait_by_id(run_id),
    .cancel(version), .fsm
RunRecord: version, run_id, type_name, action, parent, queue, status ("pending" | "running" | "succeeded" |
    "failed" | "cancelled"), current_state, retry_count, error, error_kind, error_state, cancel_requested,
    created_at, started_at, finished_at, run_at, run_after, day, options, msg, result, active, owner,
    lease_expires, executing, .finished
Event: seq, version, kind ("START" | "COMPLETE" | "ERROR" | "CANCEL" | "FINISH" | "SPAN"), state, payload,
    error, error_kind, retry_count, duration, ts, owner
metrics: snapshot(), exposition() (Prometheus text), value(name, **labels): fsm_action_count,
    fsm_action_duration_seconds {action, resource, status, kind}; fsm_transition_count,
    fsm_transition_duration_seconds {action, state, resource, status}.

Semantics
---------
* Run identity is (type_name, run_id, action); only one can be active at a time, across processes.
* Cross-process: each run has one owner (a lease row in fsm_active, renewed by a heartbeat thread); writes
  check ownership in the same transaction (a manager that lost its lease stops the run: req.cancelled is
  set, nothing more is written). `resume()` takes runs whose lease expired or that have no owner. Owners on
  this machine (same host name, boot id and pid namespace) whose process is gone (pid + start time) are
  reaped at once by every manager's heartbeat and resume(): their runs become ownerless (`reap_dead_owners`).
  Owners elsewhere (another host, the user-mode-linux guest, a container) are judged by their lease only.
* Queue limits are stored in SQLite (fsm_queues) and enforced across processes (runs marked executing).
* Cancel writes CANCEL; the run stops before its next step (or when the current step raises), finalizers run,
  FINISH records kind "cancel". Shutdown writes nothing.
* is_restart is True for the first step executed after the run was taken over by `resume()`.
* A run whose owner died is continued by a manager that calls `resume()`, `start_or_attach`/`start_child`
  for it, or `wait()` on it (if its FSM is registered there), or that has auto_resume=True (checks every
  second). Call `resume()` when a process starts.
* A step that returns normally during shutdown still gets its COMPLETE written (its work is done); to stop
  early, raise (req.check_cancelled() / req.sleep()). Never return a partial response.
* Message/response dataclasses must be importable at module level (their type hints are resolved to decode).
* Leases use wall-clock time: processes on several hosts need synchronized clocks. A dead owner elsewhere
  holds its queue slots until its lease expires (lease_ttl).
* Events of a run: START, then per step COMPLETE (response) — or ERROR (when the error message changes,
  with the retry count) and retries; CANCEL when cancel() is called; finalizers' COMPLETE; FINISH (with
  the error and its kind if the run failed or was cancelled; the response if it succeeded). A finalizer
  that fails for good adds ERROR (kind "finalizer") but doesn't change the outcome.
* SQLite: WAL, synchronous=NORMAL (a committed step survives kill -9; a power cut may lose the last ones,
  which then run again), busy_timeout 10 s, short BEGIN IMMEDIATE transactions, one connection per thread.
* SQLite tables are all prefixed fsm_ (migrations in fsm_schema_version); see img.fsm.store.
"""

from __future__ import annotations

from . import metrics
from .definition import FSM, Builder, Request, RunError, RunInfo, register
from .engine import Machine, Manager
from .errors import (
    Abort,
    AlreadyRunning,
    Cancelled,
    DefinitionError,
    FsmError,
    LeaseLost,
    ManagerClosed,
    RunCancelled,
    RunFailed,
    RunNotFound,
    UnknownFSM,
    UnknownQueue,
    Unrecoverable,
    WaitTimeout,
)
from .retry import Backoff, RetryPolicy
from .store import Event, FsmStore, RunRecord

__all__ = [
    "FSM",
    "Abort",
    "AlreadyRunning",
    "Backoff",
    "Builder",
    "Cancelled",
    "DefinitionError",
    "Event",
    "FsmError",
    "FsmStore",
    "LeaseLost",
    "Machine",
    "Manager",
    "ManagerClosed",
    "Request",
    "RetryPolicy",
    "RunCancelled",
    "RunError",
    "RunFailed",
    "RunInfo",
    "RunNotFound",
    "RunRecord",
    "UnknownFSM",
    "UnknownQueue",
    "Unrecoverable",
    "WaitTimeout",
    "metrics",
    "register",
]
