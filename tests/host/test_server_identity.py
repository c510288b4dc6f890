"""Peer identity from the kernel (SO_PEERCRED, pidfd, /proc start time) and the systemd protocols
(sd_notify, sd_listen_fds), exercised with real processes and sockets."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from img_helper import auth
from img_helper.auth import AuthError, PeerIdentity, PolkitAuthorizer, clock_ticks_now, proc_start_time
from img_helper.sdnotify import listen_fds, notify


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "l.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(4)
    yield s, path
    s.close()


def kernel_at_least(major: int, minor: int) -> bool:
    parts = platform.release().split(".")
    return (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()))) >= (major, minor)


def test_start_time_parses_comm_with_parens_and_spaces(tmp_path: Path) -> None:
    """comm may contain ') ' and spaces: field 22 must be found after the LAST ')'."""
    trap = tmp_path / "a) b ) c"
    shutil.copy("/bin/sleep", trap)
    before = clock_ticks_now()
    p = subprocess.Popen([str(trap), "5"])
    try:
        time.sleep(0.05)
        stat = Path(f"/proc/{p.pid}/stat").read_text()
        assert ") b ) c)" in stat  # the trap is really in comm
        st = proc_start_time(p.pid)
        assert before - 2 <= st <= clock_ticks_now() + 1
        assert stat.split()[21] != str(st)  # a naive split would read the wrong field
    finally:
        p.kill()
        p.wait()


def test_start_time_of_missing_process() -> None:
    with pytest.raises(ProcessLookupError):
        proc_start_time(2**22 + 12345)


def test_peer_identity_of_a_connected_process(listener: tuple[socket.socket, str]) -> None:
    srv, path = listener
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    conn, _ = srv.accept()
    peer = PeerIdentity.of(conn, clock_ticks_now())
    try:
        assert (peer.uid, peer.gid, peer.pid) == (os.getuid(), os.getgid(), os.getpid())
        assert peer.start_time == proc_start_time(os.getpid())
        assert peer.pidfd >= 0
        assert peer.pidfd_source == ("SO_PEERPIDFD" if kernel_at_least(6, 5) else "pidfd_open")
        peer.check_alive()
    finally:
        peer.close()
        conn.close()
        c.close()


def _child_peer(path: str) -> tuple[int, int]:
    """Fork a child that connects to path and exits when told (via the returned pipe fd)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(w)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    return pid, w


@pytest.mark.parametrize("force_fallback", [False, True], ids=["peerpidfd", "pidfd_open"])
def test_peer_that_exits_is_peer_gone(listener: tuple[socket.socket, str], force_fallback: bool,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if force_fallback:
        monkeypatch.setattr(auth, "SO_PEERPIDFD", 0x7FFF)  # an option no kernel has: take the fallback path
    srv, path = listener
    pid, w = _child_peer(path)
    conn, _ = srv.accept()
    peer = PeerIdentity.of(conn, clock_ticks_now())
    try:
        assert peer.pid == pid
        assert peer.pidfd_source == "pidfd_open" or not force_fallback
        peer.check_alive()
        os.write(w, b"x")
        os.waitpid(pid, 0)
        with pytest.raises(AuthError) as ei:
            peer.check_alive()
        assert ei.value.code == "peer-gone"
    finally:
        os.close(w)
        peer.close()
        conn.close()


def test_peer_started_after_accept_is_a_recycled_pid(listener: tuple[socket.socket, str]) -> None:
    """With pidfd_open, a process younger than the accept can't be the peer that connected."""
    srv, path = listener
    pid, w = _child_peer(path)
    conn, _ = srv.accept()
    try:
        with pytest.raises(AuthError) as ei:
            PeerIdentity.of(conn, accepted_at_ticks=proc_start_time(pid) - 100)
        assert ei.value.code == "peer-gone" and "recycled" in ei.value.message
    finally:
        os.write(w, b"x")
        os.waitpid(pid, 0)
        os.close(w)
        conn.close()


def test_root_peer_skips_polkit(listener: tuple[socket.socket, str], tmp_path: Path) -> None:
    srv, path = listener
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    conn, _ = srv.accept()
    peer = PeerIdentity.of(conn, clock_ticks_now())
    try:
        # a bus that does not exist: a root peer must not even ask
        d = PolkitAuthorizer(bus_address=f"unix:path={tmp_path}/none").authorize(peer, "delete_layer", False)
        assert (d.allowed, d.how) == (True, "root")
    finally:
        peer.close()
        conn.close()
        c.close()


def test_notify_path_and_abstract_sockets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    for addr, bind in [(path, path), (f"@img-test-{os.getpid()}", f"\0img-test-{os.getpid()}")]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(bind)
        monkeypatch.setenv("NOTIFY_SOCKET", addr)
        assert notify("READY=1")
        s.settimeout(2)
        assert s.recv(100) == b"READY=1"
        s.close()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify("STOPPING=1") is False  # never raises
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify("READY=1") is False


def test_listen_fds_only_for_our_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds() == []
    assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ  # not passed on to children


@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "99999999", "-1", " 1"])
def test_malformed_listen_fds_attack(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """LISTEN_FDS with non-ASCII digits ('²'.isdigit() is True, int('²') raises) or an absurd count
    (a list of 10^8 fds, then fcntl on fds that don't exist): not socket activation, no crash."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", value)
    assert listen_fds() == []
