"""S3: list image families and archives, and download objects into the content-addressed blob cache.

The client is boto3's with its standard configuration chain (environment, profiles, ``AWS_ENDPOINT_URL``),
plus ``--endpoint-url`` and anonymous access (``--no-sign-request``).

Downloads (``download``):
  * stream into ``blobs/partial/<id>.part`` while hashing (sha256, and md5 to check a plain single-part ETag),
    then fsync + rename to ``blobs/sha256/<hex>``: a blob path only ever holds complete, verified bytes;
  * an interrupted download keeps its partial file; the next attempt re-hashes that prefix and asks for the
    rest with ``Range: bytes=N-`` and ``If-Match: <ETag>`` (a changed object gives 412 → start over);
  * 5xx, throttling, timeouts, resets and truncated bodies retry with bounded exponential backoff (an attempt
    that made progress does not count against the budget); 404, 403 and objects over the size cap raise
    typed errors at once;
  * the same S3 object (bucket, key, ETag, size) seen before is not downloaded again, but the cached file's
    sha256 is re-verified against the record first;
  * one download per object at a time across processes (an flock next to the partial file).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import botocore.exceptions as bexc
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig

from img.config import Config
from img.refs import FamilyRef, layer_number

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from img.store import Store

CHUNK = 1 << 20  # hashing / copying
READ_CHUNK = 64 << 10  # network reads: small enough that a stalled stream has written what it received
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


class S3Error(Exception):
    """Base of S3 failures: ``hint`` tells the user what to do."""

    transient = False

    def __init__(self, bucket: str, key: str, reason: str, hint: str = "") -> None:
        where = f"s3://{bucket}/{key}"
        super().__init__(f"{where}: {reason}" + (f" — {hint}" if hint else ""))
        self.bucket = bucket
        self.key = key
        self.reason = reason
        self.hint = hint


class ObjectNotFound(S3Error):
    pass


class AccessDenied(S3Error):
    pass


class ObjectTooLarge(S3Error):
    def __init__(self, bucket: str, key: str, size: int, limit: int) -> None:
        super().__init__(bucket, key, f"object is {size} bytes, over the {limit}-byte cap",
                         "raise IMG_MAX_BLOB_BYTES if this image is legitimate")
        self.size = size
        self.limit = limit


class ObjectChanged(S3Error):
    """The object's ETag/size changed under us (412 on a resumed range, or a different length)."""


class CorruptDownload(S3Error):
    """The bytes received do not match the ETag's MD5 or the expected digest."""


class TransientError(S3Error):
    """5xx, throttling, timeouts or resets that outlasted the retry budget."""

    transient = True


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    key: str
    size: int
    etag: str  # as S3 returns it, quotes included

    @property
    def source_id(self) -> str:
        """Stable name for this exact object version: partial files and run ids use it."""
        h = hashlib.sha256(f"{self.bucket}\0{self.key}\0{self.etag}\0{self.size}".encode()).hexdigest()
        return h[:32]


@dataclass(frozen=True)
class Retry:
    attempts: int = 8  # failed attempts without progress before giving up
    initial: float = 0.2
    maximum: float = 5.0
    factor: float = 2.0

    def delay(self, n: int) -> float:
        base = min(self.maximum, self.initial * self.factor ** max(0, n - 1))
        return base * random.uniform(0.5, 1.0)  # jitter: concurrent clients do not retry in lockstep


def make_client(config: Config, timeout: float | None = None, api_attempts: int | None = None) -> S3Client:
    """boto3's S3 client: its own configuration chain, plus our endpoint and anonymous-access settings.
    botocore's own (standard-mode) retries handle each request; ``download`` adds resume across them.
    ``IMG_S3_TIMEOUT`` (seconds, default 30) and ``IMG_S3_API_ATTEMPTS`` (default 3) tune them."""
    t = timeout if timeout is not None else float(os.environ.get("IMG_S3_TIMEOUT", "30"))
    attempts = api_attempts if api_attempts is not None else int(os.environ.get("IMG_S3_API_ATTEMPTS", "3"))
    kw: dict[str, Any] = {"connect_timeout": min(t, 10.0), "read_timeout": t,
                          "retries": {"mode": "standard", "max_attempts": max(1, attempts)}}
    if config.no_sign_request:
        kw["signature_version"] = UNSIGNED
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=config.endpoint_url, config=BotoConfig(**kw))


# -- error classification -------------------------------------------------------------------------------

_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestTimeTooSkewed", "BadGateway", "GatewayTimeout"}


def _status(e: bexc.ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def classify(e: Exception, bucket: str, key: str) -> S3Error:
    """Maps a botocore failure to our typed errors."""
    if isinstance(e, S3Error):
        return e
    if isinstance(e, bexc.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = _status(e)
        if status == 404 or code in {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}:
            what = "bucket" if code == "NoSuchBucket" else "object"
            return ObjectNotFound(bucket, key, f"{what} not found",
                                  "check the name; `img images --remote` lists what the bucket has")
        if status == 403 or code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            return AccessDenied(bucket, key, f"access denied ({code})",
                                "check AWS credentials/profile, or --no-sign-request for a public bucket")
        if status == 412 or code == "PreconditionFailed":
            return ObjectChanged(bucket, key, "the object changed during the download",
                                 "run the command again")
        if status >= 500 or code in _TRANSIENT_CODES:
            return TransientError(bucket, key, f"server error {status} {code}".strip(), "try again later")
        return S3Error(bucket, key, f"S3 error {status} {code}: {e}")
    if isinstance(e, bexc.NoCredentialsError):
        return AccessDenied(bucket, key, "no AWS credentials",
                            "configure credentials (AWS_PROFILE, env) or pass --no-sign-request")
    if isinstance(e, bexc.EndpointConnectionError | bexc.ConnectionClosedError | bexc.ReadTimeoutError
                  | bexc.ConnectTimeoutError | bexc.ResponseStreamingError | bexc.IncompleteReadError
                  | bexc.HTTPClientError | ConnectionError | TimeoutError):
        return TransientError(bucket, key, f"network error: {e}", "check the endpoint/network and try again")
    if isinstance(e, bexc.BotoCoreError):
        return S3Error(bucket, key, f"S3 client error: {e}")
    raise e


# -- listing ----------------------------------------------------------------------------------------------

def _objects(client: S3Client, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                yield ObjectInfo(bucket, o["Key"], int(o["Size"]), o.get("ETag", ""))
    except Exception as e:
        raise classify(e, bucket, prefix) from e


def list_family(client: S3Client, ref: FamilyRef) -> list[ObjectInfo]:
    """The family's layer objects in numeric order (2 before 10). Gaps or duplicates are refused."""
    numbered: dict[int, ObjectInfo] = {}
    for o in _objects(client, ref.bucket, ref.key_prefix):
        n = layer_number(o.key, ref.key_prefix)
        if n is None:
            continue
        if n in numbered:
            raise S3Error(ref.bucket, ref.key_prefix, f"two objects claim layer {n}: "
                          f"{numbered[n].key} and {o.key}", "remove one of them")
        numbered[n] = o
    if not numbered:
        raise ObjectNotFound(ref.bucket, ref.key_prefix, f"no image family {ref.family!r} (no <n> layers)",
                             "`img images --remote` lists the families in the bucket")
    return [numbered[n] for n in sorted(numbered)]


@dataclass(frozen=True)
class RemoteFamily:
    name: str
    layers: int
    size: int


def list_families(client: S3Client, bucket: str, prefix: str) -> list[RemoteFamily]:
    fams: dict[str, list[int]] = {}
    for o in _objects(client, bucket, prefix):
        rest = o.key[len(prefix):]
        fam, sep, leaf = rest.partition("/")
        if sep and re.fullmatch(r"\d{1,9}(\.[A-Za-z0-9.]+)?", leaf):
            fams.setdefault(fam, []).append(o.size)
    return [RemoteFamily(f, len(s), sum(s)) for f, s in sorted(fams.items())]


def head(client: S3Client, bucket: str, key: str) -> ObjectInfo:
    try:
        r = client.head_object(Bucket=bucket, Key=key)
    except Exception as e:
        raise classify(e, bucket, key) from e
    return ObjectInfo(bucket, key, int(r["ContentLength"]), r.get("ETag", ""))


# -- the blob cache ---------------------------------------------------------------------------------------

def file_sha256(path: Path, length: int = -1) -> tuple[str, int]:
    """sha256 of the first ``length`` bytes (all if -1) and how many bytes that was."""
    h = hashlib.sha256()
    n = 0
    with path.open("rb") as f:
        while length < 0 or n < length:
            chunk = f.read(CHUNK if length < 0 else min(CHUNK, length - n))
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def cached_blob(config: Config, store: Store, sha256: str) -> Path | None:
    """The blob's path if the file is there and still hashes to its name; a bad file is removed."""
    path = config.blob_path(sha256)
    rec = store.blob(sha256)
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if rec is not None and st.st_size != rec.size:
        path.unlink(missing_ok=True)
        return None
    if file_sha256(path)[0] != sha256:
        path.unlink(missing_ok=True)
        return None
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process downloading this object: wait for it
        yield
    finally:
        os.close(fd)


def _md5_etag(etag: str) -> str | None:
    """The MD5 a plain single-part ETag stands for (multipart ETags "<md5>-N" are not content MD5s)."""
    e = etag.strip('"').lower()
    return e if re.fullmatch(r"[0-9a-f]{32}", e) else None


def download(client: S3Client, obj: ObjectInfo, config: Config, store: Store, *,
             expect_sha256: str | None = None, progress: Progress | None = None,
             retry: Retry = Retry()) -> str:
    """Makes sure the object's bytes are a verified blob in the cache; returns its sha256 hex."""
    if obj.size > config.max_blob_bytes:
        raise ObjectTooLarge(obj.bucket, obj.key, obj.size, config.max_blob_bytes)
    config.ensure_dirs()
    known = (store.blob_for_source(obj.bucket, obj.key, obj.etag, obj.size) or expect_sha256
             or store.blob_for_etag(obj.bucket, obj.etag, obj.size))
    if known and cached_blob(config, store, known):
        store.add_blob_source(obj.bucket, obj.key, obj.etag, obj.size, known)
        if progress:
            progress(obj.size, obj.size)
        return known
    part = config.partial_dir / f"{obj.source_id}.part"
    with _exclusive(config.partial_dir / f"{obj.source_id}.lock"):
        known = store.blob_for_source(obj.bucket, obj.key, obj.etag, obj.size) or expect_sha256
        if known and cached_blob(config, store, known):  # the process we waited for got it
            if progress:
                progress(obj.size, obj.size)
            return known
        sha = _fetch(client, obj, part, config, expect_sha256, progress, retry)
        store.add_blob_source(obj.bucket, obj.key, obj.etag, obj.size, sha)
        return sha


def _fetch(client: S3Client, obj: ObjectInfo, part: Path, config: Config, expect_sha256: str | None,
           progress: Progress | None, retry: Retry) -> str:
    sha, md5 = hashlib.sha256(), hashlib.md5()  # noqa: S324 (md5 only to compare with S3's ETag)
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
    try:
        have = os.fstat(fd).st_size
        if have > obj.size:
            os.ftruncate(fd, 0)
            have = 0
        # resume: re-hash the prefix we already have (cheaper than a refetch, and never trusted blindly:
        # the whole file is verified against the ETag/digest at the end)
        pos = 0
        while pos < have:
            chunk = os.pread(fd, min(CHUNK, have - pos), pos)
            if not chunk:
                break
            sha.update(chunk)
            md5.update(chunk)
            pos += len(chunk)
        have = pos
        os.lseek(fd, have, os.SEEK_SET)
        if progress:
            progress(have, obj.size)
        failures = 0
        kms = False  # SSE-KMS objects' ETags are not the content MD5
        while have < obj.size:
            before = have
            try:
                kw: dict[str, Any] = {"Bucket": obj.bucket, "Key": obj.key}
                if obj.etag:
                    kw["IfMatch"] = obj.etag
                if have:
                    kw["Range"] = f"bytes={have}-"
                resp = client.get_object(**kw)
                kms = kms or str(resp.get("ServerSideEncryption", "")).startswith("aws:kms")
                body = resp["Body"]
                for chunk in body.iter_chunks(READ_CHUNK):
                    if have + len(chunk) > obj.size:
                        raise ObjectChanged(obj.bucket, obj.key, "more bytes than the listed size",
                                            "run the command again")
                    os.write(fd, chunk)
                    sha.update(chunk)
                    md5.update(chunk)
                    have += len(chunk)
                    if progress:
                        progress(have, obj.size)
                if have < obj.size:
                    raise TransientError(obj.bucket, obj.key, f"truncated body at {have}/{obj.size} bytes")
            except Exception as e:
                err = classify(e, obj.bucket, obj.key)
                if not err.transient:
                    raise err from e
                os.fsync(fd)  # keep what we got for the next attempt (or the next run)
                failures = 0 if have > before else failures + 1
                if failures >= retry.attempts:
                    raise err from e
                time.sleep(retry.delay(failures or 1))
                continue
        os.fsync(fd)
        digest = sha.hexdigest()
        want_md5 = None if kms else _md5_etag(obj.etag)
        what = ("the expected digest" if expect_sha256 and digest != expect_sha256
                else "its ETag (MD5)" if want_md5 and md5.hexdigest() != want_md5 else None)
        if what:
            os.ftruncate(fd, 0)  # never reuse a prefix that produced a corrupt result
            raise CorruptDownload(obj.bucket, obj.key, f"content does not match {what}",
                                  "run the command again; if it persists the object is corrupt in S3")
    finally:
        os.close(fd)
    final = config.blob_path(digest)
    os.replace(part, final)
    os.chmod(final, 0o444)  # blobs are immutable
    _fsync_dir(config.blob_dir)
    _fsync_dir(config.partial_dir)
    return digest
