"""`img bench extract`: the same layer files extracted onto the same target filesystem by several engines.

Targets (needs root): a tmpfs, and ext4 on a loop device (backing file in the bench's temp dir), both mounted
under one temp dir and torn down afterwards. Engines: ours (img_helper, confined C extractor), bsdtar, GNU
tar, Python tarfile, libarchive-c, and the floor: `cp -a` of an already-extracted tree on the same fs.

Fairness: every engine runs in a fresh child process (`img.bench.worker`) which times only the extraction
plus one syncfs of the target (our extractor syncs once; the others would leave dirty pages behind). Inputs
are read once beforehand so every run finds them in the page cache (dropping caches is not possible
everywhere). Runs alternate between engines; the median of N runs is reported.

Caveat: bsdtar, GNU tar, tarfile and libarchive-c know nothing of OCI whiteouts (`.wh.*` files are written
as plain files, nothing is deleted). That barely changes the work, so it does not matter for timing, but
their trees are not correct images. The children run with `/` remounted read-only in a private mount
namespace: an engine that follows an image's absolute symlink cannot write to the host.

Engine settings: bsdtar `--numeric-owner -xpf`; GNU tar `--numeric-owner --xattrs --xattrs-include='*' -xpf`;
tarfile `extractall(numeric_owner=True, filter="tar")` where Python has extraction filters ("data" would
refuse the hundreds of absolute symlinks of a Debian layer; Python 3.11.2 has no filters and runs unfiltered,
in the sandbox); libarchive-c with OWNER|PERM|TIME|XATTR|SECURE_* |UNLINK, continuing past refused entries.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENGINES = ("ours", "bsdtar", "gnu-tar", "tarfile", "libarchive-c", "cp-a-floor")
DEFAULT_FAMILY = "alpha"


class BenchError(Exception):
    pass


@dataclass
class Result:
    engine: str
    target: str
    runs: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.runs) if self.runs else None


def default_sources() -> tuple[list[Path], str]:
    """The real Debian family built by tests/images/build.py (in a source checkout, once built)."""
    repo = Path(__file__).resolve().parents[3]
    if not (repo / "tests/images/build.py").exists():
        raise BenchError("no SOURCE given and no source checkout with tests/images/build.py")
    r = subprocess.run(
        [sys.executable, "-m", "tests.images.build", "--print-dir"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    current = Path(r.stdout.strip() or "/nonexistent")
    manifest = current / "manifest.json"
    if r.returncode == 0 and not manifest.exists() and current.parent.is_dir():
        # the builder changed since the last build: any earlier build is the same kind of input
        built = sorted(current.parent.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
        manifest = built[-1] if built else manifest
    if r.returncode != 0 or not manifest.exists():
        raise BenchError("no SOURCE given and the real images are not built (make fixtures)")
    m = json.loads(manifest.read_text())
    return [
        Path(p) for p in m["families"][DEFAULT_FAMILY]
    ], f"real Debian family {DEFAULT_FAMILY!r} ({manifest})"


def warm(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@contextlib.contextmanager
def mounted_target(kind: str, base: Path, size: int) -> Iterator[Path]:
    mnt = base / kind
    mnt.mkdir()
    loop = None
    try:
        if kind == "tmpfs":
            _run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "img-bench", str(mnt)])
        else:
            img = base / "ext4.img"
            with open(img, "wb") as f:
                f.truncate(size)
            # Inode tables and journal initialised now, not by a kernel thread racing the timed runs.
            opts = "nodiscard,lazy_itable_init=0,lazy_journal_init=0"
            _run(["mkfs.ext4", "-q", "-F", "-E", opts, str(img)])
            loop = subprocess.run(
                ["losetup", "--find", "--show", str(img)], check=True, capture_output=True, text=True
            ).stdout.strip()
            _run(["mount", "-t", "ext4", loop, str(mnt)])
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], stderr=subprocess.DEVNULL)
        if loop:
            subprocess.run(["losetup", "-d", loop], stderr=subprocess.DEVNULL)
        with contextlib.suppress(FileNotFoundError):
            (base / "ext4.img").unlink()


def _sandboxed(argv: list[str]) -> list[str]:
    # private mount namespace, / read-only: only the target mounts stay writable (see worker docstring)
    inner = 'mount -o remount,bind,ro / && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner, "sh", *argv]


def run_once(engine: str, dest: Path, sources: list[Path]) -> dict[str, Any]:
    argv = [sys.executable, "-m", "img.bench.worker", engine, str(dest), *map(str, sources)]
    r = subprocess.run(_sandboxed(argv), capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise BenchError((r.stderr.strip().splitlines() or ["failed"])[-1][:300])
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def _clear(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def bench_target(
    kind: str, sources: list[Path], engines: list[str], repeat: int, log: Any
) -> tuple[dict[str, Result], int]:
    input_bytes = sum(p.stat().st_size for p in sources)
    results = {e: Result(e, kind) for e in engines}
    entries = 0
    with tempfile.TemporaryDirectory(prefix="img-bench-") as tmp:
        base = Path(tmp)
        size = max(4 * input_bytes, 256 << 20) + (512 << 20)
        with mounted_target(kind, base, size) as mnt:
            floor_src = mnt / "floor-src"
            for i in range(repeat):
                for engine in engines:
                    res = results[engine]
                    if res.error:
                        continue
                    if engine == "cp-a-floor" and not (floor_src / "rootfs").exists():
                        floor_src.mkdir(exist_ok=True)
                        run_once("ours", floor_src, sources)
                    # Every engine starts from the same filesystem state: only the floor's source tree is
                    # kept. (Keeping each engine's last tree made later runs fight a fuller, more fragmented
                    # ext4, and the engine that ran first in a round paid for the others' deletions.)
                    for old in mnt.glob("run-*"):
                        _clear(old)
                    dest = mnt / f"run-{engine}"
                    dest.mkdir()
                    subprocess.run(["sync", "-f", str(mnt)], check=False)
                    srcs = [floor_src / "rootfs"] if engine == "cp-a-floor" else sources
                    try:
                        out = run_once(engine, dest, srcs)
                    except BenchError as e:
                        res.error = str(e)
                        log(f"{kind} {engine}: failed: {e}")
                        continue
                    res.runs.append(out["seconds"])
                    res.cpu.append(out["cpu_seconds"])
                    entries = out.get("entries", entries)
                    log(f"{kind} {engine} run {i + 1}/{repeat}: {out['seconds']:.3f} s")
                    _clear(dest)
    return results, entries


def report(
    sources: list[Path],
    label: str,
    all_results: dict[str, dict[str, Result]],
    entries: int,
    warmed: int,
    repeat: int,
) -> dict[str, Any]:
    input_bytes = sum(p.stat().st_size for p in sources)
    out: dict[str, Any] = {
        "source": label,
        "layers": len(sources),
        "input_bytes": input_bytes,
        "entries": entries,
        "repeat": repeat,
        "statistic": "median",
        "input_warmed_in_page_cache_bytes": warmed,
        "timing_includes_syncfs": True,
        "load_average": os.getloadavg()[0],
        "whiteouts_applied_only_by": "ours",
        "targets": {},
    }
    for target, results in all_results.items():
        ours = results.get("ours")
        ours_t = ours.median if ours else None
        ours_min = min(ours.runs) if ours and ours.runs else None
        ours_cpu = statistics.median(ours.cpu) if ours and ours.cpu else None
        rows = {}
        for name, r in results.items():
            t = r.median
            t_min = min(r.runs) if r.runs else None
            cpu = statistics.median(r.cpu) if r.cpu else None
            rows[name] = {
                "seconds": round(t, 4) if t else None,
                "min_seconds": round(t_min, 4) if t_min else None,
                "cpu_seconds": round(cpu, 4) if cpu else None,
                "runs": [round(x, 4) for x in r.runs],
                "mb_per_s": round(input_bytes / 1e6 / t, 1) if t else None,
                "files_per_s": round(entries / t) if t and entries else None,
                "ratio_to_ours": round(t / ours_t, 3) if t and ours_t else None,
                "min_ratio_to_ours": round(t_min / ours_min, 3) if t_min and ours_min else None,
                "cpu_ratio_to_ours": round(cpu / ours_cpu, 3) if cpu and ours_cpu else None,
                "error": r.error,
            }
        out["targets"][target] = rows
    return out


def format_table(rep: dict[str, Any]) -> str:
    lines = [
        f"input: {rep['source']}: {rep['layers']} layers, {rep['input_bytes'] / 1e6:.1f} MB, "
        f"{rep['entries']} entries; median of {rep['repeat']}; input warmed in page cache "
        f"({rep['input_warmed_in_page_cache_bytes'] / 1e6:.0f} MB read); times include one syncfs; "
        f"load average {rep['load_average']:.1f} (noisy walls above the CPU count: see min, cpu)",
        "note: only ours applies OCI whiteouts; the others write .wh.* files (same work, wrong tree)",
    ]
    for target, rows in rep["targets"].items():
        lines.append("")
        lines.append(f"{target}:")
        lines.append(
            f"  {'engine':<14}{'median s':>9}{'MB/s':>9}{'files/s':>10}{'x ours':>9}{'min s':>9}{'x ours':>9}"
            f"{'cpu s':>9}{'x ours':>9}"
        )
        for name, r in rows.items():
            if r["error"]:
                lines.append(f"  {name:<14}  failed: {r['error']}")
                continue
            lines.append(
                f"  {name:<14}{r['seconds']:>9.3f}{r['mb_per_s']:>9.1f}{r['files_per_s'] or 0:>10}"
                f"{r['ratio_to_ours']:>9.2f}{r['min_seconds']:>9.3f}{r['min_ratio_to_ours']:>9.2f}"
                f"{r['cpu_seconds'] or 0:>9.3f}{r['cpu_ratio_to_ours'] or 0:>9.2f}"
            )
    return "\n".join(lines)


def check_layer_files(sources: list[Path]) -> None:
    """The tar engines take layer files only: refuse archives up front instead of timing nonsense."""
    from img_helper.formats import FormatError, detect_format

    fds = [os.open(p, os.O_RDONLY) for p in sources]
    try:
        fmt = detect_format(fds)
    except FormatError as e:
        raise BenchError(f"not layer files: {e}") from None
    finally:
        for fd in fds:
            os.close(fd)
    if fmt != "layers":
        raise BenchError(
            f"{sources[0]} is a {fmt}: the bench takes ordered layer files (a bucket-style family)"
        )


def run_bench(
    sources: list[Path], label: str, targets: list[str], engines: list[str], repeat: int, log: Any
) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise BenchError("needs root (mounts a tmpfs and a loop device, restores ownership)")
    missing = [t for t in ("bsdtar", "tar", "unshare", "mkfs.ext4", "losetup") if not shutil.which(t)]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)}")
    check_layer_files(sources)
    t0 = time.monotonic()
    warmed = warm(sources)
    all_results: dict[str, dict[str, Result]] = {}
    entries = 0
    for target in targets:
        all_results[target], n = bench_target(target, sources, engines, repeat, log)
        entries = n or entries
    rep = report(sources, label, all_results, entries, warmed, repeat)
    rep["bench_seconds"] = round(time.monotonic() - t0, 1)
    return rep
