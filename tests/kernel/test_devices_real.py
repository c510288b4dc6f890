"""Real Debian images (tests/images/build.py) as layer chains on a real pool: two families that share
their first layers store them once (pool usage measured), and each activation's rootfs/ equals the
rootfs they were made from. Prints timings (mkfs, per-layer apply) for the report."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from img_helper import dm
from img_helper.service import Service
from tests.fixtures.dmpool import ThinPool
from tests.fixtures.images import RealImages
from tests.fixtures.trees import assert_same_tree, read_spec
from tests.kernel.test_devices_support import chain_ids, mounted

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def test_two_real_families_share_layers_and_match_reference(
        thin_pool_factory: Callable[..., ThinPool], real_images: RealImages, tmp_path: Path) -> None:
    pool = thin_pool_factory(data_mb=1024, meta_mb=16, block_sectors=128)
    svc = Service(pool.name, tmp_path / "state")  # default 10 GiB virtual devices
    try:
        fam_a, fam_b = real_images.shared_families[:2]
        shared = real_images.shared_layers
        block = pool.block_sectors * 512
        used = [dm.pool_status(pool.name).used_data_blocks]
        tops = {}
        for fam in (fam_a, fam_b):
            cids = chain_ids(real_images.layer_digests[fam])
            for i, path in enumerate(real_images.families[fam]):
                t0 = time.monotonic()
                with open(path, "rb") as f:
                    r = svc.ensure_layer(cids[i], cids[i - 1] if i else None, f.fileno(), 0,
                                         path.stat().st_size, real_images.layer_digests[fam][i], None)
                dt = time.monotonic() - t0
                assert r["created"] == (fam == fam_a or i >= shared), (fam, i, r)
                print(f"{fam}/{path.name}: {path.stat().st_size >> 10} KiB, {dt:.2f}s, "
                      f"created={r['created']}, {svc.devices.last_timings if r['created'] else ''}")
            used.append(dm.pool_status(pool.name).used_data_blocks)
            tops[fam] = cids[-1]
        a_bytes, b_extra = (used[1] - used[0]) * block, (used[2] - used[1]) * block
        b_own = sum(p.stat().st_size for p in real_images.families[fam_b][shared:])
        a_shared = sum(p.stat().st_size for p in real_images.families[fam_a][:shared])
        print(f"pool usage: {fam_a} {a_bytes >> 20} MiB; {fam_b} adds {b_extra >> 20} MiB "
              f"(its own layers are {b_own >> 20} MiB of tar; the shared ones {a_shared >> 20} MiB)")
        assert b_extra < a_shared // 4  # the shared layers were not stored again
        for fam, top in tops.items():
            act = svc.activate(top, f"real-{fam}")
            with mounted(act["device"]) as mnt:
                # The source spec (equal to the reference unpack, checked on the host): the guest reads
                # the reference through hostfs, which drops user.* xattrs.
                assert_same_tree(read_spec(real_images.source_specs[fam]), mnt / "rootfs")
    finally:
        svc.close()
