"""The layer chain and activations on a real pool (Service end to end, no socket)."""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from img_helper import dm
from img_helper.devices import DeviceError, layer_names
from img_helper.record import COMPLETE, DELETED, FOREIGN, LIVE
from img_helper.service import Service
from tests.fixtures.dmpool import ThinPool
from tests.kernel.test_devices_support import (
    Blob,
    chain_ids,
    extractor_tree,
    layer_series,
    make_tar,
    mounted,
    tree,
    write_blob,
)

pytestmark = pytest.mark.kernel
GiB = 1 << 30


@pytest.fixture
def svc(thin_pool: ThinPool, tmp_path: Path) -> Iterator[Service]:
    s = Service(thin_pool.name, tmp_path / "state", virtual_size=GiB)
    yield s
    s.close()


def ensure(svc: Service, blobs: list[Blob], upto: int | None = None) -> list[dict]:  # type: ignore[type-arg]
    cids = chain_ids([b.digest for b in blobs])
    out = []
    for i, b in enumerate(blobs[:upto]):
        with open(b.path, "rb") as f:
            out.append(svc.ensure_layer(cids[i], cids[i - 1] if i else None, f.fileno(), 0, b.size, b.sha256,
                                        None))
    return out


def our_devices() -> list[str]:
    return sorted(n for n in dm.list_names() if (d := dm.info(n)) and d.uuid.startswith("IMG-"))


def pool_snapshot(pool: str) -> tuple[list[str], int, int, int]:
    s = dm.pool_status(pool)
    return our_devices(), s.transaction_id, s.used_data_blocks, s.used_metadata_blocks


def thin_exists(pool: str, thin_id: int) -> bool:
    """Probe without changing anything in the end: create_thin is EEXIST iff the id exists."""
    try:
        dm.create_thin(pool, thin_id)
    except dm.DmExists:
        return True
    dm.delete_thin(pool, thin_id)
    return False


def test_record_is_private(svc: Service) -> None:
    st_dir, st_file = os.stat(svc.state_dir), os.stat(svc.record.path)
    assert stat.S_IMODE(st_dir.st_mode) == 0o700 and stat.S_IMODE(st_file.st_mode) == 0o600
    assert st_dir.st_uid == st_file.st_uid == 0


def test_first_layer_then_repeat_creates_nothing(svc: Service, thin_pool: ThinPool, tmp_path: Path) -> None:
    blob = write_blob(tmp_path, layer_series(1)[0])
    progress: list[dict] = []  # type: ignore[type-arg]
    cid = blob.digest
    t0 = time.monotonic()
    with open(blob.path, "rb") as f:
        r = svc.ensure_layer(cid, None, f.fileno(), 0, blob.size, blob.sha256, progress.append)
    elapsed = time.monotonic() - t0
    name, uuid = layer_names(cid)
    assert r == {"chain_id": cid, "device": f"/dev/mapper/{name}", "thin_id": r["thin_id"], "created": True}
    d = dm.info(name)
    assert d is not None and d.uuid == uuid and d.read_only and d.open_count == 0
    assert dm.table(name).length_sectors == GiB // 512
    row = svc.record.layer(cid)
    assert row is not None and row.state == COMPLETE and row.stats and row.stats["files"] >= 3
    print(f"first layer: {elapsed:.2f}s, timings {svc.devices.last_timings}")
    assert {"created", "mkfs"} <= {p["step"] for p in progress}
    json.dumps(progress)

    before = pool_snapshot(thin_pool.name)
    next_id = svc.record.next_thin_id()
    with open(blob.path, "rb") as f:
        again = svc.ensure_layer(cid, None, f.fileno(), 0, blob.size, blob.sha256, None)
    assert again == {**r, "created": False}
    assert pool_snapshot(thin_pool.name) == before
    assert svc.record.next_thin_id() == next_id
    with mounted(r["device"]) as mnt:
        assert sorted(p.name for p in mnt.iterdir()) == ["image.json", "lost+found", "rootfs"]
        doc = json.loads((mnt / "image.json").read_text())
        assert doc["chain_ids"] == [cid] and doc["layers"][0]["digest"] == blob.digest
        assert (mnt / "rootfs/etc/layer0").read_bytes() == b"layer 0\n"


def test_chain_of_twelve_layers_activation_equals_extractor_output(svc: Service, thin_pool: ThinPool,
                                                                    tmp_path: Path) -> None:
    blobs = [write_blob(tmp_path, t) for t in layer_series(12)]
    cids = chain_ids([b.digest for b in blobs])
    t0 = time.monotonic()
    results = ensure(svc, blobs)
    per_layer = (time.monotonic() - t0) / len(blobs)
    assert [r["created"] for r in results] == [True] * 12
    assert len({r["thin_id"] for r in results}) == 12
    assert all(dm.table(layer_names(c)[0]).length_sectors == GiB // 512 for c in cids)
    act = svc.activate(cids[-1], "web-1")
    assert act["created"] and act["device"] == "/dev/mapper/img-act-web-1"
    d = dm.info("img-act-web-1")
    assert d is not None and d.uuid == "IMG-act-web-1" and not d.read_only
    assert dm.table("img-act-web-1").length_sectors == GiB // 512
    expected = extractor_tree(blobs, tmp_path / "reference")
    with mounted(act["device"], read_only=False) as mnt:
        assert tree(mnt / "rootfs") == expected
        doc = json.loads((mnt / "image.json").read_text())
        assert doc["chain_ids"] == cids and [x["digest"] for x in doc["layers"]] == [b.digest for b in blobs]
        (mnt / "rootfs/written-by-user").write_text("scratch")
    # Writes to the activation do not reach the layer.
    with mounted(f"/dev/mapper/{layer_names(cids[-1])[0]}") as mnt:
        assert not (mnt / "rootfs/written-by-user").exists()
    print(f"12 layers: {per_layer:.2f}s per layer")
    listing = svc.list_devices()
    assert {x["chain_id"] for x in listing["layers"]} == set(cids)
    assert listing["activations"] == [{"name": "web-1", "chain_id": cids[-1], "thin_id": act["thin_id"],
                                       "device": act["device"], "size": GiB, "active": True}]


def test_two_images_sharing_first_layers_share_devices(svc: Service, thin_pool: ThinPool,
                                                        tmp_path: Path) -> None:
    big = make_tar([("dir", "usr"), ("file", "usr/big", os.urandom(4 << 20))])
    base = [write_blob(tmp_path, big), write_blob(tmp_path, make_tar([("file", "two", b"2")]))]
    img_a = [*base, write_blob(tmp_path, make_tar([("file", "a", b"a")]))]
    img_b = [*base, write_blob(tmp_path, make_tar([("file", "b", b"b")]))]
    used0 = dm.pool_status(thin_pool.name).used_data_blocks
    ra = ensure(svc, img_a)
    used_a = dm.pool_status(thin_pool.name).used_data_blocks
    devices_a = our_devices()
    rb = ensure(svc, img_b)
    used_b = dm.pool_status(thin_pool.name).used_data_blocks
    assert [r["created"] for r in rb] == [False, False, True]
    assert [r["thin_id"] for r in rb[:2]] == [r["thin_id"] for r in ra[:2]]
    assert [r["device"] for r in rb[:2]] == [r["device"] for r in ra[:2]]
    assert len(our_devices()) == len(devices_a) + 1
    block = thin_pool.block_sectors * 512
    big_blocks = (4 << 20) // block
    # Image A paid for the 4 MiB file; image B's only new layer costs far less than that.
    assert used_a - used0 >= big_blocks
    assert used_b - used_a < big_blocks // 4, (used0, used_a, used_b)
    print(f"pool blocks ({block} B): A={used_a - used0}, B extra={used_b - used_a}")


def test_activate_deactivate_idempotent(svc: Service, thin_pool: ThinPool, tmp_path: Path) -> None:
    blobs = [write_blob(tmp_path, t) for t in layer_series(2)]
    top = ensure(svc, blobs)[-1]["chain_id"]
    a = svc.activate(top, "x")
    before = pool_snapshot(thin_pool.name)
    assert svc.activate(top, "x") == {**a, "created": False}
    assert pool_snapshot(thin_pool.name) == before
    with pytest.raises(DeviceError) as exc:
        svc.activate(chain_ids([blobs[0].digest])[0], "x")
    assert exc.value.code == "conflict"
    assert svc.deactivate("x") == {"name": "x", "removed": True}
    assert dm.info("img-act-x") is None and not os.path.exists("/dev/mapper/img-act-x")
    assert not thin_exists(thin_pool.name, a["thin_id"])
    thin = svc.record.thin(a["thin_id"])
    assert thin is not None and thin.state == DELETED
    assert svc.deactivate("x") == {"name": "x", "removed": False}
    with pytest.raises(DeviceError) as exc:
        svc.activate("sha256:" + "0" * 64, "y")
    assert exc.value.code == "not_found"
    for bad in ("", "../x", "a b", "x" * 120, "-x"):
        with pytest.raises(DeviceError) as exc:
            svc.activate(top, bad)
        assert exc.value.code == "invalid"


def test_activation_survives_device_loss(svc: Service, thin_pool: ThinPool, tmp_path: Path) -> None:
    """After a reboot the devices are gone but the thins are not: steps bring them back, data intact."""
    blobs = [write_blob(tmp_path, t) for t in layer_series(2)]
    res = ensure(svc, blobs)
    a = svc.activate(res[-1]["chain_id"], "keep")
    with mounted(a["device"], read_only=False) as mnt:
        (mnt / "rootfs/state").write_text("kept")
    for name in our_devices():
        dm.remove(name)
    assert svc.activate(res[-1]["chain_id"], "keep") == {**a, "created": False}
    with mounted(a["device"]) as mnt:
        assert (mnt / "rootfs/state").read_text() == "kept"
    again = ensure(svc, blobs)
    assert [r["created"] for r in again] == [False, False]
    assert all(dm.info(layer_names(r["chain_id"])[0]) for r in again)


def test_delete_layer_refuses_while_used(svc: Service, thin_pool: ThinPool, tmp_path: Path) -> None:
    blobs = [write_blob(tmp_path, t) for t in layer_series(2)]
    res = ensure(svc, blobs)
    c0, c1 = res[0]["chain_id"], res[1]["chain_id"]
    svc.activate(c1, "a")
    with pytest.raises(DeviceError) as exc:
        svc.delete_layer(c0)
    assert exc.value.code == "in_use" and exc.value.details["children"] == [c1]
    with pytest.raises(DeviceError) as exc:
        svc.delete_layer(c1)
    assert exc.value.code == "in_use" and exc.value.details["activations"] == ["a"]
    svc.deactivate("a")
    assert svc.delete_layer(c1) == {"chain_id": c1, "removed": True}
    assert not thin_exists(thin_pool.name, res[1]["thin_id"])
    assert svc.delete_layer(c0) == {"chain_id": c0, "removed": True}
    assert svc.delete_layer(c0) == {"chain_id": c0, "removed": False}
    assert our_devices() == []
    assert dm.pool_status(thin_pool.name).used_data_blocks == 0


def test_bad_digest_leaves_nothing_and_retry_works(svc: Service, thin_pool: ThinPool, tmp_path: Path) -> None:
    blob = write_blob(tmp_path, layer_series(1)[0])
    wrong = "0" * 64  # the caller claims another digest (and its chain id): the extractor finds out
    with open(blob.path, "rb") as f, pytest.raises(DeviceError) as exc:
        svc.ensure_layer("sha256:" + wrong, None, f.fileno(), 0, blob.size, wrong, None)
    assert exc.value.code == "extract" and exc.value.details["extract_code"] == "digest"
    assert svc.record.layer("sha256:" + wrong) is None
    assert our_devices() == []
    assert [t.state for t in svc.record.thins()] == [DELETED]
    assert not thin_exists(thin_pool.name, 1)
    r = ensure(svc, [blob])[0]
    assert r["created"] and r["thin_id"] == 2  # ids are never reused


def test_missing_parent_is_refused(svc: Service, tmp_path: Path) -> None:
    blob = write_blob(tmp_path, layer_series(1)[0])
    parent = "sha256:" + "2" * 64
    cid = chain_ids([parent, blob.digest])[1]
    with open(blob.path, "rb") as f, pytest.raises(DeviceError) as exc:
        svc.ensure_layer(cid, parent, f.fileno(), 0, blob.size, blob.sha256, None)
    assert exc.value.code == "not_found"
    assert svc.record.thins() == []


def test_chain_id_poisoning_is_refused(svc: Service, thin_pool: ThinPool, tmp_path: Path) -> None:
    """A caller may not file its own content under the chain id of another image's layer: the chain id
    must derive from the parent and the (verified) blob digest, or later users of that chain id would
    get the planted content."""
    victim = write_blob(tmp_path, layer_series(1)[0])
    planted = write_blob(tmp_path, make_tar([("file", "etc/passwd", b"root::0:0::/root:/bin/sh\n")]))
    before = pool_snapshot(thin_pool.name)
    second = chain_ids([victim.digest, victim.digest])[1]
    for chain_id, parent in ((victim.digest, None), (second, victim.digest)):
        with open(planted.path, "rb") as f, pytest.raises(DeviceError) as exc:
            svc.ensure_layer(chain_id, parent, f.fileno(), 0, planted.size, planted.sha256, None)
        assert exc.value.code == "invalid"
    assert svc.record.thins() == [] and pool_snapshot(thin_pool.name) == before
    assert ensure(svc, [victim])[0]["created"]


def test_foreign_thin_id_is_skipped_and_never_touched(svc: Service, thin_pool: ThinPool,
                                                      tmp_path: Path) -> None:
    """Someone else's thin id 1 in the pool: we move on to 2 and never delete theirs."""
    dm.create_thin(thin_pool.name, 1)
    blob = write_blob(tmp_path, layer_series(1)[0])
    r = ensure(svc, [blob])[0]
    assert r["thin_id"] == 2
    t1 = svc.record.thin(1)
    assert t1 is not None and t1.state == FOREIGN
    svc.delete_layer(r["chain_id"])
    svc.reconcile()
    assert thin_exists(thin_pool.name, 1)
    assert not thin_exists(thin_pool.name, 2)


def test_foreign_device_with_our_name_is_a_conflict(svc: Service, thin_pool: ThinPool,
                                                    tmp_path: Path) -> None:
    blob = write_blob(tmp_path, layer_series(1)[0])
    name, _uuid = layer_names(blob.digest)
    dm.create(name, 8, "error", "", uuid="SOMEONE-else")
    try:
        with pytest.raises(DeviceError) as exc:
            ensure(svc, [blob])
        assert exc.value.code == "conflict"
        d = dm.info(name)
        assert d is not None and d.uuid == "SOMEONE-else"  # untouched
        assert svc.record.layer(blob.digest) is None
        assert svc.record.thins() == []  # refused before any pool change
    finally:
        dm.remove(name)


def test_status_reports_pool_usage(svc: Service, thin_pool: ThinPool, tmp_path: Path) -> None:
    s = svc.status()
    assert s["pool"]["name"] == thin_pool.name
    assert s["pool"]["data_block_sectors"] == thin_pool.block_sectors
    assert s["pool"]["data_total_bytes"] == thin_pool.data_sectors * 512
    assert s["pool"]["data_used_bytes"] == 0 and s["pool"]["no_space_mode"] == "queue"
    ensure(svc, [write_blob(tmp_path, layer_series(1)[0])])
    s2 = svc.status()
    assert s2["pool"]["data_used_bytes"] > 0 and s2["record"]["layers"] == 1
    assert s2["version"]["native"].startswith("img-native")
    json.dumps(s2)
    assert errno.EEXIST  # keep import used for readers: errors are typed by errno
    live = [t for t in svc.record.thins() if t.state == LIVE]
    assert len(live) == 1


def test_parallel_steps(svc: Service, thin_pool: ThinPool, tmp_path: Path) -> None:
    """Different chains extract in parallel; the same chain twice at once is built once."""
    from concurrent.futures import ThreadPoolExecutor

    blobs = [write_blob(tmp_path, make_tar([("file", f"f{i}", os.urandom(100_000))])) for i in range(3)]

    def one(b: Blob) -> dict:  # type: ignore[type-arg]
        with open(b.path, "rb") as f:
            return svc.ensure_layer(b.digest, None, f.fileno(), 0, b.size, b.sha256, None)

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(one, [*blobs, *blobs]))
    for i in range(len(blobs)):
        pair = [results[i], results[i + 3]]
        assert sorted(r["created"] for r in pair) == [False, True], pair
        assert pair[0]["thin_id"] == pair[1]["thin_id"]
    assert len(svc.record.thins()) == 3
    assert len(our_devices()) == 3


def test_deactivate_refuses_while_mounted(svc: Service, thin_pool: ThinPool, tmp_path: Path) -> None:
    """An activation in use is never torn down: typed "busy", thin id kept, and it works once unmounted."""
    top = ensure(svc, [write_blob(tmp_path, layer_series(1)[0])])[-1]["chain_id"]
    a = svc.activate(top, "busy")
    with mounted(a["device"]):
        with pytest.raises(DeviceError) as exc:
            svc.deactivate("busy")
        assert exc.value.code == "busy" and exc.value.details["op"] == "remove"
        assert dm.info("img-act-busy") is not None and thin_exists(thin_pool.name, a["thin_id"])
        act = svc.record.activation("busy")
        assert act is not None and act.state == "active"
    assert svc.deactivate("busy") == {"name": "busy", "removed": True}
    assert not thin_exists(thin_pool.name, a["thin_id"])


def test_module_planted_in_working_directory_is_not_run_as_root(svc: Service, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m` puts the working directory first on sys.path: a helper started from a user's
    directory must not import that user's `img_helper/apply_child.py` as root."""
    evil = tmp_path / "evil"
    (evil / "img_helper").mkdir(parents=True)
    marker = tmp_path / "pwned"
    payload = f"open({str(marker)!r}, 'w').write('root code')\n"
    (evil / "img_helper/__init__.py").write_text(payload)
    (evil / "img_helper/apply_child.py").write_text(payload)
    monkeypatch.chdir(evil)
    monkeypatch.setenv("PYTHONPATH", str(evil))
    blob = write_blob(tmp_path, layer_series(1)[0])
    r = ensure(svc, [blob])[0]
    assert r["created"] and not marker.exists()


def _mounts_of(devno: int) -> dict[int, list[str]]:
    """pid -> mount options of every mount of `devno`, from each process's own mountinfo."""
    want = f"{os.major(devno)}:{os.minor(devno)}"
    out: dict[int, list[str]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            lines = (p / "mountinfo").read_text().splitlines()
        except OSError:
            continue
        opts = [f.split()[5] for f in lines if f.split()[2] == want]
        if opts:
            out[int(p.name)] = opts
    return out


def test_layer_is_mounted_only_in_a_private_namespace_nosuid_nodev(svc: Service, tmp_path: Path) -> None:
    entries: list[tuple] = [("dir", "many")]  # type: ignore[type-arg]
    entries += [("file", f"many/f{i}", b"x") for i in range(3000)]  # enough entries for progress events
    blob = write_blob(tmp_path, make_tar(entries))
    seen: list[dict[int, list[str]]] = []

    def progress(ev: dict) -> None:  # type: ignore[type-arg]
        if ev["step"] == "apply" and not seen:
            d = dm.info(layer_names(blob.digest)[0])
            assert d is not None
            seen.append(_mounts_of(d.devno))

    with open(blob.path, "rb") as f:
        svc.ensure_layer(blob.digest, None, f.fileno(), 0, blob.size, blob.sha256, progress)
    assert seen, "no progress event arrived during the extraction"
    mounts = seen[0]
    assert os.getpid() not in mounts and len(mounts) == 1, mounts  # only the apply child sees it
    [opts] = list(mounts.values())
    assert len(opts) == 1 and {"nosuid", "nodev", "noatime"} <= set(opts[0].split(",")), opts
    d = dm.info(layer_names(blob.digest)[0])
    assert d is not None and _mounts_of(d.devno) == {} and d.open_count == 0
