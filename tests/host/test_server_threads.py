"""The server when the system refuses it a thread (memory or task limits): a connection or request that
can't get its thread is answered "busy" and leaves nothing behind (no leaked worker slot, no open fd), and
the accept loop keeps serving. Thread creation is made to fail for real: a stack larger than the address
space can't be mapped."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from img_helper import protocol as P
from img_helper.client import HelperBusy, HelperClient
from img_helper.server import Server, ServerLimits
from tests.host.test_server_standin import StandinService

CHAIN = "sha256:" + "ab" * 32


@contextmanager
def no_new_threads() -> Iterator[None]:
    old = threading.stack_size(1 << 47)  # 128 TiB: pthread_create fails with EAGAIN/ENOMEM
    try:
        yield
    finally:
        threading.stack_size(old)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    path = str(tmp_path / "h.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(path)
    listener.listen(16)
    server = Server(listener, StandinService("standin-pool", tmp_path),
                    limits=ServerLimits(shutdown_grace=5, max_workers=4))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server, path
    server.request_stop()
    t.join(10)
    assert not t.is_alive()


def test_thread_exhaustion_at_accept_attack(served: tuple[Server, str]) -> None:
    server, path = served
    with no_new_threads():
        with pytest.raises(HelperBusy):
            HelperClient(path, timeout=10).call("status", {})
    assert HelperClient(path, timeout=10).call("status", {})["version"] == "standin"  # still accepting
    with server._mu:
        assert not server._per_uid or sum(server._per_uid.values()) <= 1


def test_thread_exhaustion_at_dispatch_attack(served: tuple[Server, str], tmp_path: Path) -> None:
    server, path = served
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    P.send_frame(s, {"v": 1, "id": 99, "verb": "status", "args": {}})  # its connection thread is up
    assert P.FrameReader(s, max_fds=0).read(10, 10)[0]["ok"]
    fd = os.open(blob, os.O_RDONLY)
    before = len(os.listdir("/proc/self/fd"))
    try:
        with no_new_threads():
            for i in range(server.limits.max_workers + 2):  # more than there are worker slots
                args = {"chain_id": CHAIN, "parent_chain_id": None, "blob_fd": 0, "blob_sha256": "ab" * 32}
                P.send_frame(s, {"v": 1, "id": i, "verb": "ensure_layer", "args": args}, [fd])
                reply, _ = P.FrameReader(s, max_fds=0).read(10, 10)
                assert reply["error"]["code"] == "busy", reply
    finally:
        os.close(fd)
        s.close()
    assert server.worker_count() == 0  # no slot leaked
    assert len(os.listdir("/proc/self/fd")) <= before - 1  # the passed fds were closed
    assert HelperClient(path, timeout=10).call("status", {})["version"] == "standin"
