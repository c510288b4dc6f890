"""The installed package is what the README says: two console scripts and a compiled native layer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("script", ["img", "img-helper"])
@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_console_scripts_answer(script: str, flag: str) -> None:
    r = subprocess.run([str(BIN / script), flag], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (script in r.stdout) if flag == "--version" else ("Usage:" in r.stdout)


def test_native_extension_is_compiled_against_libdevmapper_and_libarchive() -> None:
    from img_helper.native import native_version

    assert native_version().startswith("img-native ")
    so = next(Path(__import__("img_helper").__file__).parent.glob("_native*.so"))
    ldd = subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout
    assert "libdevmapper" in ldd and "libarchive" in ldd
