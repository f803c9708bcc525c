"""Typed experiment configs: frozen dataclasses filled from YAML, then from dotted ``key=value`` overrides.

    config = load_config(TrainConfig, "train/sd15.yaml", ["optimizer.lr=3e-4", "mesh.fsdp=4"])

Every key is checked against the dataclass fields: an unknown key (in the file or an override) is a
``ConfigError`` naming it, the closest valid key and the keys valid at that level. Values are coerced to
the field's annotated type (``bool``, ``int``, ``float``, ``str``, ``X | None``, ``Literal``,
``tuple``/``list``/``dict`` of those, nested dataclasses); an override's value is read as YAML, except for
``str`` fields, which take the text as it is (``null`` or ``None`` clears an optional field).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ipadapter_jax.errors import ConfigError

T = TypeVar("T")
_NULLS = ("null", "none", "~", "")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """``cls`` from the YAML file at ``path`` (None: the defaults) with ``overrides`` applied in order."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist; check the path.")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file {path} is not valid YAML ({e}).") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of keys, not a {type(loaded).__name__}.")
        raw = loaded or {}
    raw = apply_overrides(cls, raw, overrides)
    return from_dict(cls, raw)


def apply_overrides(cls: type, raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``a.b.c=value`` set, after checking ``a.b.c`` names a field of ``cls``."""
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"Override {item!r} is not of the form key=value (e.g. optimizer.lr=1e-4).")
        field_type, parts = _resolve_key(cls, key, item)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = _parse_override(field_type, text, key)
    return out


def from_dict(cls: type[T], raw: Mapping[str, Any] | None, where: str = "") -> T:
    """``cls`` with fields from ``raw`` (missing fields take their defaults); unknown keys are errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"Config section {where or '<top>'} must be a mapping, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(_unknown(str(key), fields, where))
        values[key] = _coerce(hints[key], value, _join(where, key))
    missing = [name for name, f in fields.items() if name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"Config is missing required key(s) {', '.join(_join(where, m) for m in missing)}.")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Config section {where or '<top>'} is invalid: {e}.") from None


def to_dict(config: Any) -> Any:
    """A dataclass config as plain YAML/JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}
    if isinstance(config, (tuple, list)):
        return [to_dict(v) for v in config]
    if isinstance(config, Mapping):
        return {str(k): to_dict(v) for k, v in config.items()}
    return config


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# --- keys -------------------------------------------------------------------------------------------------


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _unknown(key: str, fields: Mapping[str, Any], where: str) -> str:
    valid = sorted(fields)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {_join(where, close[0])!r}?" if close else "."
    section = f" in section {where!r}" if where else ""
    return (f"Unknown config key {_join(where, key)!r}{hint} Valid keys{section}: {', '.join(valid)}.")


def _resolve_key(cls: type, key: str, item: str) -> tuple[Any, list[str]]:
    parts = key.split(".")
    current: Any = cls
    where = ""
    for i, part in enumerate(parts):
        target = _dataclass_of(current)
        if target is None:
            raise ConfigError(f"Override {item!r}: {where!r} is a value, not a section; "
                              f"set it as {where}=<value>.")
        fields = {f.name: f for f in dataclasses.fields(target) if f.init}
        if part not in fields:
            raise ConfigError(_unknown(part, fields, where) + f" (from override {item!r})")
        current = typing.get_type_hints(target)[part]
        where = _join(where, part)
        if i == len(parts) - 1:
            return current, parts
    raise AssertionError("unreachable")


def _dataclass_of(tp: Any) -> type | None:
    tp = _strip_optional(tp)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _strip_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if _is_union(tp) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _parse_override(tp: Any, text: str, key: str) -> Any:
    text = text.strip()
    optional = _is_union(tp) and type(None) in typing.get_args(tp)
    if optional and text.lower() in _NULLS:
        return None
    if _strip_optional(tp) is str:
        return text
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"Override {key}={text!r} is not a valid value ({e}).") from None


# --- values -----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_union(tp):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"Config key {where!r} must be set (it cannot be null).")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"Config key {where!r} expects {_type_name(tp)}, got {value!r}.")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"Config key {where!r} must be one of {', '.join(map(repr, args))}; got {value!r}.")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and hasattr(tp, "from_text"):  # a section written as one word (`mesh: auto`)
            return tp.from_text(value, where)
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"Config key {where!r} expects a list, got {value!r}.")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"Config key {where!r} expects {len(args)} values, got {len(value)}.")
            items = [_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))]
        else:
            item_type = args[0] if args else Any
            items = [_coerce(item_type, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"Config key {where!r} expects a mapping, got {value!r}.")
        kt, vt = args or (Any, Any)
        return {_coerce(kt, k, where): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    return _scalar(tp, value, where)


def _scalar(tp: Any, value: Any, where: str) -> Any:
    bad = ConfigError(f"Config key {where!r} expects {_type_name(tp)}, got {value!r}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise bad from None
            if number.is_integer():
                return int(number)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise bad from None
        if not isinstance(number, (int, float)):
            raise bad
        if not math.isfinite(number):
            raise ConfigError(f"Config key {where!r} must be a finite number, got {value!r}.")
        return float(number)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if isinstance(tp, type) and not isinstance(value, tp):
        raise bad
    return value


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
