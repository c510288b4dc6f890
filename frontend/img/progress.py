"""Progress output for long commands: bars on a terminal, plain lines in a pipe, nothing with --json.

Workflow steps run on FSM worker threads and report through one ``Reporter`` (thread-safe):
``task(key, label, done, total)`` for byte counts (downloads, unpacking) and ``note(text)`` for one-off lines.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Reporter:
    """Base: reports nothing (``--json`` and tests)."""

    def task(self, key: str, label: str, done: int, total: int) -> None:
        pass

    def finish(self, key: str, text: str | None = None) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class LineReporter(Reporter):
    """Non-terminal output: one line when a task starts and one when it ends, plus notes."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self.out = out
        self._lock = threading.Lock()
        self._started: set[str] = set()

    def task(self, key: str, label: str, done: int, total: int) -> None:
        with self._lock:
            if key not in self._started:
                self._started.add(key)
                self.out.write(f"{label} ({human(total)})\n" if total > 0 else f"{label}\n")
                self.out.flush()

    def finish(self, key: str, text: str | None = None) -> None:
        with self._lock:
            self._started.discard(key)
            if text:
                self.out.write(text + "\n")
                self.out.flush()

    def note(self, text: str) -> None:
        with self._lock:
            self.out.write(text + "\n")
            self.out.flush()


class BarReporter(Reporter):
    """Terminal output: one live bar per running task, redrawn at most 10 times a second."""

    WIDTH = 28

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self.out = out
        self._lock = threading.Lock()
        self._tasks: dict[str, tuple[str, int, int, float]] = {}  # key -> label, done, total, started
        self._drawn = 0
        self._last = 0.0

    def _bar(self, label: str, done: int, total: int, started: float) -> str:
        cols = 100
        if total > 0:
            frac = min(1.0, done / total)
            fill = int(frac * self.WIDTH)
            bar = "#" * fill + "-" * (self.WIDTH - fill)
            rate = done / max(time.monotonic() - started, 1e-3)
            text = f"{label[:40]:40} [{bar}] {frac * 100:5.1f}% {human(done)}/{human(total)} {human(rate)}/s"
        else:
            text = f"{label[:40]:40} ..."
        return text[:cols]

    def _redraw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        lines = [self._bar(*t) for t in self._tasks.values()]
        buf = ("\x1b[F" * self._drawn) if self._drawn else ""
        for line in lines:
            buf += "\x1b[2K" + line + "\n"
        for _ in range(self._drawn - len(lines)):
            buf += "\x1b[2K\n"
        extra = max(0, self._drawn - len(lines))
        if extra:
            buf += "\x1b[F" * extra
        self._drawn = len(lines)
        self.out.write(buf)
        self.out.flush()

    def task(self, key: str, label: str, done: int, total: int) -> None:
        with self._lock:
            started = self._tasks[key][3] if key in self._tasks else time.monotonic()
            self._tasks[key] = (label, done, total, started)
            self._redraw()

    def _print_above(self, text: str) -> None:
        # clear the bars, print the line, redraw the bars under it
        self.out.write(("\x1b[F\x1b[2K" * self._drawn) + text + "\n")
        self._drawn = 0
        self._redraw(force=True)

    def finish(self, key: str, text: str | None = None) -> None:
        with self._lock:
            self._tasks.pop(key, None)
            if text:
                self._print_above(text)
            else:
                self._redraw(force=True)

    def note(self, text: str) -> None:
        with self._lock:
            self._print_above(text)

    def close(self) -> None:
        with self._lock:
            self._tasks.clear()
            self._redraw(force=True)


def for_output(json_mode: bool, quiet: bool = False, out: TextIO = sys.stderr) -> Reporter:
    if json_mode or quiet:
        return Reporter()
    if out.isatty():
        return BarReporter(out)
    return LineReporter(out)
