"""Who owns a run: an owner id per Manager (host:pid:random) and a liveness check for owners on this machine
(/proc/<pid> exists and its start time is the recorded one, so a recycled pid doesn't look alive).

"This machine" is the host name plus the boot id plus the pid namespace: a process in another kernel (the
user-mode-linux guest sharing the host's files) or in another pid namespace (a container) has pids that mean
nothing here, so its liveness is judged by its lease alone."""

from __future__ import annotations

import os

_HOST: str | None = None


def hostname() -> str:
    return os.uname().nodename


def host_identity() -> str:
    """Where pids are comparable: host name / boot id / pid namespace inode."""
    global _HOST
    if _HOST is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()[:8]
        except OSError:
            boot = "?"
        try:
            pidns = str(os.stat("/proc/self/ns/pid").st_ino)
        except OSError:
            pidns = "?"
        _HOST = f"{hostname()}/{boot}/{pidns}"
    return _HOST


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
