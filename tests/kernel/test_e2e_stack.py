"""The whole img stack on real parts, for the kernel-tier end-to-end tests and for `make demo`:
a loop-backed thin pool, the real `img-helper serve` as root, a real system bus + polkitd, a real S3 server
(moto) seeded with the real sample images, and `img` run as the unprivileged user img-member (group img).

No test functions here: tests/kernel/test_e2e.py uses `Stack` through fixtures; scripts/demo.sh runs
`python -m tests.kernel.test_e2e_stack demo`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.fixtures import polkit as pk
from tests.fixtures.dmpool import ThinPool, create_pool, destroy_pool
from tests.fixtures.images import RealImages, load_real_images
from tests.fixtures.s3 import ACCESS_KEY, REGION, SECRET_KEY, FaultProxy, S3Server, start_moto_server
from tests.host.test_server_standin import HelperProc

BIN = Path(sys.executable).parent
IMG = str(BIN / "img")
BUCKET = "img-demo"
ARCHIVE_KEYS = {"docker_archive": "archives/docker-alpha.tar", "oci_archive": "archives/oci-gamma.tar",
                "oci_archive_zstd": "archives/oci-beta-zstd.tar",
                "oci_archive_mixed": "archives/oci-alpha-mixed.tar"}


class Stack:
    def __init__(self, images: RealImages, pool_mb: int = 2048, workdir: Path | None = None) -> None:
        self.images = images
        self.pool_mb = pool_mb
        # /run: a real tmpfs (inside user-mode-linux, /tmp is the host's hostfs, where files created by
        # the unprivileged user end up owned by root)
        base = "/run" if os.access("/run", os.W_OK) else None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="img-e2e.", dir=base))
        os.chmod(self.workdir, 0o755)  # the member reaches the helper's socket through it
        self.s3: S3Server | None = None
        self.proxy: FaultProxy | None = None  # img talks to S3 through it: faults, and a log of every GET
        self.pool: ThinPool | None = None
        self.helper: HelperProc | None = None
        self.daemons: Any = None
        self.member: pk.TestUser | None = None
        self.homes: list[Path] = []

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self, seed_archives: bool = True, families: list[str] | None = None) -> Stack:
        self.member, _ = pk.ensure_test_users()
        pk.install_policy_files()
        self.daemons = pk._Daemons()
        started = self.daemons.acquire()
        pk.wait_until_rules_apply(pk.PolkitEnv(self.member, _, self.daemons.log_path, started),
                                  pk.policy_action_ids())
        self.s3 = start_moto_server(self.workdir)
        for family, layers in self.images.families.items():
            if families is None or family in families:
                self.s3.seed_family(BUCKET, family, layers)
        if seed_archives:
            self.s3.seed(BUCKET, {key: getattr(self.images, attr).path for attr, key in ARCHIVE_KEYS.items()})
        self.proxy = FaultProxy(upstream_url=self.s3.endpoint_url)
        self.proxy.start()
        self.pool = create_pool(data_mb=self.pool_mb, meta_mb=32)
        self.start_helper()
        return self

    def reset_pool(self) -> None:
        """A fresh, empty pool and helper state (S3, polkit and users stay)."""
        if self.helper is not None:
            self.helper.stop()
        if self.pool is not None:
            destroy_pool(self.pool)
        shutil.rmtree(self.workdir / "helper-state", ignore_errors=True)
        self.pool = create_pool(data_mb=self.pool_mb, meta_mb=32)
        self.start_helper()

    def start_helper(self) -> HelperProc:
        assert self.pool is not None
        (self.workdir / "run").mkdir(mode=0o755, exist_ok=True)
        cmd = [str(BIN / "img-helper"), "serve", "--pool", self.pool.name, "--group", pk.GROUP]
        self.helper = HelperProc(self.workdir, cmd=cmd,
                                 socket_path=self.workdir / "run" / "helper.sock",
                                 state_dir=self.workdir / "helper-state").start(timeout=120)
        return self.helper

    def stop(self) -> None:
        if self.helper is not None:
            with contextlib.suppress(Exception):
                self.helper.stop()
        if self.pool is not None:
            destroy_pool(self.pool)
            self.pool = None
        if self.proxy is not None:
            self.proxy.stop()
        if self.s3 is not None:
            self.s3.stop()
        if self.daemons is not None:
            self.daemons.release()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- running img as the member ----------------------------------------------------------------------

    def new_home(self) -> Path:
        """A fresh IMG_HOME owner for the member; earlier ones are removed (/run is a small tmpfs)."""
        assert self.member is not None
        for old in self.homes:
            shutil.rmtree(old, ignore_errors=True)
        home = self.workdir / f"home{len(self.homes)}"
        home.mkdir(mode=0o700)
        os.chown(home, self.member.uid, self.member.gid)
        self.homes.append(home)
        return home

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        assert self.proxy is not None and self.helper is not None
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TERM")}
        return {**keep, "HOME": str(home), "IMG_HOME": str(home / "img"), "IMG_S3_BUCKET": BUCKET,
                "IMG_HELPER_SOCKET": str(self.helper.socket_path),
                "AWS_ENDPOINT_URL": self.proxy.endpoint_url,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true",
                "PYTHONDONTWRITEBYTECODE": "1", **extra}

    def argv(self, *args: str, user: pk.TestUser | None = None) -> list[str]:
        u = user or self.member
        assert u is not None
        return ["setpriv", "--reuid", str(u.uid), "--regid", str(u.gid), "--init-groups", "--", IMG, *args]

    def img(self, env: dict[str, str], *args: str, timeout: float = 900,
            user: pk.TestUser | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args, user=user), env=env, capture_output=True, text=True,
                              timeout=timeout, cwd="/")

    def spawn(self, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd="/")

    def helper_list(self) -> dict[str, Any]:
        from img_helper.client import HelperClient

        assert self.helper is not None
        return HelperClient(str(self.helper.socket_path)).call("list", {})

    def gets(self) -> list[tuple[str, str | None]]:
        """(key, Range header) of every object GET img made through the proxy."""
        assert self.proxy is not None
        return [(r.path.split("?", 1)[0].split("/", 2)[2], r.range) for r in self.proxy.log
                if r.method == "GET" and r.path.startswith(f"/{BUCKET}/") and "?" not in r.path.split("/")[2]]

    def our_dm_devices(self) -> list[str]:
        out = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout
        return sorted(line.split()[0] for line in out.splitlines() if line.startswith("img-"))


def demo() -> int:
    """`make demo`, inside a kernel with device-mapper: the main job end to end, narrated."""
    family = os.environ.get("IMG_DEMO_FAMILY", "")

    def say(msg: str) -> None:
        print(f"\n\033[1m== {msg}\033[0m" if sys.stdout.isatty() else f"\n== {msg}", flush=True)

    say("sample images (Debian bookworm, built by tests/images/build.py)")
    images = load_real_images()
    family = family or sorted(images.families)[0]
    for f, layers in sorted(images.families.items()):
        print(f"  {f}: {len(layers)} layers, {sum(p.stat().st_size for p in layers) >> 20} MiB")
    stack = Stack(images)
    try:
        say("starting a local S3 (moto), polkit, a loop-backed thin pool and img-helper (root)")
        stack.start()
        assert stack.s3 is not None and stack.pool is not None and stack.helper is not None
        print(f"  S3 {stack.s3.endpoint_url} bucket {BUCKET}; pool {stack.pool.name} ({stack.pool_mb} MiB); "
              f"helper socket {stack.helper.socket_path}")
        home = stack.new_home()
        env = stack.env(home)
        steps: list[tuple[str, list[str]]] = [
            ("img images --remote", ["images", "--remote"]),
            (f"img process {family}   (as img-member, group img)", ["process", family]),
            (f"img process {family}   (again: nothing to do)", ["process", family]),
            ("img list", ["list"]),
            ("img status", ["status"]),
        ]
        for title, args in steps:
            say(title)
            t = time.monotonic()
            r = subprocess.run(stack.argv(*args), env=env, text=True, cwd="/")
            print(f"  (exit {r.returncode}, {time.monotonic() - t:.2f} s)")
            if r.returncode != 0:
                return r.returncode
        listed = json.loads(stack.img(env, "list", "--json").stdout)["images"]
        dev = listed[0]["activations"][0]["device"]
        say(f"mount {dev} read-only and look inside")
        mnt = stack.workdir / "mnt"
        mnt.mkdir()
        subprocess.run(["mount", "-o", "ro", dev, str(mnt)], check=True)
        try:
            print(json.dumps(json.loads((mnt / "image.json").read_text()), indent=2)[:1200]
                  if (mnt / "image.json").exists() else "(no image.json)")
            osr = mnt / "rootfs" / "etc" / "os-release"
            print(osr.read_text() if osr.exists() else sorted(os.listdir(mnt)))
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
        say("demo done")
        return 0
    finally:
        stack.stop()


def _stats(samples: list[float]) -> str:
    s = sorted(samples)
    return (f"mean {sum(s) / len(s) * 1000:.1f} ms, median {s[len(s) // 2] * 1000:.1f} ms, "
            f"min {s[0] * 1000:.1f} ms, max {s[-1] * 1000:.1f} ms (n={len(s)})")


def bench(runs: int = 30) -> int:
    """bench/rerun.sh: wall time of `img process X` when X is already active (target <= 40 ms)."""
    images = load_real_images()
    family = sorted(images.families)[0]
    stack = Stack(images)
    try:
        stack.start(seed_archives=False, families=[family])
        env = stack.env(stack.new_home())
        r = stack.img(env, "process", family, "--quiet")
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return r.returncode
        # the member runs it directly (no setpriv in the timed command): a shell as the member loops
        loop = (f"for i in $(seq {runs}); do s=$(date +%s%N); {IMG} process {family} >/dev/null || exit 1; "
                "e=$(date +%s%N); echo $(( (e - s) / 1000 )); done")
        base = (f"for i in $(seq {runs}); do s=$(date +%s%N); {sys.executable} -c pass; "
                "e=$(date +%s%N); echo $(( (e - s) / 1000 )); done")
        out = {}
        for what, script in (("python -c pass (interpreter floor)", base),
                             (f"img process {family} (already active)", loop)):
            p = subprocess.run([*stack.argv(user=stack.member)[:-1], "/bin/sh", "-c", script], env=env,
                               capture_output=True, text=True, cwd="/")
            if p.returncode != 0:
                print(p.stderr, file=sys.stderr)
                return 1
            out[what] = [int(x) / 1e6 for x in p.stdout.split()]
        for what, samples in out.items():
            print(f"{what:<40} {_stats(samples)}")
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    if sys.argv[1:] == ["demo"]:
        sys.exit(demo())
    if sys.argv[1:2] == ["bench"]:
        sys.exit(bench(int(sys.argv[2]) if len(sys.argv) > 2 else 30))
    print("usage: python -m tests.kernel.test_e2e_stack demo | bench [RUNS]", file=sys.stderr)
    sys.exit(2)
