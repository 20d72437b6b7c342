"""Typed TOML configuration: tables become frozen dataclasses.

Every field of a config dataclass is declared with :func:`option`, which
carries its help text and an optional validator. :func:`build` walks a TOML
table into the dataclass, rejecting unknown keys and wrong types with an
error that names the key (``mqtt.port``) and says what would be accepted.

A field whose type has a ``from_toml(value, key)`` classmethod builds itself
from its TOML value (a table whose keys are names, not fields: the
``[backend.<name>]`` tables), and a ``toml_rows(key)`` classmethod gives its
rows in the reference.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, TypeVar

from .errors import EdgeInferError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

T = TypeVar("T")
Validator = Callable[[Any], "str | None"]


class ConfigError(EdgeInferError, ValueError):
    """The configuration is invalid; the message names the key and the fix."""

    exit_code = 2


def option(default: Any = dataclasses.MISSING, *, help: str = "", check: Validator | None = None,
           factory: Callable[[], Any] | None = None) -> Any:
    meta = {"help": help, "check": check}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def in_range(lo: float, hi: float) -> Validator:
    def check(value: Any) -> str | None:
        return None if lo <= value <= hi else f"must be between {lo} and {hi}"
    return check


def one_of(*choices: str) -> Validator:
    def check(value: Any) -> str | None:
        return None if value in choices else "must be one of: " + ", ".join(repr(c) for c in choices)
    return check


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(item, _type_name(item))
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            Path: "a path string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(args[0], value, key)
        for arg in args:
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if isinstance(tp, type) and hasattr(tp, "from_toml"):
        return tp.from_toml(value, key)   # a table whose keys are not fields (e.g. [backend.<name>])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table [{key}], got {value!r}")
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, str) and value:
            return Path(value)
    else:  # pragma: no cover - programming error in a config class
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def build(cls: type[T], table: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a TOML table, validating every key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        raise ConfigError(
            f"unknown key {'.'.join(filter(None, [prefix, unknown[0]]))!r} in {where}; "
            f"known keys: {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in table:
            value = _coerce(hints[name], table[name], key)
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        else:
            raise ConfigError(f"{key}: required but missing ({f.metadata.get('help', '')})")
        check = f.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"{key} = {value!r}: {problem}")
        kwargs[name] = value
    return cls(**kwargs)


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deep") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None


def _toml_value(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, Path)):
        return f'"{value}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) rows, for the configuration reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if isinstance(tp, type) and hasattr(tp, "toml_rows"):
            rows.extend(tp.toml_rows(key))
            continue
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(tp) or (len(inner) == 1 and dataclasses.is_dataclass(inner[0])):
            rows.extend(describe(tp if dataclasses.is_dataclass(tp) else inner[0], key))
            continue
        if f.default is not dataclasses.MISSING:
            default = _toml_value(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = _toml_value(f.default_factory())
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), default, f.metadata.get("help", "")))
    return rows


def resolve_paths(cfg: T, base: Path) -> T:
    """Every path in a config, at any depth, made relative to ``base`` (the config file's folder).

    One resolver for every program's config: a path field added later is
    resolved without anyone remembering to (the worker once read its TLS
    files from the working directory).
    """
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        value = getattr(cfg, f.name)
        if isinstance(value, Path):
            if not value.is_absolute():
                changes[f.name] = base / value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            resolved = resolve_paths(value, base)
            if resolved is not value:
                changes[f.name] = resolved
        elif isinstance(value, Mapping):   # name -> config dataclass, e.g. the [backend.<name>] tables
            items = {k: resolve_paths(v, base) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
                     for k, v in value.items()}
            if any(items[k] is not value[k] for k in items):
                changes[f.name] = items
    return dataclasses.replace(cfg, **changes) if changes else cfg
