"""Named model architectures: ``model.name: NAME`` in a run config, ``regionmed models``.

A named model is a complete :class:`~regionmed.model.config.ModelConfig` under a name: its towers,
ROI path, embedding size and, with them, its preprocessing (image size, normalisation, ROI crops,
text context length; :func:`regionmed.model.clip.preprocessor_from_config`). The packaged ones are
the JSON files of ``regionmed/model/configs/`` (``{"description": ..., "model": {...}}``; the file
name is the model's name), as open_clip's ``model_configs/*.json``; :func:`register` adds a user's
own (the role of timm's ``@register_model``).

In a run config, ``model: {name: NAME, ...}`` is the named config with the mapping's other fields
laid over it, mapping by mapping (``model: {name: resnet18-minilm, roi: {mode: none}}`` changes
the ROI mode only); ``--set model.name=NAME`` works the same.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from regionmed.config import ConfigError, from_dict, to_dict
from regionmed.model.config import ModelConfig, validate_model_config

__all__ = ["NamedModel", "get_model", "list_models", "model_config", "register", "resolve_model_mapping"]


@dataclass(frozen=True)
class NamedModel:
    """A registered architecture: ``config`` is its complete ``ModelConfig`` mapping (every field)."""

    name: str
    description: str
    config: dict
    source: str  # the packaged file, or "register()"

    def model_config(self) -> ModelConfig:
        return from_dict(ModelConfig, copy.deepcopy(self.config), "model", self.source)


_REGISTRY: dict[str, NamedModel] = {}
_PACKAGED_READ = False


def _complete(mapping: Mapping[str, Any] | ModelConfig, source: str) -> dict:
    """The validated, complete mapping of ``mapping`` (a ``ModelConfig`` or a partial mapping)."""
    cfg = mapping if isinstance(mapping, ModelConfig) else from_dict(ModelConfig, dict(mapping), "model", source)
    validate_model_config(cfg, source)
    return to_dict(cfg)


def _read_packaged() -> None:
    global _PACKAGED_READ
    if _PACKAGED_READ:
        return
    _PACKAGED_READ = True
    folder = resources.files("regionmed.model") / "configs"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        name, source = entry.name[: -len(".json")], f"regionmed/model/configs/{entry.name}"
        data = json.loads(entry.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise ConfigError(f"{source}: expected {{'description': ..., 'model': {{...}}}}")
        _REGISTRY.setdefault(name, NamedModel(name, str(data.get("description", "")), _complete(data["model"], source), source))


def register(name: str, config: ModelConfig | Mapping[str, Any], description: str = "", overwrite: bool = False) -> NamedModel:
    """Register ``config`` (a :class:`ModelConfig`, or a mapping of its fields: the others keep their
    defaults) as the named model ``name``. Raises :class:`ConfigError` for a bad field, an empty name,
    or a name already registered (unless ``overwrite``)."""
    _read_packaged()
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"register: the model name {name!r} is empty")
    if name in _REGISTRY and not overwrite:
        raise ConfigError(f"register: a model named {name!r} exists already ({_REGISTRY[name].source}); pass overwrite=True")
    source = f"register({name!r})"
    entry = NamedModel(name, description, _complete(config, source), "register()")
    _REGISTRY[name] = entry
    return entry


def list_models() -> list[str]:
    """The registered model names, sorted."""
    _read_packaged()
    return sorted(_REGISTRY)


def get_model(name: str) -> NamedModel:
    """The named model ``name``; :class:`ConfigError` naming the known ones otherwise."""
    _read_packaged()
    if name not in _REGISTRY:
        raise ConfigError(f"model.name {name!r} is not a registered model (known: {', '.join(sorted(_REGISTRY))}; "
                          "see regionmed models)")
    return _REGISTRY[name]


def _lay_over(base: dict, over: Mapping[str, Any]) -> dict:
    """``base`` with ``over`` laid over it: mappings merged key by key, any other value replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _lay_over(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_model_mapping(mapping: Mapping[str, Any], source: str = "<config>") -> dict:
    """A run config's ``model`` mapping with its ``name`` resolved: the named model's complete
    mapping with the other fields of ``mapping`` laid over it (a mapping without ``name`` is
    returned as it is). Raises :class:`ConfigError` naming ``source`` for an unknown name."""
    if "name" not in mapping:
        return dict(mapping)
    name = mapping["name"]
    if not isinstance(name, str):
        raise ConfigError(f"{source}: model.name must be a string, got {name!r}")
    try:
        named = get_model(name)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return _lay_over(named.config, {k: v for k, v in mapping.items() if k != "name"})


def model_config(name: str, overrides: Mapping[str, Any] | None = None, source: str | None = None) -> ModelConfig:
    """The validated :class:`ModelConfig` of the named model ``name`` with ``overrides`` (a partial
    mapping, e.g. ``{"roi": {"mode": "none"}}``) laid over it. Raises :class:`ConfigError`."""
    source = source or f"model {name!r}"
    cfg = from_dict(ModelConfig, resolve_model_mapping({"name": name, **(overrides or {})}, source), "model", source)
    validate_model_config(cfg, source)
    return cfg
