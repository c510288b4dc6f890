"""Shared pytest setup. Tiers: the host tier runs `-m "not kernel"`; the kernel tier runs `-m kernel`
inside the user-mode-linux guest (tests/vm/run), where device-mapper is real."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.dmpool import ThinPool, create_pool, destroy_pool, dm_names, loop_devices

REPO = Path(__file__).resolve().parent.parent

pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.polkit", "tests.fixtures.images"]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") and not os.path.exists("/dev/mapper/control"):
        pytest.fail("kernel-tier test needs device-mapper: run it through `make test-kernel` (tests/vm/run)")


@pytest.fixture
def thin_pool_factory() -> Iterator[Callable[..., ThinPool]]:
    """Makes fresh loop-backed thin pools (sizes as parameters); tears them all down, and checks
    that no device-mapper device or loop device is left behind."""
    before_dm, before_loop = set(dm_names()), set(loop_devices())
    pools: list[ThinPool] = []

    def make(**kw: int) -> ThinPool:
        pool = create_pool(**kw)  # type: ignore[arg-type]
        pools.append(pool)
        return pool

    yield make
    for pool in reversed(pools):
        destroy_pool(pool)
    assert set(dm_names()) - before_dm == set(), "device-mapper devices leaked"
    assert set(loop_devices()) - before_loop == set(), "loop devices leaked"


@pytest.fixture
def thin_pool(thin_pool_factory: Callable[..., ThinPool]) -> ThinPool:
    return thin_pool_factory()
