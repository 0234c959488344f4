"""open_clip interop: import an open_clip checkpoint (BiomedCLIP and kin) into a
:class:`~regionmed.model.clip.RegionMedCLIP`, export its global path back, and start a
model from a regionmed folder (``model.init_from``).

Supported open_clip architecture: ``CustomTextCLIP`` with

* a timm image tower (``vision_cfg.timm_model_name``; ``timm_pool`` = the model's default
  (``""``) or any timm global pooling; ``timm_proj`` = ``linear`` or ``mlp``, with or
  without ``timm_proj_bias``), and
* a Hugging Face text tower (``text_cfg.hf_model_name``; ``hf_pooler_type`` =
  ``cls_last_hidden_state_pooler``, ``mean_pooler`` or ``cls_pooler``; ``hf_proj_type`` =
  ``mlp``, ``linear`` or none).

That is BiomedCLIP's architecture (``vit_base_patch16_224`` with the ViT's class-token
pooling and a linear projection; PubMedBERT with CLS pooling and an MLP projection;
context 256). Refused with a :class:`InteropError` that says so: open_clip's own image or
text transformers (``ViT-B-32``, ``RN50``, ... as built by ``open_clip.CLIP``), attention
pooling (``abs_attn``/``rot_attn``), a timm classifier used as the projection
(``timm_proj`` empty/``none``), ``max_pooler``, the ``clips`` tokenizer mode, and SigLIP
models (a ``logit_bias``: regionmed's contrastive loss has no bias).

Name mapping (open_clip → regionmed)::

    visual.trunk.*          → image_tower.model.*
    visual.head.proj.*      → projections.image.*          (linear)
    visual.head.mlp.fc1/2.* → projections.image.fc1/2.*    (mlp)
    text.transformer.*      → text_tower.model.*
    text.proj.*             → projections.text.*           (linear)
    text.proj.0/2.*         → projections.text.fc1/2.*     (mlp)
    logit_scale             → logit_scale

The ROI processor has no counterpart: it starts new (with ``gate_init`` 0 the fused
embedding equals the global one at the start).

Preprocessing: open_clip resizes the short side (bicubic) and centre-crops; regionmed
letterboxes the whole image (:class:`~regionmed.data.transforms.Preprocessor`). The
normalisation (``preprocess_cfg`` mean/std) and the input size are carried over; for a
square image the two give the same framing, for others regionmed keeps the borders that
open_clip crops away. Embeddings are equal (to float rounding) on equal pixel tensors.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regionmed.config import ConfigError, to_dict
from regionmed.errors import RegionmedError
from regionmed.io import read_json
from regionmed.model.config import ImageTowerConfig, ModelConfig, ProjectionConfig, RoiConfig, TextTowerConfig
from regionmed.model.towers import WeightsError, check_state_dict, read_state_dict

log = logging.getLogger(__name__)

# open_clip's defaults (open_clip.model.CLIPVisionCfg / CLIPTextCfg / OPENAI_DATASET_MEAN/STD),
# applied where a config leaves a key out, as open_clip itself does.
_OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
_VISION_DEFAULTS = {"image_size": 224, "timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": False}
_TEXT_DEFAULTS = {"context_length": 77, "hf_proj_type": "mlp", "hf_pooler_type": "mean_pooler"}
_POOLERS = {"cls_last_hidden_state_pooler": "cls", "mean_pooler": "mean", "cls_pooler": "pooler"}

SUPPORTED = ("supported: open_clip CustomTextCLIP models with a timm image tower (vision_cfg.timm_model_name) and a "
             "Hugging Face text tower (text_cfg.hf_model_name), such as BiomedCLIP")

# What a state dict of open_clip's own towers (open_clip.CLIP: ViT-B-32, RN50, ...) holds.
_NATIVE_KEYS = ("token_embedding.", "positional_embedding", "text_projection", "transformer.resblocks.",
                "visual.conv1.", "visual.transformer.", "visual.layer1.", "text.token_embedding.")


class InteropError(RegionmedError, ValueError):
    """An open_clip checkpoint or config that regionmed cannot import (or a model it cannot export)."""


# -- config ---------------------------------------------------------------------------
def read_open_clip_config(path: str | Path) -> dict[str, Any]:
    """Read an open_clip config JSON: the hub form (``{"model_cfg": ..., "preprocess_cfg": ...}``,
    as ``open_clip_config.json`` of BiomedCLIP) or a bare model config (``{"embed_dim": ...,
    "vision_cfg": ..., "text_cfg": ...}``, as open_clip's ``model_configs/*.json``).

    Returns ``{"model_cfg": {...}, "preprocess_cfg": {...}}``. Raises :class:`InteropError`
    naming the file when it is missing, not JSON or has no model config."""
    path = Path(path)
    data = read_json(path, InteropError, "open_clip config")
    if isinstance(data, dict) and isinstance(data.get("model_cfg"), dict):
        return {"model_cfg": data["model_cfg"], "preprocess_cfg": data.get("preprocess_cfg") or {}}
    if isinstance(data, dict) and "embed_dim" in data:
        return {"model_cfg": data, "preprocess_cfg": {}}
    raise InteropError(f"{path}: neither an open_clip_config.json (model_cfg + preprocess_cfg) nor an open_clip model "
                       "config (embed_dim, vision_cfg, text_cfg)")


def model_config_from_open_clip(oc: Mapping[str, Any], roi: RoiConfig | None = None, source: str = "<open_clip config>",
                                text_name: str | None = None) -> ModelConfig:
    """The regionmed :class:`ModelConfig` of the open_clip model ``oc`` (as returned by
    :func:`read_open_clip_config`), with the ROI settings ``roi`` (default: regionmed's).

    Raises :class:`InteropError` naming ``source`` and the key for an architecture regionmed
    does not have (see the module docstring for the supported set)."""
    mc = dict(oc["model_cfg"])
    pre = dict(oc.get("preprocess_cfg") or {})
    vision = {**_VISION_DEFAULTS, **(mc.get("vision_cfg") or {})}
    text = {**_TEXT_DEFAULTS, **(mc.get("text_cfg") or {})}

    def refuse(key: str, msg: str) -> InteropError:
        return InteropError(f"{source}: {key} {msg}; {SUPPORTED}")

    if mc.get("init_logit_bias") is not None:
        raise refuse("init_logit_bias", "is set: a SigLIP model (sigmoid loss with a logit bias) cannot be imported, "
                     "regionmed's contrastive loss has no bias")
    if not vision.get("timm_model_name"):
        raise refuse("vision_cfg.timm_model_name", "is missing: open_clip's own vision transformer / ResNet "
                     "(ViT-B-32, RN50, ...) is not a regionmed image tower")
    if not text.get("hf_model_name"):
        raise refuse("text_cfg.hf_model_name", "is missing: open_clip's own text transformer (ViT-B-32, RN50, ...) is "
                     "not a regionmed text tower")
    pool = vision["timm_pool"]
    if pool in ("abs_attn", "rot_attn"):
        raise refuse("vision_cfg.timm_pool", f"is {pool!r}: attention pooling heads are not supported")
    proj = vision["timm_proj"]
    if proj not in ("linear", "mlp"):
        raise refuse("vision_cfg.timm_proj", f"is {proj!r}: only 'linear' and 'mlp' projections are supported "
                     "(not a timm classifier used as the projection)")
    pooler = text["hf_pooler_type"]
    if pooler not in _POOLERS:
        raise refuse("text_cfg.hf_pooler_type", f"is {pooler!r}: supported are {sorted(_POOLERS)}")
    if text.get("tokenizer_mode"):
        raise refuse("text_cfg.tokenizer_mode", f"is {text['tokenizer_mode']!r}: only the standard Hugging Face "
                     "tokenization is supported")
    if text.get("tokenizer_kwargs"):
        log.warning("%s: text_cfg.tokenizer_kwargs %s are not carried over (regionmed tokenises with the Hugging Face "
                    "tokenizer as saved)", source, text["tokenizer_kwargs"])
    hf_proj = text["hf_proj_type"]
    if hf_proj not in ("mlp", "linear", None):
        raise refuse("text_cfg.hf_proj_type", f"is {hf_proj!r}: supported are 'mlp', 'linear' and none")
    embed_dim = mc.get("embed_dim")
    if not isinstance(embed_dim, int) or embed_dim <= 0:
        raise InteropError(f"{source}: embed_dim is {embed_dim!r}: expected a positive integer")
    size = vision["image_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise InteropError(f"{source}: vision_cfg.image_size {size}: regionmed takes square inputs")
        size = size[0]
    image = ImageTowerConfig(
        name=vision["timm_model_name"], image_size=int(size), pretrained=None,
        mean=[float(v) for v in pre.get("mean", _OPENAI_MEAN)], std=[float(v) for v in pre.get("std", _OPENAI_STD)],
        global_pool=pool or None,  # "": open_clip leaves the timm model's own pooling
        # timm Mlp as open_clip builds it: hidden 2 x embed_dim, first layer with bias
        projection=ProjectionConfig(type=proj, bias=bool(vision["timm_proj_bias"]),
                                    hidden=2 * embed_dim if proj == "mlp" else None, hidden_bias=True),
    )
    text_cfg = TextTowerConfig(
        name=text_name or text["hf_model_name"], pretrained=False, context_length=int(text["context_length"]),
        pooling=_POOLERS[pooler],
        # HFTextEncoder's mlp: hidden (width + embed_dim) // 2, no biases (hidden set once the width is known)
        projection=ProjectionConfig(type=hf_proj or "none", bias=False, hidden=None, hidden_bias=False),
    )
    cfg = ModelConfig(embed_dim=embed_dim, image=image, text=text_cfg, roi=roi or RoiConfig())
    return cfg


def _text_width(text_dir: Path) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(text_dir)).hidden_size)


def _prepare_text_folder(text: Mapping[str, Any], text_dir: str | Path | None, out: Path, source: str) -> None:
    """Write the Hugging Face config and tokenizer of the text tower into ``out``: from
    ``text_dir`` when given, else from ``hf_model_name`` / ``hf_tokenizer_name`` (a local folder
    or the Hugging Face cache; offline)."""
    from transformers import AutoConfig, AutoTokenizer

    model_src = str(text_dir) if text_dir else text["hf_model_name"]
    tok_src = str(text_dir) if text_dir else (text.get("hf_tokenizer_name") or text["hf_model_name"])
    try:
        AutoConfig.from_pretrained(model_src).save_pretrained(out)
        AutoTokenizer.from_pretrained(tok_src).save_pretrained(out)
    except (OSError, ValueError) as err:
        raise InteropError(
            f"{source}: cannot read the text tower's config/tokenizer from {model_src!r} / {tok_src!r} offline ({err}); "
            "give a local folder holding the Hugging Face config.json and tokenizer files (--text-dir)"
        ) from err


# -- state dict -----------------------------------------------------------------------
def _rename_rules(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(open_clip prefix, regionmed prefix) pairs for ``cfg``'s projection types."""
    rules = [("visual.trunk.", "image_tower.model."), ("text.transformer.", "text_tower.model."),
             ("logit_scale", "logit_scale")]
    if cfg.image.projection.type == "linear":
        rules.append(("visual.head.proj.", "projections.image."))
    elif cfg.image.projection.type == "mlp":
        rules += [("visual.head.mlp.fc1.", "projections.image.fc1."), ("visual.head.mlp.fc2.", "projections.image.fc2.")]
    if cfg.text.projection.type == "linear":
        rules.append(("text.proj.", "projections.text."))
    elif cfg.text.projection.type == "mlp":
        rules += [("text.proj.0.", "projections.text.fc1."), ("text.proj.2.", "projections.text.fc2.")]
    return rules


def _read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an open_clip checkpoint (``.safetensors``, or ``.bin``/``.pt`` read with
    ``weights_only=True``; a training checkpoint's ``state_dict`` and DDP's ``module.``
    prefix are unwrapped)."""
    state = read_state_dict(path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def convert_open_clip_state_dict(state: Mapping[str, torch.Tensor], cfg: ModelConfig, expected: Mapping[str, torch.Tensor],
                                 source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Rename the open_clip tensors ``state`` to regionmed's names for ``cfg`` and check them
    against ``expected`` (name → tensor of the target model, ROI processor left out).

    Dropped with a log line: the text encoder's ``position_ids`` buffer and an unused BERT
    pooler (pooling other than ``pooler``). Raises :class:`InteropError` naming ``source`` for a
    SigLIP ``logit_bias``, open_clip's own towers, and every tensor that is unknown, missing
    or of another shape (the first few of each, with the counts)."""
    if "logit_bias" in state:
        raise InteropError(f"{source}: holds a logit_bias: a SigLIP model cannot be imported (regionmed's contrastive "
                           f"loss has no bias); {SUPPORTED}")
    native = sorted(k for k in state if k.startswith(_NATIVE_KEYS))
    if native:
        raise InteropError(f"{source}: holds open_clip's own tower weights (e.g. {native[0]!r}); {SUPPORTED}")
    rules = _rename_rules(cfg)
    out: dict[str, torch.Tensor] = {}
    unknown, dropped = [], []
    for key, value in state.items():
        if key.startswith("text.transformer.") and (
            key.endswith("embeddings.position_ids")
            or (key.startswith("text.transformer.pooler.") and cfg.text.pooling != "pooler")
        ):
            if key not in expected:
                dropped.append(key)
                continue
        for old, new in rules:
            if key == old or (old.endswith(".") and key.startswith(old)):
                out[new + key[len(old):]] = value
                break
        else:
            unknown.append(key)
    if dropped:
        log.info("%s: left out %d tensor(s) the regionmed model does not use: %s", source, len(dropped), dropped[:4])
    check_state_dict(out, expected, source, "the open_clip config", unknown=unknown, error_cls=InteropError)
    return {k: v.to(expected[k].dtype) for k, v in out.items()}


# The region-level parts of a regionmed model, which open_clip has no counterpart of.
REGION_PARTS = ("roi_processor.", "dense_head.")


def _global_path(key: str) -> bool:
    return not key.startswith(REGION_PARTS)


def _load_global_path(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                      with_parts: tuple[str, ...] = ()) -> None:
    """Load ``state`` (regionmed names) into ``model``: every tensor of the towers,
    projections and temperature must be there (and those of the region parts named in
    ``with_parts``, e.g. ``("roi_processor.",)``)."""
    target = {k: v for k, v in model.state_dict().items() if _global_path(k) or k.startswith(with_parts)}
    own = model.state_dict()
    # tensors of the model outside ``target`` (new region parts) are left alone, not "unexpected"
    check_state_dict({k: v for k, v in state.items() if k in target or k not in own}, target, source)
    model.load_state_dict({k: state[k] for k in target}, strict=False)


def import_open_clip(checkpoint: str | Path, config: str | Path, text_dir: str | Path | None = None,
                     roi: RoiConfig | None = None) -> "RegionMedCLIP":  # noqa: F821
    """Build a :class:`~regionmed.model.clip.RegionMedCLIP` holding the open_clip model of
    ``config`` (``open_clip_config.json`` or a model config JSON) with the weights of
    ``checkpoint`` (``open_clip_pytorch_model.bin``, ``.pt`` or ``.safetensors``), offline.

    ``text_dir``: a folder with the text tower's Hugging Face ``config.json`` and tokenizer
    (default: ``text_cfg.hf_model_name`` / ``hf_tokenizer_name`` as a local folder or from the
    Hugging Face cache). ``roi``: the new ROI processor's settings.

    The model's global path (``encode_image(...).global_``, ``encode_text``) gives open_clip's
    normalised ``encode_image`` / ``encode_text`` for the same pixels and token ids, and
    ``model.scale()`` its ``logit_scale.exp()`` (clamped to ``logit_scale_max``). Returned in
    eval mode. Raises :class:`InteropError` for an unsupported architecture or a checkpoint
    that does not fit the config."""
    from regionmed.model.clip import RegionMedCLIP

    oc = read_open_clip_config(config)
    cfg = model_config_from_open_clip(oc, roi, str(config))
    state = _read_checkpoint(checkpoint)
    scale = state.get("logit_scale")
    if scale is not None and scale.numel() == 1:
        value = float(scale.reshape(()))
        if abs(value) <= 20:
            cfg.logit_scale_init = value
    text = {**_TEXT_DEFAULTS, **(oc["model_cfg"].get("text_cfg") or {})}
    with tempfile.TemporaryDirectory() as tmp:
        _prepare_text_folder(text, text_dir, Path(tmp), str(config))
        if cfg.text.projection.type == "mlp":
            cfg.text.projection.hidden = (_text_width(Path(tmp)) + cfg.embed_dim) // 2
        try:
            model = RegionMedCLIP(cfg, text_source=tmp)
        except ConfigError as err:
            raise InteropError(f"{config}: the regionmed model cannot be built: {err}") from err
    expected = {k: v for k, v in model.state_dict().items() if _global_path(k)}
    converted = convert_open_clip_state_dict(state, cfg, expected, str(checkpoint))
    _load_global_path(model, converted, str(checkpoint))
    return model.eval()


def export_open_clip_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The global path of a regionmed model (towers, projections, temperature) under open_clip's
    names, for an open_clip ``CustomTextCLIP`` of the same architecture (the inverse of
    :func:`import_open_clip`; the ROI processor is left out: open_clip has none).

    Raises :class:`InteropError` for a projection open_clip's heads cannot express (an image
    MLP without a first-layer bias, a text MLP with biases or another hidden width, a
    linear text projection with a bias, a tower built with ``output_stride``)."""
    cfg: ModelConfig = model.cfg
    ip, tp = cfg.image.projection, cfg.text.projection
    if ip.type == "none":
        raise InteropError("model.image.projection.type 'none' has no open_clip counterpart (TimmModel: linear or mlp)")
    if cfg.image.output_stride is not None or "output_stride" in cfg.image.kwargs:
        raise InteropError("model.image.output_stride: open_clip's TimmModel builds the tower at its own stride, where "
                           "the same weights compute other features; export a model trained without output_stride")
    if ip.type == "mlp" and (not ip.hidden_bias or (ip.hidden or 2 * cfg.embed_dim) != 2 * cfg.embed_dim):
        raise InteropError("model.image.projection: open_clip's mlp head has hidden width 2 x embed_dim and a first-layer bias")
    width = model.text_tower.width
    if tp.type == "mlp" and (tp.bias or tp.hidden_bias or (tp.hidden or 2 * cfg.embed_dim) != (width + cfg.embed_dim) // 2):
        raise InteropError("model.text.projection: open_clip's mlp text head has hidden width (width + embed_dim) // 2 "
                           "and no biases")
    if tp.type == "linear" and tp.bias:
        raise InteropError("model.text.projection: open_clip's linear text head has no bias")
    inverse = [(new, old) for old, new in _rename_rules(cfg)]
    out = {}
    for key, value in model.state_dict().items():
        if not _global_path(key):
            continue
        for new, old in inverse:
            if key == new or (new.endswith(".") and key.startswith(new)):
                out[old + key[len(new):]] = value.detach().clone()
                break
        else:  # pragma: no cover - every non-ROI tensor has a rule
            raise InteropError(f"no open_clip name for {key!r}")
    return out


def open_clip_config(model: nn.Module) -> dict[str, Any]:
    """An ``open_clip_config.json`` mapping for :func:`export_open_clip_state_dict`'s weights
    (``hf_model_name`` is the model's ``text.name``: point it at a folder holding the text
    tower's config and tokenizer, e.g. the model folder's ``text/``)."""
    cfg: ModelConfig = model.cfg
    pooler = {v: k for k, v in _POOLERS.items()}[cfg.text.pooling]
    return {
        "model_cfg": {
            "embed_dim": cfg.embed_dim,
            "vision_cfg": {"timm_model_name": cfg.image.name, "timm_model_pretrained": False,
                           "timm_pool": cfg.image.global_pool or "", "timm_proj": cfg.image.projection.type,
                           "timm_proj_bias": cfg.image.projection.bias, "image_size": cfg.image.image_size},
            "text_cfg": {"hf_model_name": cfg.text.name, "hf_tokenizer_name": cfg.text.name, "hf_model_pretrained": False,
                         "hf_proj_type": None if cfg.text.projection.type == "none" else cfg.text.projection.type,
                         "hf_pooler_type": pooler, "context_length": cfg.text.context_length},
        },
        "preprocess_cfg": {"mean": list(cfg.image.mean), "std": list(cfg.image.std)},
    }


# -- model.init_from --------------------------------------------------------------------
# Fields that may differ between a run's model config and its init_from folder.
_FREE_FIELDS = {"image.pretrained", "image.grad_checkpointing", "image.crop_batchnorm", "text.name", "text.pretrained",
                "text.grad_checkpointing", "text.config_overrides", "logit_scale_init", "logit_scale_max", "init_from"}


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("kwargs", "config_overrides"):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def init_from_folder(cfg: ModelConfig) -> "RegionMedCLIP":  # noqa: F821
    """Build the model of ``cfg`` with the weights of the regionmed folder ``cfg.init_from``.

    The towers, projections and temperature come from the folder (its ``text/`` gives the
    text tower's config and tokenizer), the ROI processor too when the folder's ``roi``
    settings equal ``cfg.roi``, otherwise it starts new. Every tower/projection/preprocessing
    field of ``cfg`` (all but ``pretrained``, ``grad_checkpointing``, ``crop_batchnorm``,
    ``text.name``, ``text.config_overrides``, ``logit_scale_*``) must equal the folder's:
    otherwise :class:`~regionmed.config.ConfigError` names the first differing field with
    both values. A damaged or missing folder raises :class:`WeightsError`."""
    from regionmed.model.clip import CONFIG_NAME, TEXT_DIR, WEIGHTS_NAME, RegionMedCLIP, read_model_folder

    folder = Path(cfg.init_from)
    config_path = folder / CONFIG_NAME
    theirs, state = read_model_folder(folder, "model.init_from")
    if cfg.image.pretrained:
        raise ConfigError("model.image.pretrained and model.init_from are both set: the image tower would start from two "
                          "weights files; keep one")
    mine_flat, their_flat = _flat(to_dict(cfg)), _flat(to_dict(theirs))
    for key in sorted(set(mine_flat) | set(their_flat)):
        if key.startswith(("roi.", "dense.")) or key in _FREE_FIELDS:
            continue
        if mine_flat.get(key) != their_flat.get(key):
            raise ConfigError(f"model.{key} is {mine_flat.get(key)!r} but model.init_from's {config_path} has "
                              f"{their_flat.get(key)!r}: the model must have the architecture of the folder it starts from "
                              f"(copy its settings, e.g. from {folder / 'model.yaml'} when it was imported)")
    text_dir = folder / TEXT_DIR
    if not text_dir.is_dir():
        raise WeightsError(f"model.init_from: {text_dir} is missing (the text tower's config and tokenizer)")
    model = RegionMedCLIP(cfg, text_source=str(text_dir))
    weights = folder / WEIGHTS_NAME
    with_roi = dataclasses.asdict(theirs.roi) == dataclasses.asdict(cfg.roi) and cfg.roi.mode != "none"
    with_dense = dataclasses.asdict(theirs.dense) == dataclasses.asdict(cfg.dense) and cfg.dense.head != "none"
    parts = tuple(p for p, kept in (("roi_processor.", with_roi), ("dense_head.", with_dense)) if kept)
    state = {k: v for k, v in state.items() if _global_path(k) or k.startswith(parts)}
    _load_global_path(model, state, f"model.init_from: {weights}", with_parts=parts)
    log.info("model.init_from %s: towers, projections and temperature loaded; ROI processor %s; grid head %s", folder,
             "loaded" if with_roi else "new", "loaded" if with_dense else ("new" if cfg.dense.head != "none" else "none"))
    return model
