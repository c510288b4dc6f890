#!/bin/bash
# Extraction benchmark on the real Debian family of the test images (built on demand):
# ours vs bsdtar, GNU tar, Python tarfile, libarchive-c and the `cp -a` floor, on tmpfs and ext4-on-loop.
# Needs root. Usage: bench/extract.sh [--json] [-n N] [--target tmpfs|ext4|both] [SOURCE...]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/extract.sh: needs root (mounts, loop devices, ownership)" >&2; exit 1; }
.venv/bin/python -m tests.images.build >/dev/null   # no-op when the images are already built
exec .venv/bin/img bench extract "$@"
