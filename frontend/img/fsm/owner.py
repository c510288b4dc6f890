"""Who owns a run: an owner id per Manager (host:pid:random) and a liveness check for owners on this host
(/proc/<pid> exists and its start time is the recorded one, so a recycled pid doesn't look alive)."""

from __future__ import annotations

import os


def hostname() -> str:
    return os.uname().nodename


def pid_start_time(pid: int) -> str | None:
    """The process start time in clock ticks since boot (field 22 of /proc/<pid>/stat), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # a zombie is dead: it only waits to be reaped
        return None
    return fields[19]


def new_owner_id() -> str:
    return f"{hostname()}:{os.getpid()}:{os.urandom(4).hex()}"


def owner_alive_here(pid: int, pid_start: str | None) -> bool:
    """For an owner on this host: is its process still the one that registered?"""
    now_start = pid_start_time(pid)
    if now_start is None:
        return False
    return pid_start is None or now_start == pid_start
