"""A training run's configuration: data, stages, optimisation, output.

A :class:`RunConfig` plus its seed fully determines a run. Its ``model`` part is
the library's :class:`regionmed.model.config.ModelConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from regionmed.apps.train.validation import ValidationConfig, validate_validation_config
from regionmed.config import ConfigError, load_yaml_config, overrides_named
from regionmed.data.schema import SPLITS
from regionmed.losses import LOSS_NAMES
from regionmed.model.config import MODULE_NAMES, ModelConfig, check_finite, validate_model_config
from regionmed.model.registry import resolve_model_mapping


@dataclass
class SourceConfig:
    """One dataset of a mixed (or streamed) run."""

    name: str = ""  # tag of its samples in the metrics; default: the folder / first URL's name
    path: str = ""  # MedRegion dataset: a folder (both readers) or a URL holding manifest.json (streaming)
    urls: list[str] = field(default_factory=list)  # streaming only: shard URLs / brace patterns, instead of path
    weight: float = 1.0  # sampling weight (relative; the role of open_clip's upsampling factors)
    split: str = ""  # default: data.split


@dataclass
class DataConfig:
    train: str = ""  # MedRegion dataset folder (a single dataset; or give data.sources / data.urls)
    split: str = "train"
    # "indexed": random access from the build-time index (exact, world-size-independent resume);
    # "streaming": WebDataset pipeline over local paths or URLs (resume at shard granularity).
    reader: Literal["indexed", "streaming"] = "indexed"
    sources: list[SourceConfig] = field(default_factory=list)  # several datasets mixed with weights
    urls: list[str] = field(default_factory=list)  # streaming: shard URLs / brace patterns of one dataset
    shuffle_buffer: int = 1000  # streaming: samples per reading slot (rank x worker); 0/1 = no buffer
    resampled: bool = False  # streaming: draw shards with replacement, endlessly
    max_open_files: int = 16  # indexed: shard files open at once per process (least recently used closed)
    # Data counts for the start-of-run checks: "auto" = the manifest's build-time statistics, else one
    # pass over the records (indexed reader) or none (streaming); "always" = one pass; "never" = none.
    audit: Literal["auto", "always", "never"] = "auto"
    num_workers: int = 0
    pin_memory: Literal["auto", "on", "off"] = "auto"  # auto = on when CUDA is present
    prefetch_factor: int = 2  # batches in flight per worker (with num_workers > 0)
    max_negatives: int = 3  # negative captions kept per region
    max_image_negatives: int = 2  # negative reports kept per image (long texts: each costs a report's encoding)
    # Unreadable samples (an image that does not decode, a broken record) are named, skipped
    # and counted; the run stops cleanly (after a checkpoint) when more than this many
    # distinct samples were bad. 0 = stop at the first one.
    max_bad_samples: int = 10
    # Streaming: shards that cannot be read (or break off), whose samples are lost unseen; the
    # run stops cleanly (after a checkpoint) when more than this many distinct shards were bad.
    max_bad_shards: int = 0


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
class LockConfig:
    """Locked towers (LiT, Zhai et al., CVPR 2022; open_clip's ``--lock-image`` / ``--lock-text``).

    A locked tower never trains (it is left out of every stage's trainable groups, and a stage
    that names it is an error) and runs in eval mode (BatchNorm statistics and dropout frozen).
    ``cache``: compute the locked towers' outputs on the training split once and read them back
    at every step (:mod:`regionmed.features`): the projections, the grid head, the ROI processor
    and the temperature then train at a fraction of a tower pass per step. The cache lives in
    ``cache_dir`` (default ``<output_dir>/../.feature-cache``, shared by runs side by side), is
    keyed by the tower weights, the preprocessing and the data, stays within ``cache_max_gb``
    (least recently used caches there are removed) and is resumable after a kill. ``cache_dtype``:
    ``float16`` halves the disk; ``float32`` makes cached training equal uncached training to float
    rounding."""

    image: bool = False
    text: bool = False
    cache: bool = True
    cache_dir: str | None = None
    cache_max_gb: float = 20.0
    cache_dtype: Literal["float16", "float32"] = "float16"


@dataclass
class TrainConfig:
    batch_size: int = 32  # global batch (split across ranks)
    # Gradient accumulation (open_clip's name): each step takes accum_freq * batch_size samples
    # (accum_freq micro-batches of batch_size), one optimiser step.
    accum_freq: int = 1
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
    # The grounding term (a stage's losses: {grounding: w}; regionmed.losses.grounding_loss): what each
    # boxed region is grounded as ("label": its label, lower-cased, or its caption when it has none;
    # "caption": its caption) and the loss shape ("softmax" over the image's cells, or "binary" per cell).
    grounding_text: Literal["label", "caption"] = "label"
    grounding_mode: Literal["softmax", "binary"] = "softmax"
    lock: LockConfig = field(default_factory=LockConfig)
    tensorboard: bool = True  # used when the tensorboard package is installed
    # Intra-op torch threads per process, set when the trainer starts; 0 = leave the process's own
    # choice (the regionmed CLI makes it at start: regionmed.threads.choose_threads).
    threads: int = 0


@dataclass
class RunConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Validation in the loop (apps/train/validation.py): off unless validation.every > 0.
    validation: ValidationConfig = field(default_factory=ValidationConfig)


def stage_reads_grid(stage: StageConfig, has_roi_path: bool) -> bool:
    """Whether a stage's losses read the feature grid (where a grid head sits): the
    ``grounding`` term, or the ROI processor (its context; ``align`` ROIs and grid context)."""
    return stage.losses.get("grounding", 0) > 0 or (stage.use_rois and has_roi_path)


def uses_boxes(cfg: RunConfig) -> bool:
    """Whether training reads the datasets' boxes: a model with an ROI path, or a stage with
    the ``grounding`` term (its targets are the boxes)."""
    return cfg.model.roi.mode != "none" or any(st.losses.get("grounding", 0) > 0 for st in cfg.train.stages)


def validate_run_config(cfg: RunConfig, source: str = "<config>") -> None:
    """Check every field of a run config; raise :class:`ConfigError` naming ``source`` and
    the dotted field (``train.stages[1].lr``) of the first bad value.

    Non-finite numbers are refused everywhere (:func:`~regionmed.model.config.check_finite`);
    the model part is checked by :func:`~regionmed.model.config.validate_model_config`.
    """

    def need(cond: bool, where: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{source}: {where} {msg}")

    check_finite(cfg, "", source)
    validate_model_config(cfg.model, source)
    need(0 <= cfg.seed < 2**32, "seed", f"is {cfg.seed}: must be in [0, 2**32)")
    d = cfg.data
    need(d.split in SPLITS, "data.split", f"is {d.split!r}: must be one of {list(SPLITS)}")
    need(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(cfg.train.threads >= 0, "train.threads", f"is {cfg.train.threads}: must be >= 0 (0 = chosen from the cores)")
    need(d.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0 (0 = no shuffle buffer)")
    need(d.max_open_files >= 1, "data.max_open_files", "must be >= 1")
    need(d.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
    given = [name for name, v in (("data.train", d.train.strip()), ("data.sources", d.sources), ("data.urls", d.urls)) if v]
    need(len(given) <= 1, given[-1] if given else "data", f"is given together with {given[0] if given else ''}"
         f"{' (--data sets data.train)' if given[:1] == ['data.train'] else ''}: "
         "give one of data.train (one dataset), data.sources (datasets mixed with weights) or data.urls (streaming)")
    need(not d.urls or d.reader == "streaming", "data.urls", "needs data.reader: streaming (the indexed reader reads dataset "
         "folders: data.train or data.sources[].path)")
    need(not d.resampled or d.reader == "streaming", "data.resampled", "needs data.reader: streaming")
    names = set()
    for i, src in enumerate(d.sources):
        where = f"data.sources[{i}]"
        need(bool(src.path.strip()) != bool(src.urls), where, "needs exactly one of 'path' (a MedRegion dataset) or 'urls'")
        need(not src.urls or d.reader == "streaming", f"{where}.urls", "needs data.reader: streaming (the indexed reader "
             "reads dataset folders: give 'path')")
        need(not src.path or d.reader == "streaming" or "://" not in src.path, f"{where}.path",
             f"is the URL {src.path!r}: the indexed reader reads local folders (use data.reader: streaming)")
        need(src.weight > 0, f"{where}.weight", f"is {src.weight}: must be > 0")
        need(not src.split or src.split in SPLITS, f"{where}.split", f"is {src.split!r}: must be one of {list(SPLITS)}")
        name = src.name or src.path or (src.urls[0] if src.urls else "")
        need(name not in names, f"{where}.name", f"{name!r} is used twice: give each source its own name")
        names.add(name)
    need(d.max_negatives >= 0, "data.max_negatives", "must be >= 0")
    need(d.max_image_negatives >= 0, "data.max_image_negatives", "must be >= 0")
    need(d.max_bad_samples >= 0, "data.max_bad_samples", "must be >= 0 (0 = stop at the first unreadable sample)")
    need(d.max_bad_shards >= 0, "data.max_bad_shards", "must be >= 0 (0 = stop at the first unreadable shard)")
    need(not (d.audit == "always" and d.reader == "streaming"), "data.audit",
         "is 'always', which the streaming reader cannot do (it makes no pass over the data): use 'auto' (the manifest's "
         "build-time statistics; add them with regionmed index-shards) or 'never'")
    v = cfg.validation
    need(not v.every or "://" not in v.data and not v.data.startswith("pipe:"), "validation.data",
         f"is {v.data!r}: validation reads a local MedRegion folder (random access), not a URL")
    t = cfg.train
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(t.accum_freq >= 1, "train.accum_freq", f"is {t.accum_freq}: must be >= 1 (1 = no accumulation)")
    validate_validation_config(cfg.validation, source)
    need(bool(t.output_dir.strip()), "train.output_dir", "is empty")
    need(bool(t.stages), "train.stages", "is empty: give at least one stage")
    need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = no clipping)")
    need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", f"is {t.betas}: must be two numbers in [0, 1)")
    need(t.eps > 0, "train.eps", "must be > 0")
    need(t.log_every >= 1, "train.log_every", "must be >= 1 (1 = log every step)")
    need(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0 = only at stage ends)")
    need(t.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0 (0 = keep all)")
    need(t.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1")
    has_roi_path = cfg.model.roi.mode != "none"
    locked = {name for name, on in (("image_tower", t.lock.image), ("text_tower", t.lock.text)) if on}
    need(t.lock.cache_max_gb > 0, "train.lock.cache_max_gb", "must be > 0")
    need(not (t.lock.cache and locked and cfg.data.reader == "streaming"), "train.lock.cache",
         "needs data.reader: indexed (the cache holds one row per sample of a split): set it false for streaming")
    names = set()
    for i, st in enumerate(t.stages):
        where = f"train.stages[{i}]"
        need(bool(st.name.strip()), f"{where}.name", "is empty")
        need(st.name not in names, f"{where}.name", f"{st.name!r} is used twice")
        names.add(st.name)
        need((st.steps is None) != (st.epochs is None), where, "needs exactly one of 'steps' or 'epochs'")
        need(st.steps is None or st.steps >= 1, f"{where}.steps", "must be >= 1")
        need(st.epochs is None or st.epochs > 0, f"{where}.epochs", "must be > 0")
        need(st.lr > 0, f"{where}.lr", "must be > 0")
        need(st.warmup_steps >= 0, f"{where}.warmup_steps", "must be >= 0")
        need(0 <= st.min_lr_ratio <= 1, f"{where}.min_lr_ratio", "must be in [0, 1]")
        need(st.weight_decay >= 0, f"{where}.weight_decay", "must be >= 0")
        need(bool(st.trainable), f"{where}.trainable", f"is empty: name the module groups to train (all, {', '.join(MODULE_NAMES)})")
        for module in st.trainable:
            need(module == "all" or module in MODULE_NAMES, f"{where}.trainable",
                 f"names unknown module {module!r} (known: all, {', '.join(MODULE_NAMES)})")
        named_locked = sorted(locked & set(st.trainable))
        need(not named_locked, f"{where}.trainable", f"names {', '.join(named_locked)}, which train.lock locks: "
             "leave it out (a locked tower never trains)")
        trained = (set(MODULE_NAMES) if "all" in st.trainable else set(st.trainable)) - locked
        if not (st.use_rois and has_roi_path):
            trained.discard("roi_processor")  # it takes no part in a stage without ROIs
        if cfg.model.dense.head == "none" or not stage_reads_grid(st, has_roi_path):
            trained.discard("dense_head")  # no grid head, or nothing of this stage reads the grid
        need(bool(trained), f"{where}.trainable",
             f"is {st.trainable}: nothing to train in this stage (the ROI processor only trains when use_rois is true "
             "and model.roi.mode is not 'none')")
        for module, scale in st.lr_scale.items():
            need(module in MODULE_NAMES, f"{where}.lr_scale", f"names unknown module {module!r} (known: {', '.join(MODULE_NAMES)})")
            need(scale >= 0, f"{where}.lr_scale.{module}", "must be >= 0")
        need(bool(st.losses), f"{where}.losses", "is empty")
        for loss, weight in st.losses.items():
            need(loss in LOSS_NAMES, f"{where}.losses", f"names unknown loss {loss!r} (known: {', '.join(LOSS_NAMES)})")
            need(weight >= 0, f"{where}.losses.{loss}", "must be >= 0")
        need(any(w > 0 for w in st.losses.values()), f"{where}.losses", f"is {st.losses}: at least one weight must be > 0")
        uses_regions = st.losses.get("region", 0) > 0 or (st.losses.get("hard_negative", 0) > 0 and st.use_rois)
        if uses_regions and not st.use_rois:
            raise ConfigError(f"{source}: {where} has a 'region' loss but use_rois is false")
        if (st.use_rois or uses_regions) and not has_roi_path:
            raise ConfigError(
                f"{source}: {where} uses ROIs (use_rois or region/hard_negative losses) but model.roi.mode is 'none'"
            )
        need(not st.use_rois or cfg.model.roi.max_rois >= 1, "model.roi.max_rois",
             f"is 0 but {where} ('{st.name}') uses ROIs: give at least 1 ROI slot")
        need(st.losses.get("grounding", 0) <= 0 or cfg.model.roi.max_rois >= 1, "model.roi.max_rois",
             f"is 0 but {where} ('{st.name}') has the 'grounding' loss, whose targets are the boxes: give at least 1 box slot")


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None,
                    option_names: dict[str, str] | None = None) -> RunConfig:
    """Read a run config YAML, apply dotted ``overrides`` ({"train.batch_size": 8}), resolve a
    named model (``model: {name: NAME, ...}``: :func:`regionmed.model.registry.resolve_model_mapping`),
    validate.

    Raises :class:`ConfigError` naming the file and the field for any bad value; for a value
    an override set, the override (``--set train.batch_size``, or ``option_names[field]``,
    e.g. ``--data``) instead of the file."""

    def named_model(data: dict) -> dict:
        if isinstance(data.get("model"), dict):
            data["model"] = resolve_model_mapping(data["model"], str(path))
        return data

    cfg = load_yaml_config(RunConfig, path, overrides, option_names=option_names, prepare=named_model)
    with overrides_named(path, overrides, option_names):
        validate_run_config(cfg, str(path))
    return cfg


# Fields a resumed run may change: they do not change which weights the run computes
# (where data and outputs live, logging, checkpoint cadence, stopping rules, memory-only
# settings; the image tower's pretrained file only initialises a run that has not started).
RESUME_NEUTRAL_FIELDS = (
    "data.train", "data.num_workers", "data.max_bad_samples", "data.max_bad_shards", "data.max_open_files", "data.audit", "data.pin_memory",
    "data.prefetch_factor",
    "train.output_dir", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.max_nonfinite", "train.tensorboard", "train.threads",
    "model.image.pretrained", "model.image.grad_checkpointing", "model.text.grad_checkpointing",
    # Validation reads the weights and restores every random state: it never changes them.
    "validation.every", "validation.data", "validation.split", "validation.max_samples", "validation.batch_size",
)


def config_differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted field, old value, new value)`` for every leaf where two config mappings
    (``to_dict`` / JSON form) differ; lists of mappings (stages) are compared item by item."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            sub = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append((sub, old.get(key, "<absent>"), new.get(key, "<absent>")))
            else:
                out += config_differences(old[key], new[key], sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and all(isinstance(x, dict) for x in old + new):
        out = []
        for i in range(max(len(old), len(new))):
            sub = f"{prefix}[{i}]"
            if i >= len(old) or i >= len(new):
                out.append((sub, old[i]["name"] if i < len(old) and "name" in old[i] else "<absent>",
                            new[i]["name"] if i < len(new) and "name" in new[i] else "<absent>"))
            else:
                out += config_differences(old[i], new[i], sub)
        return out
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 - JSON turns tuples into lists
    return [] if norm(old) == norm(new) else [(prefix, old, new)]


def trajectory_changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """The differences between a checkpoint's run config and the current one (both in
    ``to_dict`` form) that change the run's trajectory, i.e. all but
    :data:`RESUME_NEUTRAL_FIELDS`: batch size, seed, learning rates, stages, losses, model, ..."""
    return [d for d in config_differences(saved, current) if d[0] not in RESUME_NEUTRAL_FIELDS]
