"""Layers as a chain of thin snapshots, and activations, on one thin pool.

A layer device is keyed by its chain id. The first layer is a new thin device with a fresh ext4; each
later layer is a thin snapshot of its parent with that layer applied. Identical stacks are stored once.
An activation is a new thin snapshot of a complete layer.

Device-mapper names and UUIDs (our prefixes, so our devices are recognisable after a crash):
    layer       img-layer-<chain hex>        IMG-layer-<chain hex>
    activation  img-act-<name>               IMG-act-<name>

Every pool change goes through _pool_create/_pool_delete: the thin id is allocated and committed to the
record first, an intent is committed before the message and finished after it; reconcile() replays
pending intents after a crash (EEXIST on create = done, ENODATA on delete = gone, anything else =
quarantine) and then discards whatever was half built. The pool's transaction id is set once to a random
stamp the record keeps: a pool found back at 0 was re-created empty (the record forgets its contents),
any other value means another manager, and the helper refuses the pool.

Layer states: creating (thin exists, no filesystem yet) -> applying -> complete. Complete layer devices
are kept active read-only; the filesystem is only ever mounted inside apply_child's private namespace.
deactivate(name) removes the activation's device AND deletes its thin id: writes to an activation are
discarded with it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from img_helper import dm
from img_helper.record import (
    ACTIVATING,
    ACTIVE,
    ALLOCATED,
    APPLYING,
    COMPLETE,
    CREATING,
    DELETED,
    FOREIGN,
    LIVE,
    QUARANTINED,
    ActivationRow,
    LayerRow,
    Record,
)

DEFAULT_VIRTUAL_BYTES = 10 << 30
LAYER_NAME, LAYER_UUID = "img-layer-", "IMG-layer-"
ACT_NAME, ACT_UUID = "img-act-", "IMG-act-"
OUR_UUID_PREFIX = "IMG-"
METADATA_SLACK_BYTES = 8 << 20  # ext4 metadata a layer writes besides its files
# A 16 MiB journal (not 64 MiB for 10 GiB): every layer is a snapshot, so journal blocks a layer's
# extraction touches are copied into that layer; this bounds the copy. Prezeroed: thin reads unprovisioned
# blocks as zeros, so mkfs need not write them.
MKFS_ARGS = ["mkfs.ext4", "-q", "-F", "-m", "0", "-J", "size=16",
             "-E", "nodiscard,assume_storage_prezeroed=1"]

_CHAIN_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_HEX_RE = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")
_ACT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,118}$")  # "img-act-" + name fits DM's 127
# Errnos after which the kernel certainly changed nothing (the message was refused as a whole).
_NOTHING_CHANGED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENODATA, errno.EPERM, errno.ENXIO, errno.ENODEV}

Progress = Callable[[dict[str, Any]], None]


class DeviceError(Exception):
    """A step failed. `code`: invalid | not_found | in_use | conflict | extract | mkfs | busy | no_space |
    dm | apply. `details` is JSON-able (op/errno/device for dm errors, entry/reason for extraction)."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.details = code, message, details
        for k, v in details.items():  # scalar details as attributes too: the server forwards those
            if k not in ("args", "code", "message", "details", "with_traceback", "add_note"):
                setattr(self, k, v)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.details}


def crash_point(name: str) -> None:
    """Test hook: IMG_HELPER_CRASH_AT=<name> kills the helper with SIGKILL (a real kill -9) at that point."""
    if os.environ.get("IMG_HELPER_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def check_chain_id(chain_id: str) -> str:
    m = _CHAIN_RE.match(chain_id) if isinstance(chain_id, str) else None
    if not m:
        raise DeviceError("invalid", "chain id must be sha256:<64 lowercase hex>", value=str(chain_id)[:100])
    return m.group(1)


def check_activation_name(name: str) -> str:
    if not isinstance(name, str) or not _ACT_RE.match(name):
        raise DeviceError("invalid", "activation name must match [A-Za-z0-9][A-Za-z0-9_.+-]{0,118}",
                          value=str(name)[:100])
    return name


def expected_chain_id(parent_chain_id: str | None, blob_sha256_hex: str) -> str:
    """OCI ChainID rule (img_helper.formats.chain_ids): the blob digest, or sha256("<parent> <digest>")."""
    digest = "sha256:" + blob_sha256_hex
    if parent_chain_id is None:
        return digest
    return "sha256:" + hashlib.sha256(f"{parent_chain_id} {digest}".encode()).hexdigest()


def layer_names(chain_id: str) -> tuple[str, str]:
    hx = check_chain_id(chain_id)
    return LAYER_NAME + hx, LAYER_UUID + hx  # the full hex: a name no other chain can take


def activation_names(name: str) -> tuple[str, str]:
    check_activation_name(name)
    return ACT_NAME + name, ACT_UUID + name


def wrap_dm(e: dm.DmError) -> DeviceError:
    code = {errno.EBUSY: "busy", errno.ENOSPC: "no_space"}.get(e.errno, "dm")
    return DeviceError(code, e.message or str(e), op=e.op, errno=e.errno, device=e.device)


class Devices:
    """The layer chain and activations of one pool. Thread-safe: pool changes are serialized by one lock;
    steps on different chain ids / names (and their extractions) run in parallel."""

    def __init__(self, pool: str, record: Record, work_dir: Path,
                 virtual_sectors: int = DEFAULT_VIRTUAL_BYTES // 512) -> None:
        self.pool = pool
        self.record = record
        self.work_dir = Path(work_dir)
        self.virtual_sectors = virtual_sectors
        self._pool_lock = threading.RLock()
        self._keys_lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self.last_timings: dict[str, float] = {}

    @contextmanager
    def _key(self, key: str) -> Iterator[None]:
        with self._keys_lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            yield

    # --- pool changes with intents -----------------------------------------------------------------

    def _pool_create(self, owner_kind: str, owner_key: str, origin: LayerRow | None) -> int:
        """create_thin (origin None) or create_snap of origin's thin; returns the new thin id (LIVE)."""
        op = "create_snap" if origin else "create_thin"
        for _ in range(64):
            tid = self.record.allocate_thin_id(owner_kind, owner_key, dm.MAX_THIN_ID)
            intent = self.record.begin_intent(op, tid, origin.thin_id if origin else None)
            crash_point(f"{op}:after-intent")
            try:
                if origin is None:
                    dm.create_thin(self.pool, tid)
                else:
                    with dm.suspended(origin.device if dm.info(origin.device) else None):
                        crash_point(f"{op}:suspended")
                        dm.create_snap(self.pool, tid, origin.thin_id)
            except dm.DmExists as e:
                # First attempt on a fresh id: it was in the pool before we ever sent it. Not ours.
                self.record.finish_intent(intent, FOREIGN, error=str(e), reason="existed before first use")
                continue
            except dm.DmError as e:
                if e.errno in _NOTHING_CHANGED:
                    self.record.finish_intent(intent, DELETED, error=str(e), reason="refused by the pool")
                else:
                    self.record.finish_intent(intent, QUARANTINED, error=str(e), reason=f"{op} failed: {e}")
                raise wrap_dm(e) from e
            crash_point(f"{op}:after-op")
            self.record.finish_intent(intent, LIVE)
            return tid
        raise DeviceError("dm", "64 consecutive thin ids already existed in the pool")

    def _pool_delete(self, thin_id: int) -> None:
        row = self.record.thin(thin_id)
        if row is None or row.state in (DELETED, QUARANTINED, FOREIGN):
            return
        if row.state == ALLOCATED and not self.record.intents_for(thin_id):
            self.record.set_thin_state(thin_id, DELETED, "never sent to the pool")
            return
        intent = self.record.begin_intent("delete", thin_id)
        crash_point("delete:after-intent")
        try:
            dm.delete_thin(self.pool, thin_id)
        except dm.DmNoData:
            pass  # already gone
        except dm.DmError as e:
            if e.errno in _NOTHING_CHANGED or e.errno == errno.EBUSY:
                self.record.finish_intent(intent, LIVE, error=str(e))
            else:
                self.record.finish_intent(intent, QUARANTINED, error=str(e), reason=f"delete failed: {e}")
            raise wrap_dm(e) from e
        crash_point("delete:after-op")
        self.record.finish_intent(intent, DELETED)

    # --- our devices --------------------------------------------------------------------------------

    def _owned_info(self, name: str, uuid: str) -> dm.DeviceInfo | None:
        d = dm.info(name)
        if d is not None and d.uuid != uuid:
            raise DeviceError("conflict", f"device {name} exists but is not ours", device=name, uuid=d.uuid)
        return d

    def _remove_device(self, name: str, uuid: str, skip_foreign: bool = False) -> None:
        d = dm.info(name)
        if d is None or (skip_foreign and d.uuid != uuid):
            return  # absent, or someone else's device that happens to have our name: not ours to remove
        self._owned_info(name, uuid)
        try:
            dm.remove(name)
        except dm.DmError as e:
            raise wrap_dm(e) from e

    def _create_device(self, name: str, uuid: str, thin_id: int, sectors: int, read_only: bool) -> str:
        try:
            return dm.create_thin_device(name, self.pool, thin_id, sectors, uuid, read_only=read_only)
        except dm.DmError as e:
            raise wrap_dm(e) from e

    def _check_table(self, name: str, thin_id: int) -> None:
        t = dm.table(name)
        pool = dm.info(self.pool)
        want = f"{pool.major}:{pool.minor} {thin_id}" if pool else None
        if t.target_type != "thin" or t.params != want:
            raise DeviceError("conflict", f"device {name} maps {t.target_type} {t.params}, expected {want}",
                              device=name)

    def _ensure_layer_device(self, row: LayerRow) -> str:
        """A complete layer's device: active and read-only (re-created after a reboot or a crash)."""
        d = self._owned_info(row.device, row.uuid)
        if d is not None:
            self._check_table(row.device, row.thin_id)
            if d.read_only:
                return dm.device_path(row.device)
            self._remove_device(row.device, row.uuid)
        return self._create_device(row.device, row.uuid, row.thin_id, row.size_sectors, read_only=True)

    def check_space(self, need_bytes: int) -> None:
        """Refuses work the pool cannot take: a full (or failed) pool blocks or fails I/O mid-way.
        `need_bytes` is the blob's size, a lower bound for an uncompressed layer."""
        s = dm.pool_status(self.pool)
        if s.fail or s.read_only or s.needs_check:
            raise DeviceError("dm", "pool is failed, read-only or needs check", pool=self.pool)
        block_bytes = s.length_sectors * 512 // max(1, s.total_data_blocks)
        free = (s.total_data_blocks - s.used_data_blocks) * block_bytes
        if s.out_of_data_space or free < need_bytes + METADATA_SLACK_BYTES:
            raise DeviceError("no_space", f"pool {self.pool} has {free} bytes free, the layer needs more",
                              pool=self.pool, free_bytes=free, need_bytes=need_bytes)
        if s.used_metadata_blocks * 10 >= s.total_metadata_blocks * 9:
            raise DeviceError("no_space", f"pool {self.pool} metadata is over 90% full", pool=self.pool)

    # --- layers -------------------------------------------------------------------------------------

    def ensure_layer(self, chain_id: str, parent_chain_id: str | None, blob_fd: int, offset: int, length: int,
                     blob_sha256: str, progress: Progress | None = None) -> dict[str, Any]:
        device, uuid = layer_names(chain_id)
        if parent_chain_id is not None:
            check_chain_id(parent_chain_id)
            if parent_chain_id == chain_id:
                raise DeviceError("invalid", "a layer cannot be its own parent")
        m = _HEX_RE.match(blob_sha256) if isinstance(blob_sha256, str) else None
        if not m:
            raise DeviceError("invalid", "blob_sha256 must be [sha256:]<64 lowercase hex>")
        if chain_id != expected_chain_id(parent_chain_id, m.group(1)):
            # Devices are shared by chain id across callers: a chain id must be the one its content has,
            # or one caller could plant other content under the chain id of someone else's image.
            raise DeviceError("invalid", "chain_id is not the chain id of parent_chain_id + blob_sha256",
                              chain_id=chain_id)
        if offset < 0 or length < -1:
            raise DeviceError("invalid", "bad blob range", offset=offset, length=length)
        if length == -1:
            length = max(0, os.fstat(blob_fd).st_size - offset)
        with self._key(chain_id):
            row = self.record.layer(chain_id)
            if row is not None and row.state == COMPLETE:
                if row.parent_chain_id != parent_chain_id:
                    raise DeviceError("conflict", "layer exists with another parent", chain_id=chain_id,
                                      parent_chain_id=row.parent_chain_id)
                with self._pool_lock:
                    path = self._ensure_layer_device(row)
                return {"chain_id": chain_id, "device": path, "thin_id": row.thin_id, "created": False}
            if row is not None:
                self._discard_layer(row)
            return self._build_layer(chain_id, parent_chain_id, device, uuid, blob_fd, offset, length,
                                     m.group(1), progress)

    def _build_layer(self, chain_id: str, parent_chain_id: str | None, device: str, uuid: str, blob_fd: int,
                     offset: int, length: int, sha_hex: str, progress: Progress | None) -> dict[str, Any]:
        t0 = time.monotonic()
        with self._pool_lock:
            parent = None
            if parent_chain_id is not None:
                parent = self.record.layer(parent_chain_id)
                if parent is None or parent.state != COMPLETE:
                    raise DeviceError("not_found", "parent layer is not complete", chain_id=parent_chain_id)
                self._ensure_layer_device(parent)
            self._owned_info(device, uuid)  # a foreign device with our name: refuse before any pool change
            self.check_space(length)
            tid = self._pool_create("layer", chain_id, parent)
            sectors = parent.size_sectors if parent else self.virtual_sectors
            row = LayerRow(chain_id, parent_chain_id, tid, sectors, device, uuid, CREATING, sha_hex, None,
                           time.time(), None)
            self.record.insert_layer(row)
            crash_point("layer:after-create")
        timings: dict[str, float] = {"create": time.monotonic() - t0}
        try:
            with self._pool_lock:
                if self._owned_info(device, uuid) is not None:  # left by a crash: its table may be stale
                    self._remove_device(device, uuid)
                path = self._create_device(device, uuid, tid, sectors, read_only=False)
            if progress is not None:
                progress({"step": "created", "chain_id": chain_id, "thin_id": tid,
                          "snapshot_of": parent_chain_id})
            if parent is None:
                t = time.monotonic()
                r = subprocess.run([*MKFS_ARGS, "-L", "img-layer", path], capture_output=True, text=True)
                if r.returncode:
                    raise DeviceError("mkfs", r.stderr.strip()[-500:] or "mkfs.ext4 failed", device=path)
                timings["mkfs"] = time.monotonic() - t
                if progress is not None:
                    progress({"step": "mkfs", "chain_id": chain_id, "seconds": round(timings["mkfs"], 3)})
            self.record.set_layer_state(chain_id, APPLYING)
            crash_point("layer:before-apply")
            t = time.monotonic()
            stats = self._apply(path, chain_id, parent is None, blob_fd, offset, length, sha_hex, progress)
            timings["apply"] = time.monotonic() - t
            crash_point("layer:after-apply")
            self.record.set_layer_state(chain_id, COMPLETE, stats)
            crash_point("layer:after-complete")
            with self._pool_lock:
                done = self.record.layer(chain_id)
                assert done is not None
                path = self._ensure_layer_device(done)  # rw -> ro
        except BaseException:
            cur = self.record.layer(chain_id)
            if cur is not None and cur.state != COMPLETE:
                try:
                    self._discard_layer(cur)
                except DeviceError:
                    pass  # reconcile() or the next attempt finishes the cleanup
            raise
        timings["total"] = time.monotonic() - t0
        self.last_timings = timings
        return {"chain_id": chain_id, "device": path, "thin_id": tid, "created": True}

    def _apply(self, device_path: str, chain_id: str, first: bool, blob_fd: int, offset: int, length: int,
               sha_hex: str, progress: Progress | None) -> dict[str, Any]:
        mnt_root = self.work_dir / "mnt"
        mnt_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        mnt = tempfile.mkdtemp(prefix="layer.", dir=mnt_root)
        spec = {"device": device_path, "mount_dir": mnt, "first": first, "fd": blob_fd, "offset": offset,
                "length": length, "sha256": sha_hex, "chain_id": chain_id, "parent_pid": os.getpid()}
        result: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        try:
            with tempfile.TemporaryFile(dir=mnt_root) as errf:
                # -I and cwd=/: `-m` would otherwise import from the caller's working directory first.
                cmd = [sys.executable, "-I", "-m", "img_helper.apply_child", json.dumps(spec)]
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, pass_fds=(blob_fd,),
                                        stdin=subprocess.DEVNULL, cwd="/")
                assert proc.stdout is not None
                for line in proc.stdout:
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if "mounted" in msg:
                        crash_point("layer:during-apply")
                    elif "progress" in msg and progress is not None:
                        progress({"step": "apply", "chain_id": chain_id, **msg["progress"]})
                    elif "result" in msg:
                        result = msg["result"]
                    elif "error" in msg:
                        error = msg["error"]
                rc = proc.wait()
                errf.seek(0)
                stderr = errf.read()[-2000:].decode(errors="replace")
        finally:
            os.rmdir(mnt)
        if error is not None:
            code = "extract" if error.get("kind") == "extract" else "apply"
            raise DeviceError(code, error.get("reason", ""),
                              extract_code=error.get("code"), entry=error.get("entry", ""), chain_id=chain_id)
        if rc != 0 or result is None:
            raise DeviceError("apply", f"apply child exited {rc}: {stderr.strip()}", chain_id=chain_id)
        return result

    def _discard_layer(self, row: LayerRow) -> None:
        """Removes an incomplete (or deleted) layer: device, thin id, row — in that order."""
        with self._pool_lock:
            self._remove_device(row.device, row.uuid, skip_foreign=True)
            self._pool_delete(row.thin_id)
            self.record.delete_layer_row(row.chain_id)

    def delete_layer(self, chain_id: str) -> dict[str, Any]:
        check_chain_id(chain_id)
        with self._key(chain_id), self._pool_lock:
            row = self.record.layer(chain_id)
            if row is None:
                return {"chain_id": chain_id, "removed": False}
            children = self.record.layer_children(chain_id)
            acts = [a.name for a in self.record.activations(chain_id)]
            if children or acts:
                raise DeviceError("in_use", "layer has children or activations", chain_id=chain_id,
                                  children=children, activations=acts)
            self._discard_layer(row)
            return {"chain_id": chain_id, "removed": True}

    # --- activations --------------------------------------------------------------------------------

    def activate(self, chain_id: str, name: str) -> dict[str, Any]:
        check_chain_id(chain_id)
        device, uuid = activation_names(name)
        with self._key("act:" + name), self._pool_lock:
            row = self.record.activation(name)
            if row is not None and row.chain_id != chain_id:
                raise DeviceError("conflict", "activation name is in use for another image", name=name,
                                  chain_id=row.chain_id)
            if row is not None and row.state == ACTIVE:
                if self._owned_info(device, uuid) is None:  # e.g. after a reboot: its data is still there
                    self._create_device(device, uuid, row.thin_id, row.size_sectors, read_only=False)
                else:
                    self._check_table(device, row.thin_id)
                return {"name": name, "device": dm.device_path(device), "thin_id": row.thin_id,
                        "created": False}
            if row is not None:
                self._discard_activation(row)
            layer = self.record.layer(chain_id)
            if layer is None or layer.state != COMPLETE:
                raise DeviceError("not_found", "no complete layer with this chain id", chain_id=chain_id)
            self._ensure_layer_device(layer)
            self._owned_info(device, uuid)
            tid = self._pool_create("activation", name, layer)
            self.record.insert_activation(ActivationRow(name, chain_id, tid, layer.size_sectors, device, uuid,
                                                        ACTIVATING, time.time()))
            crash_point("activate:after-create")
            if self._owned_info(device, uuid) is not None:
                self._remove_device(device, uuid)
            path = self._create_device(device, uuid, tid, layer.size_sectors, read_only=False)
            crash_point("activate:after-device")
            self.record.set_activation_state(name, ACTIVE)
            return {"name": name, "device": path, "thin_id": tid, "created": True}

    def _discard_activation(self, row: ActivationRow) -> None:
        with self._pool_lock:
            self._remove_device(row.device, row.uuid, skip_foreign=True)
            self._pool_delete(row.thin_id)
            self.record.delete_activation_row(row.name)

    def deactivate(self, name: str) -> dict[str, Any]:
        check_activation_name(name)
        with self._key("act:" + name), self._pool_lock:
            row = self.record.activation(name)
            if row is None:
                return {"name": name, "removed": False}
            self._discard_activation(row)
            return {"name": name, "removed": True}

    # --- listing and reconcile ----------------------------------------------------------------------

    def list_devices(self) -> dict[str, Any]:
        layers = []
        for r in self.record.layers():
            if r.state != COMPLETE:
                continue
            d = dm.info(r.device)
            layers.append({"chain_id": r.chain_id, "parent_chain_id": r.parent_chain_id, "thin_id": r.thin_id,
                           "device": dm.device_path(r.device), "size": r.size_sectors * 512,
                           "active": d is not None and d.uuid == r.uuid})
        acts = []
        for a in self.record.activations():
            if a.state != ACTIVE:
                continue
            d = dm.info(a.device)
            acts.append({"name": a.name, "chain_id": a.chain_id, "thin_id": a.thin_id,
                         "device": dm.device_path(a.device), "size": a.size_sectors * 512,
                         "active": d is not None and d.uuid == a.uuid})
        return {"layers": layers, "activations": acts}

    def check_pool_identity(self) -> str:
        """The pool's transaction id is our stamp: set once (0 -> random) when the record first meets the
        pool. A pool back at 0 was re-created empty (the record's contents are gone with it); any other
        change means someone else manages this pool's transaction id, and we refuse to touch it."""
        txn = dm.pool_status(self.pool).transaction_id
        stamp = self.record.meta("pool_stamp")
        if stamp is not None and txn == int(stamp):
            return "same"
        if stamp is not None and txn != 0:
            raise DeviceError("conflict", f"pool {self.pool} transaction id is {txn}, the record expects "
                              f"{stamp}: another manager changed it", pool=self.pool)
        result = "new"
        if stamp is not None:  # txn == 0: re-created
            self.record.forget_pool_contents(f"pool {self.pool} was re-created (transaction id back at 0)")
            result = "recreated"
        if txn == 0:
            new = int.from_bytes(os.urandom(6), "big") | 1
            dm.set_transaction_id(self.pool, 0, new)
            txn = new
        self.record.set_meta("pool_stamp", str(txn))  # adopted as is when someone had set it before
        return result

    def reconcile(self) -> dict[str, Any]:
        """Brings the record and the pool back in line after a crash. Returns what it did."""
        report: dict[str, Any] = {"replayed": [], "quarantined": [], "discarded_layers": [],
                                  "discarded_activations": [], "deleted_orphans": [], "unknown_devices": [],
                                  "resumed": []}
        with self._pool_lock:
            report["pool"] = self.check_pool_identity()
            for stale in (self.work_dir / "mnt").glob("layer.*"):  # mount points of apply children that died
                try:
                    stale.rmdir()  # empty: the mount lived in the dead child's namespace
                except OSError:
                    pass
            # A crash between suspend and resume (around create_snap) leaves the origin suspended.
            rows = [(r.device, r.uuid) for r in self.record.layers()]
            for device, uuid in rows + [(a.device, a.uuid) for a in self.record.activations()]:
                d = dm.info(device)
                if d is not None and d.uuid == uuid and d.suspended:
                    dm.resume(device)
                    report["resumed"].append(device)
            for intent in self.record.pending_intents():
                report["replayed"].append(self._replay(intent))
            for layer in self.record.layers():
                thin = self.record.thin(layer.thin_id)
                if layer.state != COMPLETE or thin is None or thin.state != LIVE:
                    self._discard_layer(layer)
                    report["discarded_layers"].append(layer.chain_id)
            for act in self.record.activations():
                thin = self.record.thin(act.thin_id)
                if act.state != ACTIVE or thin is None or thin.state != LIVE:
                    self._discard_activation(act)
                    report["discarded_activations"].append(act.name)
            owned = {r.thin_id for r in self.record.layers()} | {a.thin_id for a in self.record.activations()}
            for thin in self.record.thins():
                if thin.state in (LIVE, ALLOCATED) and thin.thin_id not in owned:
                    self._pool_delete(thin.thin_id)  # allocated/created, owner row never written
                    report["deleted_orphans"].append(thin.thin_id)
            report["quarantined"] = [t.thin_id for t in self.record.thins(QUARANTINED)]
            known = {r.device for r in self.record.layers()} | {a.device for a in self.record.activations()}
            pool = dm.info(self.pool)
            for name in dm.list_names():
                d = dm.info(name)
                if d is None or not d.uuid.startswith(OUR_UUID_PREFIX) or d.uuid.startswith("IMG-pool-"):
                    continue
                if name not in known and pool is not None and pool.devno in dm.deps(name):
                    report["unknown_devices"].append(name)  # not in the record: left alone
            for layer in self.record.layers():  # a crash right after "complete" leaves the device writable
                d = dm.info(layer.device)
                if d is not None and d.uuid == layer.uuid and not d.read_only and d.open_count == 0:
                    self._ensure_layer_device(layer)
        return report

    def _replay(self, intent: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"op": intent.op, "thin_id": intent.thin_id}
        try:
            if intent.op == "create_thin":
                dm.create_thin(self.pool, intent.thin_id)
            elif intent.op == "create_snap":
                origin = self.record.layer_by_thin(intent.origin_thin_id)
                origin_dev = origin.device if origin is not None and dm.info(origin.device) else None
                with dm.suspended(origin_dev):
                    dm.create_snap(self.pool, intent.thin_id, intent.origin_thin_id)
            else:
                dm.delete_thin(self.pool, intent.thin_id)
        except dm.DmExists:
            self.record.finish_intent(intent.id, LIVE)  # the create had happened
            out["result"] = "already done"
            return out
        except dm.DmNoData as e:
            # delete: already gone; create_snap: the origin is gone, nothing was created
            self.record.finish_intent(intent.id, DELETED, error=None if intent.op == "delete" else str(e))
            out["result"] = "already gone" if intent.op == "delete" else "origin gone"
            return out
        except dm.DmError as e:
            self.record.finish_intent(intent.id, QUARANTINED, error=str(e),
                                      reason=f"replay of {intent.op}: {e}")
            out["result"] = "quarantined"
            return out
        self.record.finish_intent(intent.id, LIVE if intent.op != "delete" else DELETED)
        out["result"] = "redone"
        return out
