"""Typed reads from parsed JSON: a missing key or a wrong type is a BundleError naming where it is."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from polysense.errors import BundleError

T = TypeVar("T")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def typed(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else ()):
        raise BundleError(f"{where} should be {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise BundleError(f"{where} should be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def get(data: Any, key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    """data[key] checked against `kind` (the default when given and the key is absent)."""
    typed(data, dict, where)
    if key not in data:
        if default is not ...:
            return default
        raise BundleError(f"{where} lacks {key!r}")
    return typed(data[key], kind, f"{where}.{key}")


def within(value: int, low: int, high: int, where: str) -> int:
    if not low <= value <= high:
        raise BundleError(f"{where} is {value}, outside {low}..{high}")
    return value


def items(data: Any, key: str, parse: Callable[[Any, str], T], where: str) -> tuple[T, ...]:
    values = get(data, key, list, where)
    return tuple(parse(value, f"{where}.{key}[{i}]") for i, value in enumerate(values))


def strings(values: Iterable[Any], where: str) -> tuple[str, ...]:
    return tuple(typed(v, str, f"{where}[{i}]") for i, v in enumerate(values))


def plain_file_name(name: str, where: str) -> str:
    """`name` if it names a file directly inside its folder: letters, digits, ".", "_" and "-", not starting
    with "." (so no path separator, no "..", nothing hidden), at most 128 characters."""
    if not _PLAIN_NAME.fullmatch(name):
        raise BundleError(f"{where}: {name!r} is not a plain file name inside the bundle")
    return name
