"""FSM definitions: the builder (`register(...).start().to().end().build()`), the immutable `FSM` it produces,
and what a step receives (`Request` with `.msg`, `.w`, `.run`, `.cancelled`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import Cancelled, DefinitionError
from .retry import Backoff, RetryPolicy

R = TypeVar("R")
W = TypeVar("W")
T = TypeVar("T")


@dataclass(frozen=True)
class RunError:
    """Why a run stopped: message, kind ("abort", "user", "system", "retries", "cancel"), state it was in."""

    error: str
    kind: str
    state: str | None


@dataclass(frozen=True)
class RunInfo:
    """What a step knows about its run. `is_restart` is True for the first step executed after the run was
    resumed by another manager/process (that step may have run before, partially or fully)."""

    id: str
    version: str
    action: str
    type_name: str
    state: str
    parent: str | None
    queue: str | None
    retry_count: int
    is_restart: bool

    @property
    def attempt(self) -> int:
        return self.retry_count + 1


SpanRecorder = Callable[[str, str, float, str | None], None]  # (state, name, duration, error)


class Request(Generic[R, W]):
    """The argument of every step: `msg` (the run's request message), `w` (the previous step's response, None
    for the first step; for finalizers the last completed step's), `run` (RunInfo), `cancelled`
    (threading.Event set when the run is cancelled or the manager shuts down), `log` (a LoggerAdapter with
    run_id, run_version, transition and retry_count)."""

    __slots__ = ("_spans", "cancelled", "log", "msg", "run", "w")

    def __init__(
        self,
        msg: R,
        w: W | None,
        run: RunInfo,
        cancelled: threading.Event,
        log: logging.LoggerAdapter[logging.Logger],
        spans: SpanRecorder,
    ) -> None:
        self.msg = msg
        self.w = w
        self.run = run
        self.cancelled = cancelled
        self.log = log
        self._spans = spans

    def check_cancelled(self) -> None:
        """Raise `Cancelled` if the run is being cancelled (or the manager is shutting down)."""
        if self.cancelled.is_set():
            raise Cancelled(f"run {self.run.version} cancelled")

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake up and raise `Cancelled` as soon as the run is cancelled / shut down."""
        if self.cancelled.wait(seconds):
            raise Cancelled(f"run {self.run.version} cancelled")

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Time a block; recorded as a SPAN event in the run's history (name, duration, error)."""
        t0 = time.monotonic()
        try:
            yield
        except BaseException as e:
            self._spans(self.run.state, name, time.monotonic() - t0, f"{type(e).__name__}: {e}")
            raise
        self._spans(self.run.state, name, time.monotonic() - t0, None)


StepFn = Callable[[Request[R, W]], W | None]
FinalizerFn = Callable[[Request[R, W], RunError | None], None]


@dataclass(frozen=True)
class Step:
    name: str
    fn: Callable[..., Any]
    finalizer: bool = False


@dataclass(frozen=True)
class FSM(Generic[R, W]):
    """An immutable FSM definition: nothing per-run lives here (upstream defect 4: shared mutable per-FSM
    fields raced between concurrent starts)."""

    action: str
    type_name: str
    req_type: type[R] | Any
    resp_type: type[W] | Any
    steps: tuple[Step, ...]
    end_state: str
    finalizers: tuple[Step, ...]
    retry: RetryPolicy | None  # None: the manager's default
    queue: str | None

    @property
    def key(self) -> tuple[str, str]:
        return (self.type_name, self.action)

    @property
    def states(self) -> list[str]:
        return [s.name for s in self.steps] + [self.end_state]


class Builder(Generic[R, W, T]):
    """`start(name, fn).to(name, fn)….end(name, finalizers=[...]).build()`. A step fn takes a Request and
    returns the response (a RespType instance, a JSON-able dict, or None). A finalizer is `fn(req, error)`
    (error is a RunError or None on success), given as a function or a (name, fn) pair."""

    def __init__(
        self,
        action: str,
        req_type: type[R] | Any,
        resp_type: type[W] | Any,
        on_build: Callable[[FSM[R, W]], T],
        *,
        type_name: str | None = None,
        max_attempts: int | None = None,
        backoff: Backoff | None = None,
        queue: str | None = None,
    ) -> None:
        if not action:
            raise DefinitionError("action must be a non-empty string")
        self._action = action
        self._req_type = req_type
        self._resp_type = resp_type
        self._type_name = type_name or getattr(req_type, "__name__", None) or "any"
        retry = None
        if max_attempts is not None or backoff is not None:
            retry = RetryPolicy(
                max_attempts if max_attempts is not None else RetryPolicy().max_attempts, backoff or Backoff()
            )
        self._retry = retry
        self._queue = queue
        self._on_build = on_build
        self._steps: list[Step] = []
        self._end: str | None = None
        self._finalizers: list[Step] = []
        self._built = False

    def _add(self, step: Step) -> None:
        names = {s.name for s in self._steps} | {s.name for s in self._finalizers}
        if not step.name or step.name in names or step.name == self._end:
            raise DefinitionError(f"{self._action}: state name {step.name!r} is empty or used twice")
        if not callable(step.fn):
            raise DefinitionError(f"{self._action}: {step.name!r} is not callable")

    def start(self, name: str, fn: StepFn[R, W]) -> Builder[R, W, T]:
        if self._steps:
            raise DefinitionError(f"{self._action}: start() called twice")
        step = Step(name, fn)
        self._add(step)
        self._steps.append(step)
        return self

    def to(self, name: str, fn: StepFn[R, W]) -> Builder[R, W, T]:
        if not self._steps:
            raise DefinitionError(f"{self._action}: to() before start()")
        if self._end is not None:
            raise DefinitionError(f"{self._action}: to() after end()")
        step = Step(name, fn)
        self._add(step)
        self._steps.append(step)
        return self

    def end(
        self, name: str, finalizers: Sequence[FinalizerFn[R, W] | tuple[str, FinalizerFn[R, W]]] = ()
    ) -> Builder[R, W, T]:
        if not self._steps:
            raise DefinitionError(f"{self._action}: end() before start()")
        if self._end is not None:
            raise DefinitionError(f"{self._action}: end() called twice")
        if name in {s.name for s in self._steps}:
            raise DefinitionError(f"{self._action}: end state {name!r} is also a step")
        self._end = name
        for f in finalizers:
            fname, fn = f if isinstance(f, tuple) else (f"finalize:{getattr(f, '__name__', 'finalizer')}", f)
            step = Step(fname, fn, finalizer=True)
            self._add(step)
            self._finalizers.append(step)
        return self

    def build(self) -> T:
        if self._end is None:
            raise DefinitionError(f"{self._action}: build() before end()")
        if self._built:
            raise DefinitionError(f"{self._action}: build() called twice")
        self._built = True
        return self._on_build(
            FSM(
                action=self._action,
                type_name=self._type_name,
                req_type=self._req_type,
                resp_type=self._resp_type,
                steps=tuple(self._steps),
                end_state=self._end,
                finalizers=tuple(self._finalizers),
                retry=self._retry,
                queue=self._queue,
            )
        )


def _identity(f: FSM[R, W]) -> FSM[R, W]:
    return f


def register(
    action: str,
    req_type: type[R] | Any,
    resp_type: type[W] | Any,
    *,
    type_name: str | None = None,
    max_attempts: int | None = None,
    backoff: Backoff | None = None,
    queue: str | None = None,
) -> Builder[R, W, FSM[R, W]]:
    """Define an FSM without a manager; bind it later with `Manager.add(fsm)`."""
    return Builder(
        action,
        req_type,
        resp_type,
        _identity,
        type_name=type_name,
        max_attempts=max_attempts,
        backoff=backoff,
        queue=queue,
    )
