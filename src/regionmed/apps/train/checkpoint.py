"""Training checkpoints, written atomically, with no pickle.

A checkpoint is a folder ``<output>/checkpoints/step_NNNNNNNN/``::

    model/                 the model folder (RegionMedCLIP.save_pretrained)
    optimizer.safetensors  optimizer state tensors + the torch RNG state
    trainer_state.json     step, stage, counters, optimizer hyper-parameters,
                           Python and NumPy RNG states, the run config

It is written into a temporary sibling folder and renamed into place, then
``<output>/checkpoints/latest`` (a one-line text file) is replaced atomically.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file

from regionmed.data.shards import write_json_atomic
from regionmed.errors import RegionmedError
from regionmed.model.clip import WEIGHTS_NAME

LATEST = "latest"


class CheckpointError(RegionmedError, RuntimeError):
    pass


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npm = meta["numpy"]
    np.random.set_state((npm[0], np.asarray(npm[1], dtype=np.uint32), npm[2], npm[3], npm[4]))


def save_checkpoint(
    checkpoint_dir: str | Path, step: int, model, optimizer: torch.optim.Optimizer, trainer_state: dict, keep: int = 2
) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` (0 = all)."""
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp / "model")
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    rng_tensors, rng_meta = rng_state()
    save_file({**opt_tensors, **rng_tensors}, str(tmp / "optimizer.safetensors"))
    state = {**trainer_state, "step": step, "optimizer": opt_meta, "rng": rng_meta}
    write_json_atomic(tmp / "trainer_state.json", state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(final.name + "\n", encoding="utf-8")
    os.replace(latest_tmp, root / LATEST)
    if keep > 0:
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run/checkpoints folder whose ``latest`` names one."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "trainer_state.json").is_file():
            return candidate
        latest = candidate / LATEST
        if latest.is_file():
            target = candidate / latest.read_text(encoding="utf-8").strip()
            if (target / "trainer_state.json").is_file():
                return target
    raise CheckpointError(f"no checkpoint found at {path} (expected trainer_state.json or checkpoints/{LATEST})")


def load_checkpoint(path: str | Path, model, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model weights, optimizer and RNG states in place; return the trainer state."""
    folder = find_checkpoint(path)
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    missing, unexpected = load_model(model, str(folder / "model" / WEIGHTS_NAME), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tensors = load_file(str(folder / "optimizer.safetensors"))
    _restore_optimizer(optimizer, tensors, state["optimizer"])
    restore_rng(tensors, state["rng"])
    state["checkpoint"] = str(folder)
    return state
