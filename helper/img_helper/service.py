"""The helper's step methods, called by the server once a request is authorized.

Every method is idempotent (repeating it returns the same result with created/removed False and
changes nothing) and returns a JSON-able dict. Failures raise DeviceError (img_helper.devices) with a
`code` and JSON-able `details`; the server maps them onto protocol errors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from img_helper import __version__, dm
from img_helper.devices import DEFAULT_VIRTUAL_BYTES, DeviceError, Devices, wrap_dm
from img_helper.record import QUARANTINED, Record

DEFAULT_POOL = "img-pool"
DEFAULT_STATE_DIR = Path("/var/lib/img-helper")

__all__ = ["DEFAULT_POOL", "DEFAULT_STATE_DIR", "DeviceError", "Service", "pool_usage"]


def pool_block_sectors(pool: str) -> int:
    """The pool's data block size, from its table (kernel-formatted thin-pool params, field 3)."""
    t = dm.table(pool)
    if t.target_type != "thin-pool":
        raise DeviceError("invalid", f"{pool} is a {t.target_type} device, not a thin-pool", device=pool)
    return int(t.params.split()[2])


def pool_usage(pool: str) -> dict[str, Any]:
    """The pool's status (kernel's thin-pool status) with sizes in bytes. Raises dm.DmError."""
    s = dm.pool_status(pool)
    block = pool_block_sectors(pool)
    return {"name": pool, **s.as_dict(), "data_block_sectors": block,
            "data_used_bytes": s.used_data_blocks * block * 512,
            "data_total_bytes": s.total_data_blocks * block * 512,
            "metadata_used_bytes": s.used_metadata_blocks * 4096,
            "metadata_total_bytes": s.total_metadata_blocks * 4096,
            "no_space_mode": "error" if s.error_if_no_space else "queue"}


class Service:
    """One pool, one record (state_dir/record.sqlite3). Construction reconciles the record with the pool
    (and stamps the pool's transaction id on first use: see Devices.check_pool_identity)."""

    # Devices serializes pool changes itself and per chain id / name; extractions run in parallel.
    serializes_pool_changes = True

    def __init__(self, pool: str = DEFAULT_POOL, state_dir: Path = DEFAULT_STATE_DIR, *,
                 virtual_size: int = DEFAULT_VIRTUAL_BYTES, reconcile: bool = True) -> None:
        if virtual_size <= 0 or virtual_size % 4096:
            raise DeviceError("invalid", "virtual_size must be a positive multiple of 4096")
        try:
            pool_status = dm.pool_status(pool)
        except dm.DmError as e:
            raise wrap_dm(e) from e
        if pool_status.fail or pool_status.read_only or pool_status.needs_check:
            raise DeviceError("dm", "pool is failed, read-only or needs check", pool=pool)
        self.pool = pool
        self.state_dir = Path(state_dir)
        self.record = Record(self.state_dir, pool)
        self.devices = Devices(pool, self.record, self.state_dir, virtual_size // 512)
        self.last_reconcile: dict[str, Any] = {}
        try:
            if reconcile:
                self.reconcile()
        except BaseException:
            self.record.close()
            raise

    def close(self) -> None:
        self.record.close()

    def reconcile(self) -> dict[str, Any]:
        try:
            self.last_reconcile = self.devices.reconcile()
        except dm.DmError as e:
            raise wrap_dm(e) from e
        return self.last_reconcile

    def status(self) -> dict[str, Any]:
        try:
            pool = pool_usage(self.pool)
        except dm.DmError as e:
            raise wrap_dm(e) from e
        from img_helper.native import native_version

        rec = {"next_thin_id": self.record.next_thin_id(),
               "quarantined": [t.thin_id for t in self.record.thins(QUARANTINED)],
               "layers": len(self.record.layers()), "activations": len(self.record.activations())}
        return {"pool": pool, "record": rec, "version": {"helper": __version__, "native": native_version()}}

    def list_devices(self) -> dict[str, Any]:
        try:
            return self.devices.list_devices()
        except dm.DmError as e:
            raise wrap_dm(e) from e

    def ensure_layer(self, chain_id: str, parent_chain_id: str | None, blob_fd: int, offset: int, length: int,
                     blob_sha256: str, progress: Callable[[dict[str, Any]], None] | None = None
                     ) -> dict[str, Any]:
        try:
            return self.devices.ensure_layer(chain_id, parent_chain_id, blob_fd, offset, length, blob_sha256,
                                             progress)
        except dm.DmError as e:
            raise wrap_dm(e) from e

    def activate(self, chain_id: str, name: str) -> dict[str, Any]:
        try:
            return self.devices.activate(chain_id, name)
        except dm.DmError as e:
            raise wrap_dm(e) from e

    def deactivate(self, name: str) -> dict[str, Any]:
        try:
            return self.devices.deactivate(name)
        except dm.DmError as e:
            raise wrap_dm(e) from e

    def delete_layer(self, chain_id: str) -> dict[str, Any]:
        try:
            return self.devices.delete_layer(chain_id)
        except dm.DmError as e:
            raise wrap_dm(e) from e
