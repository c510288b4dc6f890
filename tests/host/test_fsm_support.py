"""Shared helpers of the FSM engine tests (no tests here): fast retry policies, managers that are always
shut down, and polling helpers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from img import fsm

FAST = fsm.RetryPolicy(max_attempts=4, backoff=fsm.Backoff(initial=0.005, maximum=0.02, factor=1.5, jitter=0))


@dataclass
class Msg:
    n: int = 0
    tag: str = ""


@dataclass
class Out:
    total: int = 0
    trail: list[str] = field(default_factory=list)


def until(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def kinds(mgr: fsm.Manager, version: str) -> list[str]:
    return [e.kind for e in mgr.history(version) if e.kind != "SPAN"]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "img.db"


@pytest.fixture
def managers(db: Path) -> Iterator[Callable[..., fsm.Manager]]:
    made: list[fsm.Manager] = []

    def make(**kw: Any) -> fsm.Manager:
        kw.setdefault("retry", FAST)
        kw.setdefault("poll_interval", 0.01)
        m = fsm.Manager(kw.pop("db", db), **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.shutdown(timeout=2)
