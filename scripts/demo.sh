#!/bin/bash
# make demo — the main job end to end on a fresh Debian machine (as root):
#   1. installs everything (scripts/bootstrap.sh: apt packages, .venv, group img, user img-member);
#   2. builds the real sample images (Debian bookworm families, cached in /var/cache/img-test-images);
#   3. in a kernel with device-mapper thin (this host if it has it, else the user-mode-linux guest of
#      tests/vm/run): starts a local S3 (moto) seeded with the families and archives, a system bus +
#      polkitd with img's policy, a loop-backed thin pool and `img-helper serve` as root;
#   4. runs `img images --remote`, `img process <family>` (twice: the second is a no-op), `img list`
#      and `img status` as the unprivileged user img-member (group img), then mounts the activation.
# Everything it starts is stopped and removed at the end. IMG_DEMO_FAMILY picks the family.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "demo: run as root (it installs packages, creates a thin pool and starts the root helper)" >&2
  exit 1
fi
scripts/bootstrap.sh
echo "demo: sample images in $(.venv/bin/python -m tests.images.build --print-dir) (building them if needed)"
.venv/bin/python -m tests.images.build

host_has_dm_thin() {
  [ -e /dev/mapper/control ] || return 1
  modprobe -q dm-thin-pool 2>/dev/null || true
  dmsetup targets 2>/dev/null | grep -q '^thin-pool'
}

if host_has_dm_thin; then
  echo "demo: this kernel has device-mapper thin: running on the host"
  exec .venv/bin/python -m tests.kernel.test_e2e_stack demo
fi
echo "demo: no device-mapper thin on this kernel: running inside the user-mode-linux guest (tests/vm/run)"
exec tests/vm/run .venv/bin/python -m tests.kernel.test_e2e_stack demo
