"""The polkit fixture also works on the host (as root): the member is granted, the outsider is not."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.polkit import PolkitEnv, PolkitError, process_start_time

pytestmark = pytest.mark.polkit
ACTION = "io.github.img.delete-layer"


@pytest.fixture
def member_and_outsider(polkit: PolkitEnv) -> Iterator[tuple[int, int]]:
    member = polkit.spawn_as(polkit.member, ["sleep", "30"])
    outsider = polkit.spawn_as(polkit.outsider, ["sleep", "30"])
    try:
        polkit.wait_running_as(member.pid, polkit.member)
        polkit.wait_running_as(outsider.pid, polkit.outsider)
        yield member.pid, outsider.pid
    finally:
        for proc in (member, outsider):
            proc.kill()
            proc.wait()


def test_member_yes_outsider_no_on_host(polkit: PolkitEnv, member_and_outsider: tuple[int, int]) -> None:
    member, outsider = member_and_outsider
    assert polkit.check(member, ACTION).is_authorized
    assert not polkit.check(outsider, ACTION).is_authorized


def test_pid_reuse_stale_start_time_refused_on_host(polkit: PolkitEnv,
                                                   member_and_outsider: tuple[int, int]) -> None:
    member, _ = member_and_outsider
    with pytest.raises(PolkitError, match="replaced"):
        polkit.check(member, ACTION, start_time=process_start_time(member) - 1)
