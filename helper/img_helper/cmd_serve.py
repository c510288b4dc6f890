"""`img-helper serve`: run the helper's socket server (plain, or socket-activated by systemd)."""

from __future__ import annotations

import contextlib
import fcntl
import grp
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from img_helper import protocol as P

DEFAULT_POOL = "img-pool"
DEFAULT_GROUP = "img"
DEFAULT_STATE_DIR = "/var/lib/img-helper"
LOCK_NAME = "helper.lock"


class ServeError(click.ClickException):
    """A clear reason the server can't start (exit status 1)."""


class AlreadyRunning(ServeError):
    def __init__(self, lock_path: Path, holder: str) -> None:
        super().__init__(f"another img-helper instance holds {lock_path}{holder}; only one may run at a time")
        self.lock_path = lock_path


class UnsafeDirectory(ServeError):
    def __init__(self, what: str, path: Path, why: str) -> None:
        super().__init__(f"the {what} {path} {why}; refusing to use it (make it owned by root and writable "
                         "by root only)")
        self.path = path


def check_private_dir(path: Path, what: str) -> None:
    """path (an existing directory, symlinks resolved) must be beyond other users' reach: owned by us and
    writable by us only; every ancestor owned by root or us and not writable by others unless sticky (a
    sticky dir's entries can only be renamed by their owner). Otherwise another user could swap what we
    create there (a symlink in place of the socket before its chown/chmod) or plant state."""
    euid = os.geteuid()
    real = path.resolve(strict=True)
    st = os.lstat(real)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(what, path, "is not a directory")
    if st.st_uid != euid:
        raise UnsafeDirectory(what, path, f"is owned by uid {st.st_uid}, not {euid}")
    if st.st_mode & 0o022:
        raise UnsafeDirectory(what, path, f"is writable by other users (mode {stat.S_IMODE(st.st_mode):o})")
    for anc in real.parents:
        ast = os.lstat(anc)
        if ast.st_uid not in (0, euid):
            raise UnsafeDirectory(what, path, f"lies under {anc}, owned by uid {ast.st_uid}")
        if ast.st_mode & 0o022 and not ast.st_mode & stat.S_ISVTX:
            raise UnsafeDirectory(what, path, f"lies under {anc}, writable by other users")


def take_instance_lock(state_dir: Path) -> int:
    """flock the state dir's lock file for the life of the process (released by the kernel on exit,
    kill -9 included). Returns the fd; raises AlreadyRunning, or UnsafeDirectory if another user could
    write the state dir."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private_dir(state_dir, "state dir")
    path = state_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:  # ELOOP: a symlink planted there is never followed
        raise ServeError(f"cannot open the instance lock {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise AlreadyRunning(path, f" (pid {holder})" if holder.isdigit() else "") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def bind_socket(path: Path, gid: int) -> socket.socket:
    """Bind path as a listening socket, mode 0660 root:gid. A missing parent dir is created 0750
    root:gid (an existing one is left alone, but must be beyond other users' reach: check_private_dir).
    Call with the instance lock held: a socket already at path is a dead instance's and is replaced."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o750, parents=True)
        os.chown(parent, 0, gid)
        os.chmod(parent, 0o750)  # noqa: S103 -- group img must reach the socket inside
    check_private_dir(parent, "socket dir")
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ServeError(f"{path} exists and is not a socket; refusing to replace it")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # no window where the socket is reachable by others
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    # Only we can write the parent (check_private_dir), so nothing can swap the socket for a symlink here.
    os.chown(path, 0, gid, follow_symlinks=False)
    os.chmod(path, 0o660)  # explicitly: some filesystems (hostfs) apply their own umask at bind
    sock.listen(128)
    return sock


def activated_socket() -> socket.socket | None:
    from img_helper.sdnotify import listen_fds

    fds = listen_fds()
    if not fds:
        return None
    if len(fds) != 1:
        raise ServeError(f"socket activation passed {len(fds)} fds; img-helper.socket defines exactly one")
    sock = socket.socket(fileno=fds[0])
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ServeError("the socket passed by systemd is not a listening AF_UNIX stream socket")
    return sock


def default_service_factory(pool: str, state_dir: Path) -> Any:
    from img_helper.service import Service

    service = Service(pool=pool, state_dir=state_dir)
    if not hasattr(service, "serializes_pool_changes"):
        # img_helper.devices.Devices serializes its own pool changes (one lock) and steps on the same key,
        # so the server need not: extractions of different layers then run in parallel.
        service.serializes_pool_changes = True
    return service


def run_serve(socket_path: Path, pool: str, group: str, state_dir: Path,
              service_factory: Callable[[str, Path], Any] = default_service_factory,
              limits: Any = None, authorizer: Any = None) -> None:
    """Everything `serve` does; tests call it with a stand-in service factory."""
    from img_helper.server import Server

    lock_fd = take_instance_lock(state_dir)
    listener = activated_socket()
    gid = None
    if listener is None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ServeError(f"group {group!r} does not exist (systemd-sysusers creates it from "
                             "sysusers.d/img.conf; or: groupadd --system img)") from None
    try:  # before binding: a pool that can't be served leaves no socket behind
        service = service_factory(pool, state_dir)
    except Exception as e:
        if not isinstance(getattr(e, "code", None), str):
            raise  # a bug: keep the traceback
        raise ServeError(f"cannot serve pool {pool!r}: {e} (create it with `img-helper pool create`, "
                         "or pass --pool)") from None
    unlink_path = None
    if listener is None:
        assert gid is not None
        listener = bind_socket(socket_path, gid)
        unlink_path = str(socket_path)
    server = Server(listener, service, authorizer=authorizer, limits=limits, unlink_path=unlink_path)
    server.install_signal_handlers()
    where = socket_path if unlink_path else "the systemd socket"
    logging.getLogger("img_helper").info("serving on %s (pool %s, state %s)", where, pool, state_dir)
    try:
        server.serve_forever(on_ready=lambda: _notify(f"READY=1\nMAINPID={os.getpid()}"),
                             on_stopping=lambda: _notify("STOPPING=1"))
    finally:
        close = getattr(service, "close", None)
        if callable(close) and not server.unfinished:  # never pull the record from under a running step
            close()
        os.close(lock_fd)


def _notify(state: str) -> None:
    from img_helper.sdnotify import notify

    notify(state)


@click.command("serve")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), default=Path(P.DEFAULT_SOCKET),
              show_default=True, help="Unix socket to listen on (ignored when socket-activated).")
@click.option("--pool", default=DEFAULT_POOL, show_default=True, help="Thin pool (device-mapper name).")
@click.option("--group", default=DEFAULT_GROUP, show_default=True,
              help="Group that may connect (socket 0660).")
@click.option("--state-dir", type=click.Path(path_type=Path), default=Path(DEFAULT_STATE_DIR),
              show_default=True, help="Root-owned state: instance lock, thin id records.")
def serve(socket_path: Path, pool: str, group: str, state_dir: Path) -> None:
    """Serve the helper's authorized Unix socket (one instance at a time)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="img-helper[%(process)d]: %(levelname)s %(message)s")
    if os.geteuid() != 0:
        raise ServeError("img-helper serve must run as root")
    run_serve(socket_path, pool, group, state_dir)
