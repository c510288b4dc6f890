#!/bin/bash
# Idempotent rerun benchmark: wall time of `img process X` when X is already active (target <= 40 ms).
# Sets up the real stack (thin pool, img-helper, polkit, local S3, one sample family), activates the family
# once as img-member, then times RUNS (default 30) reruns, next to the bare `python -c pass` floor of the
# same machine. Runs on the host if its kernel has device-mapper thin, else inside the user-mode-linux
# guest (whose process creation is several times slower than the host's: compare with the floor).
# `bench/rerun.sh --host-store` instead times the same fast path on this host against a store whose
# activation points at an existing file (no device-mapper needed; what the fast path reads is identical).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-30}

if [ "${1:-}" = "--host-store" ]; then
  home=$(mktemp -d /tmp/img-bench.XXXXXX)
  trap 'rm -rf "$home"' EXIT
  IMG_HOME=$home/img IMG_S3_BUCKET=bench .venv/bin/python - "$home" <<'PY'
import sys
from pathlib import Path
from img.store import Store
home = Path(sys.argv[1])
(home / "img").mkdir()
dev = home / "device"
dev.write_text("")
s = Store(home / "img" / "img.db")
ref, chain = "s3://bench/images/alpha/", "sha256:" + "0" * 64
s.upsert_image(ref, "family", "alpha")
s.update_image(ref, state="ready", chain_id=chain)
s.record_activation("alpha", ref, chain, str(dev), 1)
PY
  floor=0; total=0
  for i in $(seq "$RUNS"); do
    s=$(date +%s%N); .venv/bin/python -c pass; e=$(date +%s%N); floor=$((floor + e - s))
    s=$(date +%s%N); IMG_HOME=$home/img IMG_S3_BUCKET=bench IMG_HELPER_SOCKET=/nonexistent .venv/bin/img process alpha >/dev/null
    e=$(date +%s%N); total=$((total + e - s))
  done
  echo "python -c pass (interpreter floor)        mean $((floor / RUNS / 1000)) us (n=$RUNS)"
  echo "img process alpha (already active)        mean $((total / RUNS / 1000)) us (n=$RUNS)"
  exit 0
fi

scripts/bootstrap.sh >/dev/null
.venv/bin/python -m tests.images.build >/dev/null
if [ -e /dev/mapper/control ] && { modprobe -q dm-thin-pool 2>/dev/null || true; dmsetup targets 2>/dev/null | grep -q '^thin-pool'; }; then
  exec .venv/bin/python -m tests.kernel.test_e2e_stack bench "$RUNS"
fi
exec tests/vm/run .venv/bin/python -m tests.kernel.test_e2e_stack bench "$RUNS"
