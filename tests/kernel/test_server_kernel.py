"""`img-helper serve` end to end in the guest: the real server with the real Service on a loop-backed
dm-thin pool, real polkit (tests/fixtures/polkit.py), clients running as img-member / img-outsider."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from img_helper import protocol as P
from img_helper.client import BadFd, BadRequest, HelperClient
from tests.fixtures.dmpool import ThinPool, dm_names
from tests.fixtures.polkit import PolkitEnv, TestUser
from tests.host.test_server_polkit import CALL, private_bus_without_polkit
from tests.host.test_server_standin import REPO, HelperProc

pytestmark = pytest.mark.kernel

IMG_HELPER = str(Path(sys.executable).parent / "img-helper")


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


class Blob:
    def __init__(self, d: Path, name: str, data: bytes, parent: str | None = None) -> None:
        self.path = d / name
        self.path.write_bytes(data)
        self.path.chmod(0o644)
        self.sha = hashlib.sha256(data).hexdigest()
        self.parent = parent
        self.chain_id = "sha256:" + (self.sha if parent is None else
                                     hashlib.sha256(f"{parent} sha256:{self.sha}".encode()).hexdigest())

    def args(self) -> dict[str, Any]:
        return {"chain_id": self.chain_id, "parent_chain_id": self.parent, "blob_fd": 0,
                "blob_sha256": "sha256:" + self.sha}


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="img-srvk-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.fixture
def serve(thin_pool: ThinPool, workdir: Path) -> Iterator[Callable[..., HelperProc]]:
    """Starts `img-helper serve` on the test pool (group img unless told); stops them all at the end."""
    procs: list[HelperProc] = []

    def start(group: str = "img", env: dict[str, str] | None = None, expect_ready: bool = True,
              socket_path: Path | None = None) -> HelperProc:
        h = HelperProc(workdir, cmd=[IMG_HELPER, "serve", "--pool", thin_pool.name, "--group", group],
                       env=env, socket_path=socket_path)
        procs.append(h)
        return h.start(timeout=60, expect_ready=expect_ready)

    yield start
    for h in procs:
        if h.proc is not None and h.proc.poll() is None:
            assert h.stop(timeout=60) == 0, h.output()


def root(h: HelperProc) -> HelperClient:
    return HelperClient(h.socket_path, timeout=120)


def call_as(polkit: PolkitEnv, user: TestUser, h: HelperProc, verb: str, args: dict[str, Any] | None = None,
            blob: Path | None = None, **extra: Any) -> dict[str, Any]:
    """Run one client call as user (the blob, if any, opened by that user and passed as fd 0)."""
    code = CALL
    if blob is not None:  # open the blob as the user and pass it
        open_blob = f"fds=[os.open({str(blob)!r}, os.O_RDONLY)],"
        code = CALL.replace("r = HelperClient(path, timeout=60).call(verb, args,",
                            f"r = HelperClient(path, timeout=60).call(verb, args, {open_blob}")
        code = code.replace("import json, sys", "import json, os, sys")
    r = polkit.run_as(user, [sys.executable, "-c", code, str(h.socket_path), verb, json.dumps(args or {}),
                             json.dumps(extra)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0 and r.stdout, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def our_devices(pool: ThinPool) -> set[str]:
    return {n for n in dm_names() if n != pool.name}


def test_every_verb_end_to_end_as_member_and_repeats_create_nothing(polkit: PolkitEnv, thin_pool: ThinPool,
                                                                     serve: Callable[..., HelperProc],
                                                                     workdir: Path) -> None:
    h = serve()
    base = Blob(workdir, "l1.tar", layer_tar({"etc/hello": b"hello\n", "bin/tool": b"\x7fELF" + b"x" * 5000}))
    top = Blob(workdir, "l2.tar", layer_tar({"etc/hello": b"bye\n"}), parent=base.chain_id)
    m = polkit.member
    r1 = call_as(polkit, m, h, "ensure_layer", base.args(), blob=base.path)
    assert r1["ok"] and r1["result"]["created"] is True, r1
    r2 = call_as(polkit, m, h, "ensure_layer", top.args(), blob=top.path)
    assert r2["ok"] and r2["result"]["created"] is True, r2
    devices = our_devices(thin_pool)
    again = call_as(polkit, m, h, "ensure_layer", top.args(), blob=top.path)
    assert again["result"] == {**r2["result"], "created": False}
    act = call_as(polkit, m, h, "activate", {"chain_id": top.chain_id, "name": "web"})
    assert act["ok"] and act["result"]["created"] is True, act
    assert os.path.exists(act["result"]["device"])
    act2 = call_as(polkit, m, h, "activate", {"chain_id": top.chain_id, "name": "web"})
    assert act2["result"]["created"] is False and act2["result"]["thin_id"] == act["result"]["thin_id"]
    assert len(our_devices(thin_pool) - devices) == 1  # the activation, once
    listed = call_as(polkit, m, h, "list")["result"]
    assert {la["chain_id"] for la in listed["layers"]} == {base.chain_id, top.chain_id}
    assert [a["name"] for a in listed["activations"]] == ["web"]
    st = call_as(polkit, m, h, "status")["result"]
    assert st["pool"]["name"] == thin_pool.name and st["pool"]["data_used_bytes"] > 0
    assert call_as(polkit, m, h, "deactivate", {"name": "web"})["result"]["removed"] is True
    assert call_as(polkit, m, h, "deactivate", {"name": "web"})["result"]["removed"] is False
    for b in (top, base):
        assert call_as(polkit, m, h, "delete_layer", {"chain_id": b.chain_id})["result"]["removed"] is True
        assert call_as(polkit, m, h, "delete_layer", {"chain_id": b.chain_id})["result"]["removed"] is False
    assert our_devices(thin_pool) == set()


def test_outsider_denied_mutating_verb_and_nothing_changes(polkit: PolkitEnv, thin_pool: ThinPool,
                                                           serve: Callable[..., HelperProc],
                                                           workdir: Path) -> None:
    h = serve(group="img-outsider")  # the outsider gets past the socket: polkit alone must say no
    b = Blob(workdir, "l.tar", layer_tar({"f": b"x"}))
    r = call_as(polkit, polkit.outsider, h, "ensure_layer", b.args(), blob=b.path)
    assert (r["type"], r["error"]["code"]) == ("NotAuthorized", "not-authorized")
    r = call_as(polkit, polkit.outsider, h, "activate", {"chain_id": b.chain_id, "name": "x"})
    assert r["error"]["code"] == "not-authorized"
    # a uid (or pid) claimed in the request is refused, never used
    for claim in ({"uid": 0}, {"pid": 1}):
        req = {"v": 1, "id": 1, "verb": "delete_layer", "args": {"chain_id": b.chain_id}, **claim}
        r = call_as(polkit, polkit.outsider, h, "delete_layer", raw=req)
        assert r["error"]["code"] == "bad-request"
    assert root(h).call("list", {}) == {"layers": [], "activations": []}
    assert our_devices(thin_pool) == set()


def test_member_cannot_reach_socket_of_other_group_and_outsider_cannot_reach_img(
        polkit: PolkitEnv, serve: Callable[..., HelperProc]) -> None:
    h = serve(group="img")
    r = call_as(polkit, polkit.outsider, h, "status")
    assert r["type"] == "NotAuthorized" and "group img" in r["error"]["message"]


def test_writable_and_non_regular_fds_refused(serve: Callable[..., HelperProc], thin_pool: ThinPool,
                                              workdir: Path) -> None:
    h = serve()
    b = Blob(workdir, "l.tar", layer_tar({"f": b"x"}))
    r, w = os.pipe()
    fds = {"o_rdwr": os.open(b.path, os.O_RDWR), "o_wronly": os.open(b.path, os.O_WRONLY),
           "o_path": os.open(b.path, os.O_PATH), "pipe": r, "directory": os.open(workdir, os.O_RDONLY)}
    try:
        for kind, fd in fds.items():
            with pytest.raises(BadFd) as ei:
                root(h).call("ensure_layer", b.args(), fds=[fd])
            assert ei.value.field == "fds[0]", kind
    finally:
        for fd in [*fds.values(), w]:
            os.close(fd)
    assert root(h).call("list", {})["layers"] == [] and our_devices(thin_pool) == set()


def _raw(h: HelperProc, data: bytes) -> list[Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(h.socket_path))
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        reader, out = P.FrameReader(s, max_bytes=P.MAX_REPLY_BYTES, max_fds=0), []
        while True:
            try:
                out.append(reader.read(30, 30)[0])
            except (P.PeerClosed, ConnectionResetError):
                return out
    finally:
        s.close()


def test_garbage_oversized_truncated_frames_leave_helper_serving(serve: Callable[..., HelperProc]) -> None:
    h = serve()
    good = P.encode({"v": 1, "id": 1, "verb": "status", "args": {}})
    assert _raw(h, b"\x00\x00\x00\x05garbage")[-1]["error"]["code"] == "bad-frame"
    assert _raw(h, struct.pack(">I", 1 << 30) + b"x" * 1000)[-1]["error"]["code"] == "bad-frame"
    assert _raw(h, good[:9]) == []
    with pytest.raises(BadRequest):
        root(h).call("mkfs", {})
    assert root(h).call("status", {})["pool"]["name"]


def test_stalled_client_does_not_block_a_layer_build(serve: Callable[..., HelperProc], workdir: Path) -> None:
    h = serve()
    staller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staller.connect(str(h.socket_path))
    staller.sendall(P.encode({"v": 1, "id": 1, "verb": "status", "args": {}})[:5])
    b = Blob(workdir, "l.tar", layer_tar({"f": b"x" * 100}))
    fd = os.open(b.path, os.O_RDONLY)
    try:
        t0 = time.monotonic()
        assert root(h).call("ensure_layer", b.args(), fds=[fd])["created"] is True
        assert time.monotonic() - t0 < 9  # not queued behind the staller (cut off after 10 s)
    finally:
        os.close(fd)
        staller.close()


def test_parallel_layer_builds_on_different_chains(serve: Callable[..., HelperProc], workdir: Path) -> None:
    h = serve()
    blobs = [Blob(workdir, f"p{i}.tar", layer_tar({f"f{i}": os.urandom(2000)})) for i in range(3)]
    results: list[Any] = []

    def build(b: Blob) -> None:
        fd = os.open(b.path, os.O_RDONLY)
        try:
            results.append(root(h).call("ensure_layer", b.args(), fds=[fd]))
        except Exception as e:
            results.append(e)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=build, args=(b,)) for b in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, dict) and r["created"] for r in results), results
    assert len({r["thin_id"] for r in results}) == 3


def test_kill9_mid_layer_then_restart(serve: Callable[..., HelperProc], thin_pool: ThinPool,
                                      workdir: Path) -> None:
    h = serve()
    b = Blob(workdir, "big.tar", layer_tar({f"d/f{i}": os.urandom(4096) for i in range(400)}))
    fd = os.open(b.path, os.O_RDONLY)
    killed = threading.Event()

    def on_progress(_: dict[str, Any]) -> None:
        if not killed.is_set():
            killed.set()
            os.kill(h.pid, signal.SIGKILL)

    try:
        with pytest.raises(Exception):  # noqa: B017 -- the connection dies with the helper
            root(h).call("ensure_layer", b.args(), fds=[fd], on_progress=on_progress)
        assert h.stop() == -signal.SIGKILL
        h2 = serve()  # the lock died with the process; the Service reconciles on start
        r = root(h2).call("ensure_layer", b.args(), fds=[fd])
        assert r["chain_id"] == b.chain_id
        again = root(h2).call("ensure_layer", b.args(), fds=[fd])
        assert again == {**r, "created": False}
        listed = root(h2).call("list", {})
        assert [la["chain_id"] for la in listed["layers"]] == [b.chain_id]
    finally:
        os.close(fd)


def test_second_instance_refused(serve: Callable[..., HelperProc], workdir: Path) -> None:
    h = serve()
    second = serve(expect_ready=False, socket_path=workdir / "second.sock")
    assert second.proc is not None and second.proc.wait(60) == 1
    assert "another img-helper instance holds" in second.output()
    assert root(h).call("status", {})["pool"]["name"]


def test_polkit_unavailable_denies_member(polkit: PolkitEnv, serve: Callable[..., HelperProc]) -> None:
    """A system bus on which polkit is not running (and can't be activated)."""
    with private_bus_without_polkit() as bus:
        h = serve(env={"DBUS_SYSTEM_BUS_ADDRESS": bus})
        r = call_as(polkit, polkit.member, h, "deactivate", {"name": "x"})
        assert (r["type"], r["error"]["code"]) == ("PolkitUnavailable", "polkit-unavailable")
        assert root(h).call("deactivate", {"name": "x"})["removed"] is False  # root needs no polkit
