"""open_clip interop: import an open_clip checkpoint (BiomedCLIP and kin) into a
:class:`~regionmed.model.clip.RegionMedCLIP` and export its global path back (a model that
starts from the imported folder: ``model.init_from``, :func:`regionmed.model.clip.init_from_folder`).

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

import logging
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regionmed.config import ConfigError
from regionmed.errors import RegionmedError
from regionmed.io import read_json
from regionmed.model.clip import RegionMedCLIP
from regionmed.model.config import ImageTowerConfig, ModelConfig, ProjectionConfig, RoiConfig, TextTowerConfig
from regionmed.model.towers import check_tokenizer
from regionmed.model.weights import WeightsError, check_state_dict, is_global_key, load_global_path, read_state_dict

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
    for key in ("vision_cfg", "text_cfg"):
        _check_type(source, f"model_cfg.{key}", mc.get(key), (dict, type(None)), "a mapping")
    _check_type(source, "preprocess_cfg", oc.get("preprocess_cfg"), (dict, type(None)), "a mapping")
    pre = dict(oc.get("preprocess_cfg") or {})
    vision = {**_VISION_DEFAULTS, **(mc.get("vision_cfg") or {})}
    text = {**_TEXT_DEFAULTS, **(mc.get("text_cfg") or {})}
    _check_fields(source, mc, vision, text, pre)

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


_STR, _OPT_STR, _BOOL = (str,), (str, type(None)), (bool,)
# (section, key, allowed types, what the key must be): checked before any value is used, so that
# a value of another type is a one-line error naming the key, never a traceback or a silent cast.
_FIELD_TYPES = (
    ("vision_cfg", "timm_model_name", _OPT_STR, "a timm model name"),
    ("vision_cfg", "timm_pool", _OPT_STR, "a timm pooling name (or empty)"),
    ("vision_cfg", "timm_proj", _OPT_STR, "'linear' or 'mlp'"),
    ("vision_cfg", "timm_proj_bias", _BOOL, "true or false"),
    ("text_cfg", "hf_model_name", _OPT_STR, "a Hugging Face model name or folder"),
    ("text_cfg", "hf_tokenizer_name", _OPT_STR, "a Hugging Face tokenizer name or folder"),
    ("text_cfg", "hf_pooler_type", _OPT_STR, "a pooler name"),
    ("text_cfg", "hf_proj_type", _OPT_STR, "'mlp', 'linear' or null"),
    ("text_cfg", "tokenizer_mode", _OPT_STR, "a tokenizer mode or null"),
    ("text_cfg", "tokenizer_kwargs", (dict, type(None)), "a mapping or null"),
)


def _check_type(source: str, key: str, value: Any, types: tuple, what: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise InteropError(f"{source}: {key} is {value!r}: expected {what}")


def _positive_int(source: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InteropError(f"{source}: {key} is {value!r}: expected a positive integer")
    return value


def _check_fields(source: str, mc: Mapping[str, Any], vision: Mapping[str, Any], text: Mapping[str, Any],
                  pre: Mapping[str, Any]) -> None:
    """Every value the import reads has its type: :class:`InteropError` naming the key otherwise."""
    sections = {"vision_cfg": vision, "text_cfg": text}
    for section, key, types, what in _FIELD_TYPES:
        _check_type(source, f"{section}.{key}", sections[section].get(key), types, what)
    _positive_int(source, "embed_dim", mc.get("embed_dim"))
    _positive_int(source, "text_cfg.context_length", text["context_length"])
    size = vision["image_size"]
    if isinstance(size, (list, tuple)):
        for i, v in enumerate(size):
            _positive_int(source, f"vision_cfg.image_size[{i}]", v)
    else:
        _positive_int(source, "vision_cfg.image_size", size)
    bias = mc.get("init_logit_bias")
    if bias is not None and (isinstance(bias, bool) or not isinstance(bias, (int, float))):
        raise InteropError(f"{source}: init_logit_bias is {bias!r}: expected a number or null")
    for key in ("mean", "std"):
        value = pre.get(key)
        if value is None:
            continue
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
                or (key == "std" and not all(v > 0 for v in value))):
            rule = "3 positive numbers" if key == "std" else "3 finite numbers"
            raise InteropError(f"{source}: preprocess_cfg.{key} is {value!r}: expected a list of {rule} (R, G, B)")


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
        hf_config = AutoConfig.from_pretrained(model_src)
        tokenizer = AutoTokenizer.from_pretrained(tok_src)
    except (OSError, ValueError) as err:
        raise InteropError(
            f"{source}: cannot read the text tower's config/tokenizer from {model_src!r} / {tok_src!r} offline ({err}); "
            "give a local folder holding the Hugging Face config.json and tokenizer files (--text-dir)"
        ) from err
    try:  # a folder without its vocabulary files gives a tokenizer of a few special tokens
        check_tokenizer(tokenizer, hf_config, f"{source}: the text tower's tokenizer from {tok_src!r}")
    except WeightsError as err:
        raise InteropError(str(err)) from None
    hf_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


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


def import_open_clip(checkpoint: str | Path, config: str | Path, text_dir: str | Path | None = None,
                     roi: RoiConfig | None = None) -> RegionMedCLIP:
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
    expected = {k: v for k, v in model.state_dict().items() if is_global_key(k)}
    converted = convert_open_clip_state_dict(state, cfg, expected, str(checkpoint))
    load_global_path(model, converted, str(checkpoint))
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
        if not is_global_key(key):
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
