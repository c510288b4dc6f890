"""Typed errors of the FSM engine: the ones a step raises to steer its run, and the ones the engine raises."""

from __future__ import annotations

from typing import Literal

UnrecoverableKind = Literal["system", "user"]


class FsmError(Exception):
    """Base of every error the engine raises."""


# --- raised by steps ----------------------------------------------------------------------------------------


class Abort(FsmError):
    """Raise from a step to stop the run now: remaining steps are skipped, finalizers run, the run fails
    with kind "abort". Not retried."""

    def __init__(self, error: BaseException | str) -> None:
        self.error = error
        super().__init__(str(error))


class Unrecoverable(FsmError):
    """Like Abort, but says whose fault it is: kind "user" (bad input, 404, oversize…) or "system"."""

    def __init__(self, error: BaseException | str, kind: UnrecoverableKind = "system") -> None:
        if kind not in ("system", "user"):
            raise ValueError(f"Unrecoverable kind must be 'system' or 'user', not {kind!r}")
        self.error = error
        self.kind: UnrecoverableKind = kind
        super().__init__(str(error))


class Cancelled(FsmError):
    """Raised by `Request.check_cancelled()` / `Request.sleep()` when the run is being cancelled or the
    manager is shutting down. A step should let it propagate (never return a partial result)."""


# --- raised by the engine -----------------------------------------------------------------------------------


class AlreadyRunning(FsmError):
    """A run of the same (type, id, action) is active; `version` is the active run's version."""

    def __init__(self, version: str, run_id: str, action: str, type_name: str) -> None:
        self.version = version
        self.run_id = run_id
        self.action = action
        self.type_name = type_name
        super().__init__(f"{action} run {run_id!r} ({type_name}) is already running as version {version}")


class RunFailed(FsmError):
    """A run finished with an error. `kind` is "abort", "user", "system", "retries" (attempts exhausted)
    or "cancel"; `state` is the step (or finalizer) that stopped it; `error` is the error's message.
    In the process that ran the step, the original exception is chained as `__cause__`."""

    def __init__(
        self, version: str, run_id: str, action: str, state: str | None, error: str, kind: str
    ) -> None:
        self.version = version
        self.run_id = run_id
        self.action = action
        self.state = state
        self.error = error
        self.kind = kind
        super().__init__(f"{action} run {run_id!r} ({version}) failed in {state or '-'} [{kind}]: {error}")


class RunCancelled(RunFailed):
    """The run was cancelled (kind "cancel")."""


class RunNotFound(FsmError, LookupError):
    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"no FSM run {what}")


class UnknownFSM(FsmError, LookupError):
    """No FSM registered with this manager for (action, type)."""

    def __init__(self, action: str, type_name: str | None = None) -> None:
        self.action = action
        self.type_name = type_name
        super().__init__(
            f"no FSM registered for action {action!r}" + (f" type {type_name!r}" if type_name else "")
        )


class UnknownQueue(FsmError, LookupError):
    def __init__(self, queue: str) -> None:
        self.queue = queue
        super().__init__(f"queue {queue!r} is not configured (Manager(queues={{{queue!r}: limit}}))")


class WaitTimeout(FsmError, TimeoutError):
    def __init__(self, version: str, timeout: float) -> None:
        self.version = version
        self.timeout = timeout
        super().__init__(f"run {version} not finished after {timeout:g}s")


class LeaseLost(FsmError):
    """Another owner took this run (our lease expired): stop executing it, write nothing."""

    def __init__(self, version: str, owner: str | None) -> None:
        self.version = version
        self.owner = owner
        super().__init__(f"lease on run {version} lost to {owner or 'nobody'}")


class ManagerClosed(FsmError):
    def __init__(self) -> None:
        super().__init__("FSM manager is shut down")


class DefinitionError(FsmError, ValueError):
    """The builder was used wrongly (duplicate state names, no steps, registering an action twice…)."""
