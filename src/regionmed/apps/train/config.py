"""A training run's configuration: data, stages, optimisation, output.

A :class:`RunConfig` plus its seed fully determines a run. Its ``model`` part is
the library's :class:`regionmed.model.config.ModelConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from regionmed.config import ConfigError, load_yaml_config
from regionmed.losses import LOSS_NAMES
from regionmed.model.config import MODULE_NAMES, ModelConfig, validate_model_config


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


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a run config YAML, apply dotted ``overrides`` ({"train.batch_size": 8}), validate."""
    cfg = load_yaml_config(RunConfig, path, overrides)
    validate_run_config(cfg, str(path))
    return cfg
