"""The server's authorization against real polkit (tests/fixtures/polkit.py: system bus + polkitd, users
img-member in group img and img-outsider not). Clients run as those users through setpriv; the server
is the real server with the stand-in Service (the kernel tier repeats this with the real Service)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.polkit import PolkitEnv, TestUser
from tests.host.test_server_standin import REPO, HelperProc

CHAIN = "sha256:" + "ab" * 32

CALL = """
import json, sys
from img_helper.client import HelperClient, HelperError
path, verb, args, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
try:
    if extra.get("raw"):
        # a hand-made frame: lets a test put fields into the request that the client would never send
        import socket
        from img_helper import protocol as P
        s = socket.socket(socket.AF_UNIX); s.connect(path)
        P.send_frame(s, extra["raw"])
        obj, _ = P.FrameReader(s, max_bytes=P.MAX_REPLY_BYTES, max_fds=0).read(30, 30)
        print(json.dumps(obj if not obj.get("ok") else {"ok": True, "result": obj["result"]}))
    else:
        r = HelperClient(path, timeout=60).call(verb, args, allow_interaction=extra.get("interactive", False))
        print(json.dumps({"ok": True, "result": r}))
except HelperError as e:
    err = {"code": e.code, "message": e.message}
    print(json.dumps({"ok": False, "error": err, "type": type(e).__name__}))
"""


def call_as(polkit: PolkitEnv, user: TestUser, h: HelperProc, verb: str, args: dict[str, Any] | None = None,
            **extra: Any) -> dict[str, Any]:
    r = polkit.run_as(user, [sys.executable, "-c", CALL, str(h.socket_path), verb, json.dumps(args or {}),
                             json.dumps(extra)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and r.stdout, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, HelperProc]]:
    """Two stand-in servers: socket group img (the product's setup) and socket group img-outsider (so the
    outsider gets past the socket permissions and polkit alone must stop it)."""
    d = Path(tempfile.mkdtemp(prefix="img-pk-", dir="/tmp"))
    d.chmod(0o755)
    hs: dict[str, HelperProc] = {}
    try:
        for group in ("img", "img-outsider"):
            (d / group).mkdir(mode=0o755)
            hs[group] = HelperProc(d / group, group=group).start()
        yield hs
    finally:
        for h in hs.values():
            h.stop()
        subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.fixture(scope="module")
def member_server(polkit: PolkitEnv, servers: dict[str, HelperProc]) -> HelperProc:
    return servers["img"]


@pytest.fixture(scope="module")
def open_server(polkit: PolkitEnv, servers: dict[str, HelperProc]) -> HelperProc:
    return servers["img-outsider"]


def test_member_allowed_every_verb(polkit: PolkitEnv, member_server: HelperProc) -> None:
    assert call_as(polkit, polkit.member, member_server, "status")["ok"]
    assert call_as(polkit, polkit.member, member_server, "list")["ok"]
    r = call_as(polkit, polkit.member, member_server, "deactivate", {"name": "never-activated"})
    assert r == {"ok": True, "result": {"name": "never-activated", "removed": False}}
    r = call_as(polkit, polkit.member, member_server, "delete_layer", {"chain_id": CHAIN})
    assert r["ok"]
    r = call_as(polkit, polkit.member, member_server, "activate", {"chain_id": CHAIN, "name": "x"})
    assert r["error"]["code"] == "unknown-layer"  # authorized; the stand-in has no such layer


def test_outsider_cannot_reach_the_socket(polkit: PolkitEnv, member_server: HelperProc) -> None:
    r = call_as(polkit, polkit.outsider, member_server, "status")
    assert (r["type"], r["error"]["code"]) == ("NotAuthorized", "not-authorized")
    assert "group img" in r["error"]["message"]


@pytest.mark.parametrize("verb,args", [("deactivate", {"name": "a"}), ("delete_layer", {"chain_id": CHAIN}),
                                       ("status", {}), ("list", {})])
def test_outsider_denied_by_polkit(polkit: PolkitEnv, open_server: HelperProc, verb: str,
                                   args: dict[str, Any]) -> None:
    r = call_as(polkit, polkit.outsider, open_server, verb, args)
    assert (r["type"], r["error"]["code"]) == ("NotAuthorized", "not-authorized")
    assert f"io.github.img.{verb.replace('_', '-')}" in r["error"]["message"]


def test_outsider_denied_even_with_interaction_allowed(polkit: PolkitEnv, open_server: HelperProc) -> None:
    r = call_as(polkit, polkit.outsider, open_server, "deactivate", {"name": "a"}, interactive=True)
    assert r["error"]["code"] == "not-authorized"  # no agent to answer a challenge: still no


@pytest.mark.parametrize("claim", [{"uid": 0}, {"pid": 1}, {"uid": 0, "pid": 1, "gid": 0}])
def test_outsider_claiming_root_in_request_denied(polkit: PolkitEnv, open_server: HelperProc,
                                                  claim: dict[str, int]) -> None:
    """Identity written into the request is never used: the frame is refused outright."""
    for req in ({"v": 1, "id": 1, "verb": "deactivate", "args": {"name": "a"}, **claim},
                {"v": 1, "id": 1, "verb": "deactivate", "args": {"name": "a", **claim}}):
        r = call_as(polkit, polkit.outsider, open_server, "deactivate", raw=req)
        assert r["ok"] is False and r["error"]["code"] == "bad-request", r


def test_member_claiming_other_uid_gets_no_extra_and_no_less(polkit: PolkitEnv, open_server: HelperProc,
                                                             member_server: HelperProc) -> None:
    """The same claim from a member is refused too (strict schema), while the plain request works."""
    req = {"v": 1, "id": 1, "verb": "status", "args": {}, "uid": polkit.outsider.uid}
    assert call_as(polkit, polkit.member, member_server, "status", raw=req)["error"]["code"] == "bad-request"
    assert call_as(polkit, polkit.member, member_server, "status")["ok"]


def test_connection_handed_on_after_the_connecting_process_exits(polkit: PolkitEnv,
                                                                  member_server: HelperProc) -> None:
    """A member connects, hands the connection to a child and exits: the helper authorizes the process
    that connected (now gone), never whoever holds the socket now."""
    code = f"""
import json, os, socket, time
from img_helper import protocol as P
s = socket.socket(socket.AF_UNIX); s.connect({str(member_server.socket_path)!r})
if os.fork() == 0:
    ppid = os.getppid()
    while os.getppid() == ppid:  # until the connecting process has exited
        time.sleep(0.01)
    P.send_frame(s, {{"v": 1, "id": 1, "verb": "status", "args": {{}}}})
    obj, _ = P.FrameReader(s, max_bytes=P.MAX_REPLY_BYTES, max_fds=0).read(30, 30)
    print(json.dumps(obj), flush=True)
    os._exit(0)
time.sleep(0.2)
os._exit(0)
"""
    r = polkit.run_as(polkit.member, [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                      cwd=REPO)  # returns once the child has closed stdout too
    assert r.stdout.strip(), r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["error"]["code"] == "peer-gone"


@pytest.fixture
def bus_without_polkit() -> Iterator[str]:
    with private_bus_without_polkit() as address:
        yield address


@contextlib.contextmanager
def private_bus_without_polkit() -> Iterator[str]:
    """A real D-Bus daemon on which no polkit runs (and none can be activated): its address."""
    d = Path(tempfile.mkdtemp(prefix="img-bus-", dir="/tmp"))
    d.chmod(0o755)
    sock = d / "bus"
    conf = d / "bus.conf"
    conf.write_text(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>custom</type>
  <listen>unix:path={sock}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
""")
    out = subprocess.run(["dbus-daemon", f"--config-file={conf}", "--fork", "--print-pid"],
                         capture_output=True, text=True, check=True).stdout
    pid = int(out.split()[0])
    try:
        yield f"unix:path={sock}"
    finally:
        os.kill(pid, signal.SIGTERM)
        subprocess.run(["rm", "-rf", str(d)], check=False)


def test_polkit_unavailable_denies_non_root_serves_root(polkit: PolkitEnv, bus_without_polkit: str) -> None:
    d = Path(tempfile.mkdtemp(prefix="img-pk-", dir="/tmp"))
    d.chmod(0o755)
    h = HelperProc(d, group="img", env={"DBUS_SYSTEM_BUS_ADDRESS": bus_without_polkit}).start()
    try:
        r = call_as(polkit, polkit.member, h, "status")
        assert (r["type"], r["error"]["code"]) == ("PolkitUnavailable", "polkit-unavailable")
        assert "polkit" in r["error"]["message"]
        from img_helper.client import HelperClient

        assert HelperClient(h.socket_path).call("status", {})["version"] == "standin"  # root: no polkit
    finally:
        assert h.stop() == 0
        subprocess.run(["rm", "-rf", str(d)], check=False)


CHALLENGE_POLICY = Path("/usr/share/polkit-1/actions/io.github.img.test-challenge.policy")


@pytest.fixture
def challenge_action(polkit: PolkitEnv) -> Iterator[str]:
    """A test-only action whose answer for anyone is "authenticate as admin" (a challenge)."""
    if os.environ.get("IMG_IN_VM"):
        pytest.skip("hostfs has no inotify: the guest's polkitd never sees an action added after it started")
    CHALLENGE_POLICY.write_text("""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE policyconfig PUBLIC "-//freedesktop//DTD PolicyKit Policy Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/PolicyKit/1/policyconfig.dtd">
<policyconfig>
  <action id="io.github.img.test-challenge">
    <description>img test: always a challenge</description>
    <message>img test</message>
    <defaults><allow_any>auth_admin</allow_any><allow_inactive>auth_admin</allow_inactive>
    <allow_active>auth_admin</allow_active></defaults>
  </action>
</policyconfig>
""")
    try:
        import time

        deadline = time.monotonic() + 30
        while subprocess.run(["pkaction", "--action-id", "io.github.img.test-challenge"],
                             capture_output=True).returncode != 0:  # polkitd reloads asynchronously
            assert time.monotonic() < deadline, "polkitd did not load the test action"
            time.sleep(0.1)
        yield "test_challenge"
    finally:
        CHALLENGE_POLICY.unlink(missing_ok=True)


def test_challenge_is_a_denial_unless_interaction_allowed(polkit: PolkitEnv, challenge_action: str) -> None:
    import socket

    from img_helper.auth import AuthError, PeerIdentity, PolkitAuthorizer, clock_ticks_now

    d = Path(tempfile.mkdtemp(prefix="img-pk-", dir="/tmp"))
    d.chmod(0o755)
    path = d / "s"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    path.chmod(0o777)
    srv.listen(1)
    code = f"import socket, time; s = socket.socket(socket.AF_UNIX); s.connect({str(path)!r}); time.sleep(30)"
    proc = polkit.spawn_as(polkit.outsider, [sys.executable, "-c", code])  # not covered by 50-img.rules
    try:
        srv.settimeout(30)
        conn, _ = srv.accept()
        peer = PeerIdentity.of(conn, clock_ticks_now())
        assert peer.uid == polkit.outsider.uid
        raw = polkit.check(peer.pid, "io.github.img.test-challenge")
        assert (raw.is_authorized, raw.is_challenge) == (False, True)  # what polkit itself answers
        with pytest.raises(AuthError) as ei:
            PolkitAuthorizer().authorize(peer, challenge_action, allow_interaction=False)
        assert ei.value.code == "not-authorized" and "needs authentication" in ei.value.message
        with pytest.raises(AuthError) as ei:  # interaction allowed, but no agent answers: still no
            PolkitAuthorizer(interactive_timeout=20).authorize(peer, challenge_action, allow_interaction=True)
        assert ei.value.code == "not-authorized"
        peer.close()
        conn.close()
    finally:
        proc.kill()
        proc.wait()
        srv.close()
        subprocess.run(["rm", "-rf", str(d)], check=False)


def test_one_member_piling_up_timed_out_steps_does_not_starve_others_attack(polkit: PolkitEnv) -> None:
    """A step outlives its request's time limit (it finishes in the background); a member who lets steps
    time out one after another could fill every worker slot and leave everyone else "busy". Each non-root
    uid gets at most max_workers_per_uid of them."""
    d = Path(tempfile.mkdtemp(prefix="img-pk-", dir="/tmp"))
    d.chmod(0o755)
    h = HelperProc(d, group="img", limits={"verb_timeouts": {"activate": 0.3}, "max_workers": 4,
                                           "max_workers_per_uid": 2},
                   env={"STANDIN_SERIALIZES": "1"}).start()  # steps on different names run in parallel
    try:
        codes = [call_as(polkit, polkit.member, h, "activate", {"chain_id": CHAIN, "name": f"sleep-60-{i}"})
                 for i in range(3)]  # 6 s steps
        codes = [c["error"]["code"] for c in codes]
        assert codes == ["timeout", "timeout", "busy"]
        assert call_as(polkit, polkit.member, h, "status")["error"]["code"] == "busy"
        root = subprocess.run([sys.executable, "-c", CALL, str(h.socket_path), "status", "{}", "{}"],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
        assert json.loads(root.stdout)["ok"], root.stdout  # others still have worker slots
    finally:
        h.stop()
        subprocess.run(["rm", "-rf", str(d)], check=False)
