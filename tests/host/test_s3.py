"""S3 listing and downloads against a real S3 server (moto in server mode), faults injected by a proxy."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from img.config import Config
from img.refs import FamilyRef
from img.s3 import (
    AccessDenied,
    ObjectChanged,
    ObjectInfo,
    ObjectNotFound,
    ObjectTooLarge,
    Retry,
    TransientError,
    download,
    head,
    list_families,
    list_family,
    make_client,
)
from img.store import Store
from tests.fixtures.s3 import Fault, FaultProxy, S3Server

pytest_plugins = ["tests.fixtures.s3"]

FAST = Retry(attempts=3, initial=0.01, maximum=0.05)


def payload(n: int, seed: int = 0) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    c = Config(home=tmp_path / "home", bucket=None, max_blob_bytes=64 << 20)
    c.ensure_dirs()
    return c


@pytest.fixture
def store(cfg: Config) -> Store:
    return Store(cfg.db_path)


def test_family_listing_is_numeric_and_ignores_non_layers(s3_server: S3Server, cfg: Config) -> None:
    bucket = s3_server.new_bucket()
    s3_server.seed(bucket, {f"images/py/{n}.tar": payload(10, n) for n in (1, 2, 10, 3)}
                   | {"images/py/README": b"x", "images/node/1.tar": b"n", "other/x/1.tar": b"o"})
    client = make_client(cfg)
    keys = [o.key for o in list_family(client, FamilyRef(bucket, "images/", "py"))]
    assert keys == ["images/py/1.tar", "images/py/2.tar", "images/py/3.tar", "images/py/10.tar"]
    fams = {f.name: (f.layers, f.size) for f in list_families(client, bucket, "images/")}
    assert fams == {"py": (4, 40), "node": (1, 1)}


def test_missing_family_and_bucket_are_not_found(s3_server: S3Server, cfg: Config) -> None:
    bucket = s3_server.new_bucket()
    client = make_client(cfg)
    with pytest.raises(ObjectNotFound, match="img images --remote"):
        list_family(client, FamilyRef(bucket, "images/", "nope"))
    with pytest.raises(ObjectNotFound):
        list_family(client, FamilyRef("no-such-bucket-xyz", "images/", "nope"))
    with pytest.raises(ObjectNotFound):
        head(client, bucket, "images/nope/1.tar")


def test_download_verifies_and_stores_content_addressed(s3_server: S3Server, cfg: Config,
                                                        store: Store) -> None:
    bucket = s3_server.new_bucket()
    data = payload(300_000)
    s3_server.seed(bucket, {"images/a/1.tar": data})
    client = make_client(cfg)
    obj = head(client, bucket, "images/a/1.tar")
    seen: list[tuple[int, int]] = []
    sha = download(client, obj, cfg, store, progress=lambda d, t: seen.append((d, t)))
    assert sha == hashlib.sha256(data).hexdigest()
    assert cfg.blob_path(sha).read_bytes() == data
    assert store.blob_for_source(bucket, obj.key, obj.etag, obj.size) == sha
    assert seen[-1] == (len(data), len(data))
    assert list(cfg.partial_dir.glob("*.part")) == []


def test_same_object_is_downloaded_once(s3_faults: FaultProxy, s3_server: S3Server, cfg: Config,
                                        store: Store) -> None:
    bucket = s3_server.new_bucket()
    s3_server.seed(bucket, {"images/a/1.tar": payload(1000), "images/b/1.tar": payload(1000)})
    client = make_client(cfg)
    a, b = head(client, bucket, "images/a/1.tar"), head(client, bucket, "images/b/1.tar")
    first = download(client, a, cfg, store)
    assert download(client, a, cfg, store) == first == download(client, b, cfg, store)
    gets = [r for r in s3_faults.log if r.method == "GET" and "/images/" in r.path]
    # b is another key with the same content (same ETag and size): its bytes are the cached blob
    assert len(gets) == 1
    assert store.blob_for_source(bucket, b.key, b.etag, b.size) is not None


def test_same_etag_in_another_bucket_is_downloaded(s3_server: S3Server, cfg: Config, store: Store) -> None:
    b1, b2 = s3_server.new_bucket(), s3_server.new_bucket()
    s3_server.seed(b1, {"k": payload(1000)})
    s3_server.seed(b2, {"k": payload(1000)})
    client = make_client(cfg)
    o1, o2 = head(client, b1, "k"), head(client, b2, "k")
    assert o1.etag == o2.etag
    download(client, o1, cfg, store)
    assert store.blob_for_etag(b2, o2.etag, o2.size) is None  # trust stays per bucket


def test_tampered_cache_file_is_refetched(s3_server: S3Server, cfg: Config, store: Store) -> None:
    bucket = s3_server.new_bucket()
    data = payload(5000)
    s3_server.seed(bucket, {"k/1.tar": data})
    client = make_client(cfg)
    obj = head(client, bucket, "k/1.tar")
    sha = download(client, obj, cfg, store)
    path = cfg.blob_path(sha)
    os.chmod(path, 0o644)
    path.write_bytes(b"evil" + data[4:])
    assert download(client, obj, cfg, store) == sha
    assert path.read_bytes() == data


def test_interrupted_download_resumes_with_a_range(s3_faults: FaultProxy, s3_server: S3Server, cfg: Config,
                                                   store: Store) -> None:
    bucket = s3_server.new_bucket()
    data = payload(3 << 20)
    s3_server.seed(bucket, {"images/a/1.tar": data})
    client = make_client(cfg)
    obj = head(client, bucket, "images/a/1.tar")
    s3_faults.add(Fault.truncate(1 << 20, times=1, key="images/a/1.tar"))
    sha = download(client, obj, cfg, store, retry=FAST)
    assert cfg.blob_path(sha).read_bytes() == data
    gets = [r for r in s3_faults.log if r.method == "GET" and "images/a/1.tar" in r.path]
    assert [g.outcome for g in gets] == ["truncate", "pass"]
    assert gets[1].range is not None and gets[1].range.startswith("bytes=")
    assert int(gets[1].range[len("bytes="):].rstrip("-")) >= 1 << 16  # kept what it had


def test_partial_file_from_a_crashed_run_is_resumed_not_refetched(s3_faults: FaultProxy, s3_server: S3Server,
                                                                  cfg: Config, store: Store) -> None:
    bucket = s3_server.new_bucket()
    data = payload(200_000)
    s3_server.seed(bucket, {"x/1.tar": data})
    client = make_client(cfg)
    obj = head(client, bucket, "x/1.tar")
    (cfg.partial_dir / f"{obj.source_id}.part").write_bytes(data[:123_456])  # what a killed run left
    s3_faults.log.clear()
    sha = download(client, obj, cfg, store)
    assert cfg.blob_path(sha).read_bytes() == data
    assert [r.range for r in s3_faults.log if r.method == "GET"] == ["bytes=123456-"]


def test_corrupt_partial_prefix_is_caught_by_the_etag_md5_and_discarded(s3_server: S3Server, cfg: Config,
                                                                        store: Store) -> None:
    bucket = s3_server.new_bucket()
    data = payload(100_000)  # below the multipart size: a plain MD5 ETag
    s3_server.seed(bucket, {"x/1.tar": data})
    client = make_client(cfg)
    obj = head(client, bucket, "x/1.tar")
    part = cfg.partial_dir / f"{obj.source_id}.part"
    part.write_bytes(b"\0" * 5000)
    from img.s3 import CorruptDownload

    with pytest.raises(CorruptDownload):
        download(client, obj, cfg, store)
    assert not list(cfg.blob_dir.iterdir())  # nothing half-right was ever stored
    assert download(client, obj, cfg, store) == hashlib.sha256(data).hexdigest()


def test_5xx_and_resets_are_retried(s3_faults: FaultProxy, s3_server: S3Server, cfg: Config,
                                    store: Store) -> None:
    bucket = s3_server.new_bucket()
    data = payload(50_000)
    s3_server.seed(bucket, {"x/1.tar": data})
    client = make_client(cfg)
    obj = head(client, bucket, "x/1.tar")
    s3_faults.add(Fault.status(503, times=2, method="GET"))
    s3_faults.add(Fault.status(500, times=1, method="GET"))
    s3_faults.add(Fault.reset(times=1, method="GET"))
    assert download(client, obj, cfg, store, retry=Retry(attempts=8, initial=0.01, maximum=0.05)) \
        == hashlib.sha256(data).hexdigest()


def test_persistent_5xx_gives_up_with_a_typed_error(s3_faults: FaultProxy, s3_server: S3Server, cfg: Config,
                                                    store: Store) -> None:
    bucket = s3_server.new_bucket()
    s3_server.seed(bucket, {"x/1.tar": b"abc"})
    client = make_client(cfg, api_attempts=1)
    obj = head(client, bucket, "x/1.tar")
    s3_faults.add(Fault.status(503, times=None, method="GET"))
    with pytest.raises(TransientError):
        download(client, obj, cfg, store, retry=FAST)
    assert not list(cfg.blob_dir.iterdir())


def test_read_timeout_is_retried(s3_faults: FaultProxy, s3_server: S3Server, cfg: Config,
                                 store: Store) -> None:
    bucket = s3_server.new_bucket()
    data = payload(100_000)
    s3_server.seed(bucket, {"x/1.tar": data})
    client = make_client(cfg, timeout=0.5)
    obj = head(client, bucket, "x/1.tar")
    s3_faults.add(Fault.stall(10_000, 3.0, times=1))
    assert download(client, obj, cfg, store, retry=FAST) == hashlib.sha256(data).hexdigest()


def test_404_during_download_aborts(s3_faults: FaultProxy, s3_server: S3Server, cfg: Config,
                                    store: Store) -> None:
    bucket = s3_server.new_bucket()
    s3_server.seed(bucket, {"x/1.tar": b"abc"})
    client = make_client(cfg)
    obj = head(client, bucket, "x/1.tar")
    s3_faults.add(Fault.not_found(times=None, method="GET"))
    with pytest.raises(ObjectNotFound):
        download(client, obj, cfg, store, retry=FAST)
    assert len([r for r in s3_faults.log if r.method == "GET"]) == 1  # no retries of a 404


def test_403_aborts_with_a_hint(s3_faults: FaultProxy, s3_server: S3Server, cfg: Config,
                                store: Store) -> None:
    bucket = s3_server.new_bucket()
    s3_server.seed(bucket, {"x/1.tar": b"abc"})
    client = make_client(cfg)
    obj = head(client, bucket, "x/1.tar")
    s3_faults.add(Fault.status(403, times=None, method="GET"))
    with pytest.raises(AccessDenied, match="no-sign-request"):
        download(client, obj, cfg, store, retry=FAST)


def test_oversize_object_is_refused_before_any_get(s3_faults: FaultProxy, s3_server: S3Server, tmp_path: Path,
                                                   store: Store, cfg: Config) -> None:
    bucket = s3_server.new_bucket()
    s3_server.seed(bucket, {"x/1.tar": payload(2000)})
    small = Config(home=cfg.home, max_blob_bytes=1000)
    client = make_client(small)
    obj = head(client, bucket, "x/1.tar")
    with pytest.raises(ObjectTooLarge):
        download(client, obj, small, store)
    assert [r for r in s3_faults.log if r.method == "GET"] == []


def test_object_replaced_mid_download_is_detected(s3_server: S3Server, cfg: Config, store: Store) -> None:
    bucket = s3_server.new_bucket()
    data = payload(100_000)
    s3_server.seed(bucket, {"x/1.tar": data})
    client = make_client(cfg)
    obj = head(client, bucket, "x/1.tar")
    (cfg.partial_dir / f"{obj.source_id}.part").write_bytes(data[:5000])
    s3_server.seed(bucket, {"x/1.tar": payload(100_000, seed=9)})  # new ETag: If-Match fails
    with pytest.raises(ObjectChanged):
        download(client, obj, cfg, store)
    assert not list(cfg.blob_dir.iterdir())


def test_concurrent_downloads_of_one_object_fetch_it_once(s3_faults: FaultProxy, s3_server: S3Server,
                                                          cfg: Config) -> None:
    bucket = s3_server.new_bucket()
    data = payload(2 << 20)
    s3_server.seed(bucket, {"x/1.tar": data})
    obj = head(make_client(cfg), bucket, "x/1.tar")
    s3_faults.log.clear()
    results: list[str] = []

    def one() -> None:
        results.append(download(make_client(cfg), obj, cfg, Store(cfg.db_path)))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [hashlib.sha256(data).hexdigest()] * 3
    assert len([r for r in s3_faults.log if r.method == "GET"]) == 1


def test_object_info_source_id_is_stable() -> None:
    a = ObjectInfo("b", "k", 1, '"e"')
    assert a.source_id == ObjectInfo("b", "k", 1, '"e"').source_id != ObjectInfo("b", "k", 1, '"f"').source_id
