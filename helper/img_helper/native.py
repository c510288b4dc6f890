"""Loads the cffi extension compiled from helper/csrc at install time."""

from __future__ import annotations

import importlib
from typing import Any

_native = importlib.import_module("img_helper._native")

ffi: Any = _native.ffi
lib: Any = _native.lib


def native_version() -> str:
    return str(ffi.string(lib.img_native_version()).decode())
