"""Proves the S3 fixture is a real S3 server over HTTP, and that each fault of the proxy really happens."""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.request
from pathlib import Path

import botocore.exceptions
import pytest
from botocore.config import Config

from tests.fixtures.s3 import MIN_PART_SIZE, Fault, FaultProxy, S3Server

NO_RETRY = Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=5)
QUICK_TIMEOUT = Config(retries={"total_max_attempts": 1}, read_timeout=0.5)


def test_environment_points_boto3_at_the_server(s3_server: S3Server) -> None:
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    import boto3

    bucket = s3_server.new_bucket()
    names = [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]  # env only: no explicit args
    assert bucket in names


def test_multipart_object_roundtrip_and_ranged_get(s3_server: S3Server, tmp_path: Path) -> None:
    data = os.urandom(MIN_PART_SIZE + 123_457)  # two parts: 5 MiB + the rest
    path = tmp_path / "layer.tar"
    path.write_bytes(data)
    bucket = s3_server.new_bucket()
    etags = s3_server.seed(bucket, {"images/x/1.tar": path, "small": b"tiny"})

    # A multipart ETag is md5(concatenated part md5s) + "-<parts>".
    parts = [data[:MIN_PART_SIZE], data[MIN_PART_SIZE:]]
    want = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-2"
    assert etags["images/x/1.tar"] == want
    assert etags["small"] == hashlib.md5(b"tiny").hexdigest()

    client = s3_server.client()
    got = client.get_object(Bucket=bucket, Key="images/x/1.tar")
    assert got["ContentLength"] == len(data)
    assert got["Body"].read() == data

    start, end = MIN_PART_SIZE - 10, MIN_PART_SIZE + 9  # across the part boundary; Range is inclusive
    ranged = client.get_object(Bucket=bucket, Key="images/x/1.tar", Range=f"bytes={start}-{end}")
    assert ranged["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert ranged["ContentRange"] == f"bytes {start}-{end}/{len(data)}"
    assert ranged["Body"].read() == data[start:end + 1]


def test_seed_family_numbers_layers_in_order(s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    layers = [f"layer {n}".encode() for n in range(1, 12)]
    keys = s3_server.seed_families(bucket, {"big": layers, "small": layers[:2]})["big"]
    assert keys[9] == "images/big/10.tar"
    client = s3_server.client()
    for key, body in zip(keys, layers, strict=True):
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == body
    listed = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="images/small/")["Contents"]]
    assert listed == ["images/small/1.tar", "images/small/2.tar"]


@pytest.fixture
def seeded(s3_server: S3Server) -> tuple[str, bytes]:
    bucket = s3_server.new_bucket("faults")
    body = os.urandom(200_000)
    s3_server.seed(bucket, {"obj": body})
    return bucket, body


def test_proxy_passes_through(s3_server: S3Server, s3_faults: FaultProxy, seeded: tuple[str, bytes]) -> None:
    bucket, body = seeded
    assert os.environ["AWS_ENDPOINT_URL"] == s3_faults.endpoint_url
    client = s3_server.client(s3_faults.endpoint_url)
    assert client.get_object(Bucket=bucket, Key="obj")["Body"].read() == body
    client.put_object(Bucket=bucket, Key="via-proxy", Body=b"x" * 3000)
    assert s3_server.client().get_object(Bucket=bucket, Key="via-proxy")["Body"].read() == b"x" * 3000
    assert [r.outcome for r in s3_faults.log] == ["pass", "pass"]


def test_proxy_status_faults_then_pass(s3_server: S3Server, s3_faults: FaultProxy,
                                       seeded: tuple[str, bytes]) -> None:
    bucket, body = seeded
    fault = s3_faults.add(Fault.status(503, times=2))
    client = s3_server.client(s3_faults.endpoint_url, NO_RETRY)
    for _ in range(2):
        with pytest.raises(botocore.exceptions.ClientError) as err:
            client.get_object(Bucket=bucket, Key="obj")
        assert err.value.response["Error"]["Code"] == "SlowDown"
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert client.get_object(Bucket=bucket, Key="obj")["Body"].read() == body
    assert fault.fired == 2
    assert [r.outcome for r in s3_faults.log] == ["status", "status", "pass"]

    s3_faults.add(Fault.status(500))
    with pytest.raises(botocore.exceptions.ClientError) as err:
        client.get_object(Bucket=bucket, Key="obj")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500


def test_proxy_404_only_for_the_matching_key(s3_server: S3Server, s3_faults: FaultProxy,
                                             seeded: tuple[str, bytes]) -> None:
    bucket, _ = seeded
    s3_server.seed(bucket, {"other": b"o"})
    s3_faults.add(Fault.not_found(key="/obj", times=None))
    client = s3_server.client(s3_faults.endpoint_url, NO_RETRY)
    with pytest.raises(client.exceptions.NoSuchKey):
        client.get_object(Bucket=bucket, Key="obj")
    with pytest.raises(botocore.exceptions.ClientError) as err:
        client.head_object(Bucket=bucket, Key="obj")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert client.get_object(Bucket=bucket, Key="other")["Body"].read() == b"o"


def test_proxy_delay_causes_read_timeout(s3_server: S3Server, s3_faults: FaultProxy,
                                         seeded: tuple[str, bytes]) -> None:
    bucket, _ = seeded
    s3_faults.add(Fault.delay(3.0))
    client = s3_server.client(s3_faults.endpoint_url, QUICK_TIMEOUT)
    t0 = time.monotonic()
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        client.get_object(Bucket=bucket, Key="obj")
    assert time.monotonic() - t0 < 2.5


def test_proxy_truncates_body(s3_server: S3Server, s3_faults: FaultProxy, seeded: tuple[str, bytes]) -> None:
    bucket, body = seeded
    s3_faults.add(Fault.truncate(1000))
    client = s3_server.client(s3_faults.endpoint_url, NO_RETRY)
    resp = client.get_object(Bucket=bucket, Key="obj")
    assert resp["ContentLength"] == len(body)  # the headers promised everything
    with pytest.raises(botocore.exceptions.ResponseStreamingError):
        resp["Body"].read()
    # Read with plain HTTP: the prefix that did arrive is the real data, then the connection ends short.
    s3_faults.add(Fault.truncate(1000))
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "obj"})
    with urllib.request.urlopen(url, timeout=5) as r:
        with pytest.raises(http.client.IncompleteRead) as short:
            r.read()
    assert short.value.partial == body[:1000]
    assert [r.outcome for r in s3_faults.log] == ["truncate", "truncate"]


def test_proxy_stall_then_cut(s3_server: S3Server, s3_faults: FaultProxy, seeded: tuple[str, bytes]) -> None:
    bucket, _ = seeded
    s3_faults.add(Fault.stall(500, 3.0))
    client = s3_server.client(s3_faults.endpoint_url, QUICK_TIMEOUT)
    resp = client.get_object(Bucket=bucket, Key="obj")
    with pytest.raises(botocore.exceptions.BotoCoreError):
        resp["Body"].read()


def test_proxy_reset_closes_without_answer(s3_server: S3Server, s3_faults: FaultProxy,
                                           seeded: tuple[str, bytes]) -> None:
    bucket, body = seeded
    s3_faults.add(Fault.reset())
    client = s3_server.client(s3_faults.endpoint_url, NO_RETRY)
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        client.get_object(Bucket=bucket, Key="obj")
    assert client.get_object(Bucket=bucket, Key="obj")["Body"].read() == body
    assert [r.outcome for r in s3_faults.log] == ["reset", "pass"]


def test_proxy_retries_succeed_with_default_client(s3_faults: FaultProxy, seeded: tuple[str, bytes]) -> None:
    """The ordinary env-configured client, as product code builds it, retries through two 503s."""
    import boto3

    bucket, body = seeded
    s3_faults.add(Fault.status(503, times=2))
    assert boto3.client("s3").get_object(Bucket=bucket, Key="obj")["Body"].read() == body
    assert [r.outcome for r in s3_faults.log] == ["status", "status", "pass"]
