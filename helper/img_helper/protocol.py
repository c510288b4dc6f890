"""The helper's wire protocol: versioned, length-prefixed JSON frames over a Unix stream socket, with
file descriptors passed by SCM_RIGHTS in the same sendmsg as the frame's first bytes.

Frame: 4-byte big-endian unsigned length N, then N bytes of UTF-8 JSON (one object).

    request   {"v": 1, "id": N, "verb": "...", "args": {...}, "allow_interaction": false}
    progress  {"v": 1, "id": N, "event": "progress", "data": {...}}         (zero or more, before the reply)
    reply     {"v": 1, "id": N, "ok": true, "result": {...}}
              {"v": 1, "id": N, "ok": false, "error": {"code": "...", "message": "...", "field": "..."?}}

Each verb has a strict argument schema (VERBS); fds are referenced from args by index into the list
of passed fds. This module is imported by the unprivileged client too: stdlib-only, cheap imports.
"""

from __future__ import annotations

import array
import json
import os
import re
import socket
import struct
import time
from typing import Any

from img_helper.strictjson import DuplicateKeyError, no_duplicate_keys

VERSION = 1
HEADER = struct.Struct(">I")
# A larger request frame is refused and the connection closed. Requests are < 1 KiB; a 1 MiB frame of
# "[[],[],...]" would parse into 22 MB of objects, per connection.
MAX_REQUEST_BYTES = 64 << 10
MAX_REPLY_BYTES = 64 << 20  # the client's bound on what the helper may send back
MAX_FDS = 8  # fds per request frame; more and the frame is refused
DEFAULT_SOCKET = "/run/img/helper.sock"
SOCKET_ENV = "IMG_HELPER_SOCKET"

# Error codes on the wire (error.code). Service errors carry their own codes (e.g. "escape", "digest").
BAD_FRAME = "bad-frame"  # undecodable / oversized / truncated frame: the connection is closed after it
BAD_REQUEST = "bad-request"  # schema violation; error.field names the offending field
BAD_FD = "bad-fd"  # a passed fd is not a regular file opened read-only
UNSUPPORTED_VERSION = "unsupported-version"
NOT_AUTHORIZED = "not-authorized"
POLKIT_UNAVAILABLE = "polkit-unavailable"
PEER_GONE = "peer-gone"  # the calling process exited (or its pid was recycled) during the check
TIMEOUT = "timeout"
BUSY = "busy"  # too many connections
SHUTTING_DOWN = "shutting-down"
INTERNAL = "internal"


class ProtocolError(Exception):
    """A frame-level or schema-level violation, sent back as error {code, message, field}."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    def to_error(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        return err


class FrameTimeout(ProtocolError):
    def __init__(self, message: str) -> None:
        super().__init__(TIMEOUT, message)


class PeerClosed(Exception):
    """The peer closed the connection; `partial` says whether it did so inside a frame (truncation)."""

    def __init__(self, partial: bool) -> None:
        super().__init__("peer closed the connection" + (" mid-frame" if partial else ""))
        self.partial = partial


# ---- argument schemas ---------------------------------------------------------------------------

CHAIN_ID_RE = re.compile(r"sha256:[0-9a-f]{64}")
SHA256_RE = re.compile(r"(sha256:)?[0-9a-f]{64}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,118}")  # a DM name suffix: fits DM_NAME_LEN


class Field:
    """One argument: kind "str" | "int" | "fd" (an index into the passed fds)."""

    __slots__ = ("default", "kind", "max", "min", "nullable", "optional", "pattern")

    def __init__(self, kind: str, pattern: re.Pattern[str] | None = None, nullable: bool = False,
                 optional: bool = False, default: Any = None, min: int | None = None,
                 max: int | None = None) -> None:
        self.kind, self.pattern, self.nullable, self.optional = kind, pattern, nullable, optional
        self.default, self.min, self.max = default, min, max


class VerbSpec:
    """A verb: the Service method it calls, its argument schema, whether it changes the pool, and its
    per-request time limit in seconds (lock wait + the call; polkit's check has its own timeout)."""

    __slots__ = ("args", "method", "mutating", "timeout")

    def __init__(self, method: str, args: dict[str, Field] | None = None, mutating: bool = False,
                 timeout: float = 60.0) -> None:
        self.method, self.args, self.mutating, self.timeout = method, args or {}, mutating, timeout

    @property
    def n_fds(self) -> int:
        return sum(1 for f in self.args.values() if f.kind == "fd")


_CHAIN = Field("str", CHAIN_ID_RE)
VERBS: dict[str, VerbSpec] = {
    "status": VerbSpec("status", timeout=30),
    "list": VerbSpec("list_devices", timeout=30),
    "ensure_layer": VerbSpec(
        "ensure_layer",
        {
            "chain_id": _CHAIN,
            "parent_chain_id": Field("str", CHAIN_ID_RE, nullable=True),
            "blob_fd": Field("fd"),
            "offset": Field("int", optional=True, default=0, min=0, max=(1 << 63) - 1),
            "length": Field("int", optional=True, default=-1, min=-1, max=(1 << 63) - 1),
            "blob_sha256": Field("str", SHA256_RE),
        },
        mutating=True,
        timeout=3600,
    ),
    "activate": VerbSpec("activate", {"chain_id": _CHAIN, "name": Field("str", NAME_RE)}, True, 300),
    "deactivate": VerbSpec("deactivate", {"name": Field("str", NAME_RE)}, True, 300),
    "delete_layer": VerbSpec("delete_layer", {"chain_id": _CHAIN}, True, 300),
}


def polkit_action(verb: str) -> str:
    return "io.github.img." + verb.replace("_", "-")


class Request:
    """A validated request; args' fd fields hold indexes into fds."""

    __slots__ = ("allow_interaction", "args", "fds", "id", "verb")

    def __init__(self, id: int, verb: str, args: dict[str, Any], allow_interaction: bool = False,
                 fds: list[int] | None = None) -> None:
        self.id, self.verb, self.args, self.allow_interaction = id, verb, args, allow_interaction
        self.fds: list[int] = fds if fds is not None else []

    @property
    def spec(self) -> VerbSpec:
        return VERBS[self.verb]


_ENVELOPE = {"v", "id", "verb", "args", "allow_interaction"}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def request_id_of(obj: Any) -> int | None:
    """The request id, if the frame had a usable one (so an error reply can name it)."""
    if isinstance(obj, dict) and _is_int(obj.get("id")) and 0 <= obj["id"] < (1 << 53):
        return int(obj["id"])
    return None


def parse_request(obj: Any, n_fds: int) -> Request:
    """Validate a decoded request frame strictly; raise ProtocolError naming the offending field."""
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_REQUEST, "a request is a JSON object", "")
    if "v" not in obj:
        raise ProtocolError(BAD_REQUEST, "missing protocol version", "v")
    if not _is_int(obj["v"]) or obj["v"] != VERSION:
        msg = f"protocol version {str(obj['v'])[:20]!r} not supported (want {VERSION})"
        raise ProtocolError(UNSUPPORTED_VERSION, msg, "v")
    for k in obj:
        if k not in _ENVELOPE:
            raise ProtocolError(BAD_REQUEST, f"unknown field {k!r}", str(k))
    if request_id_of(obj) is None:
        raise ProtocolError(BAD_REQUEST, "id must be an integer in [0, 2^53)", "id")
    verb = obj.get("verb")
    if not isinstance(verb, str):
        raise ProtocolError(BAD_REQUEST, "verb must be a string", "verb")
    spec = VERBS.get(verb)
    if spec is None:
        raise ProtocolError(BAD_REQUEST, f"unknown verb {verb[:64]!r}", "verb")
    allow = obj.get("allow_interaction", False)
    if not isinstance(allow, bool):
        raise ProtocolError(BAD_REQUEST, "allow_interaction must be a boolean", "allow_interaction")
    raw = obj.get("args", {})
    if not isinstance(raw, dict):
        raise ProtocolError(BAD_REQUEST, "args must be an object", "args")
    args: dict[str, Any] = {}
    for k in raw:
        if k not in spec.args:
            raise ProtocolError(BAD_REQUEST, f"unknown argument {str(k)[:64]!r} for {verb}", f"args.{k}")
    fd_indexes: set[int] = set()
    for name, f in spec.args.items():
        where = f"args.{name}"
        if name not in raw:
            if f.optional:
                args[name] = f.default
                continue
            raise ProtocolError(BAD_REQUEST, f"missing argument {name!r} for {verb}", where)
        val = raw[name]
        if val is None:
            if not f.nullable:
                raise ProtocolError(BAD_REQUEST, f"{name} must not be null", where)
        elif f.kind == "str":
            if not isinstance(val, str):
                raise ProtocolError(BAD_REQUEST, f"{name} must be a string", where)
            if f.pattern is not None and not f.pattern.fullmatch(val):
                raise ProtocolError(BAD_REQUEST, f"{name} is malformed", where)
        elif f.kind in ("int", "fd"):
            if not _is_int(val):
                raise ProtocolError(BAD_REQUEST, f"{name} must be an integer", where)
            lo, hi = (0, n_fds - 1) if f.kind == "fd" else (f.min, f.max)
            if (lo is not None and val < lo) or (hi is not None and val > hi):
                what = "an index into the passed fds" if f.kind == "fd" else "out of range"
                raise ProtocolError(BAD_REQUEST, f"{name} must be {what}", where)
            if f.kind == "fd":
                fd_indexes.add(val)
        args[name] = val
    if n_fds != len(fd_indexes):
        raise ProtocolError(BAD_REQUEST, f"{verb} takes {spec.n_fds} fd(s), {n_fds} were passed", "fds")
    return Request(id=int(obj["id"]), verb=verb, args=args, allow_interaction=allow)


# ---- frames -------------------------------------------------------------------------------------


def encode(obj: dict[str, Any]) -> bytes:
    # ASCII with \u escapes: a lone surrogate echoed from a request (e.g. in error.field) stays sendable
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except DuplicateKeyError as e:
        raise ProtocolError(BAD_FRAME, f"frame has a {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(BAD_FRAME, f"frame is not UTF-8 JSON: {str(e)[:100]}") from None


def send_frame(sock: socket.socket, obj: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send one frame; fds (if any) ride on the first sendmsg with its first byte."""
    data = memoryview(encode(obj))
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        data = data[sent:]
    if data:
        sock.sendall(data)


class FrameReader:
    """Reads frames from a stream socket, collecting SCM_RIGHTS fds (close-on-exec) that arrive with
    them. Frame-level failures raise ProtocolError / PeerClosed; any fds received are closed then."""

    def __init__(self, sock: socket.socket, max_bytes: int = MAX_REQUEST_BYTES,
                 max_fds: int = MAX_FDS) -> None:
        self.sock = sock
        self.max_bytes = max_bytes
        self.max_fds = max_fds
        self._cmsg_space = socket.CMSG_SPACE(max_fds * 4)

    def read(self, idle_timeout: float | None, frame_timeout: float | None) -> tuple[Any, list[int]]:
        """Wait up to idle_timeout for a frame to start, then up to frame_timeout for all of it.
        Raises TimeoutError if no frame started, PeerClosed on EOF, ProtocolError on a bad frame."""
        fds: list[int] = []
        try:
            self.sock.settimeout(idle_timeout)
            buf = self._recv(HEADER.size, fds)
            if not buf:
                raise PeerClosed(partial=False)
            deadline = None if frame_timeout is None else time.monotonic() + frame_timeout
            buf += self._read_exact(HEADER.size - len(buf), fds, deadline)
            (n,) = HEADER.unpack(buf)
            if n > self.max_bytes:
                raise ProtocolError(BAD_FRAME, f"frame of {n} bytes exceeds the limit of {self.max_bytes}")
            if n == 0:
                raise ProtocolError(BAD_FRAME, "empty frame")
            return decode(self._read_exact(n, fds, deadline)), fds
        except BaseException:
            close_fds(fds)
            raise

    def _read_exact(self, n: int, fds: list[int], deadline: float | None) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FrameTimeout("frame not completed in time")
                self.sock.settimeout(left)
            else:
                self.sock.settimeout(None)
            try:
                data = self._recv(n - len(buf), fds)
            except TimeoutError:
                raise FrameTimeout("frame not completed in time") from None
            if not data:
                raise PeerClosed(partial=True)
            buf += data
        return bytes(buf)

    def _recv(self, n: int, fds: list[int]) -> bytes:
        data, anc, flags, _ = self.sock.recvmsg(n, self._cmsg_space, socket.MSG_CMSG_CLOEXEC)
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(cdata[: len(cdata) - (len(cdata) % got.itemsize)])
                fds.extend(got)
        if flags & socket.MSG_CTRUNC or len(fds) > self.max_fds:
            raise ProtocolError(BAD_FD, f"too many fds (at most {self.max_fds} per request)", "fds")
        return data


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
