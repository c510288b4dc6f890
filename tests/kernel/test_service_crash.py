"""kill -9 of the helper between intent and completion of each pool change, then restart (reconcile):
no leaked thin id, no duplicate device, no half-built layer, and the step then succeeds.

The step runs in a child process with IMG_HELPER_CRASH_AT=<point>; at that point the helper sends
itself SIGKILL (a real kill -9: no finally blocks, no atexit)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from img_helper import dm
from img_helper.devices import layer_names
from img_helper.record import ACTIVE, COMPLETE, DELETED, FOREIGN, LIVE
from img_helper.service import Service
from tests.fixtures.dmpool import ThinPool
from tests.kernel.test_devices_support import Blob, chain_ids, layer_series, mounted, tree, write_blob

pytestmark = pytest.mark.kernel
VSIZE = 256 << 20
REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, os, sys
from pathlib import Path
from img_helper.devices import DeviceError
from img_helper.service import Service
a = json.loads(sys.argv[1])
s = Service(a["pool"], Path(a["state"]), virtual_size=a["vsize"])
os.environ["IMG_HELPER_CRASH_AT"] = a["point"]  # armed only for the step, not for start-up reconcile
try:
    if a["verb"] == "ensure_layer":
        with open(a["blob"], "rb") as f:
            s.ensure_layer(a["chain_id"], a["parent"], f.fileno(), 0, a["size"], a["sha"], None)
    elif a["verb"] == "activate":
        s.activate(a["chain_id"], a["name"])
    elif a["verb"] == "deactivate":
        s.deactivate(a["name"])
    elif a["verb"] == "delete_layer":
        s.delete_layer(a["chain_id"])
except DeviceError as e:
    print(json.dumps(e.to_dict()))
    sys.exit(3)
"""

# step -> crash points on its path
CASES = [
    ("layer0", "create_thin:after-intent"), ("layer0", "create_thin:after-op"),
    ("layer0", "layer:after-create"), ("layer0", "layer:before-apply"), ("layer0", "layer:during-apply"),
    ("layer0", "layer:after-apply"), ("layer0", "layer:after-complete"),
    ("layer1", "create_snap:after-intent"), ("layer1", "create_snap:suspended"),
    ("layer1", "create_snap:after-op"),
    ("layer1", "layer:after-create"), ("layer1", "layer:during-apply"), ("layer1", "layer:after-apply"),
    ("activate", "create_snap:after-intent"), ("activate", "create_snap:suspended"),
    ("activate", "create_snap:after-op"),
    ("activate", "activate:after-create"), ("activate", "activate:after-device"),
    ("deactivate", "delete:after-intent"), ("deactivate", "delete:after-op"),
    ("delete_layer", "delete:after-intent"), ("delete_layer", "delete:after-op"),
]


class Scenario:
    def __init__(self, pool: ThinPool, tmp: Path) -> None:
        self.pool, self.state = pool, tmp / "state"
        self.blobs: list[Blob] = [write_blob(tmp, t) for t in layer_series(2)]
        self.cids = chain_ids([b.digest for b in self.blobs])

    def service(self) -> Service:
        return Service(self.pool.name, self.state, virtual_size=VSIZE)

    def args(self, step: str, point: str) -> dict[str, Any]:
        base = {"pool": self.pool.name, "state": str(self.state), "vsize": VSIZE, "point": point}
        if step in ("layer0", "layer1"):
            i = int(step[-1])
            b = self.blobs[i]
            return {**base, "verb": "ensure_layer", "chain_id": self.cids[i],
                    "parent": self.cids[i - 1] if i else None, "blob": str(b.path), "size": b.size,
                    "sha": b.sha256}
        if step in ("activate", "deactivate"):
            return {**base, "verb": step, "chain_id": self.cids[1], "name": "crash"}
        return {**base, "verb": "delete_layer", "chain_id": self.cids[1]}

    def prepare(self, step: str) -> None:
        """Everything the step needs, done without crashing."""
        need = {"layer0": [], "layer1": ["layer0"], "activate": ["layer0", "layer1"],
                "deactivate": ["layer0", "layer1", "activate"], "delete_layer": ["layer0", "layer1"]}[step]
        svc = self.service()
        try:
            for s in need:
                self.run_in_process(svc, s)
        finally:
            svc.close()

    def run_in_process(self, svc: Service, step: str) -> dict[str, Any]:
        a = self.args(step, "")
        if a["verb"] == "ensure_layer":
            with open(a["blob"], "rb") as f:
                return svc.ensure_layer(a["chain_id"], a["parent"], f.fileno(), 0, a["size"], a["sha"], None)
        if a["verb"] == "activate":
            return svc.activate(a["chain_id"], a["name"])
        if a["verb"] == "deactivate":
            return svc.deactivate(a["name"])
        return svc.delete_layer(a["chain_id"])

    def crash(self, step: str, point: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", CHILD, json.dumps(self.args(step, point))], cwd=REPO,
                              capture_output=True, text=True, timeout=120)


def thin_exists(pool: str, thin_id: int) -> bool:
    try:
        dm.create_thin(pool, thin_id)
    except dm.DmExists:
        return True
    dm.delete_thin(pool, thin_id)
    return False


def assert_consistent(svc: Service, pool: str) -> None:
    rec = svc.record
    assert rec.pending_intents() == []
    layers, acts = rec.layers(), rec.activations()
    assert all(r.state == COMPLETE for r in layers) and all(a.state == ACTIVE for a in acts)
    owners = [r.thin_id for r in layers] + [a.thin_id for a in acts]
    assert len(owners) == len(set(owners)), "two owners share a thin id"
    thins = {t.thin_id: t for t in rec.thins()}
    for tid in range(1, rec.next_thin_id() + 3):
        t = thins.get(tid)
        state = t.state if t else None
        assert state in (LIVE, DELETED, FOREIGN, None), f"thin {tid} is {state}"
        if state == LIVE:
            assert tid in owners, f"thin {tid} is live but owned by nothing"
            assert thin_exists(pool, tid)
        elif state != FOREIGN:
            assert tid not in owners
            assert not thin_exists(pool, tid), f"thin id {tid} leaked in the pool"
    # Devices: ours are exactly the recorded ones, each mapping its own thin id, no duplicates.
    ours = sorted(n for n in dm.list_names() if (d := dm.info(n)) and d.uuid.startswith("IMG-"))
    assert len(ours) == len(set(ours))
    expected = {r.device: r.thin_id for r in layers} | {a.device: a.thin_id for a in acts}
    assert set(ours) <= set(expected), f"devices not in the record: {set(ours) - set(expected)}"
    mapped = [int(dm.table(n).params.split()[1]) for n in ours]
    assert mapped == [expected[n] for n in ours] and len(set(mapped)) == len(mapped)
    layer_devices = {r.device for r in layers}
    for n in ours:
        d = dm.info(n)
        assert d is not None and d.open_count == 0 and not d.suspended  # no mount, no suspended origin
        assert d.read_only == (n in layer_devices)  # complete layers are read-only, activations not


@pytest.mark.parametrize(("step", "point"), CASES, ids=[f"{s}-{p}" for s, p in CASES])
def test_kill_9_then_reconcile(thin_pool: ThinPool, tmp_path: Path, step: str, point: str) -> None:
    sc = Scenario(thin_pool, tmp_path)
    sc.prepare(step)
    r = sc.crash(step, point)
    assert r.returncode == -signal.SIGKILL, f"not killed at {point}: rc={r.returncode} {r.stdout} {r.stderr}"
    origin = layer_names(sc.cids[0 if step == "layer1" else 1])[0]
    if point.endswith(":suspended"):  # the helper died with the origin suspended
        d = dm.info(origin)
        assert d is not None and d.suspended
    svc = sc.service()  # restart: reconcile
    try:
        assert svc.last_reconcile["quarantined"] == []
        assert list((sc.state / "mnt").glob("layer.*")) == []
        assert svc.last_reconcile["resumed"] == ([origin] if point.endswith(":suspended") else [])
        assert_consistent(svc, thin_pool.name)
        again = sc.run_in_process(svc, step)  # the retry completes the step
        assert_consistent(svc, thin_pool.name)
        if step.startswith("layer"):
            assert again["created"] or point == "layer:after-complete"
            with mounted(again["device"]) as mnt:
                assert (mnt / "rootfs/etc/current").read_text() == f"{int(step[-1])}\n"
        elif step == "activate":
            assert dm.info("img-act-crash") is not None
            with mounted(again["device"]) as mnt:
                assert tree(mnt / "rootfs")["etc/layer1"][0] == "f"
        elif step == "deactivate":
            assert dm.info("img-act-crash") is None and svc.record.activation("crash") is None
        else:
            assert svc.record.layer(sc.cids[1]) is None
            assert dm.info(layer_names(sc.cids[1])[0]) is None
        # A second restart finds nothing to do.
        svc.close()
        svc = sc.service()
        rep = svc.last_reconcile
        assert not any(rep[k] for k in ("replayed", "discarded_layers", "discarded_activations",
                                        "deleted_orphans", "quarantined", "unknown_devices", "resumed")), rep
    finally:
        svc.close()


def test_apply_child_killed_leaves_nothing(thin_pool: ThinPool, tmp_path: Path) -> None:
    """The extraction child dies (kill -9 inside it): the helper reports it and discards the layer."""
    sc = Scenario(thin_pool, tmp_path)
    r = sc.crash("layer0", "apply:before-extract")
    assert r.returncode == 3, r.stderr
    assert json.loads(r.stdout)["code"] == "apply"
    svc = sc.service()
    try:
        assert svc.last_reconcile["discarded_layers"] == []  # the helper itself cleaned up
        assert svc.record.layers() == []
        assert_consistent(svc, thin_pool.name)
    finally:
        svc.close()


def test_reconcile_leaves_unknown_img_devices_alone(thin_pool: ThinPool, tmp_path: Path) -> None:
    name = "img-layer-" + "0" * 64
    dm.create_thin(thin_pool.name, 99)
    dm.create_thin_device(name, thin_pool.name, 99, 8192, uuid="IMG-layer-" + "0" * 64)
    try:
        svc = Service(thin_pool.name, tmp_path / "state", virtual_size=VSIZE)
        try:
            assert svc.last_reconcile["unknown_devices"] == [name]
            assert dm.info(name) is not None
            assert svc.record.thins() == []  # thin 99 is not ours: not even recorded
        finally:
            svc.close()
    finally:
        dm.remove(name)


def test_record_of_another_pool_is_refused(thin_pool: ThinPool, tmp_path: Path) -> None:
    from img_helper.record import Record, RecordError

    Record(tmp_path / "state", "other-pool").close()
    with pytest.raises(RecordError) as exc:
        Service(thin_pool.name, tmp_path / "state", virtual_size=VSIZE)
    assert exc.value.code == "pool"
    os.stat(tmp_path / "state")


def test_replay_with_unknown_outcome_quarantines_the_id(thin_pool: ThinPool, tmp_path: Path) -> None:
    """A delete was in flight when the helper died, and its replay fails for a reason that says nothing
    about what happened (here EBUSY: the thin is open). The id is quarantined: never reused, never
    touched again; ids allocated but never sent are simply marked gone."""
    from img_helper.record import QUARANTINED, Record

    rec = Record(tmp_path / "state", thin_pool.name)
    assert [rec.allocate_thin_id("layer", f"c{i}", dm.MAX_THIN_ID) for i in range(3)] == [1, 2, 3]
    dm.create_thin(thin_pool.name, 3)
    holder = f"{thin_pool.name}-holder"
    dm.create_thin_device(holder, thin_pool.name, 3, 8192, uuid="TEST-holder")
    rec.begin_intent("delete", 3)
    rec.close()
    try:
        svc = Service(thin_pool.name, tmp_path / "state", virtual_size=VSIZE)
        try:
            assert svc.last_reconcile["quarantined"] == [3]
            assert [(t.thin_id, t.state) for t in svc.record.thins()] == [(1, DELETED), (2, DELETED),
                                                                          (3, QUARANTINED)]
            assert dm.info(holder) is not None and thin_exists(thin_pool.name, 3)
            svc.reconcile()
            assert len(svc.record.intents_for(3)) == 1  # not retried
            assert svc.status()["record"]["quarantined"] == [3]
            blob = Scenario(thin_pool, tmp_path).blobs[0]
            with open(blob.path, "rb") as f:
                r = svc.ensure_layer(blob.digest, None, f.fileno(), 0, blob.size, blob.sha256, None)
            assert r["thin_id"] == 4
        finally:
            svc.close()
    finally:
        dm.remove(holder)


def test_pool_recreated_under_a_kept_record(thin_pool: ThinPool, tmp_path: Path) -> None:
    """The pool's transaction id stamps it for the record: a pool re-created empty (id back at 0) makes
    the record forget what it held (instead of claiming layers that are gone); ids are still not reused."""
    sc = Scenario(thin_pool, tmp_path)
    svc = sc.service()
    stamp = dm.pool_status(thin_pool.name).transaction_id
    assert stamp != 0 and svc.last_reconcile["pool"] == "new"
    first = sc.run_in_process(svc, "layer0")
    svc.close()
    # Re-create the pool on the same loop devices with fresh metadata.
    table = dm.table(thin_pool.name)
    pool_info = dm.info(thin_pool.name)
    assert pool_info is not None
    for n in dm.list_names():
        if n != thin_pool.name and pool_info.devno in dm.deps(n):
            dm.remove(n)
    dm.remove(thin_pool.name)
    with open(thin_pool.meta_loop, "r+b") as f:
        f.write(bytes(4096))
    dm.create(thin_pool.name, table.length_sectors, "thin-pool", table.params)
    svc = sc.service()
    try:
        assert svc.last_reconcile["pool"] == "recreated"
        assert svc.record.layers() == [] and all(t.state == DELETED for t in svc.record.thins())
        again = sc.run_in_process(svc, "layer0")
        assert again["created"] and again["thin_id"] > first["thin_id"]
        assert_consistent(svc, thin_pool.name)
    finally:
        svc.close()
    # Someone else moving the transaction id: refuse to touch the pool.
    new_stamp = dm.pool_status(thin_pool.name).transaction_id
    dm.set_transaction_id(thin_pool.name, new_stamp, new_stamp + 1)
    from img_helper.devices import DeviceError

    with pytest.raises(DeviceError) as exc:
        sc.service()
    assert exc.value.code == "conflict"
