"""Reading weights files and loading tensors into a model, with errors that name the file.

* :func:`read_state_dict` — tensors of a ``.safetensors`` file, or of a PyTorch file read with
  ``weights_only=True`` (never a pickle of objects);
* :func:`check_state_dict` — a state dict against the tensors a model expects, name by name;
* :func:`load_weights` — a regionmed ``model.safetensors`` into a model, strictly;
* :func:`load_global_path` — the towers, projections and temperature (the ROI processor
  optionally) from a state dict in regionmed's names.

Shared by the towers, the model folder format, the open_clip interop and the pretrained-weight
mappings, so none of them imports another for these.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model
from torch import nn

from regionmed.errors import RegionmedError
from regionmed.finite import nonfinite_tensors

__all__ = ["REGION_PARTS", "WeightsError", "check_state_dict", "is_global_key", "load_global_path", "load_weights",
           "read_state_dict"]


class WeightsError(RegionmedError, RuntimeError):
    """Pretrained weights that cannot be found or do not fit the model."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from ``.safetensors`` (preferred) or a PyTorch file with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:  # truncated, not weights
        raise WeightsError(f"weights file {path} cannot be read (truncated or not a weights file): {err}") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str,
                     what: str = "the model", unknown: Sequence[str] = (), unknown_label: str = "unknown tensors",
                     error_cls: type[Exception] = WeightsError) -> None:
    """Check that ``state`` fits ``expected`` (a model's state dict, or the part of it that must
    be loaded) name by name: no tensor missing, none the model lacks, every shape equal.

    ``unknown``: names of the source that no renaming rule took (reported first, as
    ``unknown_label``). Raises
    ``error_cls`` (default :class:`WeightsError`) starting with ``source`` and ``what``, giving
    each kind of problem with its count and the first three names (shapes: file vs model)."""
    extra = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = [f"{len(items)} {kind} (e.g. {items[:3]})" for kind, items in (
        (unknown_label, sorted(unknown)), ("tensors the model does not have", extra),
        ("missing tensors", missing), ("shape mismatches", shapes)) if items]
    if problems:
        raise error_cls(f"{source} does not fit {what}: {'; '.join(problems)}")


def load_weights(model: nn.Module, path: str | Path, device: str = "cpu") -> None:
    """Load the safetensors file ``path`` into ``model`` in place, strictly.

    The one loader of saved model weights (model folders and training checkpoints).
    Raises :class:`WeightsError` naming ``path`` when it is missing, truncated or not a
    safetensors file, when its tensors do not fit the model (missing or unexpected
    names, other shapes), or when a weight is not finite (NaN / inf)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} is missing")
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: cannot be read (truncated or not a safetensors file): {err}") from err
    except RuntimeError as err:  # load_state_dict: size mismatch
        lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
        raise WeightsError(
            f"{path} does not fit the model config: {'; '.join(lines[:3]) or err}"
            f"{f' (and {len(lines) - 3} more)' if len(lines) > 3 else ''}"
        ) from err
    if missing or unexpected:
        raise WeightsError(
            f"{path} does not fit the model config: missing {sorted(missing)[:5]}"
            f"{f' (+{len(missing) - 5})' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}"
            f"{f' (+{len(unexpected) - 5})' if len(unexpected) > 5 else ''}"
        )
    bad = nonfinite_tensors([*model.named_parameters(), *model.named_buffers()])
    if bad:
        raise WeightsError(f"{path}: {len(bad)} weight tensor(s) hold NaN or inf values (e.g. {bad[:3]}): the weights are unusable")


# The region-level parts of a regionmed model (which open_clip has no counterpart of).
REGION_PARTS = ("roi_processor.", "dense_head.")


def is_global_key(key: str) -> bool:
    """True for a state-dict key of the towers, projections or temperature (the global path),
    False for one of the region parts (:data:`REGION_PARTS`)."""
    return not key.startswith(REGION_PARTS)


def load_global_path(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                     with_parts: tuple[str, ...] = ()) -> None:
    """Load ``state`` (regionmed names) into ``model``: every tensor of the towers,
    projections and temperature must be there (and those of the region parts named in
    ``with_parts``, e.g. ``("roi_processor.",)``). Raises :class:`WeightsError` naming ``source``."""
    target = {k: v for k, v in model.state_dict().items() if is_global_key(k) or k.startswith(with_parts)}
    own = model.state_dict()
    # tensors of the model outside ``target`` (new region parts) are left alone, not "unexpected"
    check_state_dict({k: v for k, v in state.items() if k in target or k not in own}, target, source)
    model.load_state_dict({k: state[k] for k in target}, strict=False)
