"""Builds the real test images from Debian packages, cached outside the repository clone.

Layer 1 is an `mmdebstrap --variant=minbase bookworm` rootfs; later layers unpack real .deb files into the
tree, delete files (genuine OCI whiteouts), and add the awkward cases (hardlink, setuid, xattr, chown,
absolute symlink, directory replaced by a file, opaque directory). umoci makes the layers; skopeo exports
them.

Output directory (see `manifest.json` in it; tests read it through tests/fixtures/images.py):
    images/<family>/<n>.tar    uncompressed layer diff tars (bucket style; byte-identical to the OCI diff_ids)
    layers/<diff_id>.tar       the same files, one copy each (the family files are hardlinks to these)
    oci/                       OCI layout, tag per family (gzip layers)
    docker/, oci-archive/      docker-archive and OCI archives (gzip, all-zstd) made by skopeo, and an OCI
                               archive with one zstd layer among gzip ones (written here)
    reference/<family>/        `umoci raw unpack` of each family: what an extractor must reproduce
    specs/<family>.spec        tree spec of the rootfs each family was made from (tests/fixtures/trees.py)

Usage: python -m tests.images.build [--print-dir] [--force]
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.fixtures.synth import (
    LAYER_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPE,
    REF_NAME,
    Dir,
    File,
    Opaque,
    compress,
    make_layer,
)
from tests.fixtures.trees import tree_spec

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# Every timestamp we control (mmdebstrap, umoci history, files we create) is this one.
SOURCE_DATE_EPOCH = 1_700_000_000
CREATED = "2023-11-14T22:13:20Z"
MANIFEST_VERSION = 1
SYSTEM_CACHE = Path("/var/cache/img-test-images")
TOOLS = ("mmdebstrap", "umoci", "skopeo", "libarchive-tools")

# Packages unpacked into later layers (their dependencies are in minbase or listed alongside).
COMMON_PACKAGES = ["less", "file", "libmagic1", "libmagic-mgc", "netbase", "bzip2", "xz-utils",
                   "libncursesw6"]
ALPHA_PACKAGES = ["procps", "libproc2-0", "psmisc"]
BETA_PACKAGES = ["jq", "libjq1", "libonig5"]
GAMMA_PACKAGES = {6: ["nano"], 8: ["vim-common", "vim-tiny"]}
ALL_PACKAGES = sorted({*COMMON_PACKAGES, *ALPHA_PACKAGES, *BETA_PACKAGES,
                       *(p for ps in GAMMA_PACKAGES.values() for p in ps)})

GAMMA_LAYERS = 12  # >= 10 so that numeric and lexicographic layer order differ
SHARED_LAYERS = 3  # alpha, beta and gamma share layers 1..3 byte for byte
DOCKER_ARCHIVE_FAMILY = "alpha"
OCI_ARCHIVE_FAMILY = "gamma"
ZSTD_ARCHIVE_FAMILY = "beta"
MIXED_ARCHIVE_FAMILY = "alpha"


class BuildError(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


# ---------------------------------------------------------------- cache location and key


def builder_hash() -> str:
    """Content hash of the builder (its sources and the versions of the tools it drives)."""
    h = hashlib.sha256()
    fixtures = Path(__file__).parents[1] / "fixtures"
    for src in [*sorted(Path(__file__).parent.glob("*.py")), fixtures / "trees.py", fixtures / "synth.py"]:
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    q = subprocess.run(["dpkg-query", "-W", *TOOLS], capture_output=True, text=True)
    h.update(q.stdout.encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    env = os.environ.get("IMG_TEST_IMAGES_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return SYSTEM_CACHE
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "img-test-images"


def image_dir(digest: str | None = None) -> Path:
    """Where the images of this builder version live (built or not). A completed system-wide build is
    used by every user (the unprivileged test users read it)."""
    digest = digest or builder_hash()
    if not os.environ.get("IMG_TEST_IMAGES_CACHE") and (SYSTEM_CACHE / digest / "manifest.json").exists():
        return SYSTEM_CACHE / digest
    return cache_root() / digest


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_built(force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Returns the directory holding manifest.json, building it first if needed (atomically: a temp dir is
    renamed into place, so an interrupted build is never used). Concurrent callers wait on a lock."""
    digest = builder_hash()
    final = image_dir(digest)
    if not force and (final / "manifest.json").exists():
        return final
    root = final.parent
    with _locked(root):
        if not force and (final / "manifest.json").exists():
            return final
        if os.geteuid() != 0:
            raise BuildError("start", "building the images needs root (mmdebstrap, chown, umoci unpack)")
        if os.environ.get("IMG_IN_VM"):
            # the user-mode-linux guest has no network, and its file locks do not reach the host
            raise BuildError("start", f"{final} is not built: run `make fixtures` on the host first")
        _prune(root, keep=digest)
        tmp = root / f".tmp-{digest}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            Builder(tmp, final, log or _stderr_log).build()
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _prune(root: Path, keep: str) -> None:
    """Removes interrupted builds (after two hours) and builds of older builder versions unused for a day."""
    for d in root.iterdir():
        if not d.is_dir() or d.name == keep:
            continue
        if d.name.startswith(".tmp-"):
            # the lock keeps out builds on this host, not ones in a VM sharing the directory: age decides
            if time.time() - d.stat().st_mtime > 7200:
                shutil.rmtree(d, ignore_errors=True)
            continue
        marker = d / ".last-used" if (d / ".last-used").exists() else d / "manifest.json"
        try:
            age = time.time() - marker.stat().st_mtime
        except FileNotFoundError:
            age = float("inf")
        if age > 86400:
            shutil.rmtree(d, ignore_errors=True)


def _stderr_log(msg: str) -> None:
    print(f"images: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the build


@dataclass
class Family:
    name: str
    tag: str
    layers: list[str]  # diff_ids, bottom first


class Builder:
    def __init__(self, out: Path, final: Path, log: Callable[[str], None]) -> None:
        self.out = out
        self.final = final
        self.log = log
        self.work = out / "work"
        self.oci = out / "oci"
        self.bundle = self.work / "bundle"
        self.debs: dict[str, Path] = {}
        self.versions: dict[str, str] = {}
        self.base_versions: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    # -- helpers

    def run(self, *args: str | Path, step: str, env: dict[str, str] | None = None) -> str:
        with subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **(env or {})}) as p:
            try:
                out, err = p.communicate()
            except BaseException:
                p.terminate()  # interrupted: let the tool clean up (mmdebstrap unmounts its chroot)
                try:
                    p.communicate(timeout=120)
                except subprocess.TimeoutExpired:
                    p.kill()
                raise
        if p.returncode != 0:
            tail = (err or out)[-3000:]
            raise BuildError(step, f"{args[0]} exited {p.returncode}: {tail}")
        return out

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        self.timings[step] = round(time.monotonic() - t0, 2)
        self.log(f"{step}: {self.timings[step]:.1f}s")

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"

    def repack(self, tag: str, created_by: str) -> None:
        self.run("umoci", "repack", "--refresh-bundle", "--image", f"{self.oci}:{tag}",
                 "--history.created", CREATED, "--history.created_by", created_by, self.bundle, step=tag)

    def unpack(self, tag: str) -> None:
        shutil.rmtree(self.bundle, ignore_errors=True)
        self.run("umoci", "unpack", "--image", f"{self.oci}:{tag}", self.bundle, step=f"unpack {tag}")

    def install(self, packages: list[str]) -> None:
        """Unpacks real .debs into the rootfs and records them in dpkg's status file (no maintainer
        scripts run: that needs no chroot and gives the same kind of layer diff)."""
        status = self.rootfs / "var/lib/dpkg/status"
        stanzas = []
        for name in packages:
            deb = self.debs[name]
            self.run("dpkg-deb", "-x", deb, self.rootfs, step=f"install {name}")
            control = self.run("dpkg-deb", "-f", deb, step=f"install {name}").rstrip("\n").split("\n")
            control.insert(1, "Status: install ok installed")
            stanzas.append("\n".join(control) + "\n")
        with open(status, "a") as f:
            f.write("\n" + "\n".join(stanzas))

    def write(self, rel: str, data: bytes | str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Path:
        p = self.rootfs / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        os.chown(p, uid, gid)
        os.chmod(p, mode)
        os.utime(p, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
        return p

    def remove(self, rel: str) -> None:
        p = self.rootfs / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()

    # -- steps

    def build(self) -> None:
        t0 = time.monotonic()
        self.work.mkdir()
        with self.timed("mmdebstrap"):
            self.bootstrap()
        with self.timed("common layers"):
            self.common_layers()
        families = []
        with self.timed("alpha"):
            families.append(self.alpha())
        with self.timed("beta"):
            families.append(self.beta())
        with self.timed("gamma"):
            families.append(self.gamma())
        self.run("umoci", "gc", "--layout", self.oci, step="gc")
        shutil.rmtree(self.work)
        with self.timed("bucket layers"):
            layer_files = self.export_layers(families)
        with self.timed("archives"):
            archives = self.export_archives()
        with self.timed("references"):
            refs = self.export_references(families)
        manifest = {
            "version": MANIFEST_VERSION,
            "builder_hash": self.final.name,
            "dir": str(self.final),
            "suite": SUITE,
            "mirror": MIRROR,
            "source_date_epoch": SOURCE_DATE_EPOCH,
            "families": {f.name: [str(self.final / p) for p in layer_files[f.name]] for f in families},
            "layer_digests": {f.name: [f"sha256:{d}" for d in f.layers] for f in families},
            "shared_layers": {"families": [f.name for f in families], "count": SHARED_LAYERS},
            "oci_layout": {"path": str(self.final / "oci"), "tags": {f.name: f.tag for f in families}},
            **{k: {**v, "path": str(self.final / v["path"])} for k, v in archives.items()},
            "references": {k: str(self.final / v) for k, v in refs.items()},
            "source_specs": {f.name: str(self.final / "specs" / f"{f.name}.spec") for f in families},
            "packages": self.versions,  # unpacked into layers 2+
            "base_packages": self.base_versions,  # what mmdebstrap installed (the mirror is not pinned)
            "timings": self.timings,
            "sizes_mb": {d.name: _size_mb(d) for d in sorted(self.out.iterdir()) if d.is_dir()},
            "total_mb": _size_mb(self.out),  # images/ and layers/ are hardlinks of each other
            "build_seconds": round(time.monotonic() - t0, 1),
        }
        (self.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        self.log(f"built in {manifest['build_seconds']}s")

    def bootstrap(self) -> None:
        debs = self.work / "debs"
        debs.mkdir()
        os.chmod(debs, 0o777)  # apt downloads as _apt
        hook = (f'cd {debs} && APT_CONFIG="$MMDEBSTRAP_APT_CONFIG" apt-get download -q '
                + " ".join(ALL_PACKAGES))
        self.run("mmdebstrap", "--variant=minbase", "--quiet", "--mode=root", "--customize-hook", hook,
                 SUITE, self.work / "minbase.tar", MIRROR, step="mmdebstrap",
                 env={"SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)})
        for deb in debs.glob("*.deb"):
            name, version = self.run("dpkg-deb", "-f", deb, "Package", "Version", step="debs").split("\n")[:2]
            self.debs[name.split(": ", 1)[1]] = deb
            self.versions[name.split(": ", 1)[1]] = version.split(": ", 1)[1]
        missing = set(ALL_PACKAGES) - set(self.debs)
        if missing:
            raise BuildError("mmdebstrap", f"packages not downloaded: {sorted(missing)}")

    def common_layers(self) -> None:
        self.run("umoci", "init", "--layout", self.oci, step="init")
        self.run("umoci", "new", "--image", f"{self.oci}:empty", step="new")
        self.run("umoci", "config", "--image", f"{self.oci}:empty", "--created", CREATED,
                 "--author", "img tests", "--history.created", CREATED, "--config.cmd", "/bin/bash",
                 "--config.env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 "--os", "linux", "--architecture", "amd64", step="config")
        self.unpack("empty")
        self.run("tar", "-C", self.rootfs, "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf",
                 self.work / "minbase.tar", step="layer 1")
        (self.work / "minbase.tar").unlink()
        self.base_versions = dpkg_versions(self.rootfs / "var/lib/dpkg/status")
        self.repack("common1", f"mmdebstrap --variant=minbase {SUITE}")

        # layer 2: install real packages
        self.install(COMMON_PACKAGES)
        self.repack("common2", "install " + " ".join(COMMON_PACKAGES))

        # layer 3: deletions (whiteouts of base and of layer-2 files) and the awkward file kinds
        self.remove("etc/motd")
        self.remove("usr/share/doc/less")  # directory from layer 2
        self.remove("usr/share/man/man1/bzip2.1.gz")
        self.remove("usr/share/doc/netbase")
        self.write("usr/share/doc/netbase", "a file where a directory was\n")  # dir -> file
        app = "opt/app"
        rng = random.Random(SOURCE_DATE_EPOCH)
        blob = self.write(f"{app}/blob.bin", rng.randbytes(300_000), uid=1000, gid=1000)
        os.setxattr(blob, "user.img.test", b"yes")
        hello = self.write(f"{app}/hello.txt", "hello\n", mode=0o4755)
        os.link(hello, self.rootfs / app / "hello-hardlink.txt")
        os.symlink("../app/hello.txt", self.rootfs / app / "hello-relative")
        os.symlink("/usr/bin/less", self.rootfs / app / "less-absolute")
        os.symlink("/opt/app/missing", self.rootfs / app / "dangling-absolute")
        sticky = self.rootfs / app / "sticky"
        sticky.mkdir()
        os.chmod(sticky, 0o1777)
        shared = self.rootfs / app / "setgid-dir"
        shared.mkdir()
        os.chown(shared, 0, 50)
        os.chmod(shared, 0o2775)
        self.write(f"{app}/setgid-dir/owned-by-nobody", "x\n", mode=0o640, uid=65534, gid=65534)
        self.write("opt/order/counter", "3\n")
        self.repack("common3", "whiteouts, hardlink, setuid, xattr, chown, symlinks")

    def finish(self, name: str, tag: str) -> Family:
        (self.out / "specs").mkdir(exist_ok=True)
        (self.out / "specs" / f"{name}.spec").write_text("\n".join(tree_spec(self.rootfs)) + "\n")
        return Family(name, tag, self.diff_ids(tag))

    def alpha(self) -> Family:
        self.install(ALPHA_PACKAGES)
        self.remove("usr/share/locale/de")  # a whole base directory -> one whiteout
        self.remove("usr/bin/pmap")  # same-layer: installed then deleted, never in the tar
        self.write("etc/issue", "alpha\n")  # modified base file
        self.write("opt/order/counter", "alpha\n")
        self.repack("alpha4", "install " + " ".join(ALPHA_PACKAGES))
        # layer 5: an opaque directory. Written by hand: umoci 0.4.7's `insert` leaves its tar unterminated.
        log_dir = self.rootfs / "var/log"
        shutil.rmtree(log_dir)
        self.write("var/log/fresh/only.txt", "only this survives in /var/log\n")
        for d in (log_dir, log_dir / "fresh"):
            os.chmod(d, 0o755)
        self.append_layer("alpha4", "alpha", make_layer([
            Opaque("var/log"), Dir("var/log"), Dir("var/log/fresh"),
            File("var/log/fresh/only.txt", b"only this survives in /var/log\n"),
        ]), "opaque /var/log")
        return self.finish("alpha", "alpha")

    def beta(self) -> Family:
        self.unpack("common3")
        self.install(BETA_PACKAGES)
        self.remove("usr/share/zoneinfo/right")
        self.remove("usr/share/perl")  # big base directory
        self.write("opt/order/counter", "beta\n")
        self.repack("beta4", "install " + " ".join(BETA_PACKAGES))
        # layer 5: file -> directory, chown'd and setgid files, a hardlink across directories
        self.remove("etc/issue.net")
        self.write("etc/issue.net/README", "a directory where a file was\n")
        self.write("opt/app/tool", "#!/bin/sh\necho tool\n", mode=0o2755, uid=0, gid=50)
        os.link(self.rootfs / "opt/app/tool", self.rootfs / "usr/local/bin/tool")
        self.remove("opt/app/blob.bin")
        self.repack("beta", "file to directory, setgid, hardlink")
        return self.finish("beta", "beta")

    def gamma(self) -> Family:
        """Layers 4..12 are order-sensitive: each rewrites a counter, deletes the previous step's file and
        reshapes /opt/order/slot, so applying them in any other order (1, 10, 11, 12, 2, ...) differs.
        They are written docker-style by hand_layer (whiteout, then the new entry) rather than by
        `umoci repack`, which rehashes the whole rootfs per layer (too slow for nine layers)."""
        self.unpack("common3")
        base = "common3"
        for n in range(SHARED_LAYERS + 1, GAMMA_LAYERS + 1):
            adds, whiteouts = ["opt/order/counter", f"opt/order/step-{n}"], []
            self.write("opt/order/counter", f"{n}\n")
            self.write(f"opt/order/step-{n}", f"step {n}\n")
            if n > SHARED_LAYERS + 1:
                self.remove(f"opt/order/step-{n - 1}")
                whiteouts.append(f"opt/order/step-{n - 1}")
            slot = self.rootfs / "opt/order/slot"
            if slot.is_symlink() or slot.exists():
                self.remove("opt/order/slot")
                if n != 10:  # layer 10 replaces the directory by a file without a whiteout, as umoci does
                    whiteouts.append("opt/order/slot")
            kind = n % 3
            if kind == 0:
                self.write(f"opt/order/slot/from-{n}", f"{n}\n")  # directory
                adds += ["opt/order/slot", f"opt/order/slot/from-{n}"]
            elif kind == 1:
                self.write("opt/order/slot", f"file from layer {n}\n")  # file
                adds.append("opt/order/slot")
            else:
                os.symlink(f"/opt/order/step-{n}", slot)  # absolute symlink
                adds.append("opt/order/slot")
            for pkg in GAMMA_PACKAGES.get(n, []):
                self.install([pkg])
                adds += self.deb_paths(pkg)
            if GAMMA_PACKAGES.get(n):
                adds.append("var/lib/dpkg/status")
            if n == 10:
                self.remove("usr/bin/xz")  # a layer-2 file deleted by a two-digit layer
                whiteouts.append("usr/bin/xz")
            tag = "gamma" if n == GAMMA_LAYERS else f"gamma{n}"
            self.append_layer(base, tag, self.hand_layer(adds, whiteouts), f"order step {n}")
            base = tag
        return self.finish("gamma", "gamma")

    def deb_paths(self, name: str) -> list[str]:
        """The paths a package's data tar holds, parents first, without the leading './'."""
        listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(self.debs[name])], capture_output=True,
                                 check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(listing)) as tar:
            return [m.name.removeprefix("./").rstrip("/") for m in tar if m.name not in (".", "./")]

    def hand_layer(self, adds: list[str], whiteouts: list[str]) -> bytes:
        """A layer diff tar: whiteouts first, then `adds` as they now are in the bundle rootfs."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel in whiteouts:
                parent, _, name = rel.rpartition("/")
                ti = tarfile.TarInfo(f"{parent}/.wh.{name}" if parent else f".wh.{name}")
                ti.mtime = SOURCE_DATE_EPOCH
                tar.addfile(ti)
            for rel in adds:
                tar.add(self.rootfs / rel, arcname=rel, recursive=False)
        return buf.getvalue()

    # -- exports

    def manifest_of(self, tag: str) -> dict:
        index = json.loads((self.oci / "index.json").read_text())
        for m in index["manifests"]:
            if m.get("annotations", {}).get(REF_NAME) == tag:
                return json.loads(self.blob(m["digest"]).read_bytes())
        raise BuildError("export", f"tag {tag} not in {self.oci}")

    def blob(self, digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return self.oci / "blobs" / algo / hexd

    def put_blob(self, data: bytes, media_type: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (self.oci / "blobs/sha256" / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    def append_layer(self, base: str, tag: str, layer: bytes, created_by: str) -> None:
        """Adds a layer tar on top of image `base` as image `tag`, writing the OCI blobs ourselves."""
        manifest = self.manifest_of(base)
        config = json.loads(self.blob(manifest["config"]["digest"]).read_bytes())
        config["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(layer).hexdigest())
        config["history"].append({"created": CREATED, "created_by": created_by})
        manifest["layers"].append(self.put_blob(gzip.compress(layer, mtime=0), LAYER_MEDIA_TYPES["gzip"]))
        manifest["config"] = self.put_blob(json.dumps(config).encode(), manifest["config"]["mediaType"])
        desc = self.put_blob(json.dumps(manifest).encode(), manifest.get("mediaType", MANIFEST_MEDIA_TYPE))
        desc["annotations"] = {REF_NAME: tag}
        index_path = self.oci / "index.json"
        index = json.loads(index_path.read_text())
        index["manifests"] = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag]
        index["manifests"].append(desc)
        index_path.write_text(json.dumps(index))

    def diff_ids(self, tag: str) -> list[str]:
        config = json.loads(self.blob(self.manifest_of(tag)["config"]["digest"]).read_bytes())
        return [d.split(":", 1)[1] for d in config["rootfs"]["diff_ids"]]

    def export_layers(self, families: list[Family]) -> dict[str, list[str]]:
        """Decompresses each distinct layer once into layers/<diff_id>.tar (checking the diff_id) and
        hardlinks it as images/<family>/<n>.tar."""
        (self.out / "layers").mkdir()
        done: set[str] = set()
        files: dict[str, list[str]] = {}
        for fam in families:
            layers = self.manifest_of(fam.tag)["layers"]
            fam_dir = self.out / "images" / fam.name
            fam_dir.mkdir(parents=True)
            files[fam.name] = []
            for n, (desc, diff_id) in enumerate(zip(layers, fam.layers, strict=True), start=1):
                target = self.out / "layers" / f"{diff_id}.tar"
                if diff_id not in done:
                    h = hashlib.sha256()
                    with gzip.open(self.blob(desc["digest"]), "rb") as src, open(target, "wb") as dst:
                        while chunk := src.read(1 << 20):
                            h.update(chunk)
                            dst.write(chunk)
                    if h.hexdigest() != diff_id:
                        raise BuildError("export", f"layer {desc['digest']} does not decompress to {diff_id}")
                    os.chmod(target, 0o444)
                    done.add(diff_id)
                os.link(target, fam_dir / f"{n}.tar")
                files[fam.name].append(f"images/{fam.name}/{n}.tar")
        return files

    def export_archives(self) -> dict[str, dict[str, str]]:
        (self.out / "docker").mkdir()
        (self.out / "oci-archive").mkdir()
        docker = f"docker/{DOCKER_ARCHIVE_FAMILY}.docker.tar"
        ref = f"docker.io/img-test/{DOCKER_ARCHIVE_FAMILY}:latest"  # as skopeo normalises it in RepoTags
        self.run("skopeo", "copy", "--quiet", "--insecure-policy", f"oci:{self.oci}:{DOCKER_ARCHIVE_FAMILY}",
                 f"docker-archive:{self.out / docker}:{ref}", step="docker-archive")
        oci_gz = f"oci-archive/{OCI_ARCHIVE_FAMILY}.oci.tar"
        self.run("skopeo", "copy", "--quiet", "--insecure-policy", f"oci:{self.oci}:{OCI_ARCHIVE_FAMILY}",
                 f"oci-archive:{self.out / oci_gz}:{OCI_ARCHIVE_FAMILY}", step="oci-archive")
        oci_zst = f"oci-archive/{ZSTD_ARCHIVE_FAMILY}.zstd.oci.tar"
        self.run("skopeo", "copy", "--quiet", "--insecure-policy", "--dest-compress",
                 "--dest-compress-format", "zstd", f"oci:{self.oci}:{ZSTD_ARCHIVE_FAMILY}",
                 f"oci-archive:{self.out / oci_zst}:{ZSTD_ARCHIVE_FAMILY}", step="oci-archive zstd")
        return {
            "docker_archive": {"path": docker, "family": DOCKER_ARCHIVE_FAMILY, "ref": ref,
                               "compression": "none"},
            "oci_archive": {"path": oci_gz, "family": OCI_ARCHIVE_FAMILY, "ref": OCI_ARCHIVE_FAMILY,
                            "compression": "gzip"},
            "oci_archive_zstd": {"path": oci_zst, "family": ZSTD_ARCHIVE_FAMILY, "ref": ZSTD_ARCHIVE_FAMILY,
                                 "compression": "zstd"},
            "oci_archive_mixed": self.mixed_archive(MIXED_ARCHIVE_FAMILY, zstd_layer=1),
        }

    def mixed_archive(self, family: str, zstd_layer: int) -> dict[str, str]:
        """An OCI archive whose layer `zstd_layer` (0-based) is zstd, the others gzip ("mixed"), written by
        hand (skopeo compresses all layers alike): per-layer media types must be honoured."""
        manifest = self.manifest_of(family)
        config = self.manifest_of(family)["config"]
        diff_id = self.diff_ids(family)[zstd_layer]
        zst = compress((self.out / "layers" / f"{diff_id}.tar").read_bytes(), "zstd")
        manifest["layers"][zstd_layer] = {"mediaType": LAYER_MEDIA_TYPES["zstd"], "size": len(zst),
                                          "digest": "sha256:" + hashlib.sha256(zst).hexdigest()}
        manifest_bytes = json.dumps(manifest).encode()
        manifest_hex = hashlib.sha256(manifest_bytes).hexdigest()
        desc = {"mediaType": MANIFEST_MEDIA_TYPE, "size": len(manifest_bytes),
                "digest": f"sha256:{manifest_hex}", "annotations": {REF_NAME: family}}
        small = {
            "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
            "index.json": json.dumps({"schemaVersion": 2, "manifests": [desc]}).encode(),
            f"blobs/sha256/{manifest_hex}": manifest_bytes,
            f"blobs/sha256/{manifest['layers'][zstd_layer]['digest'].split(':')[1]}": zst,
        }
        rel = f"oci-archive/{family}.mixed.oci.tar"
        with tarfile.open(self.out / rel, "w", format=tarfile.PAX_FORMAT) as tar:
            for d in ("blobs", "blobs/sha256"):
                ti = tarfile.TarInfo(d)
                ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, SOURCE_DATE_EPOCH
                tar.addfile(ti)
            for name, data in small.items():
                ti = tarfile.TarInfo(name)
                ti.size, ti.mode, ti.mtime = len(data), 0o644, SOURCE_DATE_EPOCH
                tar.addfile(ti, io.BytesIO(data))
            for d in [config, *manifest["layers"]]:
                if d["mediaType"] != LAYER_MEDIA_TYPES["zstd"]:
                    tar.add(self.blob(d["digest"]), arcname=f"blobs/sha256/{d['digest'].split(':')[1]}")
        return {"path": rel, "family": family, "ref": family, "compression": "mixed"}

    def export_references(self, families: list[Family]) -> dict[str, str]:
        refs = {}
        for fam in families:
            rel = f"reference/{fam.name}"
            (self.out / "reference").mkdir(exist_ok=True)
            self.run("umoci", "raw", "unpack", "--image", f"{self.oci}:{fam.tag}", self.out / rel,
                     step=f"reference {fam.name}")
            refs[fam.name] = rel
        return refs


def dpkg_versions(status: Path) -> dict[str, str]:
    versions = {}
    for stanza in status.read_text().split("\n\n"):
        lines = [ln for ln in stanza.splitlines() if ": " in ln and not ln.startswith(" ")]
        fields = dict(ln.split(": ", 1) for ln in lines)
        if "Package" in fields and "Version" in fields:
            versions[fields["Package"]] = fields["Version"]
    return versions


def _size_mb(path: Path) -> float:
    """Disk usage, counting each hardlinked file once."""
    seen: set[int] = set()
    total = 0
    for p in [path, *path.rglob("*")]:
        st = p.lstat()
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_blocks * 512
    return round(total / 1e6, 1)


def summary(manifest: dict) -> str:
    fams = " ".join(f"{k}:{len(v)}" for k, v in manifest["families"].items())
    return (f"images {manifest['dir']} families[{fams}] "
            f"docker-archive={manifest['docker_archive']['family']} "
            f"oci-archive={manifest['oci_archive']['family']} zstd={manifest['oci_archive_zstd']['family']} "
            f"mixed={manifest['oci_archive_mixed']['family']} "
            f"references={','.join(manifest['references'])} "
            f"size={manifest['total_mb']:.0f}MB built_in={manifest['build_seconds']}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.images.build", description=__doc__.split("\n")[0])
    ap.add_argument("--print-dir", action="store_true", help="print the image directory (not building it)")
    ap.add_argument("--force", action="store_true", help="rebuild even if a build is cached")
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: subprocess.run kills the running tool and the temp dir is removed
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.print_dir:
        print(image_dir())
        return 0
    try:
        out = ensure_built(force=args.force)
    except BuildError as e:
        print(f"images: build failed at {e.step}: {e.reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("images: interrupted (nothing kept)", file=sys.stderr)
        return 130
    print(summary(json.loads((out / "manifest.json").read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
