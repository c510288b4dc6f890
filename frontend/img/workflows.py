"""The workflows behind `img process`: durable FSM runs (img.fsm) that download, unpack and activate an image.

Runs and their deterministic ids (so a rerun after a crash continues the same runs, and two processes
asking for the same thing meet on one run — the second gets AlreadyRunning and waits for it):

  image  id ``<canonical ref>#<activation name>``
         resolve (list S3) → download (one ``blob`` child per object) → layers (layer ranges, digests,
         chain ids) → unpack (one ``layer`` child per layer, bottom-up) → activate; a finalizer records
         success or failure in the store.
  blob   id = the S3 object's identity (bucket, key, ETag, size): the cache is checked first, then a
         verified, resumable download (img.s3.download).
  layer  id = the layer's chain id: the helper's device list is checked first, then ``ensure_layer``
         with the blob fd; identical stacks in different images share the run and the device.

Every step checks real state before acting (blob digests on disk, the helper's device list), because
FSM delivery is at least once. Failures that retrying cannot fix raise ``fsm.Unrecoverable`` with a
message ``"<code>: <text>"``; ``error_code`` maps such a message back to the code (the CLI's exit status).
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from img import fsm
from img.config import Config
from img.fsm.errors import UnrecoverableKind
from img.progress import Reporter
from img.refs import ArchiveRef, FamilyRef, ImageRef
from img.store import ImageLayer, Store

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from img_helper.client import HelperClient

# Failure codes carried in run errors (they cross processes as text) and the CLI's exit status for each.
EXIT_CODES: dict[str, int] = {
    "bad-ref": 2,
    "s3-not-found": 3,
    "s3-denied": 3,
    "helper-unavailable": 4,
    "not-authorized": 4,
    "rejected": 5,
    "too-large": 5,
}
DOWNLOAD_QUEUE = "img-downloads"
DOWNLOADS_AT_ONCE = 3


class WorkflowError(Exception):
    """`img process` failed; ``code`` is one of EXIT_CODES' keys or "failed"."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.code, 1)


def fail(code: str, message: str, kind: UnrecoverableKind = "user") -> fsm.Unrecoverable:
    return fsm.Unrecoverable(f"{code}: {message}", kind=kind)


def error_code(message: str) -> str:
    code, sep, _ = message.partition(": ")
    return code if sep and code in EXIT_CODES else "failed"


def strip_code(message: str) -> str:
    code, sep, rest = message.partition(": ")
    return rest if sep and code in EXIT_CODES else message


# -- messages (persisted as JSON by the FSM) ---------------------------------------------------------------

@dataclass
class ObjectRec:
    bucket: str
    key: str
    size: int
    etag: str


@dataclass
class LayerRec:
    position: int
    blob_sha256: str  # the cached object holding it
    offset: int
    length: int
    digest: str  # sha256:<hex> of bytes [offset, offset+length)
    chain_id: str
    parent_chain_id: str | None = None
    source_key: str | None = None


@dataclass
class ImageReq:
    ref: str  # canonical
    kind: str  # family | archive
    bucket: str
    prefix: str = ""  # family
    family: str = ""  # family
    key: str = ""  # archive
    name: str = ""  # activation name


@dataclass
class ImageResp:
    objects: list[ObjectRec] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    format: str = ""
    layers: list[LayerRec] = field(default_factory=list)
    device: str = ""
    thin_id: int | None = None
    chain_id: str = ""


@dataclass
class BlobReq:
    bucket: str
    key: str
    size: int
    etag: str


@dataclass
class BlobResp:
    sha256: str = ""
    downloaded: bool = False


@dataclass
class LayerReq:
    chain_id: str
    parent_chain_id: str | None
    blob_sha256: str
    offset: int
    length: int
    digest: str


@dataclass
class LayerResp:
    chain_id: str = ""
    device: str = ""
    thin_id: int | None = None
    created: bool = False


# -- the environment steps run in (one per process) ---------------------------------------------------------

class Env:
    def __init__(self, config: Config, store: Store, reporter: Reporter | None = None,
                 s3_factory: Callable[[], S3Client] | None = None,
                 helper_factory: Callable[[], HelperClient] | None = None) -> None:
        self.config = config
        self.store = store
        self.reporter = reporter or Reporter()
        self._s3_factory = s3_factory
        self._helper_factory = helper_factory
        self._s3: S3Client | None = None
        self._lock = threading.Lock()

    def s3(self) -> S3Client:
        with self._lock:  # boto3 clients are thread-safe once made; making one is not
            if self._s3 is None:
                if self._s3_factory is not None:
                    self._s3 = self._s3_factory()
                else:
                    from img.s3 import make_client

                    self._s3 = make_client(self.config)
            return self._s3

    def helper(self) -> HelperClient:
        if self._helper_factory is not None:
            return self._helper_factory()
        from img_helper.client import HelperClient

        return HelperClient(self.config.helper_socket)


_ENV: Env | None = None


def env() -> Env:
    if _ENV is None:
        raise RuntimeError("img.workflows: no Runner in this process")
    return _ENV


# -- helpers -----------------------------------------------------------------------------------------------

def crash_point(name: str) -> None:
    """Test hook: ``IMG_CRASH_AT=<name>`` kills this process with SIGKILL right here (kill -9 tests at every
    FSM step, before its work and after its work but before the FSM has recorded it)."""
    if os.environ.get("IMG_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _s3_failure(e: Exception) -> Exception:
    """S3 errors: what retrying cannot fix becomes Unrecoverable; the rest is retried by the FSM."""
    from img import s3

    if isinstance(e, s3.ObjectNotFound):
        return fail("s3-not-found", str(e))
    if isinstance(e, s3.AccessDenied):
        return fail("s3-denied", str(e))
    if isinstance(e, s3.ObjectTooLarge):
        return fail("too-large", str(e))
    # TransientError: retried (bounded) by the FSM; ObjectChanged / CorruptDownload: a fresh attempt
    # starts over from an empty partial file
    return e


def _helper_call(verb: str, args: dict[str, Any], fds: list[int] | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    import img_helper.client as hc

    try:
        return env().helper().call(verb, args, fds or [], on_progress=on_progress)
    except hc.HelperUnavailable as e:
        raise fail("helper-unavailable", e.message, "system") from e
    except hc.NotAuthorized as e:
        raise fail("not-authorized", f"{e.message} (polkit action io.github.img.{verb.replace('_', '-')}; "
                   "the user must be in group img)", "system") from e
    except hc.BadRequest as e:
        raise fail("rejected", f"the helper refused {verb}: {e.message}") from e
    except hc.ServiceError as e:
        # The helper reports a refused blob as code "extract" with the extractor's own code in details;
        # "invalid" is a request it will never accept. Neither gets better by retrying.
        if e.code == "extract":
            why = (e.details or {}).get("extract_code", "extract")
            raise fail("rejected", f"image layer rejected ({why}): {e.message}") from e
        if e.code == "invalid":
            raise fail("rejected", f"the helper refused {verb}: {e.message}") from e
        raise  # device-mapper trouble etc.: retried (bounded)


def _wait(req: fsm.Request[Any, Any], version: str) -> Any:
    """Wait for a child run (maybe executed by another process), picking up runs whose owner died."""
    mgr = _manager()
    while True:
        req.check_cancelled()
        try:
            return mgr.wait(version, timeout=1.0)
        except fsm.WaitTimeout:
            mgr.resume()


def _start_child(req: fsm.Request[Any, Any], machine: fsm.FSM[Any, Any], run_id: str, msg: Any,
                 queue: str | None = None) -> str:
    # an active run with this id is joined (the same blob/layer for another image), and taken over if
    # its owner died
    return _manager().start_or_attach(machine, run_id, msg, parent=req.run.version, queue=queue)


def _child_result(req: fsm.Request[Any, Any], version: str) -> Any:
    try:
        return _wait(req, version)
    except fsm.RunFailed as e:
        # keep the child's code (e.g. s3-not-found) for the exit status; retrying the parent won't help
        raise fsm.Unrecoverable(e.error, kind="user" if e.kind == "user" else "system") from e


_MANAGER: fsm.Manager | None = None


def _manager() -> fsm.Manager:
    if _MANAGER is None:
        raise RuntimeError("img.workflows: no Runner in this process")
    return _MANAGER


def range_sha256(path: str, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            chunk = f.read(min(1 << 20, left))
            if not chunk:
                raise fail("rejected", f"layer range {offset}+{length} is past the end of {path}")
            h.update(chunk)
            left -= len(chunk)
    return "sha256:" + h.hexdigest()


# -- blob: one S3 object into the cache ----------------------------------------------------------------

def blob_fetch(req: fsm.Request[BlobReq, BlobResp]) -> BlobResp:
    from img import s3

    m, e = req.msg, env()
    obj = s3.ObjectInfo(m.bucket, m.key, m.size, m.etag)
    label = f"download {m.key.rsplit('/', 2)[-2] + '/' if '/' in m.key else ''}{m.key.rsplit('/', 1)[-1]}"
    key = f"blob:{obj.source_id}"
    try:
        before = e.store.blob_for_source(m.bucket, m.key, m.etag, m.size)
        sha = s3.download(e.s3(), obj, e.config, e.store,
                          progress=lambda done, total: e.reporter.task(key, label, done, total))
    except s3.S3Error as err:
        e.reporter.finish(key)
        mapped = _s3_failure(err)
        if mapped is err:
            raise
        raise mapped from err
    except OSError as err:
        e.reporter.finish(key)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise fail("failed", f"no space left for the blob cache in {e.config.home} ({m.size} bytes "
                       "needed): free some space or run `img gc`", "system") from err
        raise
    e.reporter.finish(key, f"{label}: {'cached' if before == sha else 'done'} sha256:{sha[:12]}")
    crash_point("blob:after")
    return BlobResp(sha256=sha, downloaded=before != sha)


_blob: fsm.Builder[BlobReq, BlobResp, fsm.FSM[BlobReq, BlobResp]] = fsm.register(
    "img-blob", BlobReq, BlobResp, max_attempts=4, backoff=fsm.Backoff(initial=0.5, maximum=10.0, factor=2.0))
BLOB = (_blob.start("fetch", blob_fetch).end("done").build())


# -- layer: one layer device via the helper --------------------------------------------------------------

def _listed_layer(chain_id: str) -> dict[str, Any] | None:
    listed = _helper_call("list", {})
    return next((la for la in listed.get("layers", []) if la.get("chain_id") == chain_id), None)


def layer_ensure(req: fsm.Request[LayerReq, LayerResp]) -> LayerResp:
    m, e = req.msg, env()
    have = _listed_layer(m.chain_id)
    if have is not None:  # real state first: the helper already has this stack
        e.store.record_layer_device(m.chain_id, m.parent_chain_id, m.digest, have["device"],
                                    have.get("thin_id"), have.get("size"))
        return LayerResp(m.chain_id, have["device"], have.get("thin_id"), False)
    path = e.config.blob_path(m.blob_sha256)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise fail("failed", f"blob {m.blob_sha256} vanished from the cache ({path}); run the command "
                   "again to download it", "system") from None
    key = f"layer:{m.chain_id}"
    label = f"unpack {m.digest[7:19]}"
    try:
        def on_progress(p: dict[str, Any]) -> None:
            if p.get("step") == "apply":  # the extractor's stats: compressed bytes consumed so far
                e.reporter.task(key, label, int(p.get("blob_bytes") or 0), m.length)

        e.reporter.task(key, label, 0, m.length)
        res = _helper_call("ensure_layer", {"chain_id": m.chain_id, "parent_chain_id": m.parent_chain_id,
                                            "blob_fd": 0, "offset": m.offset, "length": m.length,
                                            "blob_sha256": m.digest}, [fd], on_progress)
    finally:
        os.close(fd)
        e.reporter.finish(key)
    e.store.record_layer_device(m.chain_id, m.parent_chain_id, m.digest, res["device"], res.get("thin_id"),
                                res.get("size"))
    crash_point("layer:after")
    e.reporter.note(f"{label}: {'created' if res.get('created') else 'present'} {res['device']}")
    return LayerResp(m.chain_id, res["device"], res.get("thin_id"), bool(res.get("created")))


_layer: fsm.Builder[LayerReq, LayerResp, fsm.FSM[LayerReq, LayerResp]] = fsm.register(
    "img-layer", LayerReq, LayerResp, max_attempts=3,
    backoff=fsm.Backoff(initial=0.5, maximum=5.0, factor=2.0))
LAYER = (_layer.start("ensure", layer_ensure).end("done").build())


# -- image: the parent run -------------------------------------------------------------------------------

def image_resolve(req: fsm.Request[ImageReq, ImageResp]) -> ImageResp:
    crash_point("resolve:before")
    from img import s3
    from img.refs import FamilyRef

    m, e = req.msg, env()
    try:
        if m.kind == "family":
            objs = s3.list_family(e.s3(), FamilyRef(m.bucket, m.prefix, m.family))
        else:
            objs = [s3.head(e.s3(), m.bucket, m.key)]
    except s3.S3Error as err:
        mapped = _s3_failure(err)
        if mapped is err:
            raise
        raise mapped from err
    # recorded once it exists: a typo'd family leaves no image row behind
    e.store.upsert_image(m.ref, m.kind, m.family or m.key.rsplit("/", 1)[-1])
    e.store.update_image(m.ref, state="downloading", error=None)
    e.reporter.note(f"{m.ref}: {len(objs)} object(s), {sum(o.size for o in objs)} bytes")
    return ImageResp(objects=[ObjectRec(o.bucket, o.key, o.size, o.etag) for o in objs])


def image_download(req: fsm.Request[ImageReq, ImageResp]) -> ImageResp:
    crash_point("download:before")
    from img.s3 import ObjectInfo

    assert req.w is not None
    versions = [_start_child(req, BLOB, ObjectInfo(o.bucket, o.key, o.size, o.etag).source_id,
                             BlobReq(o.bucket, o.key, o.size, o.etag), queue=DOWNLOAD_QUEUE)
                for o in req.w.objects]
    blobs = [_child_result(req, v).sha256 for v in versions]
    crash_point("download:after")
    env().store.update_image(req.msg.ref, size=sum(o.size for o in req.w.objects))
    return replace(req.w, blobs=blobs)


def chain_ids(digests: list[str]) -> list[str]:
    """The contract's chain ids (img_helper.formats.chain_ids, tested equal): chain[0] = digest[0];
    chain[n] = "sha256:" + sha256(chain[n-1] + " " + digest[n]). Here to keep archive parsing optional."""
    out: list[str] = []
    for d in digests:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def image_layers(req: fsm.Request[ImageReq, ImageResp]) -> ImageResp:
    crash_point("layers:before")
    assert req.w is not None
    m, e = req.msg, env()
    ranges: list[tuple[str, int, int, str, str | None]] = []  # blob, offset, length, digest, source key
    if m.kind == "family":
        fmt = "layers"
        for o, sha in zip(req.w.objects, req.w.blobs, strict=True):
            ranges.append((sha, 0, o.size, "sha256:" + sha, o.key))
    else:
        fmt, ranges = _archive_layers(req.w.blobs[0], req.w.objects[0].key)
    if not ranges:
        raise fail("rejected", f"{m.ref}: the image has no layers")
    chains = chain_ids([r[3] for r in ranges])
    layers = [LayerRec(i, b, off, ln, dg, chains[i], chains[i - 1] if i else None, src)
              for i, (b, off, ln, dg, src) in enumerate(ranges)]
    e.store.set_image_layers(m.ref, [ImageLayer(m.ref, la.position, la.blob_sha256, la.offset, la.length,
                                                la.digest, la.chain_id, la.source_key) for la in layers])
    e.store.update_image(m.ref, format=fmt, chain_id=chains[-1], state="unpacking")
    crash_point("layers:after")
    return replace(req.w, format=fmt, layers=layers, chain_id=chains[-1])


def _archive_layers(sha: str, key: str) -> tuple[str, list[tuple[str, int, int, str, str | None]]]:
    """Parse a docker-archive / OCI archive blob (unprivileged, here, before the helper sees it)."""
    from img_helper.formats import FormatError, open_image

    path = env().config.blob_path(sha)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            image = open_image([fd])
        except FormatError as err:
            raise fail("rejected", f"{key}: not an image archive we accept ({err})") from err
        try:
            out: list[tuple[str, int, int, str, str | None]] = []
            size = os.fstat(fd).st_size
            for la in image.layers:
                if la.source.fd != fd:
                    raise fail("rejected", f"{key}: layers outside the archive are not supported")
                length = la.source.length if la.source.length >= 0 else size - la.source.offset
                digest = la.digest or range_sha256(str(path), la.source.offset, length)
                out.append((sha, la.source.offset, length, digest, key))
            return image.format, out
        finally:
            image.close()
    finally:
        os.close(fd)


def image_unpack(req: fsm.Request[ImageReq, ImageResp]) -> ImageResp:
    crash_point("unpack:before")
    assert req.w is not None
    for la in req.w.layers:  # bottom-up: each layer is a snapshot of the one below
        v = _start_child(req, LAYER, la.chain_id,
                         LayerReq(la.chain_id, la.parent_chain_id, la.blob_sha256, la.offset, la.length,
                                  la.digest))
        _child_result(req, v)
    crash_point("unpack:after")
    return req.w


def image_activate(req: fsm.Request[ImageReq, ImageResp]) -> ImageResp:
    crash_point("activate:before")
    assert req.w is not None
    m, e = req.msg, env()
    top = req.w.chain_id
    listed = _helper_call("list", {})
    current = next((a for a in listed.get("activations", []) if a.get("name") == m.name), None)
    if current is not None and current.get("chain_id") != top:
        # the name points at another image (e.g. an older version of the family): move it
        e.reporter.note(f"activation {m.name}: replacing {current.get('chain_id', '')[:19]}")
        _helper_call("deactivate", {"name": m.name})
        current = None
    if current is None:
        res = _helper_call("activate", {"chain_id": top, "name": m.name})
        device, thin_id = res["device"], res.get("thin_id")
    else:
        device, thin_id = current["device"], current.get("thin_id")
    e.store.record_activation(m.name, m.ref, top, device, thin_id)
    crash_point("activate:after")
    return replace(req.w, device=device, thin_id=thin_id)


def image_finish(req: fsm.Request[ImageReq, ImageResp], err: fsm.RunError | None) -> None:
    e = env()
    if e.store.image(req.msg.ref) is None:
        return
    if err is None:
        e.store.update_image(req.msg.ref, state="ready", error=None)
    else:
        e.store.update_image(req.msg.ref, state="failed", error=strip_code(err.error)[:2000])


_image: fsm.Builder[ImageReq, ImageResp, fsm.FSM[ImageReq, ImageResp]] = fsm.register(
    "img-image", ImageReq, ImageResp, max_attempts=3,
    backoff=fsm.Backoff(initial=0.5, maximum=5.0, factor=2.0))
IMAGE = (_image.start("resolve", image_resolve)
         .to("download", image_download)
         .to("layers", image_layers)
         .to("unpack", image_unpack)
         .to("activate", image_activate)
         .end("done", finalizers=[image_finish]).build())



# -- the runner ------------------------------------------------------------------------------------------

def image_req(ref: ImageRef, name: str) -> ImageReq:
    if isinstance(ref, FamilyRef):
        return ImageReq(ref.canonical, "family", ref.bucket, prefix=ref.prefix, family=ref.family, name=name)
    assert isinstance(ref, ArchiveRef)
    return ImageReq(ref.canonical, "archive", ref.bucket, key=ref.key, name=name)


def image_run_id(ref: ImageRef, name: str) -> str:
    return f"{ref.canonical}#{name}"


class Runner:
    """One per process: owns the FSM manager and the environment the steps use."""

    def __init__(self, config: Config, reporter: Reporter | None = None, *,
                 s3_factory: Callable[[], S3Client] | None = None,
                 helper_factory: Callable[[], HelperClient] | None = None, lease_ttl: float = 15.0) -> None:
        global _ENV, _MANAGER
        config.ensure_dirs()
        self.config = config
        self.store = Store(config.db_path)
        self.env = Env(config, self.store, reporter, s3_factory, helper_factory)
        self.manager = fsm.Manager(str(config.db_path), queues={DOWNLOAD_QUEUE: DOWNLOADS_AT_ONCE},
                                   lease_ttl=lease_ttl)
        self.manager.add(IMAGE)
        self.manager.add(BLOB)
        self.manager.add(LAYER)
        _ENV, _MANAGER = self.env, self.manager

    def close(self) -> None:
        global _ENV, _MANAGER
        self.manager.shutdown()
        if _MANAGER is self.manager:
            _ENV, _MANAGER = None, None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait(self, version: str, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self.manager.wait(version, timeout=1.0)
            except fsm.WaitTimeout:
                if deadline is not None and time.monotonic() > deadline:
                    raise
                self.manager.resume()  # the run's owner may have died: take it over

    def start_image(self, ref: ImageRef, name: str) -> tuple[str, bool]:
        """(version, started_here): a run already active for this image+name is joined, not duplicated
        (and continued here if the process that ran it died)."""
        try:
            return self.manager.start(IMAGE, image_run_id(ref, name), image_req(ref, name)), True
        except fsm.AlreadyRunning:
            return self.manager.start_or_attach(IMAGE, image_run_id(ref, name), image_req(ref, name)), False

    def process(self, ref: ImageRef, name: str) -> ImageResp:
        version, started = self.start_image(ref, name)
        if not started:
            self.env.reporter.note(f"{ref.canonical}: joining the run already in progress ({version})")
        try:
            resp = self.wait(version)
        except fsm.RunFailed as e:
            raise WorkflowError(error_code(e.error), strip_code(e.error)) from e
        assert isinstance(resp, ImageResp)
        return resp

    def resume_all(self) -> list[str]:
        """Take over every orphaned run and wait for them; returns the versions that were resumed."""
        versions = self.manager.resume()
        for v in versions:
            try:
                self.wait(v)
            except fsm.RunFailed:
                pass  # recorded in the run's history and the image row
        return versions
