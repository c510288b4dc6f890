"""The helper's socket server as a real process (tests/host/test_server_standin.py serves a stand-in
Service through the real server, protocol and auth code). Root peers skip polkit here; non-root peers run
through setpriv as nobody. Every rejected attack is a test named after it, and after each attack a fresh
client must still be served."""

from __future__ import annotations

import array
import grp
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from img_helper import protocol as P
from img_helper.client import (
    BadFd,
    BadRequest,
    HelperBusy,
    HelperClient,
    HelperTimeout,
    HelperUnavailable,
    NotAuthorized,
    PolkitUnavailable,
    ServiceError,
)
from tests.host.test_server_standin import HelperProc

NOBODY = 65534
CHAIN = "sha256:" + "ab" * 32
CHAIN2 = "sha256:" + "cd" * 32
PY = sys.executable


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A temp dir nobody can traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="img-srv-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def start(workdir: Path, **kw: Any) -> HelperProc:
    return HelperProc(workdir, **kw).start()


@pytest.fixture(scope="module")
def helper() -> Iterator[HelperProc]:
    d = Path(tempfile.mkdtemp(prefix="img-srv-", dir="/tmp"))
    d.chmod(0o755)
    h = HelperProc(d, limits={"frame_timeout": 1.0, "idle_timeout": 20}, group="nogroup",
                   env={"STANDIN_CHUNK_DELAY": "0.03"}).start()
    yield h
    assert h.stop() == 0, h.output()
    subprocess.run(["rm", "-rf", str(d)], check=False)


def client(h: HelperProc) -> HelperClient:
    return HelperClient(h.socket_path, timeout=30)


def still_serving(h: HelperProc) -> None:
    assert client(h).call("status", {})["version"] == "standin"


def raw(h: HelperProc, data: bytes, fds: list[int] | None = None, half_close: bool = True) -> list[Any]:
    """Send raw bytes (fds on the first byte); return every frame the helper sends back until it closes."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(h.socket_path))
    try:
        if fds:
            n = s.sendmsg([data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            data = data[n:]
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        frames: list[Any] = []
        reader = P.FrameReader(s, max_bytes=P.MAX_REPLY_BYTES, max_fds=0)
        while True:
            try:
                obj, _ = reader.read(10, 10)
            except (P.PeerClosed, ConnectionResetError):
                return frames
            frames.append(obj)
    finally:
        s.close()


def frame(obj: Any) -> bytes:
    return P.encode(obj)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def quiet_fd_count(pid: int) -> int:
    """The helper's fd count once earlier connections have finished closing (two equal samples)."""
    last = fd_count(pid)
    for _ in range(50):
        time.sleep(0.1)
        now = fd_count(pid)
        if now == last:
            return now
        last = now
    return last


def settles_to(pid: int, n: int, timeout: float = 5) -> bool:
    """The helper's fd count comes back to n (connection threads close asynchronously after EOF)."""
    deadline = time.monotonic() + timeout
    while fd_count(pid) != n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def blob_file(workdir: Path, data: bytes) -> tuple[Path, str]:
    import hashlib

    p = workdir / "blob"
    p.write_bytes(data)
    return p, hashlib.sha256(data).hexdigest()


def ensure_args(sha: str, chain: str = CHAIN) -> dict[str, Any]:
    return {"chain_id": chain, "parent_chain_id": None, "blob_fd": 0, "blob_sha256": sha}


def run_as_nobody(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", PY,
                           "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=Path(__file__).resolve().parents[2])


# ---- the verbs, as root --------------------------------------------------------------------------


def test_status_and_list_as_root(helper: HelperProc) -> None:
    st = client(helper).call("status", {})
    assert st["pool"]["name"] == "standin-pool" and st["pid"] == helper.pid
    assert set(client(helper).call("list", {})) == {"layers", "activations"}


def test_ensure_layer_reads_the_passed_fd_and_streams_progress(helper: HelperProc, workdir: Path) -> None:
    path, sha = blob_file(workdir, os.urandom(300_000))
    events: list[dict[str, Any]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        r = client(helper).call("ensure_layer", ensure_args(sha, CHAIN2), fds=[fd], on_progress=events.append)
        again = client(helper).call("ensure_layer", ensure_args(sha, CHAIN2), fds=[fd])
    finally:
        os.close(fd)
    assert r["created"] is True and r["size"] == 300_000 and r["chain_id"] == CHAIN2
    assert again["created"] is False and again["thin_id"] == r["thin_id"]  # idempotent
    assert len(events) >= 2 and events[-1]["bytes"] <= 300_000
    assert [e["bytes"] for e in events] == sorted(e["bytes"] for e in events)


def test_service_error_keeps_its_code_and_fields(helper: HelperProc, workdir: Path) -> None:
    path, _ = blob_file(workdir, b"layer")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ServiceError) as ei:
            client(helper).call("ensure_layer", ensure_args("00" * 32, "sha256:" + "12" * 32), fds=[fd])
    finally:
        os.close(fd)
    assert ei.value.code == "digest" and ei.value.details["reason"] == "digest"
    still_serving(helper)


# ---- frame attacks ------------------------------------------------------------------------------


def test_garbage_bytes_attack(helper: HelperProc) -> None:
    frames = raw(helper, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # 'GET ' = a 1.2 GB length
    assert frames[-1]["error"]["code"] == "bad-frame"
    still_serving(helper)


def test_garbage_json_attack(helper: HelperProc) -> None:
    body = b"\xff{not json"
    frames = raw(helper, struct.pack(">I", len(body)) + body)
    assert frames == [{"v": 1, "id": None, "ok": False, "error": frames[0]["error"]}]
    assert frames[0]["error"]["code"] == "bad-frame"
    still_serving(helper)


def test_oversized_frame_attack(helper: HelperProc) -> None:
    frames = raw(helper, struct.pack(">I", P.MAX_REQUEST_BYTES + 1) + b"x" * 65536)
    assert frames[-1]["error"]["code"] == "bad-frame"
    still_serving(helper)


def test_oversized_frame_via_client_is_bad_request(helper: HelperProc) -> None:
    with pytest.raises(BadRequest) as ei:
        client(helper).call("deactivate", {"name": "x" * (P.MAX_REQUEST_BYTES + 10)})
    assert ei.value.code == "bad-frame"
    still_serving(helper)


def test_truncated_frame_attack(helper: HelperProc) -> None:
    data = frame({"v": 1, "id": 1, "verb": "status", "args": {}})
    assert raw(helper, data[: len(data) // 2]) == []  # EOF mid-frame: just closed
    still_serving(helper)


def test_deeply_nested_json_attack(helper: HelperProc) -> None:
    body = b"[" * 200_000
    frames = raw(helper, struct.pack(">I", len(body)) + body)
    assert frames[-1]["error"]["code"] == "bad-frame"
    still_serving(helper)


def test_lone_surrogate_field_name_attack(helper: HelperProc) -> None:
    """An unknown argument named by an escaped lone surrogate: its error still reaches the client"""
    body = b'{"v":1,"id":7,"verb":"status","args":{"\\ud800":1}}'
    frames = raw(helper, struct.pack(">I", len(body)) + body)
    assert [(f["id"], f["error"]["code"]) for f in frames] == [(7, "bad-request")]
    still_serving(helper)


def test_duplicate_keys_attack(helper: HelperProc) -> None:
    body = b'{"v":1,"id":3,"verb":"status","verb":"delete_layer","args":{}}'
    frames = raw(helper, struct.pack(">I", len(body)) + body)
    assert [f["error"]["code"] for f in frames] == ["bad-frame"]
    still_serving(helper)


def test_many_requests_on_one_connection(helper: HelperProc) -> None:
    data = b"".join(frame({"v": 1, "id": i, "verb": "status", "args": {}}) for i in range(5))
    frames = raw(helper, data)
    assert [f["id"] for f in frames] == list(range(5)) and all(f["ok"] for f in frames)


def test_random_frames_attack(helper: HelperProc) -> None:
    """Hundreds of random and half-valid frames, some cut short: every one is answered or dropped, the
    helper keeps serving and holds no extra fds afterwards."""
    import random

    rng = random.Random(99)
    before = quiet_fd_count(helper.pid)
    valid = frame({"v": 1, "id": 5, "verb": "deactivate", "args": {"name": "fuzz"}})
    for i in range(150):
        kind = i % 3
        if kind == 0:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            data = struct.pack(">I", len(body)) + body
        elif kind == 1:
            b = bytearray(valid)
            for _ in range(rng.randrange(1, 6)):
                b[rng.randrange(4, len(b))] = rng.randrange(256)
            data = bytes(b)
        else:
            data = valid[: rng.randrange(1, len(valid))]
        frames = raw(helper, data)
        assert all(isinstance(f, dict) and f.get("v") == 1 for f in frames)
    still_serving(helper)
    assert settles_to(helper.pid, before)


# ---- schema attacks ------------------------------------------------------------------------------


def test_unknown_verb_attack(helper: HelperProc) -> None:
    with pytest.raises(BadRequest) as ei:
        client(helper).call("format_disk", {})
    assert (ei.value.code, ei.value.field) == ("bad-request", "verb")
    still_serving(helper)


@pytest.mark.parametrize("claim", [{"uid": 0}, {"pid": 1}, {"gid": 0}])
def test_identity_claimed_in_request_attack(helper: HelperProc, claim: dict[str, int]) -> None:
    req = {"v": 1, "id": 3, "verb": "status", "args": {}, **claim}
    (reply,) = raw(helper, frame(req))
    assert reply["error"]["code"] == "bad-request" and reply["error"]["field"] == next(iter(claim))
    (reply,) = raw(helper, frame({"v": 1, "id": 3, "verb": "deactivate", "args": {"name": "a", **claim}}))
    assert reply["error"]["field"] == "args." + next(iter(claim))


@pytest.mark.parametrize("when", ["before-accept", "after-first-request"])
def test_root_connects_then_drops_privileges_attack(helper: HelperProc, when: str) -> None:
    """SO_PEERCRED is the connector's credentials AT connect(): a root (or setuid-root) process that
    connects, then drops to an unprivileged uid and runs untrusted code with the socket, must not keep
    root's standing. The connector's current euid is checked with each request."""
    code = f"""
import json, os, socket, sys, time
from img_helper import protocol as P
s = socket.socket(socket.AF_UNIX); s.connect({str(helper.socket_path)!r})
out = []
def ask(i):
    try:
        P.send_frame(s, {{"v": 1, "id": i, "verb": "status", "args": {{}}}})
    except OSError:  # refused at accept already (peer-gone), and closed: its reason is still to be read
        pass
    r, _ = P.FrameReader(s, max_fds=0).read(10, 10)
    out.append(r.get("error", {{}}).get("code", "ok"))
if {when!r} == "after-first-request":
    ask(1)
os.setgroups([]); os.setresgid({NOBODY}, {NOBODY}, {NOBODY}); os.setresuid({NOBODY}, {NOBODY}, {NOBODY})
time.sleep(0.2)
ask(2)
print(json.dumps(out))
"""
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    want = (["ok"] if when == "after-first-request" else []) + ["peer-gone"]
    assert json.loads(r.stdout) == want
    still_serving(helper)


@pytest.mark.parametrize(("args", "field"), [
    ({"name": 5}, "args.name"),
    ({"name": ["a"]}, "args.name"),
    ({"name": "../../etc/passwd"}, "args.name"),
    ({}, "args.name"),
])
def test_bad_types_attack(helper: HelperProc, args: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest) as ei:
        client(helper).call("deactivate", args)
    assert ei.value.field == field
    still_serving(helper)


def test_wrong_protocol_version_attack(helper: HelperProc) -> None:
    (reply,) = raw(helper, frame({"v": 99, "id": 4, "verb": "status", "args": {}}))
    assert (reply["id"], reply["error"]["code"]) == (4, "unsupported-version")


# ---- fd attacks ------------------------------------------------------------------------------------


def test_too_many_fds_attack(helper: HelperProc, workdir: Path) -> None:
    path, sha = blob_file(workdir, b"x")
    fd = os.open(path, os.O_RDONLY)
    before = quiet_fd_count(helper.pid)
    try:
        frames = raw(helper, frame({"v": 1, "id": 1, "verb": "ensure_layer", "args": ensure_args(sha)}),
                     fds=[fd] * (P.MAX_FDS + 1))
    finally:
        os.close(fd)
    assert frames[-1]["error"]["code"] == "bad-fd"
    still_serving(helper)
    assert settles_to(helper.pid, before)  # every received fd was closed


def test_extra_fd_to_a_verb_without_fds_attack(helper: HelperProc, workdir: Path) -> None:
    path, _ = blob_file(workdir, b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BadRequest) as ei:
            client(helper).call("status", {}, fds=[fd])
    finally:
        os.close(fd)
    assert ei.value.field == "fds"


def _open_attack_fd(kind: str, workdir: Path) -> tuple[int, list[Any]]:
    """An fd of the given kind, plus things to keep alive/close."""
    path, _ = blob_file(workdir, b"blob")
    if kind == "pipe":
        r, w = os.pipe()
        return r, [w]
    if kind == "directory":
        return os.open(workdir, os.O_RDONLY | os.O_DIRECTORY), []
    if kind == "socket":
        a, b = socket.socketpair()
        return os.dup(a.fileno()), [a, b]
    if kind == "char_device":
        return os.open("/dev/null", os.O_RDONLY), []
    if kind == "o_rdwr":
        return os.open(path, os.O_RDWR), []
    if kind == "o_wronly":
        return os.open(path, os.O_WRONLY), []
    if kind == "o_path":
        return os.open(path, os.O_PATH), []
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["pipe", "directory", "socket", "char_device", "o_rdwr", "o_wronly",
                                  "o_path"])
def test_non_regular_or_writable_fd_attack(helper: HelperProc, workdir: Path, kind: str) -> None:
    fd, keep = _open_attack_fd(kind, workdir)
    before = quiet_fd_count(helper.pid)
    try:
        with pytest.raises(BadFd) as ei:
            client(helper).call("ensure_layer", ensure_args("ab" * 32, "sha256:" + "ee" * 32), fds=[fd])
    finally:
        os.close(fd)
        for k in keep:
            k.close() if hasattr(k, "close") else os.close(k)
    assert (ei.value.code, ei.value.field) == ("bad-fd", "fds[0]")
    assert settles_to(helper.pid, before)
    assert not any(r["chain_id"] == "sha256:" + "ee" * 32 for r in client(helper).call("list", {})["layers"])


# ---- slow and hostile clients -----------------------------------------------------------------------


def test_stalled_half_frame_does_not_block_others_and_is_cut_off(helper: HelperProc) -> None:
    staller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staller.connect(str(helper.socket_path))
    staller.sendall(frame({"v": 1, "id": 1, "verb": "status", "args": {}})[:7])
    t0 = time.monotonic()
    still_serving(helper)
    assert time.monotonic() - t0 < 0.9  # not queued behind the staller (frame_timeout is 1 s)
    staller.settimeout(10)
    reader = P.FrameReader(staller, max_bytes=P.MAX_REPLY_BYTES, max_fds=0)
    obj, _ = reader.read(10, 10)
    assert obj["error"]["code"] == "timeout"
    with pytest.raises(P.PeerClosed):
        reader.read(10, 10)
    assert time.monotonic() - t0 < 5
    staller.close()


def test_client_that_never_reads_replies_does_not_block_others(helper: HelperProc) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(helper.socket_path))
    s.setblocking(False)
    try:  # pipeline requests without ever reading
        for i in range(2000):
            s.send(frame({"v": 1, "id": i, "verb": "list", "args": {}}))
    except BlockingIOError:
        pass
    t0 = time.monotonic()
    still_serving(helper)
    assert time.monotonic() - t0 < 2
    s.close()


def test_many_idle_connections_do_not_block_others(helper: HelperProc) -> None:
    socks = []
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(helper.socket_path))
        socks.append(s)
    try:
        still_serving(helper)
    finally:
        for s in socks:
            s.close()


def test_connection_flood_is_refused_busy(workdir: Path) -> None:
    h = start(workdir, limits={"max_connections": 3})
    socks = []
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(h.socket_path))
            socks.append(s)
        time.sleep(0.2)
        with pytest.raises(HelperBusy):
            client(h).call("status", {})
        socks.pop().close()
        time.sleep(0.2)
        still_serving(h)
    finally:
        for s in socks:
            s.close()
        assert h.stop() == 0


def test_per_uid_connection_cap_for_non_root(workdir: Path) -> None:
    h = start(workdir, limits={"max_connections_per_uid": 2}, group="nogroup")
    code = f"""
import socket, time
from img_helper.client import HelperClient, HelperBusy
socks = []
for _ in range(2):
    s = socket.socket(socket.AF_UNIX); s.connect({str(h.socket_path)!r}); socks.append(s)
time.sleep(0.3)
try:
    HelperClient({str(h.socket_path)!r}).call("status", {{}})
    print("served")
except HelperBusy as e:
    print("busy", e.code)
"""
    try:
        r = run_as_nobody(code)
        assert r.stdout.strip() == "busy busy", r.stderr
        still_serving(h)  # root is not counted against nobody's cap
    finally:
        assert h.stop() == 0


# ---- time limits and locking ---------------------------------------------------------------------------


def test_verb_time_limit(workdir: Path) -> None:
    h = start(workdir, limits={"verb_timeouts": {"activate": 0.5}})
    try:
        t0 = time.monotonic()
        with pytest.raises(HelperTimeout) as ei:
            client(h).call("activate", {"chain_id": CHAIN, "name": "sleep-20"})  # 2 s step
        assert time.monotonic() - t0 < 1.5 and "idempotent" in ei.value.message
        still_serving(h)  # read-only verbs don't wait for the pool lock
    finally:
        assert h.stop() == 0


def test_timed_out_steps_piling_up_are_capped(workdir: Path) -> None:
    """A client can't pile up background work by letting requests time out: past max_workers, busy."""
    h = start(workdir, limits={"verb_timeouts": {"activate": 0.3}, "max_workers": 1})
    try:
        with pytest.raises(HelperTimeout):
            client(h).call("activate", {"chain_id": CHAIN, "name": "sleep-15"})  # runs on for 1.5 s
        with pytest.raises(HelperBusy):
            client(h).call("activate", {"chain_id": CHAIN, "name": "sleep-15"})
        deadline = time.monotonic() + 10
        while True:
            try:
                still_serving(h)
                break
            except HelperBusy:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        assert h.stop() == 0


def test_pool_changes_serialized_reads_not_blocked(workdir: Path) -> None:
    h = start(workdir)
    results: list[float] = []

    def slow() -> None:
        client(h).call("activate", {"chain_id": CHAIN, "name": "sleep-5"})
        results.append(time.monotonic())

    try:
        t0 = time.monotonic()
        threads = [threading.Thread(target=slow) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.1)
        st = client(h).call("status", {})  # a read while a pool change runs
        assert time.monotonic() - t0 < 0.4
        for t in threads:
            t.join()
        assert max(results) - t0 >= 1.0  # two 0.5 s pool changes, one after the other
        st = client(h).call("status", {})
        assert st["pool"]["max_overlap"] == 1
    finally:
        assert h.stop() == 0


def test_service_that_serializes_itself_gets_parallel_steps(workdir: Path) -> None:
    h = start(workdir, env={"STANDIN_SERIALIZES": "1"})
    try:
        threads = [threading.Thread(target=client(h).call, args=("activate", {"chain_id": CHAIN,
                                                                              "name": f"sleep-5-{i}"}))
                   for i in range(2)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert time.monotonic() - t0 < 0.95
        assert client(h).call("status", {})["pool"]["max_overlap"] == 2
    finally:
        assert h.stop() == 0


# ---- lifecycle ---------------------------------------------------------------------------------------


def test_socket_mode_group_and_parent_dir(workdir: Path) -> None:
    h = start(workdir, group="nogroup")
    try:
        st, parent = os.lstat(h.socket_path), os.lstat(h.socket_path.parent)
        gid = grp.getgrnam("nogroup").gr_gid
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert (st.st_uid, st.st_gid) == (0, gid)
        assert stat.S_IMODE(parent.st_mode) == 0o750 and (parent.st_uid, parent.st_gid) == (0, gid)
        assert stat.S_IMODE(os.lstat(h.state_dir).st_mode) == 0o700
    finally:
        assert h.stop() == 0
    assert not h.socket_path.exists()  # removed on a clean stop


def test_second_instance_refused(workdir: Path) -> None:
    h = start(workdir)
    try:
        second = HelperProc(workdir, socket_path=workdir / "other.sock").start(expect_ready=False)
        assert second.proc is not None and second.proc.wait(30) == 1
        assert "another img-helper instance holds" in second.output() and f"pid {h.pid}" in second.output()
        still_serving(h)
    finally:
        assert h.stop() == 0


def test_real_serve_without_a_pool_fails_clearly_and_leaves_no_socket(workdir: Path) -> None:
    argv = [str(Path(PY).parent / "img-helper"), "serve", "--socket", str(workdir / "run/h.sock"),
            "--state-dir", str(workdir / "state"), "--pool", "img-no-such-pool", "--group", "nogroup"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot serve pool 'img-no-such-pool'" in r.stderr, r.stderr
    assert not (workdir / "run").exists()


def test_missing_group_is_a_clear_error(workdir: Path) -> None:
    h = HelperProc(workdir, group="no-such-group-img").start(expect_ready=False)
    assert h.proc is not None and h.proc.wait(30) == 1
    assert "group 'no-such-group-img' does not exist" in h.output()


def test_non_socket_at_socket_path_is_not_replaced(workdir: Path) -> None:
    victim = workdir / "run" / "helper.sock"
    victim.parent.mkdir()
    victim.write_text("precious")
    h = HelperProc(workdir).start(expect_ready=False)
    assert h.proc is not None and h.proc.wait(30) == 1
    assert "exists and is not a socket" in h.output() and victim.read_text() == "precious"


def test_symlinked_lock_file_attack(workdir: Path) -> None:
    """The lock file is opened O_NOFOLLOW: a symlink planted in the state dir can't redirect it."""
    state = workdir / "state"
    state.mkdir(mode=0o700)
    target = workdir / "target"
    target.write_text("keep")
    (state / "helper.lock").symlink_to(target)
    h = HelperProc(workdir).start(expect_ready=False)
    assert h.proc is not None and h.proc.wait(30) == 1
    assert "cannot open the instance lock" in h.output() and target.read_text() == "keep"


def refused_to_start(h: HelperProc) -> str:
    h.start(expect_ready=False)
    assert h.proc is not None
    try:
        rc = h.proc.wait(20)
    except subprocess.TimeoutExpired:
        h.stop()
        raise AssertionError(f"the helper started:\n{h.output()}") from None
    assert rc == 1, h.output()
    return h.output()


def test_socket_dir_writable_by_others_attack(workdir: Path) -> None:
    """Another user who can write the socket's directory could swap the fresh socket for a symlink before
    the chown/chmod (to /etc/shadow: root:img 0660), or squat the path: the helper refuses such a dir."""
    run = workdir / "run"
    run.mkdir()
    run.chmod(0o777)
    out = refused_to_start(HelperProc(workdir))
    assert "writable by other users" in out and not (run / "helper.sock").exists()


def test_socket_dir_symlink_to_a_sticky_shared_dir_attack(workdir: Path) -> None:
    shared = workdir / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (workdir / "run").symlink_to(shared)
    out = refused_to_start(HelperProc(workdir))
    assert "writable by other users" in out and not (shared / "helper.sock").exists()


def test_socket_dir_under_a_dir_writable_by_others_attack(workdir: Path) -> None:
    """An ancestor writable by others (not sticky) lets them rename the socket dir away and put their own."""
    top = workdir / "top"
    top.mkdir()
    top.chmod(0o777)
    (top / "run").mkdir(mode=0o755)
    out = refused_to_start(HelperProc(workdir, socket_path=top / "run" / "helper.sock"))
    assert "writable by other users" in out


@pytest.mark.parametrize("kind", ["world-writable", "group-writable", "owned by nobody"])
def test_state_dir_others_can_write_attack(workdir: Path, kind: str) -> None:
    """The state dir holds the instance lock and the thin-id record: another user who can write it could
    plant records or hold the lock. It must be ours and private."""
    state = workdir / "state"
    state.mkdir(mode=0o700)
    if kind == "world-writable":
        state.chmod(0o777)
    elif kind == "group-writable":
        state.chmod(0o770)
    else:
        os.chown(state, NOBODY, NOBODY)
    out = refused_to_start(HelperProc(workdir))
    assert "state dir" in out and not (workdir / "run").exists()


def test_kill9_then_restart(workdir: Path) -> None:
    h = start(workdir)
    os.kill(h.pid, 9)
    h.stop()
    assert h.socket_path.exists()  # a stale socket is left behind ...
    h2 = start(workdir)  # ... and the lock was released by the kernel
    try:
        assert client(h2).call("status", {})["pid"] == h2.pid
    finally:
        assert h2.stop() == 0


def test_sigterm_lets_in_flight_request_finish(workdir: Path) -> None:
    h = start(workdir)
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(client(h).call("activate", {"chain_id": CHAIN,
                                                                              "name": "sleep-8"})))
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert h.stop(timeout=30) == 0
    t.join()
    assert out and out[0]["name"] == "sleep-8"
    assert time.monotonic() - t0 >= 0.3
    with pytest.raises(HelperUnavailable):
        client(h).call("status", {})


def test_sigterm_closes_idle_connections_promptly(workdir: Path) -> None:
    h = start(workdir)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(h.socket_path))
    time.sleep(0.2)
    t0 = time.monotonic()
    assert h.stop() == 0
    assert time.monotonic() - t0 < 5
    s.close()


def test_socket_activation(workdir: Path) -> None:
    path = workdir / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    fd = listener.fileno()
    h = HelperProc(workdir, socket_path=workdir / "unused" / "x.sock", pass_fds=(fd,))
    # sd_listen_fds protocol: the socket as fd 3, LISTEN_PID = the server's own pid
    h.cmd = ["bash", "-c", f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "bash", *h.cmd]
    try:
        h.start()
    finally:
        listener.close()
    try:
        assert HelperClient(path).call("status", {})["pid"] == h.pid
        assert not (workdir / "unused").exists()  # --socket ignored when activated
    finally:
        assert h.stop() == 0
    assert path.exists()  # the activated socket belongs to systemd: not unlinked


def test_socket_activation_by_systemd_socket_activate(workdir: Path) -> None:
    """systemd's own implementation of the protocol: it listens, and execs the helper on the first
    connection with LISTEN_FDS/LISTEN_PID set."""
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate not installed")
    path = workdir / "activated.sock"
    h = HelperProc(workdir, socket_path=workdir / "unused" / "x.sock")
    h.cmd = [tool, "-l", str(path), "-E", "NOTIFY_SOCKET", *h.cmd]  # it drops NOTIFY_SOCKET otherwise
    h.start(expect_ready=False)
    try:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert time.monotonic() < deadline and h.proc is not None and h.proc.poll() is None, h.output()
            time.sleep(0.05)
        assert HelperClient(path, timeout=30).call("status", {})["pid"] == h.pid  # started on demand
        h._read_note(5)
        assert any(n.startswith("READY=1") for n in h.notes)
        assert not (workdir / "unused").exists()
    finally:
        assert h.stop() == 0, h.output()


def test_notify_reports_ready_and_stopping(workdir: Path) -> None:
    h = start(workdir)
    assert any(n.startswith("READY=1") and f"MAINPID={h.pid}" in n for n in h.notes)
    assert h.stop() == 0


# ---- non-root peers (polkit unreachable on purpose; real polkit: tests/kernel/test_auth.py) ----------------


def test_non_root_denied_when_polkit_unreachable(workdir: Path) -> None:
    h = start(workdir, group="nogroup", env={"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={workdir}/no-bus"})
    code = f"""
from img_helper.client import HelperClient, PolkitUnavailable
try:
    HelperClient({str(h.socket_path)!r}).call("status", {{}})
    print("allowed")
except PolkitUnavailable as e:
    print(e.code)
"""
    try:
        r = run_as_nobody(code)
        assert r.stdout.strip() == "polkit-unavailable", r.stderr
        still_serving(h)  # root skips polkit
    finally:
        assert h.stop() == 0


def test_non_member_cannot_reach_the_socket(helper: HelperProc, workdir: Path) -> None:
    h = start(workdir, group="root")
    code = f"""
from img_helper.client import HelperClient, NotAuthorized
try:
    HelperClient({str(h.socket_path)!r}).call("status", {{}})
except NotAuthorized as e:
    print(type(e).__name__, "group img" in e.message)
"""
    try:
        r = run_as_nobody(code)
        assert r.stdout.strip() == "NotAuthorized True", r.stderr
    finally:
        assert h.stop() == 0


# ---- client ------------------------------------------------------------------------------------------------


def test_client_without_helper_says_how_to_start_it(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMG_HELPER_SOCKET", str(workdir / "none.sock"))
    with pytest.raises(HelperUnavailable) as ei:
        HelperClient().call("status", {})
    assert "img-helper.socket" in ei.value.message and str(workdir / "none.sock") in ei.value.message
    assert issubclass(PolkitUnavailable, NotAuthorized)


def test_client_import_is_cheap() -> None:
    """The frontend imports the client on every command: it must pull in no heavy module. (How fast that
    is, is measured by bench/rerun.sh, not asserted here: timings on a shared machine are not tests.)"""
    code = "import json, sys; import img_helper.client; print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([PY, "-c", code], capture_output=True, text=True,
                                           check=True).stdout))
    heavy = {"jeepney", "click", "cffi", "img_helper.server", "img_helper.auth", "logging", "threading",
             "dataclasses", "inspect", "asyncio"}
    assert heavy.isdisjoint(loaded), heavy & loaded
