"""The two bits of systemd's protocols the helper needs, without libsystemd: socket activation
(sd_listen_fds) and readiness notification (sd_notify)."""

from __future__ import annotations

import fcntl
import os
import socket

SD_LISTEN_FDS_START = 3
MAX_LISTEN_FDS = 64  # our socket unit passes one; a larger count is not systemd talking to us


def _decimal(s: str) -> bool:
    """ASCII digits only: str.isdigit() accepts '²' and other digits int() refuses."""
    return s.isascii() and s.isdigit()


def listen_fds(unset_environment: bool = True) -> list[int]:
    """The fds systemd passed us (LISTEN_PID must be our pid), close-on-exec; [] when not activated."""
    pid, n = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    if unset_environment:
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(k, None)
    if not _decimal(pid) or int(pid) != os.getpid() or not _decimal(n) or int(n) > MAX_LISTEN_FDS:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(n)))
    for fd in fds:
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
    return fds


def notify(state: str) -> bool:
    """Send state (e.g. "READY=1") to $NOTIFY_SOCKET; False if there is none or it can't be reached
    (like sd_notify, a failure here never stops the service). '@' = abstract socket."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return False
    target = "\0" + addr[1:] if addr[0] == "@" else addr
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), target)
    except OSError:
        return False
    return True
