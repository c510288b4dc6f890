"""Proves the polkit fixture is real: inside the guest (an isolated system with its own bus and polkitd),
the shipped policy and rule grant the img actions to a member of group img and not to anyone else."""

from __future__ import annotations

import grp
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.fixtures import polkit as pk
from tests.fixtures.polkit import PolkitEnv, PolkitError, process_start_time

pytestmark = [pytest.mark.kernel, pytest.mark.polkit]

Sleepers = dict[str, subprocess.Popen[bytes]]
VERBS = ["status", "list", "ensure-layer", "activate", "deactivate", "delete-layer"]


@pytest.fixture
def sleepers(polkit: PolkitEnv) -> Iterator[Sleepers]:
    procs = {u.name: polkit.spawn_as(u, ["sleep", "30"]) for u in (polkit.member, polkit.outsider)}
    try:
        polkit.wait_running_as(procs[polkit.member.name].pid, polkit.member)
        polkit.wait_running_as(procs[polkit.outsider.name].pid, polkit.outsider)
        yield procs
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_policy_has_one_action_per_helper_verb() -> None:
    assert pk.policy_action_ids() == [f"io.github.img.{v}" for v in VERBS]


def test_member_is_authorized_outsider_is_not(polkit: PolkitEnv,
                                              sleepers: Sleepers) -> None:
    member, outsider = sleepers[polkit.member.name], sleepers[polkit.outsider.name]
    for verb in VERBS:
        action = f"io.github.img.{verb}"
        assert polkit.check(member.pid, action).is_authorized, action
        result = polkit.check(outsider.pid, action)
        assert not result.is_authorized, action
        assert not result.is_challenge, action  # no session, no agent: a plain no, nobody to ask


def test_group_grants_only_img_actions(polkit: PolkitEnv, sleepers: Sleepers) -> None:
    member = sleepers[polkit.member.name]
    assert not polkit.check(member.pid, "org.freedesktop.policykit.exec").is_authorized


def test_pid_reuse_stale_start_time_is_refused(polkit: PolkitEnv, sleepers: Sleepers) -> None:
    """Attack: pid reuse. A subject naming the member's pid with another start time is a different
    process and must not inherit the member's authorization: polkitd refuses it outright."""
    member = sleepers[polkit.member.name]
    start = process_start_time(member.pid)
    for stale in (start - 1, start + 1, 1):
        with pytest.raises(PolkitError, match="replaced"):
            polkit.check(member.pid, "io.github.img.ensure-layer", start_time=stale)
    assert polkit.check(member.pid, "io.github.img.ensure-layer", start_time=start).is_authorized


def test_exited_member_process_is_refused(polkit: PolkitEnv) -> None:
    proc = polkit.spawn_as(polkit.member, ["sleep", "30"])
    polkit.wait_running_as(proc.pid, polkit.member)
    start = process_start_time(proc.pid)
    proc.kill()
    proc.wait()
    with pytest.raises(PolkitError):
        polkit.check(proc.pid, "io.github.img.activate", start_time=start, uid=polkit.member.uid)


def test_test_users_can_run_the_venv(polkit: PolkitEnv) -> None:
    """Products under test run as these users: the venv's python and both packages must work for them."""
    code = ("import json, os, img, img_helper, jeepney, boto3;"
            "print(json.dumps([os.getuid(), os.getgroups()]))")
    img_gid = grp.getgrnam("img").gr_gid
    for user, in_group in ((polkit.member, True), (polkit.outsider, False)):
        r = polkit.run_as(user, [sys.executable, "-c", code], capture_output=True, text=True, cwd=pk.REPO)
        assert r.returncode == 0, r.stderr
        uid, groups = json.loads(r.stdout)
        assert uid == user.uid
        assert (img_gid in groups) == in_group
