"""JSON codec for request and response messages: dataclasses (nested, with list/dict/Optional fields),
plain dicts/lists/scalars, pathlib paths, and any class with `to_dict()` / `from_dict()`."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import PurePath
from typing import Any


class CodecError(TypeError):
    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(what)


def to_jsonable(obj: Any) -> Any:
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    raise CodecError(f"cannot encode {type(obj).__name__} as JSON")


def encode(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), separators=(",", ":"), sort_keys=True)


def _hints(tp: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(tp)
    except Exception:  # unresolvable forward refs: fall back to raw values
        return {}


def from_jsonable(tp: Any, data: Any) -> Any:
    if data is None or tp is None or tp is Any or tp is object:
        return data
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return from_jsonable(options[0], data) if len(options) == 1 else data
    if origin in (list, tuple, set, frozenset):
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [from_jsonable(inner, v) for v in data]
        return items if origin is list else origin(items)
    if origin is dict:
        kv = typing.get_args(tp)
        inner = kv[1] if len(kv) == 2 else Any
        return {k: from_jsonable(inner, v) for k, v in data.items()}
    if origin is not None:
        return data
    if isinstance(tp, type):
        if hasattr(tp, "from_dict") and callable(tp.from_dict):
            return tp.from_dict(data)
        if dataclasses.is_dataclass(tp):
            if not isinstance(data, dict):
                raise CodecError(f"cannot decode {type(data).__name__} into {tp.__name__}")
            hints = _hints(tp)
            kwargs = {
                f.name: from_jsonable(hints.get(f.name, Any), data[f.name])
                for f in dataclasses.fields(tp)
                if f.init and f.name in data
            }
            return tp(**kwargs)
        if issubclass(tp, PurePath):
            return tp(data)
        if tp is float and isinstance(data, int):
            return float(data)
    return data


def decode(tp: Any, text: str | None) -> Any:
    if text is None:
        return None
    return from_jsonable(tp, json.loads(text))
