#!/bin/bash
# Runs the extractor's host tests against an AddressSanitizer + UBSan build of the C layer.
# The instrumented module shadows img_helper._native through PYTHONPATH; nothing in the tree changes.
#   tests/fuzz/asan-extract.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=build/asan
rm -rf "$out" && mkdir -p "$out/img_helper"
cp helper/img_helper/*.py "$out/img_helper/"
.venv/bin/python - "$out" <<'PY'
import pathlib, shlex, shutil, subprocess, sys
from cffi import FFI
out, csrc = pathlib.Path(sys.argv[1]), pathlib.Path("helper/csrc").resolve()
pairs = ["version", "extract"]
ffi = FFI()
ffi.cdef("\n".join((csrc / f"{p}.cdef").read_text() for p in pairs))
libs = shlex.split(subprocess.run(["pkg-config", "--libs", "libarchive", "libcrypto", "devmapper"],
                                  capture_output=True, text=True, check=True).stdout)
san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
ffi.set_source("img_helper._native", "".join(f'#include "{p}.h"\n' for p in pairs),
               sources=[str(csrc / f"{p}.c") for p in pairs], include_dirs=[str(csrc)],
               extra_compile_args=["-O1", "-g", "-D_GNU_SOURCE", *san], extra_link_args=[*san, *libs])
shutil.copy(ffi.compile(tmpdir=str(out / "build")), out / "img_helper")
PY
export ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
[ $# -gt 0 ] || set -- tests/host/test_extract_hostile.py tests/host/test_extract_semantics.py
PYTHONPATH="$PWD/$out" exec .venv/bin/pytest -p no:cacheprovider -q "$@"
