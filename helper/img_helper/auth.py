"""Who is calling, according to the kernel, and may they do it, according to polkit.

Identity is taken once per connection right after accept: SO_PEERCRED (uid, gid, pid), a pidfd for
that process (SO_PEERPIDFD on Linux >= 6.5, else pidfd_open(pid)), and its start time from
/proc/<pid>/stat. Nothing in a request can change it. Each request is then checked with polkit
(root peers skip polkit), and afterwards the pidfd must still be alive with the same start time, so a
pid recycled during the check can't borrow the caller's authorization.

What the identity means: SO_PEERCRED records the process that called connect(), with the credentials
it had at that moment. Whoever holds the socket afterwards (a child after fork, a process it was passed
to by SCM_RIGHTS) speaks with the connector's authority, but only while the connector lives, is the same
process (start time, pidfd) and still has the effective uid it connected with: a root or setuid-root
process that connects, then drops privileges or dies, leaves no root-standing socket behind (PEER_GONE).
Handing a live connection to another process is delegation by the connector, as with any fd. On kernels
without SO_PEERPIDFD (< 6.5) a connector that exits before accept() and whose pid is reused at once by a
process of the same uid is indistinguishable from it; polkit is still asked about that uid.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from img_helper.protocol import NOT_AUTHORIZED, PEER_GONE, POLKIT_UNAVAILABLE, polkit_action

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5; not yet named in Python 3.11
_UCRED = struct.Struct("3i")
POLKIT_BUS_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"
ALLOW_USER_INTERACTION = 1
_cancel_ids = itertools.count(1)


class AuthError(Exception):
    """The request is refused: code is NOT_AUTHORIZED, POLKIT_UNAVAILABLE or PEER_GONE."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def clock_ticks_now() -> int:
    """Now, in the unit and epoch of /proc/<pid>/stat starttime (clock ticks since boot)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def proc_start_time(pid: int) -> int:
    """Field 22 (starttime) of /proc/<pid>/stat. comm (field 2) may hold spaces and ')', so split at
    the LAST ')'. Raises ProcessLookupError if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(pid) from None
    rest = stat[stat.rindex(b")") + 1 :].split()
    # rest[0] is field 3 (state), so field 22 is rest[19]
    if len(rest) < 20:
        raise ProcessLookupError(pid)
    return int(rest[19])


def proc_euid(pid: int) -> int:
    """The effective uid of /proc/<pid>/status (in our user namespace, like SO_PEERCRED's).
    Raises ProcessLookupError if the process is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[2])
    except (FileNotFoundError, ProcessLookupError):
        pass
    raise ProcessLookupError(pid)


def pidfd_alive(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return not p.poll(0)


@dataclass
class PeerIdentity:
    uid: int
    gid: int
    pid: int
    start_time: int  # clock ticks since boot, from /proc/<pid>/stat
    pidfd: int  # -1 if no pidfd could be had (then the start time alone guards recycling)
    pidfd_source: str  # "SO_PEERPIDFD" | "pidfd_open" | "none"

    @classmethod
    def of(cls, conn: socket.socket, accepted_at_ticks: int) -> PeerIdentity:
        """The connected peer, from the kernel. Raise AuthError(PEER_GONE) if it can't be pinned down."""
        pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if pid <= 0:
            raise AuthError(PEER_GONE, "the peer's pid is not visible in the helper's pid namespace")
        pidfd, source = -1, "none"
        try:
            pidfd = struct.unpack("i", conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
            source = "SO_PEERPIDFD"
        except OSError:
            try:
                pidfd, source = os.pidfd_open(pid), "pidfd_open"
            except ProcessLookupError:
                raise AuthError(PEER_GONE, f"peer process {pid} is gone") from None
            except OSError:
                pass  # pidfd_open unsupported: the start-time checks below still apply
        ident = cls(uid, gid, pid, 0, pidfd, source)
        try:
            ident.start_time = proc_start_time(pid)
            # With pidfd_open there is a window between the connect and pidfd_open: a process that started
            # after we accepted can't be the peer (it would be a recycled pid).
            if ident.start_time > accepted_at_ticks + 1:
                raise AuthError(PEER_GONE, f"peer pid {pid} was recycled")
            ident.check_alive()
        except ProcessLookupError:
            ident.close()
            raise AuthError(PEER_GONE, f"peer process {pid} is gone") from None
        except BaseException:
            ident.close()
            raise
        return ident

    def check_alive(self) -> None:
        """Still the same process (pidfd not exited, same start time), with the effective uid it
        connected with? Raise AuthError(PEER_GONE)."""
        try:
            same = proc_start_time(self.pid) == self.start_time
            euid = proc_euid(self.pid)
        except ProcessLookupError:
            same, euid = False, self.uid
        if not same or (self.pidfd >= 0 and not pidfd_alive(self.pidfd)):
            raise AuthError(PEER_GONE, f"peer process {self.pid} exited or its pid was recycled")
        if euid != self.uid:
            raise AuthError(PEER_GONE, f"peer process {self.pid} connected as uid {self.uid} and now runs as "
                            f"uid {euid}: its connection no longer speaks for uid {self.uid}")

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


@dataclass
class Decision:
    allowed: bool
    how: str  # "root" | "polkit"
    challenge: bool = False


class PolkitAuthorizer:
    """polkit CheckAuthorization over the system bus (jeepney), one bus connection per check: nothing is
    cached across requests, and a restarted polkitd or bus is picked up by the next request."""

    def __init__(self, timeout: float = 25.0, interactive_timeout: float = 300.0,
                 bus_address: str | None = None) -> None:
        self.timeout = timeout
        self.interactive_timeout = interactive_timeout
        self.bus_address = bus_address  # None: the system bus ($DBUS_SYSTEM_BUS_ADDRESS or the default)

    def authorize(self, peer: PeerIdentity, verb: str, allow_interaction: bool) -> Decision:
        """Raise AuthError unless the peer may run verb now."""
        if peer.uid == 0:
            peer.check_alive()
            return Decision(True, "root")
        action = polkit_action(verb)
        allowed, challenge = self._check(peer, action, allow_interaction)
        peer.check_alive()  # the pid we asked about is still our peer
        if not allowed:
            if challenge:
                raise AuthError(NOT_AUTHORIZED, f"{action} needs authentication and the request did not "
                                "allow interaction; join group img (a shipped polkit rule grants it) or "
                                "retry with interaction allowed")
            raise AuthError(NOT_AUTHORIZED, f"polkit denied {action} to uid {peer.uid}; join group img "
                            "(see polkit/50-img.rules)")
        return Decision(True, "polkit", challenge)

    def _check(self, peer: PeerIdentity, action: str, interactive: bool) -> tuple[bool, bool]:
        from jeepney import DBusAddress, MessageType, new_method_call
        from jeepney.io.blocking import open_dbus_connection

        authority = DBusAddress(POLKIT_PATH, bus_name=POLKIT_BUS_NAME, interface=POLKIT_IFACE)
        subject = ("unix-process", {"pid": ("u", peer.pid), "start-time": ("t", peer.start_time),
                                    "uid": ("i", peer.uid)})
        flags = ALLOW_USER_INTERACTION if interactive else 0
        # an interactive check can wait on a human: give it an id so a timed-out one can be cancelled
        cancel_id = f"img-helper-{os.getpid()}-{next(_cancel_ids)}" if interactive else ""
        msg = new_method_call(authority, "CheckAuthorization", "(sa{sv})sa{ss}us",
                              (subject, action, {}, flags, cancel_id))
        timeout = self.interactive_timeout if interactive else self.timeout
        try:
            with open_dbus_connection(bus=self.bus_address or "SYSTEM") as conn:
                try:
                    reply = conn.send_and_get_reply(msg, timeout=timeout)
                except TimeoutError:
                    if cancel_id:
                        cancel = new_method_call(authority, "CancelCheckAuthorization", "s", (cancel_id,))
                        with contextlib.suppress(Exception):
                            conn.send(cancel)
                    raise
        except (OSError, TimeoutError, ValueError, KeyError, RuntimeError) as e:
            raise AuthError(POLKIT_UNAVAILABLE, f"cannot reach polkit on the system bus ({type(e).__name__}: "
                            f"{e}); non-root callers are denied until polkit runs") from None
        if reply.header.message_type == MessageType.error:
            from jeepney import HeaderFields

            name = str(reply.header.fields.get(HeaderFields.error_name, ""))
            text = str(reply.body[0]) if reply.body else ""
            if name.startswith("org.freedesktop.DBus.Error."):
                # ServiceUnknown / NameHasNoOwner / NoReply / ...: polkitd is not there to ask
                raise AuthError(POLKIT_UNAVAILABLE, f"polkit is unavailable ({name}: {text}); non-root "
                                "callers are denied until polkit runs")
            raise AuthError(NOT_AUTHORIZED, f"polkit refused the check ({name}: {text})")
        (is_authorized, is_challenge, _details), = reply.body
        return bool(is_authorized), bool(is_challenge)
