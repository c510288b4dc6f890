"""Test-only stand-in for img_helper.service.Service (the contract in team RULES), and a runner that
serves it through the real server: `python -m tests.host.test_server_standin --socket P --state-dir D
--group G [--limits JSON]`. Used by the protocol/auth tests, which don't need device-mapper. It keeps
its state in memory and really reads the passed blob fd (so fd passing is exercised end to end)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


class StandinError(Exception):
    def __init__(self, code: str, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.code = code
        for k, v in fields.items():
            setattr(self, k, v)


class StandinService:
    serializes_pool_changes = os.environ.get("STANDIN_SERIALIZES", "") == "1"

    def __init__(self, pool: str, state_dir: Path) -> None:
        self.pool = pool
        self.state_dir = state_dir
        self.layers: dict[str, dict[str, Any]] = {}
        self.activations: dict[str, dict[str, Any]] = {}
        self.mu = threading.Lock()
        self.in_pool_change = 0  # > 1 would mean two pool changes overlapped
        self.max_overlap = 0

    def _pool_change(self, seconds: float) -> None:
        with self.mu:
            self.in_pool_change += 1
            self.max_overlap = max(self.max_overlap, self.in_pool_change)
        time.sleep(seconds)
        with self.mu:
            self.in_pool_change -= 1

    def status(self) -> dict[str, Any]:
        return {"pool": {"name": self.pool, "standin": True, "max_overlap": self.max_overlap},
                "version": "standin", "pid": os.getpid()}

    def list_devices(self) -> dict[str, Any]:
        return {"layers": sorted(self.layers.values(), key=lambda x: x["thin_id"]),
                "activations": sorted(self.activations.values(), key=lambda x: x["name"])}

    def ensure_layer(self, chain_id: str, parent_chain_id: str | None, blob_fd: int, offset: int,
                     length: int, blob_sha256: str,
                     progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        if chain_id in self.layers:
            return {**self.layers[chain_id], "created": False}
        if parent_chain_id is not None and parent_chain_id not in self.layers:
            raise StandinError("unknown-layer", f"parent {parent_chain_id} absent", chain_id=parent_chain_id)
        h = hashlib.sha256()
        pos, end = offset, (os.fstat(blob_fd).st_size if length < 0 else offset + length)
        while pos < end:
            chunk = os.pread(blob_fd, min(65536, end - pos), pos)
            if not chunk:
                raise StandinError("corrupt", "blob shorter than its length", entry="", reason="short")
            h.update(chunk)
            pos += len(chunk)
            if progress:
                progress({"bytes": pos - offset})
            delay = float(os.environ.get("STANDIN_CHUNK_DELAY", "0"))
            if delay:
                time.sleep(delay)
        if h.hexdigest() != blob_sha256.removeprefix("sha256:"):
            raise StandinError("digest", f"blob sha256 {h.hexdigest()} != {blob_sha256}", entry="",
                               reason="digest")
        self._pool_change(float(os.environ.get("STANDIN_POOL_DELAY", "0")))
        with self.mu:
            if chain_id in self.layers:
                return {**self.layers[chain_id], "created": False}
            row = {"chain_id": chain_id, "thin_id": len(self.layers) + 1,
                   "device": f"/dev/mapper/standin-{len(self.layers) + 1}", "size": end - offset}
            self.layers[chain_id] = row
        return {**row, "created": True}

    def activate(self, chain_id: str, name: str) -> dict[str, Any]:
        if name.startswith("sleep-"):  # test hook: a slow step of int(name[6:]) tenths of a second
            self._pool_change(int(name[6:].split("-")[0]) / 10)
            return {"name": name, "device": "", "thin_id": 0, "created": False}
        if chain_id not in self.layers:
            raise StandinError("unknown-layer", f"no layer {chain_id}", chain_id=chain_id)
        self._pool_change(0)
        if name in self.activations:
            return {**self.activations[name], "created": False}
        row = {"name": name, "chain_id": chain_id, "device": f"/dev/mapper/standin-a-{name}",
               "thin_id": 1000 + len(self.activations)}
        self.activations[name] = row
        return {**row, "created": True}

    def deactivate(self, name: str) -> dict[str, Any]:
        self._pool_change(0)
        return {"name": name, "removed": self.activations.pop(name, None) is not None}

    def delete_layer(self, chain_id: str) -> dict[str, Any]:
        self._pool_change(0)
        return {"chain_id": chain_id, "removed": self.layers.pop(chain_id, None) is not None}


REPO = Path(__file__).resolve().parents[2]


class HelperProc:
    """A helper server subprocess (the stand-in runner by default, or any command taking --socket and
    --state-dir), started with a NOTIFY_SOCKET so start() returns once it said READY=1."""

    def __init__(self, workdir: Path, limits: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 group: str = "root", cmd: list[str] | None = None, socket_path: Path | None = None,
                 state_dir: Path | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        self.workdir = workdir
        self.socket_path = socket_path or workdir / "run" / "helper.sock"
        self.state_dir = state_dir or workdir / "state"
        self.cmd = cmd or [sys.executable, "-m", "tests.host.test_server_standin", "--group", group,
                           "--limits", json.dumps(limits or {})]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.notes: list[str] = []
        self.log = workdir / f"helper-{id(self)}.log"
        self.pass_fds = pass_fds

    def start(self, timeout: float = 30, expect_ready: bool = True) -> HelperProc:
        self.notify_path = self.workdir / f"notify-{id(self)}"
        self.nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.nsock.bind(str(self.notify_path))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.cmd, "--socket", str(self.socket_path), "--state-dir", str(self.state_dir)],
                env={**self.env, "NOTIFY_SOCKET": str(self.notify_path)}, cwd=REPO, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, pass_fds=self.pass_fds)
        if not expect_ready:
            return self
        deadline = time.monotonic() + timeout
        while "READY=1" not in "\n".join(self.notes):
            if not self._read_note(0.2) and (self.proc.poll() is not None or time.monotonic() > deadline):
                raise RuntimeError(f"helper did not get ready (rc {self.proc.poll()}):\n{self.output()}")
        return self

    def _read_note(self, timeout: float) -> bool:
        self.nsock.settimeout(timeout)
        try:
            self.notes.append(self.nsock.recv(4096).decode())
            return True
        except (TimeoutError, BlockingIOError):
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal it, wait for the exit; returns the exit status. Collects the last notifications."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        if self.nsock.fileno() >= 0:
            while self._read_note(0):
                pass
            self.nsock.close()
            self.notify_path.unlink(missing_ok=True)
        return rc

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@click.command()
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), required=True)
@click.option("--state-dir", type=click.Path(path_type=Path), required=True)
@click.option("--group", default="root")
@click.option("--pool", default="standin-pool")
@click.option("--limits", default="{}", help="JSON: ServerLimits fields")
def main(socket_path: Path, state_dir: Path, group: str, pool: str, limits: str) -> None:
    import logging

    from img_helper.cmd_serve import run_serve
    from img_helper.server import ServerLimits

    logging.basicConfig(level=logging.INFO, format="standin[%(process)d]: %(levelname)s %(message)s")
    run_serve(socket_path, pool, group, state_dir, service_factory=StandinService,
              limits=ServerLimits(**json.loads(limits)))


if __name__ == "__main__":
    main()
