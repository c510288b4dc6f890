"""End to end on real parts (kernel tier): real thin pool, real `img-helper serve` as root, real polkit, real
S3 server (through a fault proxy), `img` as the unprivileged member of group img, the real sample images.

Checked: every family and every archive format pulls, unpacks and activates, and the activated device
mounts with a rootfs/ equal to the reference unpack; a rerun is a no-op; kill -9 of the frontend at every
FSM step then a rerun completes with no leaked devices and no second download; two concurrent
`img process` share one download and one device chain; S3 faults; an outsider is refused.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import polkit as pk
from tests.fixtures.images import RealImages
from tests.fixtures.s3 import Fault
from tests.fixtures.trees import assert_same_tree, read_spec
from tests.kernel.test_e2e_stack import ARCHIVE_KEYS, BUCKET, Stack

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


@pytest.fixture(scope="module")
def images(request: pytest.FixtureRequest) -> RealImages:
    """The real sample images; IMG_E2E_MANIFEST=<dir>/manifest.json pins an already built set (for
    development while the builder changes)."""
    if os.environ.get("IMG_E2E_MANIFEST"):
        return RealImages.from_manifest(Path(os.environ["IMG_E2E_MANIFEST"]))
    built: RealImages = request.getfixturevalue("real_images")
    return built


@pytest.fixture(scope="module")
def stack(images: RealImages) -> Iterator[Stack]:
    s = Stack(images).start()
    try:
        yield s
    finally:
        s.stop()


def mounted_rootfs_equals(device: str, spec: Path) -> None:
    """The activation mounts and its rootfs/ is the tree the family was built from (the builder's tree spec,
    made on the host: hostfs in the guest hides the reference unpack's xattrs)."""
    mnt = Path(tempfile.mkdtemp(prefix="img-e2e-mnt.", dir="/run"))
    subprocess.run(["mount", "-o", "ro", device, str(mnt)], check=True)
    try:
        assert (mnt / "rootfs").is_dir()
        assert_same_tree(read_spec(spec), mnt / "rootfs")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        mnt.rmdir()


def no_leaks(stack: Stack) -> None:
    """Every img-* device-mapper device is one the helper lists, and vice versa."""
    listed = stack.helper_list()
    names = {Path(x["device"]).name for x in listed["layers"] + listed["activations"]}
    assert set(stack.our_dm_devices()) == names


def processed(stack: Stack, env: dict[str, str], ref: str, *extra: str) -> dict[str, object]:
    r = stack.img(env, "process", ref, "--json", *extra)
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


@pytest.mark.parametrize("family", ["alpha", "beta", "gamma"])
def test_family_end_to_end_and_rerun_is_a_no_op(stack: Stack, images: RealImages, family: str) -> None:
    env = stack.env(stack.new_home())
    assert stack.proxy is not None
    stack.proxy.clear()
    out = processed(stack, env, family)
    assert out["changed"] is True and out["layers"] == len(images.families[family])
    n_layers = len(images.families[family])
    want = sorted(f"images/{family}/{n}.tar" for n in range(1, n_layers + 1))
    assert sorted(k for k, _ in stack.gets()) == want
    mounted_rootfs_equals(str(out["device"]), images.source_specs[family])
    stack.proxy.clear()
    again = processed(stack, env, family)
    assert again["changed"] is False and again["device"] == out["device"]
    assert stack.gets() == []  # not even a listing: the fast path answered
    no_leaks(stack)


@pytest.mark.parametrize("attr", sorted(ARCHIVE_KEYS))
def test_archive_formats_end_to_end(stack: Stack, images: RealImages, attr: str) -> None:
    archive = getattr(images, attr)
    env = stack.env(stack.new_home())
    out = processed(stack, env, f"s3://{BUCKET}/{ARCHIVE_KEYS[attr]}")
    assert out["format"] in ("docker-archive", "oci-archive")
    mounted_rootfs_equals(str(out["device"]), images.source_specs[archive.family])
    assert processed(stack, env, f"s3://{BUCKET}/{ARCHIVE_KEYS[attr]}")["changed"] is False
    no_leaks(stack)


CRASH_POINTS = ["resolve:before", "download:before", "blob:after", "layers:after", "unpack:before",
                "layer:after", "unpack:after", "activate:before", "activate:after"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_9_at_every_step_then_rerun(stack: Stack, images: RealImages, point: str) -> None:
    stack.reset_pool()
    home = stack.new_home()
    env = stack.env(home)
    r = stack.img({**env, "IMG_CRASH_AT": point}, "process", "beta")
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    db = sqlite3.connect(home / "img" / "img.db")
    cached = {k for k, sha in db.execute("SELECT key, sha256 FROM blob_sources")
              if (home / "img" / "blobs" / "sha256" / sha).exists()}
    db.close()
    assert stack.proxy is not None
    stack.proxy.clear()
    out = processed(stack, env, "beta")
    again = [k for k, _ in stack.gets()]
    assert not cached & set(again), "downloaded again after the kill"
    assert len(again) == len(set(again))
    runs = json.loads(stack.img(env, "runs", "--json").stdout)["runs"]
    assert not [x for x in runs if x["active"]]
    assert [x["status"] for x in runs if x["action"] == "img-image"] == ["succeeded"]
    listed = stack.helper_list()
    assert len(listed["layers"]) == len(images.families["beta"])  # one chain, nothing half-built left
    assert [a["name"] for a in listed["activations"]] == ["beta"]
    no_leaks(stack)
    mounted_rootfs_equals(str(out["device"]), images.source_specs["beta"])


def test_two_concurrent_processes_share_one_download_and_chain(stack: Stack, images: RealImages) -> None:
    stack.reset_pool()
    env = stack.env(stack.new_home())
    assert stack.proxy is not None
    stack.proxy.clear()
    procs = [stack.spawn(env, "process", "gamma", "--json") for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert len({json.loads(o)["device"] for o, _ in outs}) == 1
    keys = [k for k, _ in stack.gets()]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == len(images.families["gamma"])
    assert len(stack.helper_list()["layers"]) == len(images.families["gamma"])
    no_leaks(stack)


def test_s3_faults_are_retried_and_404_aborts(stack: Stack, images: RealImages) -> None:
    stack.reset_pool()
    env = stack.env(stack.new_home(), IMG_S3_TIMEOUT="3")
    assert stack.proxy is not None
    stack.proxy.clear()
    stack.proxy.add(Fault.status(503, times=2, method="GET", key="images/alpha/1.tar"))
    stack.proxy.add(Fault.truncate(1 << 20, times=1, key="images/alpha/2.tar"))
    stack.proxy.add(Fault.stall(1 << 16, 10.0, times=1, key="images/alpha/3.tar"))
    stack.proxy.add(Fault.reset(times=1, method="GET", key="images/alpha/4.tar"))
    out = processed(stack, env, "alpha")
    mounted_rootfs_equals(str(out["device"]), images.source_specs["alpha"])
    ranged = [(k, rg) for k, rg in stack.gets() if k.endswith("/2.tar") and rg]
    assert ranged, "the truncated download was not resumed with a Range request"
    stack.proxy.clear()
    stack.proxy.add(Fault.not_found(times=None, key="images/beta/"))
    try:
        r = stack.img(env, "process", "beta")
        assert r.returncode == 3, r.stderr
        assert "not found" in r.stderr and "img images --remote" in r.stderr
        r = stack.img(env, "process", "nosuchfamily")
        assert r.returncode == 3
    finally:
        stack.proxy.clear()


def test_outsider_is_refused_with_exit_4(stack: Stack) -> None:
    outsider = pk.ensure_test_users()[1]
    home = stack.workdir / f"outsider-home-{time.monotonic_ns()}"
    home.mkdir(mode=0o700)
    os.chown(home, outsider.uid, outsider.gid)
    r = stack.img(stack.env(home), "process", "alpha", user=outsider)
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert "group img" in r.stderr or "img" in r.stderr


def _applying() -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if b"img_helper.apply_child" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                pass
    return False


def test_helper_killed_during_ensure_layer_then_rerun(stack: Stack, images: RealImages) -> None:
    stack.reset_pool()
    env = stack.env(stack.new_home())
    assert stack.helper is not None
    p = stack.spawn(env, "process", "alpha")
    deadline = time.monotonic() + 600
    while not _applying():
        assert p.poll() is None and time.monotonic() < deadline, "never saw the helper applying a layer"
        time.sleep(0.05)
    os.kill(stack.helper.pid, signal.SIGKILL)
    _, err = p.communicate(timeout=600)
    assert p.returncode in (1, 4), err  # the helper went away: it says so and stops
    stack.start_helper()  # reconciles its record with the pool at start
    out = processed(stack, stack.env(Path(env["HOME"])), "alpha")
    no_leaks(stack)
    assert len(stack.helper_list()["layers"]) == len(images.families["alpha"])
    mounted_rootfs_equals(str(out["device"]), images.source_specs["alpha"])


def test_rm_then_gc_deletes_the_devices_through_the_helper(stack: Stack, images: RealImages) -> None:
    stack.reset_pool()
    assert stack.proxy is not None
    stack.proxy.clear()
    env = stack.env(stack.new_home())
    processed(stack, env, "alpha")
    processed(stack, env, "beta")  # shares its lower layers with alpha
    r = stack.img(env, "rm", "beta")
    assert r.returncode == 0, r.stderr
    assert stack.img(env, "gc").returncode == 0
    listed = stack.helper_list()
    assert [a["name"] for a in listed["activations"]] == ["alpha"]
    assert len(listed["layers"]) == len(images.families["alpha"])  # beta's own layers are gone
    no_leaks(stack)
