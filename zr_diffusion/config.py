"""Typed recipe configs: one dataclass per recipe, filled from YAML plus ``key.sub=value`` overrides.

Unknown keys and values of the wrong type are errors that name the key, the source (file or
override) and what would be valid. Nothing is coerced silently except the YAML-natural int -> float.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_mapping(tp, value, where)
    if origin in (list, tuple, Sequence, typing.Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}: {value!r}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(k, kt, f"{where} key"): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def _fields(cls: type) -> tuple[dict[str, dataclasses.Field], dict[str, Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}, get_type_hints(cls)


def _from_mapping(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    fields, hints = _fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(fields)}"
        )
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _set_path(tree: dict, dotted: str, value: Any, cls: type, where: str) -> None:
    keys = dotted.split(".")
    node, node_cls = tree, cls
    for i, key in enumerate(keys):
        fields, hints = _fields(node_cls) if dataclasses.is_dataclass(node_cls) else ({}, {})
        if dataclasses.is_dataclass(node_cls) and key not in fields:
            raise ConfigError(
                f"{where}: unknown key {'.'.join(keys[: i + 1])!r} for {node_cls.__name__}; "
                f"valid keys: {sorted(fields)}"
            )
        if i == len(keys) - 1:
            node[key] = value
            return
        if dataclasses.is_dataclass(node_cls):
            sub_cls = hints.get(key, dict)
        else:  # an entry of a dict[str, V] section (e.g. named judges) is a V
            sub_cls = (get_args(node_cls) or (str, dict))[1]
        if not dataclasses.is_dataclass(sub_cls) and get_origin(sub_cls) not in (dict, Mapping):
            raise ConfigError(f"{where}: {'.'.join(keys[: i + 1])!r} is not a section, cannot set {dotted!r}")
        node = node.setdefault(key, {})
        node_cls = sub_cls


def parse_overrides(overrides: Sequence[str], cls: type) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        _set_path(tree, key.strip(), value, cls, f"override {item!r}")
    return tree


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return dict(data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file and ``key.sub=value`` overrides (overrides win)."""
    data = read_yaml(path) if path is not None else {}
    where = str(path) if path is not None else ""
    if overrides:
        # Validate each override on its own so that its error names the override, not the file.
        over = parse_overrides(overrides, cls)
        _from_mapping(cls, _merge(data, over), where or "overrides")
        data = _merge(data, over)
    return _from_mapping(cls, data, where)


def to_dict(cfg: Any) -> Any:
    """A plain (YAML/JSON-serialisable) view of a config dataclass."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    from zr_diffusion.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
