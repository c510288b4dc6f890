#!/bin/bash
# Fast rebuild of img_helper._native after editing helper/csrc (the editable install picks it up).
set -euo pipefail
cd "$(dirname "$0")/.."
IMG_NATIVE_ABSOLUTE=1 .venv/bin/python - <<'PY'
import importlib.util, pathlib, shutil, sys
sys.path.insert(0, "helper")
spec = importlib.util.spec_from_file_location("native_build", "helper/native_build.py")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
out = pathlib.Path(mod.ffibuilder.compile(tmpdir="build/native", verbose=False))
# One name only: the editable install builds _native.abi3.so, and a stale twin would shadow it.
pkg = pathlib.Path("helper/img_helper")
for twin in pkg.glob("_native.cpython-*.so"):
    twin.unlink()
dest = pkg / "_native.abi3.so"
shutil.copy2(out, dest.with_suffix(".tmp"))
dest.with_suffix(".tmp").rename(dest)
print("built", dest)
PY
