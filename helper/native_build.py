"""cffi (API mode) build of img_helper._native from helper/csrc.

Each concern in helper/csrc is a pair: NAME.c (the code) and NAME.cdef (the declarations
Python may call). Every pair is compiled into the one extension, so adding a concern means
adding a pair, not editing this file.
"""

import os
import shlex
import subprocess
from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent / "csrc"


def _pkg_config(*args: str) -> list[str]:
    out = subprocess.run(["pkg-config", *args], check=True, capture_output=True, text=True).stdout
    return shlex.split(out)


def _build() -> FFI:
    ffi = FFI()
    cdefs = sorted(CSRC.glob("*.cdef"))
    ffi.cdef("\n".join(p.read_text() for p in cdefs))
    headers = sorted(CSRC.glob("*.h"))
    # setuptools wants paths relative to the project; cffi's own compile() (scripts/build-native.sh sets
    # IMG_NATIVE_ABSOLUTE) runs from its tmpdir and needs absolute ones.
    here = Path.cwd()
    absolute = "IMG_NATIVE_ABSOLUTE" in os.environ
    sources = sorted(str(p) if absolute or not p.is_relative_to(here) else str(p.relative_to(here))
                     for p in CSRC.glob("*.c"))
    pkgs = ["devmapper", "libarchive", "libcrypto"]
    ffi.set_source(
        "img_helper._native",
        "\n".join(f'#include "{h.name}"' for h in headers),
        sources=sources,
        include_dirs=[str(CSRC)],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-D_GNU_SOURCE",
                            "-fstack-protector-strong", "-D_FORTIFY_SOURCE=2",
                            *_pkg_config("--cflags", *pkgs)],
        extra_link_args=_pkg_config("--libs", *pkgs),
    )
    return ffi


ffibuilder = _build()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
