"""The wire protocol in isolation: request schema (each rejection names its field) and the frame reader
over a real socketpair (oversized, truncated, stalled, garbage frames; too many fds)."""

from __future__ import annotations

import array
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from img_helper import protocol as P

CHAIN = "sha256:" + "ab" * 32
CHAIN2 = "sha256:" + "cd" * 32


def req(verb: str = "status", args: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"v": 1, "id": 7, "verb": verb, "args": {} if args is None else args, **extra}


def ensure_args(**over: Any) -> dict[str, Any]:
    a: dict[str, Any] = {"chain_id": CHAIN, "parent_chain_id": None, "blob_fd": 0, "offset": 0, "length": -1,
                         "blob_sha256": "ef" * 32}
    a.update(over)
    return {k: v for k, v in a.items() if v is not ...}


def rejected(obj: Any, n_fds: int = 0) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as ei:
        P.parse_request(obj, n_fds)
    return ei.value


# ---- schema ----


def test_valid_requests_parse_with_defaults() -> None:
    r = P.parse_request(req("ensure_layer", ensure_args(offset=..., length=...)), 1)
    assert (r.id, r.verb, r.args["offset"], r.args["length"]) == (7, "ensure_layer", 0, -1)
    assert r.allow_interaction is False
    r = P.parse_request(req("activate", {"chain_id": CHAIN, "name": "web-1"}, allow_interaction=True), 0)
    assert r.allow_interaction and r.args == {"chain_id": CHAIN, "name": "web-1"}
    assert P.parse_request(req("list"), 0).spec.method == "list_devices"


def test_unknown_verb_rejected() -> None:
    e = rejected(req("format_disk"))
    assert (e.code, e.field) == ("bad-request", "verb")


@pytest.mark.parametrize("field", ["uid", "pid", "gid", "user"])
def test_identity_claimed_in_envelope_rejected(field: str) -> None:
    e = rejected(req("status", **{field: 0}))
    assert (e.code, e.field) == ("bad-request", field)


def test_identity_claimed_in_args_rejected() -> None:
    e = rejected(req("deactivate", {"name": "x", "uid": 0}))
    assert (e.code, e.field) == ("bad-request", "args.uid")


@pytest.mark.parametrize(("args", "field"), [
    (ensure_args(offset="0"), "args.offset"),
    (ensure_args(offset=True), "args.offset"),  # a bool is not an integer here
    (ensure_args(offset=1.5), "args.offset"),
    (ensure_args(offset=-1), "args.offset"),
    (ensure_args(length=-2), "args.length"),
    (ensure_args(chain_id="sha256:XYZ"), "args.chain_id"),
    (ensure_args(chain_id=None), "args.chain_id"),
    (ensure_args(chain_id=..., ), "args.chain_id"),
    (ensure_args(parent_chain_id=5), "args.parent_chain_id"),
    (ensure_args(blob_sha256="md5:00"), "args.blob_sha256"),
    (ensure_args(blob_fd=1), "args.blob_fd"),  # index past the one fd passed
    (ensure_args(blob_fd=-1), "args.blob_fd"),
])
def test_bad_argument_types_rejected_naming_the_field(args: dict[str, Any], field: str) -> None:
    e = rejected(req("ensure_layer", args), n_fds=1)
    assert (e.code, e.field) == ("bad-request", field)


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "-rf", "x" * 200, "sp ace", "nul\0"])
def test_bad_activation_names_rejected(name: str) -> None:
    e = rejected(req("activate", {"chain_id": CHAIN, "name": name}))
    assert (e.code, e.field) == ("bad-request", "args.name")


@pytest.mark.parametrize(("obj", "code", "field"), [
    ([1, 2], "bad-request", ""),
    ({"id": 1, "verb": "status"}, "bad-request", "v"),
    (req(v=2), "unsupported-version", "v"),
    (req(v=True), "unsupported-version", "v"),
    (req(id="1"), "bad-request", "id"),
    (req(id=True), "bad-request", "id"),
    (req(id=-1), "bad-request", "id"),
    (req(verb=None), "bad-request", "verb"),
    (req(args=[]), "bad-request", "args"),
    (req(allow_interaction=1), "bad-request", "allow_interaction"),
])
def test_bad_envelope_rejected(obj: Any, code: str, field: str) -> None:
    e = rejected(obj)
    assert (e.code, e.field) == (code, field)


def test_fds_to_a_verb_that_takes_none_rejected() -> None:
    assert rejected(req("status"), n_fds=1).field == "fds"


def test_fd_count_must_match_the_verb() -> None:
    assert rejected(req("ensure_layer", ensure_args()), n_fds=2).field == "fds"
    assert rejected(req("ensure_layer", ensure_args()), n_fds=0).field == "args.blob_fd"


def test_polkit_action_ids() -> None:
    assert P.polkit_action("ensure_layer") == "io.github.img.ensure-layer"
    assert P.polkit_action("list") == "io.github.img.list"


# ---- frames ----


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_frame_roundtrip_with_fds(pair: tuple[socket.socket, socket.socket], tmp_path: Any) -> None:
    a, b = pair
    f = tmp_path / "blob"
    f.write_bytes(b"x")
    fd = os.open(f, os.O_RDONLY)
    try:
        P.send_frame(a, req("status"), [fd])
    finally:
        os.close(fd)
    obj, fds = P.FrameReader(b).read(1, 1)
    assert obj == req("status") and len(fds) == 1
    assert os.read(fds[0], 1) == b"x"
    assert os.get_inheritable(fds[0]) is False  # MSG_CMSG_CLOEXEC
    P.close_fds(fds)


def test_oversized_frame_refused_before_reading_it(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", P.MAX_REQUEST_BYTES + 1))
    with pytest.raises(P.ProtocolError) as ei:
        P.FrameReader(b).read(1, 1)
    assert ei.value.code == "bad-frame" and "exceeds" in ei.value.message


def test_truncated_frame_is_peer_closed_partial(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(P.encode(req())[:-3])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(P.PeerClosed) as ei:
        P.FrameReader(b).read(1, 1)
    assert ei.value.partial


def test_truncated_header_is_peer_closed_partial(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"\0\0")
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(P.PeerClosed) as ei:
        P.FrameReader(b).read(1, 1)
    assert ei.value.partial


def test_clean_close_between_frames_is_not_partial(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(P.PeerClosed) as ei:
        P.FrameReader(b).read(1, 1)
    assert not ei.value.partial


def test_stall_mid_frame_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(P.encode(req())[:6])
    t0 = time.monotonic()
    with pytest.raises(P.FrameTimeout):
        P.FrameReader(b).read(idle_timeout=10, frame_timeout=0.3)
    assert time.monotonic() - t0 < 2


def test_slow_drip_frame_times_out_overall(pair: tuple[socket.socket, socket.socket]) -> None:
    """A client dripping one byte at a time can't keep a frame open past frame_timeout."""
    a, b = pair
    frame = P.encode(req())
    stop = threading.Event()

    def drip() -> None:
        for byte in frame[:-1]:
            if stop.wait(0.05):
                return
            a.send(bytes([byte]))

    t = threading.Thread(target=drip)
    t.start()
    try:
        with pytest.raises(P.FrameTimeout):
            P.FrameReader(b).read(idle_timeout=5, frame_timeout=0.5)
    finally:
        stop.set()
        t.join()


def test_idle_without_a_frame_is_timeout_error(pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(TimeoutError):
        P.FrameReader(pair[1]).read(idle_timeout=0.1, frame_timeout=5)


@pytest.mark.parametrize("body", [b"\xff\xfe garbage", b"{not json", b'{"v":1,"id":', b"[" * 100000])
def test_garbage_body_is_bad_frame(pair: tuple[socket.socket, socket.socket], body: bytes) -> None:
    a, b = pair
    threading.Thread(target=a.sendall, args=(struct.pack(">I", len(body)) + body,), daemon=True).start()
    with pytest.raises(P.ProtocolError) as ei:
        P.FrameReader(b).read(1, 1)
    assert ei.value.code == "bad-frame"


def test_empty_frame_is_bad_frame(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", 0))
    with pytest.raises(P.ProtocolError) as ei:
        P.FrameReader(b).read(1, 1)
    assert ei.value.code == "bad-frame"


def test_too_many_fds_refused_and_all_received_fds_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        before = open_fd_count()
        a.sendmsg([P.encode(req())], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", [r] * (P.MAX_FDS + 1)))])
        with pytest.raises(P.ProtocolError) as ei:
            P.FrameReader(b).read(1, 1)
        assert (ei.value.code, ei.value.field) == ("bad-fd", "fds")
        assert open_fd_count() == before  # nothing leaked into the reader
    finally:
        os.close(r)
        os.close(w)


def test_fds_split_across_sendmsgs_still_counted(pair: tuple[socket.socket, socket.socket]) -> None:
    """fds attached to several pieces of one frame add up against the limit."""
    a, b = pair
    frame = P.encode(req())
    r, w = os.pipe()
    try:
        before = open_fd_count()
        a.sendmsg([frame[:3]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r] * 5))])
        a.sendmsg([frame[3:]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r] * 5))])
        with pytest.raises(P.ProtocolError) as ei:
            P.FrameReader(b).read(1, 1)
        assert ei.value.code == "bad-fd"
        assert open_fd_count() == before
    finally:
        os.close(r)
        os.close(w)


def _mutations(rng: Any, obj: Any, depth: int = 0) -> Any:
    """A randomly damaged copy of a request: types swapped, keys added/dropped, values replaced."""
    junk = [None, True, False, 0, -1, 2**64, 1.5, float("inf"), "", "x" * 300, [], {}, [1, "a"], {"uid": 0},
            "sha256:" + "0" * 64, "\0", "../", -(2**63)]
    if isinstance(obj, dict) and depth < 3:
        out = {k: _mutations(rng, v, depth + 1) if rng.random() < 0.3 else v for k, v in obj.items()}
        if out and rng.random() < 0.2:
            out.pop(rng.choice(list(out)))
        if rng.random() < 0.2:
            out[rng.choice(["uid", "pid", "x", "args", "verb", "v", "id"])] = rng.choice(junk)
        return out
    return rng.choice(junk) if rng.random() < 0.7 else obj


def test_random_damaged_requests_only_raise_protocol_errors() -> None:
    import random

    rng = random.Random(1234)
    seeds = [req("ensure_layer", ensure_args()), req("activate", {"chain_id": CHAIN, "name": "a"}),
             req("deactivate", {"name": "a"}), req("delete_layer", {"chain_id": CHAIN2}), req("list")]
    accepted = 0
    for i in range(5000):
        obj = _mutations(rng, seeds[i % len(seeds)])
        try:
            r = P.parse_request(obj, rng.choice([0, 1, 2]))
        except P.ProtocolError as e:
            assert e.code in ("bad-request", "unsupported-version") and isinstance(e.field, str)
            continue
        accepted += 1
        # whatever got through is exactly what the schema allows
        spec = P.VERBS[r.verb]
        assert set(r.args) == set(spec.args)
        for name, f in spec.args.items():
            v = r.args[name]
            want = int if f.kind in ("int", "fd") else str
            assert (v is None and f.nullable) or type(v) is want
    assert accepted > 0


# ---- JSON the strict schema must not let through ----


def test_duplicate_keys_attack() -> None:
    """json.loads keeps the LAST of duplicate keys, another parser may keep the first: a frame that reads as
    one verb to a logger or proxy and as another to the helper is refused outright."""
    for body in (b'{"v":1,"id":1,"verb":"status","verb":"delete_layer","args":{}}',
                 b'{"v":1,"id":1,"verb":"activate","args":{"name":"a","name":"b","chain_id":"x"}}'):
        with pytest.raises(P.ProtocolError) as ei:
            P.decode(body)
        assert ei.value.code == P.BAD_FRAME and "duplicate" in ei.value.message


def test_lone_surrogate_in_a_name_attack() -> None:
    """JSON may escape a lone UTF-16 surrogate (not encodable as UTF-8); an error naming it must still be
    sendable, or the client gets no reply at all."""
    obj = P.decode(b'{"v":1,"id":7,"verb":"status","args":{"\\ud800":1}}')
    e = rejected(obj)
    assert e.code == P.BAD_REQUEST
    frame = P.encode({"v": 1, "id": 7, "ok": False, "error": e.to_error()})
    assert P.decode(frame[4:])["error"]["field"] == "args.\ud800"


def test_huge_integer_literal_attack() -> None:
    """A 100k-digit integer must not cost quadratic time to convert; it is a bad frame."""
    t0 = time.monotonic()
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(b'{"v":1,"id":' + b"9" * 100_000 + b',"verb":"status"}')
    assert ei.value.code == P.BAD_FRAME and time.monotonic() - t0 < 1


def test_json_allocation_bomb_frame_attack() -> None:
    """1 MiB of '[[],[],...]' parses into 22 MB of objects; 64 connections doing it at once cost the root
    helper ~1.4 GB. Requests are small (the largest, ensure_layer, is under 1 KiB): frames are capped at
    64 KiB, so a connection's parse can cost at most a few MB."""
    assert P.MAX_REQUEST_BYTES <= 64 << 10
    largest = P.encode({"v": 1, "id": (1 << 53) - 1, "verb": "ensure_layer", "allow_interaction": True,
                        "args": {"chain_id": CHAIN, "parent_chain_id": CHAIN2, "blob_fd": 0,
                                 "offset": (1 << 63) - 1, "length": (1 << 63) - 1, "blob_sha256": CHAIN}})
    assert len(largest) < P.MAX_REQUEST_BYTES // 32
