"""Typed configuration machinery: dataclasses loaded from YAML and checked on load.

The configs themselves live with what they configure: the model's in
:mod:`regionmed.model.config`, a training run's in :mod:`regionmed.apps.train.config`,
a dataset build's in :mod:`regionmed.apps.curation.config`. This module only
reads them: an unknown key, a wrong type or a bad value raises
:class:`ConfigError` naming the file and the dotted field (``train.stages[2].lr``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from regionmed.errors import RegionmedError


class ConfigError(RegionmedError, ValueError):
    """A configuration value that is missing, unknown or out of range."""


_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{source}: {where} must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {where}: {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{source}: {where} is {value!r}, expected one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {where} must be a list, got {type(value).__name__}")
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a mapping, got {type(value).__name__}")
        key_tp, val_tp = get_args(tp)
        return {_convert(k, key_tp, f"{where} key", source): _convert(v, val_tp, f"{where}.{k}", source) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads `1e-4` as a string; YAML 1.2 and users mean a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {where}: unsupported type {tp}")  # pragma: no cover


def from_dict(cls: type, data: Any, where: str = "", source: str = "<config>") -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{source}: unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], sub, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {sub}")
    obj = cls(**kwargs)
    return obj


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def load_yaml_config(cls: type, path: str | Path, overrides: dict[str, Any] | None = None, what: str = "config file",
                     prepare: Callable[[dict], dict] | None = None) -> Any:
    """Read YAML ``path``, apply dotted ``overrides`` ({"train.batch_size": 8}), then ``prepare``
    (e.g. resolve a named model), and build dataclass ``cls`` from it, checking keys and types
    (errors name the file and field).

    The one place configs are read: the file must be UTF-8 (a byte-order mark is
    accepted); anything else is a :class:`ConfigError` naming the file, byte offset and
    line, never a guess."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror or err}") from err
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{path}: {what} is UTF-16 text; save it as UTF-8")
    try:  # strict UTF-8; a byte-order mark (as some editors write) is accepted and removed
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}: {what} is not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start} "
                          f"(line {line}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    data = {} if data is None else data
    for dotted, value in (overrides or {}).items() if isinstance(data, dict) else ():
        set_dotted(data, dotted, value)
    if prepare is not None and isinstance(data, dict):
        data = prepare(data)
    return from_dict(cls, data, "", str(path))


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b[2].c`` in nested dicts/lists; a missing list index is an error."""
    keys: list[str | int] = []
    for part in dotted.split("."):
        name, _, rest = part.partition("[")
        if name:
            keys.append(name)
        while rest:
            idx, _, rest = rest.partition("]")
            if not idx.isdigit():
                raise ConfigError(f"override {dotted!r}: bad list index [{idx}]")
            keys.append(int(idx))
            rest = rest.lstrip("[")
    node: Any = data
    for key, nxt in zip(keys[:-1], keys[1:]):
        if isinstance(key, int):
            if not isinstance(node, list) or key >= len(node):
                raise ConfigError(f"override {dotted!r}: index [{key}] does not exist")
            node = node[key]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {key!r} is not a field of a list; a list item is "
                                  f"reached with [i], e.g. train.stages[0].steps=2")
            node = node.setdefault(key, [] if isinstance(nxt, int) else {})
    if isinstance(keys[-1], str) and not isinstance(node, dict):
        raise ConfigError(f"override {dotted!r}: {keys[-1]!r} is not a field of a list; a list item is "
                          f"reached with [i], e.g. train.stages[0].steps=2")
    last = keys[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ConfigError(f"override {dotted!r}: index [{last}] does not exist")
    node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value`` (value read as YAML) for ``--set`` on the CLI."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)
