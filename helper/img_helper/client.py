"""HelperClient: how the unprivileged frontend talks to the root helper. Cheap to import (stdlib only).

    from img_helper.client import HelperClient, HelperError
    result = HelperClient().call("ensure_layer", {...}, fds=[blob_fd], on_progress=print)

Every failure is a HelperError (code, message); subclasses by kind, so callers can catch what they
handle. Each call uses its own connection (the helper authorizes every request anyway).
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from img_helper import protocol as P


class HelperError(Exception):
    """A request failed. code: the wire error code (or a client-side one: "unavailable", "protocol")."""

    def __init__(self, code: str, message: str, field: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.details = details or {}


class HelperUnavailable(HelperError):
    """No helper answers on the socket."""


class NotAuthorized(HelperError):
    """polkit (or the socket's permissions) said no."""


class PolkitUnavailable(NotAuthorized):
    """polkit can't be reached, so non-root callers are denied."""


class BadRequest(HelperError):
    """The helper refused the request as malformed (error.field says where)."""


class BadFd(BadRequest):
    """A passed fd is not a regular file opened read-only."""


class HelperTimeout(HelperError):
    """The request (or the client's wait) exceeded its time limit."""


class HelperBusy(HelperError):
    """Too many connections, or the helper is shutting down: retry later."""


class ProtocolViolation(HelperError):
    """The helper's reply was not understood, or the connection dropped mid-reply."""


class ServiceError(HelperError):
    """The step itself failed (device-mapper, extraction, ...); code is the step's error code."""


_BY_CODE: dict[str, type[HelperError]] = {
    P.NOT_AUTHORIZED: NotAuthorized,
    P.PEER_GONE: NotAuthorized,
    P.POLKIT_UNAVAILABLE: PolkitUnavailable,
    P.BAD_REQUEST: BadRequest,
    P.BAD_FRAME: BadRequest,
    P.UNSUPPORTED_VERSION: BadRequest,
    P.BAD_FD: BadFd,
    P.TIMEOUT: HelperTimeout,
    P.BUSY: HelperBusy,
    P.SHUTTING_DOWN: HelperBusy,
    P.INTERNAL: ServiceError,
}


def error_from_wire(err: Any) -> HelperError:
    if not isinstance(err, dict) or not isinstance(err.get("code"), str):
        return ProtocolViolation("protocol", f"malformed error from the helper: {str(err)[:200]}")
    code, message = err["code"], str(err.get("message", ""))
    field = err.get("field") if isinstance(err.get("field"), str) else None
    details = err.get("details") if isinstance(err.get("details"), dict) else None
    return _BY_CODE.get(code, ServiceError)(code, message, field, details)


def default_socket_path() -> str:
    return os.environ.get(P.SOCKET_ENV) or P.DEFAULT_SOCKET


class HelperClient:
    _ids = itertools.count(1)

    def __init__(self, socket_path: str | os.PathLike[str] | None = None,
                 timeout: float | None = None) -> None:
        self.socket_path = os.fspath(socket_path) if socket_path is not None else default_socket_path()
        self.timeout = timeout  # default for call(); None = the helper's per-verb limit governs

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(10)
        try:
            s.connect(self.socket_path)
        except PermissionError as e:
            s.close()
            raise NotAuthorized(P.NOT_AUTHORIZED, f"cannot connect to the img helper at {self.socket_path}: "
                                f"{e.strerror}; join group img (sudo usermod -aG img $USER, then log in "
                                "again)") from None
        except OSError as e:
            s.close()
            raise HelperUnavailable("unavailable", f"no img helper at {self.socket_path} ({e.strerror}); "
                                    "start it: sudo systemctl enable --now img-helper.socket (or run "
                                    f"`sudo img-helper serve`), or set ${P.SOCKET_ENV}") from None
        return s

    def call(self, verb: str, args: dict[str, Any] | None = None, fds: Sequence[int] = (),
             on_progress: Callable[[dict[str, Any]], None] | None = None, timeout: float | None = None,
             allow_interaction: bool = False) -> dict[str, Any]:
        """Run one verb; return its result dict, or raise a HelperError subclass."""
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        rid = next(self._ids)
        req = {"v": P.VERSION, "id": rid, "verb": verb, "args": dict(args or {}),
               "allow_interaction": allow_interaction}
        with self.connect() as s:
            try:
                s.settimeout(timeout)
                reader = P.FrameReader(s, max_bytes=P.MAX_REPLY_BYTES, max_fds=0)
                try:
                    P.send_frame(s, req, list(fds))
                except (BrokenPipeError, ConnectionResetError):
                    # the helper refused the frame early (e.g. too large) and closed: read its reason
                    msg, _ = reader.read(1.0, 1.0)
                    raise error_from_wire(msg.get("error") if isinstance(msg, dict) else None) from None
                while True:
                    left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
                    msg, _ = reader.read(left, left)
                    if not isinstance(msg, dict) or msg.get("v") != P.VERSION:
                        raise ProtocolViolation("protocol", f"unexpected frame: {str(msg)[:200]}")
                    if msg.get("event") == "progress":
                        if on_progress is not None and isinstance(msg.get("data"), dict):
                            on_progress(msg["data"])
                        continue
                    if msg.get("id") not in (rid, None):
                        raise ProtocolViolation("protocol", f"reply for request {msg.get('id')}, sent {rid}")
                    if msg.get("ok") is True and isinstance(msg.get("result"), dict):
                        return msg["result"]
                    raise error_from_wire(msg.get("error"))
            except TimeoutError:
                raise HelperTimeout(P.TIMEOUT, f"no reply to {verb} within {timeout} s") from None
            except P.PeerClosed as e:
                raise ProtocolViolation("protocol", f"the helper closed the connection during {verb} "
                                        f"({e}); is it restarting?") from None
            except P.ProtocolError as e:
                if e.code == P.TIMEOUT:
                    raise HelperTimeout(P.TIMEOUT, f"reply to {verb} not completed in time") from None
                raise ProtocolViolation("protocol", f"bad reply from the helper: {e.message}") from None
            except (BrokenPipeError, ConnectionResetError) as e:
                raise ProtocolViolation("protocol", f"the helper dropped the connection during {verb}: "
                                        f"{e.strerror}") from None
