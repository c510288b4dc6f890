"""The helper's socket server: accepts connections, pins down the caller (auth.PeerIdentity),
reads frames (protocol), checks fds and polkit, and dispatches verbs to the Service.

Concurrency: one thread per connection (capped globally and per uid), so a slow or hostile client
only ever holds its own thread; a frame that starts must complete within `frame_timeout`, and an idle
connection is closed after `idle_timeout`. Each request's Service call runs in its own worker thread so
the connection thread can stream progress events and enforce the verb's time limit; on timeout the
client gets a "timeout" error and the worker finishes in the background (steps are idempotent) — its
fds are closed by the worker, never while it may still read them.

Locking (who locks what): read-only verbs (status, list) take no lock. Mutating verbs are serialized
by the server with one pool lock, unless the Service sets `serializes_pool_changes = True` (it then
locks its own pool changes, so extractions can run in parallel); in that case the server only
serializes requests on the same key (the chain id, or the activation name), which keeps a repeated
step from racing its twin.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import selectors
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from img_helper import protocol as P
from img_helper.auth import AuthError, PeerIdentity, PolkitAuthorizer, clock_ticks_now

log = logging.getLogger("img_helper.server")


@dataclass
class ServerLimits:
    max_connections: int = 64
    max_connections_per_uid: int = 16  # non-root uids; root is bounded by max_connections only
    max_workers: int = 128  # running Service calls, including ones whose client timed out
    max_workers_per_uid: int = 32  # of those, for one non-root uid: one caller can't starve the others
    idle_timeout: float = 60.0  # no request started on a connection for this long: close it
    frame_timeout: float = 10.0  # a started frame must be complete within this
    send_timeout: float = 30.0  # a client that doesn't read its replies for this long is dropped
    shutdown_grace: float = 30.0  # SIGTERM: in-flight requests get this long to finish
    verb_timeouts: dict[str, float] = field(default_factory=dict)  # overrides VerbSpec.timeout
    progress_interval: float = 0.1  # at most one progress event per this many seconds per request

    def timeout_for(self, verb: str) -> float:
        return self.verb_timeouts.get(verb, P.VERBS[verb].timeout)


class KeyedLocks:
    """One lock per key, created on demand and dropped when unused."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, key: str, timeout: float) -> Iterator[bool]:
        with self._mu:
            lock, n = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, n + 1)
        got = lock.acquire(timeout=max(timeout, 0))
        try:
            yield got
        finally:
            if got:
                lock.release()
            with self._mu:
                lock, n = self._locks[key]
                if n == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, n - 1)


def check_fd(fd: int, where: str) -> os.stat_result:
    """Accept only a regular file opened read-only (not O_PATH)."""
    import fcntl

    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        st = os.fstat(fd)
    except OSError as e:
        raise P.ProtocolError(P.BAD_FD, f"{where}: unusable fd ({e.strerror})", where) from None
    if flags & os.O_PATH:
        raise P.ProtocolError(P.BAD_FD, f"{where}: O_PATH fds are refused", where)
    if flags & os.O_ACCMODE != os.O_RDONLY:
        raise P.ProtocolError(P.BAD_FD, f"{where}: the fd must be opened read-only (O_RDONLY)", where)
    if not stat.S_ISREG(st.st_mode):
        mode = stat.filemode(st.st_mode)
        raise P.ProtocolError(P.BAD_FD, f"{where}: not a regular file (mode {mode})", where)
    return st


def _json_ok(v: Any) -> bool:
    try:
        P.encode({"v": v})
        return True
    except (TypeError, ValueError):
        return False


def error_of(exc: BaseException) -> dict[str, Any]:
    """A Service exception as a wire error: its `code` attribute (if a string), its `message`, and its
    JSON-able fields (attributes, and a `details` dict if it has one) as error.details."""
    code = getattr(exc, "code", None)
    if not isinstance(code, str) or not code:
        return {"code": P.INTERNAL, "message": f"{type(exc).__name__}: {exc}"[:2000]}
    message = getattr(exc, "message", None)
    message = message if isinstance(message, str) else str(exc)
    err: dict[str, Any] = {"code": code, "message": message[:2000]}
    fields = {k: v for k, v in vars(exc).items() if k not in ("code", "message", "details")
              and not k.startswith("_")}
    extra = getattr(exc, "details", None)
    if isinstance(extra, dict):
        fields.update({str(k): v for k, v in extra.items()})
    details = {k: v for k, v in fields.items() if _json_ok(v)}
    if details:
        err["details"] = details
    return err


class Connection:
    """One accepted client; lives in its own thread."""

    def __init__(self, server: Server, sock: socket.socket, peer: PeerIdentity) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.idle = True  # waiting for the next request (may be cut short at shutdown)

    def run(self) -> None:
        reader = P.FrameReader(self.sock)
        lim = self.server.limits
        try:
            while not self.server.stopping.is_set():
                self.idle = True
                try:
                    obj, fds = reader.read(lim.idle_timeout, lim.frame_timeout)
                except (TimeoutError, P.PeerClosed, ConnectionError):
                    return
                except P.ProtocolError as e:  # the stream is out of step now: report and close
                    self._send_quiet({"v": P.VERSION, "id": None, "ok": False, "error": e.to_error()})
                    return
                self.idle = False
                if not self._serve(obj, fds):
                    return
        except OSError as e:
            log.info("connection from pid %d uid %d ended: %s", self.peer.pid, self.peer.uid, e)
        finally:
            self.sock.close()
            self.server.release(self)

    def _send(self, obj: dict[str, Any]) -> None:
        self.sock.settimeout(self.server.limits.send_timeout)
        P.send_frame(self.sock, obj)

    def _send_quiet(self, obj: dict[str, Any]) -> bool:
        try:
            self._send(obj)
            return True
        except (OSError, ValueError):
            return False

    def _reply_error(self, rid: int | None, err: dict[str, Any]) -> bool:
        return self._send_quiet({"v": P.VERSION, "id": rid, "ok": False, "error": err})

    def _serve(self, obj: Any, fds: list[int]) -> bool:
        """Answer one request; False if the connection should be closed.
        Owns fds until a worker takes them."""
        rid = P.request_id_of(obj)
        try:
            req = P.parse_request(obj, len(fds))
            req.fds = fds
            for i, fd in enumerate(fds):
                check_fd(fd, f"fds[{i}]")
            if self.server.stopping.is_set():
                raise P.ProtocolError(P.SHUTTING_DOWN, "the helper is shutting down; retry")
            if self.server.worker_count() >= self.server.limits.max_workers:
                raise P.ProtocolError(P.BUSY, "too many requests in progress; retry later")
            if self.peer.uid != 0 and (self.server.worker_count(self.peer.uid)
                                       >= self.server.limits.max_workers_per_uid):
                raise P.ProtocolError(P.BUSY, "too many of your requests are still running (some may have "
                                      "timed out and be finishing); retry later")
            self.server.authorizer.authorize(self.peer, req.verb, req.allow_interaction)
            # the verb's time limit starts once authorized (polkit has its own, longer if interactive)
            deadline = time.monotonic() + self.server.limits.timeout_for(req.verb)
        except P.ProtocolError as e:
            P.close_fds(fds)
            return self._reply_error(rid, e.to_error())
        except AuthError as e:
            P.close_fds(fds)
            log.info("denied %s to pid %d uid %d: %s", obj.get("verb"), self.peer.pid, self.peer.uid, e.code)
            return self._reply_error(rid, {"code": e.code, "message": e.message})
        except BaseException:
            P.close_fds(fds)
            raise
        return self._dispatch(req, deadline)

    def _dispatch(self, req: P.Request, deadline: float) -> bool:
        """Run the call in a worker; stream its progress (coalesced) and send the final reply."""
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        try:
            self.server.start_worker(req, deadline, events, self.peer.uid)  # it owns req.fds from here on
        except RuntimeError as e:  # no thread to be had (memory, task limits): this request only fails
            P.close_fds(req.fds)
            log.warning("cannot start a worker for %s: %s", req.verb, e)
            return self._reply_error(req.id, {"code": P.BUSY, "message": (
                "the helper cannot start a thread now (out of memory or tasks); retry later")})
        interval = self.server.limits.progress_interval
        last_sent = 0.0
        pending: dict[str, Any] | None = None  # latest progress not yet sent
        while True:
            now = time.monotonic()
            if pending is not None and now - last_sent >= interval:
                if not self._send_quiet({"v": P.VERSION, "id": req.id, "event": "progress", "data": pending}):
                    return False  # client gone: the worker still finishes (and closes the fds)
                pending, last_sent = None, now
            wait = deadline - now
            if pending is not None:
                wait = min(wait, last_sent + interval - now)
            try:
                kind, payload = events.get(timeout=max(wait, 0.0))
            except queue.Empty:
                if time.monotonic() < deadline:
                    continue
                limit = self.server.limits.timeout_for(req.verb)
                return self._reply_error(req.id, {"code": P.TIMEOUT, "message": (
                    f"{req.verb} did not finish within {limit:g} s; it may still complete in the helper "
                    "(steps are idempotent: repeat it)")})
            if kind == "progress":
                pending = payload
            elif kind == "ok":
                return self._send_quiet({"v": P.VERSION, "id": req.id, "ok": True, "result": payload})
            else:
                return self._reply_error(req.id, payload)


def _jsonable(d: Any) -> dict[str, Any]:
    try:
        P.encode({"data": d})
        return d if isinstance(d, dict) else {"value": d}
    except (TypeError, ValueError):
        return {"repr": repr(d)[:500]}


class Server:
    def __init__(self, listener: socket.socket, service: Any, authorizer: PolkitAuthorizer | None = None,
                 limits: ServerLimits | None = None, unlink_path: str | None = None) -> None:
        self.listener = listener
        self.service = service
        self.authorizer = authorizer or PolkitAuthorizer()
        self.limits = limits or ServerLimits()
        self.unlink_path = unlink_path  # the socket path we bound (not when systemd owns it)
        self.stopping = threading.Event()
        self.unfinished = 0  # threads still running when shutdown gave up waiting
        self._mu = threading.Lock()
        self._conns: dict[Connection, threading.Thread] = {}
        self._workers: dict[threading.Thread, int] = {}  # running worker -> the uid it works for
        self._per_uid: dict[int, int] = {}
        self.pool_lock = threading.Lock()
        self.key_locks = KeyedLocks()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    # ---- accept loop ----
    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.request_stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def request_stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def serve_forever(self, on_ready: Callable[[], None] | None = None,
                      on_stopping: Callable[[], None] | None = None) -> None:
        self.listener.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        if on_ready:
            on_ready()
        try:
            while not self.stopping.is_set():
                for key, _ in sel.select():
                    if key.fd == self._wake_r:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 64)
                    else:
                        self._accept()
        finally:
            sel.close()
            if on_stopping:
                on_stopping()
            self._shutdown()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.warning("accept: %s; backing off", e)
                time.sleep(0.1)
                return
            raise
        sock.setblocking(True)
        try:
            peer = PeerIdentity.of(sock, clock_ticks_now())
        except AuthError as e:
            self._refuse(sock, e.code, e.message)
            return
        except Exception as e:  # never let one odd peer take the accept loop down
            log.warning("cannot identify a peer: %s: %s", type(e).__name__, e)
            self._refuse(sock, P.INTERNAL, f"cannot identify the peer: {e}")
            return
        with self._mu:
            n_uid = self._per_uid.get(peer.uid, 0)
            if len(self._conns) >= self.limits.max_connections or (
                    peer.uid != 0 and n_uid >= self.limits.max_connections_per_uid):
                busy = True
            else:
                busy = False
                conn = Connection(self, sock, peer)
                t = threading.Thread(target=conn.run, name=f"conn-pid{peer.pid}", daemon=True)
                self._conns[conn] = t
                self._per_uid[peer.uid] = n_uid + 1
        if busy:
            peer.close()
            self._refuse(sock, P.BUSY, "too many connections; retry later")
            return
        try:
            t.start()
        except RuntimeError as e:  # no thread to be had: turn this one away, keep accepting
            log.warning("cannot start a connection thread: %s", e)
            self.release(conn)
            self._refuse(sock, P.BUSY, "the helper cannot start a thread now (out of memory or tasks); "
                         "retry later")

    def _refuse(self, sock: socket.socket, code: str, message: str) -> None:
        with contextlib.suppress(OSError):
            sock.settimeout(0)  # never wait on a client we are turning away
            err = {"code": code, "message": message}
            P.send_frame(sock, {"v": P.VERSION, "id": None, "ok": False, "error": err})
        sock.close()

    def release(self, conn: Connection) -> None:
        conn.peer.close()
        with self._mu:
            self._conns.pop(conn, None)
            n = self._per_uid.get(conn.peer.uid, 1) - 1
            if n:
                self._per_uid[conn.peer.uid] = n
            else:
                self._per_uid.pop(conn.peer.uid, None)

    # ---- workers ----
    def worker_count(self, uid: int | None = None) -> int:
        """Running workers (for uid, if given)."""
        with self._mu:
            if uid is None:
                return len(self._workers)
            return sum(1 for u in self._workers.values() if u == uid)

    def start_worker(self, req: P.Request, deadline: float, events: queue.Queue[tuple[str, Any]],
                     uid: int = 0) -> None:
        t = threading.Thread(target=self._work, args=(req, deadline, events), name=f"{req.verb}-{req.id}",
                             daemon=True)
        with self._mu:
            self._workers[t] = uid
        try:
            t.start()
        except RuntimeError:
            with self._mu:
                self._workers.pop(t, None)
            raise

    @contextlib.contextmanager
    def _locks_for(self, req: P.Request, deadline: float) -> Iterator[bool]:
        spec = req.spec
        if not spec.mutating:
            yield True
        elif getattr(self.service, "serializes_pool_changes", False):
            key = req.args.get("chain_id") if req.verb in ("ensure_layer", "delete_layer") else None
            key = f"chain:{key}" if key else f"name:{req.args.get('name')}"
            with self.key_locks.hold(key, deadline - time.monotonic()) as got:
                yield got
        else:
            got = self.pool_lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
            try:
                yield got
            finally:
                if got:
                    self.pool_lock.release()

    def _work(self, req: P.Request, deadline: float, events: queue.Queue[tuple[str, Any]]) -> None:
        spec = req.spec
        kwargs: dict[str, Any] = {}
        for name, f in spec.args.items():
            kwargs[name] = req.fds[req.args[name]] if f.kind == "fd" else req.args[name]
        if req.verb == "ensure_layer":
            kwargs["progress"] = lambda d: events.put(("progress", _jsonable(d)))
        try:
            with self._locks_for(req, deadline) as got:
                if not got:
                    events.put(("error", {"code": P.TIMEOUT, "message": f"{req.verb}: the pool stayed busy "
                                          "past the request's time limit"}))
                    return
                result = getattr(self.service, spec.method)(**kwargs)
            result = result if isinstance(result, dict) else {"value": result}
            try:
                P.encode({"result": result})
            except (TypeError, ValueError) as e:
                raise TypeError(f"{spec.method} returned a result that is not JSON: {e}") from None
            events.put(("ok", result))
        except Exception as e:
            if not isinstance(getattr(e, "code", None), str):
                log.exception("%s failed", req.verb)
            events.put(("error", error_of(e)))
        finally:
            P.close_fds(req.fds)
            with self._mu:
                self._workers.pop(threading.current_thread(), None)

    # ---- shutdown ----
    def _shutdown(self) -> None:
        """Stop accepting, cut idle connections, give in-flight requests `shutdown_grace` to finish."""
        # The instance lock is held until we exit, so no successor can have re-bound the path yet.
        with contextlib.suppress(OSError):
            if self.unlink_path and stat.S_ISSOCK(os.lstat(self.unlink_path).st_mode):
                os.unlink(self.unlink_path)
        self.listener.close()
        deadline = time.monotonic() + self.limits.shutdown_grace
        while True:
            with self._mu:
                conns = list(self._conns.items())
                workers = list(self._workers)
            for conn, _ in conns:
                if conn.idle:
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RD)
            threads = [t for _, t in conns] + workers
            if not threads or time.monotonic() >= deadline:
                break
            if threads[0].ident is None:  # registered, not started yet (or failing to start)
                time.sleep(0.01)
            else:
                threads[0].join(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
        self.unfinished = len(threads)
        if threads:
            log.warning("shutdown: %d request(s) still running after %g s; exiting anyway",
                        len(threads), self.limits.shutdown_grace)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
