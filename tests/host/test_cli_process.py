"""`img process` and friends end to end on the host: the real CLI as a subprocess, a real S3 server (moto),
and the real helper server with its test stand-in service (no device-mapper on the host; the kernel tier
runs the same flows against the real helper)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from img.config import Config, load
from img.fastpath import _canonical, _home
from img.refs import parse
from img.workflows import chain_ids
from tests.fixtures.s3 import Fault, FaultProxy, S3Server
from tests.host.test_server_standin import HelperProc

IMG = str(Path(sys.executable).parent / "img")


def payload(n: int, seed: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


@pytest.fixture
def helper(tmp_path: Path) -> Iterator[HelperProc]:
    h = HelperProc(tmp_path, env={"STANDIN_CHUNK_DELAY": os.environ.get("STANDIN_CHUNK_DELAY", "0")}).start()
    yield h
    h.stop()


@pytest.fixture
def env(tmp_path: Path, helper: HelperProc, s3_server: S3Server) -> dict[str, str]:
    bucket = s3_server.new_bucket("cli")
    s3_server.seed_family(bucket, "alpha", [payload(300_000, 1), payload(30_000, 2), payload(5_000, 3)])
    s3_server.seed_family(bucket, "beta", [payload(300_000, 1), payload(30_000, 2), payload(9_000, 4)])
    return {**os.environ, "IMG_HOME": str(tmp_path / "home"), "IMG_S3_BUCKET": bucket,
            "IMG_HELPER_SOCKET": str(helper.socket_path), "IMG_S3_TIMEOUT": "5"}


def img(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IMG, *args], env=env, capture_output=True, text=True, timeout=timeout)


def gets(proxy: FaultProxy) -> list[str]:
    return [r.path for r in proxy.log if r.method == "GET" and "/images/" in r.path]


def test_process_then_rerun_is_a_no_op(env: dict[str, str], s3_faults: FaultProxy) -> None:
    env = {**env, "AWS_ENDPOINT_URL": s3_faults.endpoint_url}
    r = img(env, "process", "alpha", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["changed"] is True and out["layers"] == 3 and out["device"].endswith("-alpha")
    assert len(gets(s3_faults)) == 3
    db = sqlite3.connect(Path(env["IMG_HOME"]) / "img.db")
    assert db.execute("SELECT state FROM images").fetchall() == [("ready",)]
    assert db.execute("SELECT name, device FROM activations").fetchall() == [("alpha", out["device"])]
    digests = [d for (d,) in db.execute("SELECT digest FROM image_layers ORDER BY position")]
    chains = [c for (c,) in db.execute("SELECT chain_id FROM image_layers ORDER BY position")]
    assert chains == chain_ids(digests)
    # the stand-in reports devices under /dev/mapper that don't exist on the host: the fast path must
    # notice and fall back to the full path, which checks the helper and skips all work
    r2 = img(env, "process", "alpha", "--json")
    assert r2.returncode == 0, r2.stderr
    assert len(gets(s3_faults)) == 3  # no second download


def test_fast_path_answers_from_the_store_alone(env: dict[str, str], tmp_path: Path) -> None:
    assert img(env, "process", "alpha").returncode == 0
    dev = tmp_path / "fake-device"
    dev.write_text("")
    db = sqlite3.connect(Path(env["IMG_HOME"]) / "img.db")
    db.execute("UPDATE activations SET device = ?", (str(dev),))
    db.commit()
    dead = {**env, "IMG_HELPER_SOCKET": str(tmp_path / "nothing.sock"), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    r = img(dead, "process", "alpha", "--json")  # neither S3 nor the helper is touched
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"ref": parse("alpha", load(env)).canonical, "name": "alpha",
                                    "chain_id": json.loads(r.stdout)["chain_id"], "device": str(dev),
                                    "state": "active", "changed": False}
    t = time.monotonic()
    for _ in range(5):
        assert img(dead, "process", "alpha").returncode == 0
    assert (time.monotonic() - t) / 5 < 1.0  # generous here; bench/rerun.sh measures it properly


def test_shared_layers_are_downloaded_once(env: dict[str, str], s3_faults: FaultProxy) -> None:
    env = {**env, "AWS_ENDPOINT_URL": s3_faults.endpoint_url}
    assert img(env, "process", "alpha").returncode == 0
    r = img(env, "process", "beta", "--json")
    assert r.returncode == 0, r.stderr
    # beta's layers 1-2 are alpha's (same bytes, same ETag in the same bucket): only beta/3 is fetched
    assert sorted(p.split("/images/")[1] for p in gets(s3_faults)) == \
        ["alpha/1.tar", "alpha/2.tar", "alpha/3.tar", "beta/3.tar"]
    listed = json.loads(img(env, "list", "--json").stdout)["images"]
    a, b = sorted(listed, key=lambda i: i["name"])
    assert [la["chain_id"] for la in a["layers"][:2]] == [la["chain_id"] for la in b["layers"][:2]]


def test_exit_codes(env: dict[str, str], tmp_path: Path) -> None:
    assert img(env, "process", "../etc").returncode == 2
    assert img({**env, "IMG_S3_BUCKET": ""}, "process", "alpha").returncode == 2
    r = img(env, "process", "nosuchfamily")
    assert r.returncode == 3 and "img images --remote" in r.stderr
    r = img({**env, "IMG_HELPER_SOCKET": str(tmp_path / "none.sock")}, "process", "alpha")
    assert r.returncode == 4 and "img-helper serve" in r.stderr, r.stderr
    r = img({**env, "IMG_MAX_BLOB_BYTES": "1000"}, "process", "beta")
    assert r.returncode == 5 and "IMG_MAX_BLOB_BYTES" in r.stderr, r.stderr


def test_concurrent_processes_share_one_run(env: dict[str, str], s3_faults: FaultProxy) -> None:
    env = {**env, "AWS_ENDPOINT_URL": s3_faults.endpoint_url, "STANDIN_CHUNK_DELAY": "0.01"}
    procs = [subprocess.Popen([IMG, "process", "alpha", "--json"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len({json.loads(o)["device"] for o, _ in outs}) == 1
    assert len(gets(s3_faults)) == 3  # one download per object


def test_kill_9_mid_download_then_rerun_completes(env: dict[str, str], s3_faults: FaultProxy) -> None:
    slow = {**env, "AWS_ENDPOINT_URL": s3_faults.endpoint_url}
    stall = s3_faults.add(Fault.stall(150_000, 30.0, key="alpha/1.tar"))  # part of 1.tar, then nothing
    p = subprocess.Popen([IMG, "process", "alpha"], env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    blobs = Path(env["IMG_HOME"]) / "blobs" / "sha256"
    deadline = time.monotonic() + 60
    while (stall.fired == 0 or len(list(blobs.glob("*"))) < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    s3_faults.clear()
    r = img(slow, "process", "alpha", "--json")
    assert r.returncode == 0, r.stderr
    got = [r for r in s3_faults.log if r.method == "GET" and "/images/" in r.path]
    # 2.tar and 3.tar were complete: not fetched again; 1.tar resumes after the bytes it had
    assert [g.path.rsplit("/", 1)[1] for g in got] == ["1.tar"], got
    assert got[0].range is not None and got[0].range != "bytes=0-"
    runs = json.loads(img(slow, "runs", "--json").stdout)["runs"]
    assert not [x for x in runs if x["active"]]
    image_runs = [x for x in runs if x["action"] == "img-image"]
    assert len(image_runs) == 1 and image_runs[0]["status"] == "succeeded"  # the same run, resumed


def test_runs_show_resume_gc_status(env: dict[str, str]) -> None:
    assert img(env, "process", "alpha").returncode == 0
    runs = json.loads(img(env, "runs", "--json").stdout)["runs"]
    top = next(x for x in runs if x["action"] == "img-image")
    shown = json.loads(img(env, "run", "show", top["version"], "--json").stdout)
    assert shown["events"][0]["kind"] == "START" and shown["events"][-1]["kind"] == "FINISH"
    assert len(shown["children"]) == 6  # 3 blobs + 3 layers
    assert img(env, "run", "show", "nope").returncode == 2
    assert "nothing to resume" in img(env, "resume").stdout
    home = Path(env["IMG_HOME"])
    stray = home / "blobs" / "sha256" / ("0" * 64)
    stray.write_bytes(b"x")
    dry = json.loads(img(env, "gc", "--dry-run", "--json").stdout)
    assert dry["blobs"] == ["0" * 64] and dry["devices"] == [] and stray.exists()
    assert img(env, "gc").returncode == 0 and not stray.exists()
    st = img(env, "status", "--json")
    assert st.returncode == 0, st.stdout + st.stderr
    s = json.loads(st.stdout)
    assert s["ok"] and s["authorized"] and s["images"] == 1


def test_remote_listing(env: dict[str, str]) -> None:
    r = img(env, "images", "--remote", "--json")
    assert r.returncode == 0, r.stderr
    assert {f["name"]: f["layers"] for f in json.loads(r.stdout)["families"]} == {"alpha": 3, "beta": 3}


def test_fast_path_agrees_with_the_full_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for prefix in ["images/", "images", "x/y/", ""]:
        monkeypatch.setenv("IMG_S3_BUCKET", "bkt")
        monkeypatch.setenv("IMG_S3_PREFIX", prefix)
        cfg = load()
        assert _canonical("python") == (parse("python", cfg).canonical, "python")
    for bad in ["s3://bkt/images/python/", "../x", "a/b", ""]:
        assert _canonical(bad) is None
    monkeypatch.setenv("IMG_HOME", str(tmp_path))
    assert Path(_home()) == load().home == tmp_path
    monkeypatch.delenv("IMG_HOME")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "st"))
    assert Path(_home()) == load().home


def test_chain_ids_match_the_formats_contract() -> None:
    formats = pytest.importorskip("img_helper.formats")
    ds = ["sha256:" + hashlib.sha256(bytes([i])).hexdigest() for i in range(4)]
    assert chain_ids(ds) == formats.chain_ids(ds)
    assert isinstance(Config, type)


CRASH_POINTS = ["resolve:before", "download:before", "blob:after", "download:after", "layers:before",
                "layers:after", "unpack:before", "layer:after", "unpack:after", "activate:before",
                "activate:after"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_9_at_every_step_then_rerun_completes(point: str, env: dict[str, str],
                                                   s3_faults: FaultProxy) -> None:
    env = {**env, "AWS_ENDPOINT_URL": s3_faults.endpoint_url}
    r = img({**env, "IMG_CRASH_AT": point}, "process", "alpha")
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    home = Path(env["IMG_HOME"])
    db = sqlite3.connect(home / "img.db")
    cached = {k for k, sha in db.execute("SELECT key, sha256 FROM blob_sources")
              if (home / "blobs" / "sha256" / sha).exists()}
    db.close()
    seen = len(s3_faults.log)
    r = img(env, "process", "alpha", "--json")
    assert r.returncode == 0, r.stderr
    again = [r.path.split("/", 2)[2] for r in s3_faults.log[seen:]
             if r.method == "GET" and "/images/" in r.path]
    assert not cached & set(again)  # nothing that was downloaded before the kill is downloaded again
    assert len(again) == len(set(again))
    runs = json.loads(img(env, "runs", "--json").stdout)["runs"]
    assert not [x for x in runs if x["active"]]
    image_runs = [x for x in runs if x["action"] == "img-image"]
    assert [x["status"] for x in image_runs] == ["succeeded"]  # the killed run itself was continued
    listed = json.loads(img(env, "list", "--json").stdout)["images"]
    assert [(i["state"], len(i["layers"]), [a["name"] for a in i["activations"]]) for i in listed] == \
        [("ready", 3, ["alpha"])]


def test_outsider_errors_say_what_to_do(env: dict[str, str], tmp_path: Path) -> None:
    r = img({**env, "IMG_HOME": str(tmp_path / "h2")}, "runs")
    assert r.returncode == 0 and "no runs" in r.stdout
    r = img(env, "gc", "--dry-run")
    assert r.returncode == 0


def test_daemon_processes_spooled_refs(env: dict[str, str]) -> None:
    spool = Path(env["IMG_HOME"]) / "spool"
    d = subprocess.Popen([IMG, "daemon"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not spool.is_dir() and time.monotonic() < deadline:
            time.sleep(0.1)
        (spool / ".alpha.tmp").write_text("")
        os.rename(spool / ".alpha.tmp", spool / "alpha")  # moved in: picked up
        (spool / "req2").write_text("nosuchfamily\n")  # closed after writing: picked up
        while not ((spool / "done" / "alpha").exists() and (spool / "failed" / "req2").exists()):
            assert time.monotonic() < deadline, d.stderr.read() if d.poll() is not None else "timeout"
            time.sleep(0.2)
        assert (spool / "done" / "alpha").read_text().startswith("ok ")
        assert "no image family" in (spool / "failed" / "req2").read_text()
    finally:
        d.send_signal(signal.SIGTERM)
        _, err = d.communicate(timeout=60)
    assert d.returncode == 0, err
    listed = json.loads(img(env, "list", "--json").stdout)["images"]
    assert [(i["name"], i["state"]) for i in listed] == [("alpha", "ready")]


def test_rm_then_gc_frees_devices_and_blobs(env: dict[str, str]) -> None:
    assert img(env, "process", "alpha").returncode == 0
    assert img(env, "process", "beta").returncode == 0
    r = img(env, "rm", "beta", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["image_forgotten"] is True
    plan = json.loads(img(env, "gc", "--dry-run", "--json").stdout)
    assert len(plan["devices"]) == 1 and len(plan["blobs"]) == 1  # beta's own top layer and its blob
    assert img(env, "gc").returncode == 0
    after = json.loads(img(env, "gc", "--dry-run", "--json").stdout)
    assert after["devices"] == [] and after["blobs"] == []
    assert [i["name"] for i in json.loads(img(env, "list", "--json").stdout)["images"]] == ["alpha"]
    assert img(env, "rm", "nope").returncode == 2


def test_fast_path_does_not_skip_a_run_killed_after_activating(env: dict[str, str], tmp_path: Path) -> None:
    r = img({**env, "IMG_CRASH_AT": "activate:after"}, "process", "alpha")
    assert r.returncode == -signal.SIGKILL
    dev = tmp_path / "device"
    dev.write_text("")
    db = sqlite3.connect(Path(env["IMG_HOME"]) / "img.db")
    db.execute("UPDATE activations SET device = ?", (str(dev),))  # as if the device exists
    db.commit()
    r = img(env, "process", "alpha", "--json")
    assert r.returncode == 0, r.stderr
    runs = json.loads(img(env, "runs", "--json").stdout)["runs"]
    assert not [x for x in runs if x["active"]]  # the killed run was finished, not skipped
    assert [i["state"] for i in json.loads(img(env, "list", "--json").stdout)["images"]] == ["ready"]
