"""Typed configuration machinery: dataclasses loaded from YAML and checked on load.

The configs themselves live with what they configure: the model's in
:mod:`regionmed.model.config`, a training run's in :mod:`regionmed.apps.train.config`,
a dataset build's in :mod:`regionmed.apps.curation.config`. This module only
reads them: an unknown key, a wrong type or a bad value raises
:class:`ConfigError` naming the file and the dotted field (``train.stages[2].lr``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from regionmed.errors import RegionmedError
from regionmed.io import decode_utf8


class ConfigError(RegionmedError, ValueError):
    """A configuration value that is missing, unknown or out of range."""


_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")



def _src(source: Any, where: str) -> str:
    """Where the value of field ``where`` came from: the config file, or the command-line
    argument that set it (``source`` may be a function of the dotted field)."""
    return source(where) if callable(source) else str(source)


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{_src(source, where)}: {where} must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{_src(source, where)}: {where}: {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{_src(source, where)}: {where} is {value!r}, expected one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{_src(source, where)}: {where} must be a list, got {type(value).__name__}")
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_src(source, where)}: {where} must be a mapping, got {type(value).__name__}")
        key_tp, val_tp = get_args(tp)
        return {_convert(k, key_tp, f"{where} key", source): _convert(v, val_tp, f"{where}.{k}", source) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_src(source, where)}: {where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_src(source, where)}: {where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads `1e-4` as a string; YAML 1.2 and users mean a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_src(source, where)}: {where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_src(source, where)}: {where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{_src(source, where)}: {where}: unsupported type {tp}")  # pragma: no cover


def from_dict(cls: type, data: Any, where: str = "", source: Any = "<config>") -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively.

    ``source`` names where the values came from in messages: a file name, or a function
    of the dotted field (``train.stages[0].lr``) that names the file or the ``--set``
    argument that set it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{_src(source, where)}: {where or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{_src(source, f'{prefix}{unknown[0]}')}: unknown key {prefix}{unknown[0]} "
                          f"(known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], sub, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_src(source, sub)}: missing required key {sub}")
    obj = cls(**kwargs)
    return obj


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def load_yaml_config(cls: type, path: str | Path, overrides: dict[str, Any] | None = None, what: str = "config file",
                     option_names: dict[str, str] | None = None,
                     prepare: Callable[[dict], dict] | None = None) -> Any:
    """Read YAML ``path``, apply dotted ``overrides`` ({"train.batch_size": 8}), then ``prepare``
    (e.g. resolve a named model), and build dataclass ``cls`` from it, checking keys and types
    (errors name the file and field).

    The one place configs are read: the file must be UTF-8 (a byte-order mark is
    accepted); anything else is a :class:`ConfigError` naming the file, byte offset and
    line, never a guess. Every error is one line. A bad value or key that an override
    set names the override (``--set train.batch_size``, or the option given in
    ``option_names``, e.g. ``{"data.train": "--data"}``), not the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror or err}") from err
    text = decode_utf8(raw, path, what, ConfigError)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({yaml_error_line(err)})") from None
    data = {} if data is None else data
    overrides = dict(overrides or {})
    source = override_source(path, overrides, option_names)
    if overrides and not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    for dotted, value in overrides.items():
        try:
            set_dotted(data, dotted, value)
        except ConfigError as err:
            raise ConfigError(f"{_override_name(dotted, option_names)}: {err}") from None
    if prepare is not None and isinstance(data, dict):
        data = prepare(data)
    return from_dict(cls, data, "", source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML 1.2 requires keys
    to be unique; PyYAML keeps the last one silently, so a value given earlier would vanish)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (first at line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: the base class reports it
                pass
        return super().construct_mapping(node, deep)


def yaml_error_line(err: Exception) -> str:
    """A YAML error in one line: what went wrong and where (line and column, 1-based)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(problem) + (f" ({context})" if context and context != problem else "")


def _override_name(dotted: str, option_names: dict[str, str] | None) -> str:
    return (option_names or {}).get(dotted) or f"--set {dotted}"


def override_source(path: str | Path, overrides: dict[str, Any], option_names: dict[str, str] | None = None):
    """A ``source`` for :func:`from_dict`: for a dotted field set by an override (or inside
    one), the override's name (``--set KEY`` or ``option_names[KEY]``), else the file."""
    keys = sorted(overrides, key=len, reverse=True)

    def name(where: str) -> str:
        for key in keys:
            if where == key or where.startswith((key + ".", key + "[")):
                return _override_name(key, option_names)
        return str(path)

    return name


@contextlib.contextmanager
def overrides_named(path: str | Path, overrides: dict[str, Any] | None, option_names: dict[str, str] | None = None):
    """Within this block, a :class:`ConfigError` of a validator that names ``path`` and a
    field an override set (``"<path>: train.batch_size must be >= 1"``) names the override
    instead (``"--set train.batch_size: ..."``); one about a field that holds an override
    says both (``"<path> (with --set train.stages[0].steps): ..."``)."""
    try:
        yield
    except ConfigError as err:
        text, prefix = str(err), f"{path}: "
        if not overrides or not text.startswith(prefix):
            raise
        rest = text[len(prefix):]
        field_ = re.match(r"[A-Za-z_][\w.\[\]]*", rest)
        where = field_.group(0) if field_ else ""
        for key in sorted(overrides, key=len, reverse=True):
            if where and (where == key or where.startswith((key + ".", key + "["))):
                raise ConfigError(f"{_override_name(key, option_names)}: {rest}") from None
            if where and key.startswith((where + ".", where + "[")):
                raise ConfigError(f"{path} (with {_override_name(key, option_names)}): {rest}") from None
        raise


def _kind(node: Any) -> str:
    return "a list" if isinstance(node, list) else "a mapping" if isinstance(node, dict) else f"the value {node!r}"


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b[2].c`` in nested dicts/lists (a mapping that is absent or null on the way is
    made). Raises :class:`ConfigError` for a malformed or missing list index, and for a
    field set inside a value that is not a mapping (a list item is reached with ``[i]``)."""
    keys: list[str | int] = []
    for part in dotted.split("."):
        name, _, rest = part.partition("[")
        if name:
            keys.append(name)
        while rest:
            idx, _, rest = rest.partition("]")
            if not idx.isdigit():
                raise ConfigError(f"bad list index [{idx}] in {dotted!r}")
            keys.append(int(idx))
            rest = rest.lstrip("[")
    if not keys:
        raise ConfigError(f"no field named in {dotted!r}")
    node: Any = data
    path = ""
    for pos, key in enumerate(keys):
        last = pos == len(keys) - 1
        if isinstance(key, int):
            if not isinstance(node, list) or key >= len(node):
                raise ConfigError(f"index [{key}] does not exist in {dotted!r}: {path or 'the top level'} is {_kind(node)}"
                                  + (f" of {len(node)} item(s)" if isinstance(node, list) else ""))
        elif not isinstance(node, dict):
            hint = "; a list item is reached with [i], e.g. train.stages[0].steps=2" if isinstance(node, list) else ""
            raise ConfigError(f"{key!r} cannot be set in {dotted!r}: {path or 'the top level'} is {_kind(node)}{hint}")
        if last:
            node[key] = value
            return
        if isinstance(key, str) and node.get(key) is None:
            node[key] = [] if isinstance(keys[pos + 1], int) else {}
        node = node[key]
        path = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)


def parse_override(text: str, option: str = "--set") -> tuple[str, Any]:
    """Parse ``key.sub=value`` (value read as YAML) for ``--set`` on the CLI. Raises
    :class:`ConfigError`, one line naming the argument, for text without ``=``, an empty
    or malformed key, or a value that is not YAML."""
    if "=" not in text:
        raise ConfigError(f"{option} {text!r}: expected KEY=VALUE, e.g. {option} train.batch_size=16")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_]\w*(\[\d+\])*(\.[A-Za-z_]\w*(\[\d+\])*)*", key):
        raise ConfigError(f"{option} {text!r}: {key!r} is not a dotted field name (e.g. train.stages[0].lr)")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{option} {text!r}: the value is not valid YAML ({yaml_error_line(err)})") from None
