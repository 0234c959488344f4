"""Training checkpoints, written atomically, with no pickle.

A checkpoint is a folder ``<output>/checkpoints/step_NNNNNNNN/``::

    model/                 the model folder (RegionMedCLIP.save_pretrained)
    optimizer.safetensors  optimizer state tensors + the torch RNG state
    trainer_state.json     step, stage, counters, optimizer hyper-parameters,
                           Python and NumPy RNG states, the run config

It is written into a temporary sibling folder (``.tmp_step_NNNNNNNN_<pid>``) and
renamed into place, then ``<output>/checkpoints/latest`` (a one-line text file) is
replaced atomically. A write killed midway leaves only its temporary folder, which
:func:`clean_stale_temporaries` removes when the next run starts. The final model
folder is written the same way (:func:`save_model_folder`).

Resuming (:func:`find_checkpoint`) takes the checkpoint ``latest`` names when it is
complete, else the newest complete one (with a warning).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from regionmed.data.shards import write_json_atomic
from regionmed.errors import RegionmedError
from regionmed.io import read_json
from regionmed.model.clip import CONFIG_NAME, WEIGHTS_NAME, load_weights

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TEMPORARY = (".tmp_step_*", f".{LATEST}.tmp*", ".model.tmp-*", ".model.old-*")


class CheckpointError(RegionmedError, RuntimeError):
    """A checkpoint that cannot be found, read or resumed from."""


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


def clean_stale_temporaries(*folders: str | Path) -> list[Path]:
    """Remove what interrupted writes left in ``folders`` (checkpoint and model temporaries;
    see :data:`_TEMPORARY`); return the removed paths. Call it before a run writes anything
    (one writer per output folder)."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for pattern in _TEMPORARY:
            for path in folder.glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def save_model_folder(model, dest: str | Path) -> Path:
    """``model.save_pretrained`` into ``dest`` atomically: written into a temporary sibling,
    then renamed into place (an existing ``dest`` is replaced only once the new one is
    complete)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".model.tmp-{os.getpid()}")
    old = dest.with_name(f".model.old-{os.getpid()}")
    for path in (tmp, old):
        if path.exists():
            shutil.rmtree(path)
    model.save_pretrained(tmp)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def save_checkpoint(
    checkpoint_dir: str | Path, step: int, model, optimizer: torch.optim.Optimizer, trainer_state: dict, keep: int = 2
) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it; keep the newest
    ``keep`` (0 = all) up to this step, and remove any of a later step (the abandoned future
    of a run resumed from an earlier checkpoint)."""
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp / "model")
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    rng_tensors, rng_meta = rng_state()
    save_file({**opt_tensors, **rng_tensors}, str(tmp / OPTIMIZER_NAME))
    state = {**trainer_state, "step": step, "optimizer": opt_meta, "rng": rng_meta}
    write_json_atomic(tmp / STATE_NAME, state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(final.name + "\n", encoding="utf-8")
    os.replace(latest_tmp, root / LATEST)
    # Older than the newest ``keep``, or past this step (the abandoned future of a run resumed
    # from an earlier checkpoint, or a damaged write): removed.
    folders = step_folders(root)
    newer = [f for f in folders if int(_STEP_DIR.match(f.name).group(1)) > step]
    older = [f for f in folders if f not in newer and f != final]
    for old in newer + (older[max(0, keep - 1):] if keep > 0 else []):
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why ``folder`` is not a complete, readable checkpoint (None when it is): a missing
    file, a ``trainer_state.json`` that is not JSON or has no step, a safetensors file
    whose header does not parse or that is shorter than its header says."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} does not exist"
    for rel in (STATE_NAME, OPTIMIZER_NAME, f"model/{WEIGHTS_NAME}", f"model/{CONFIG_NAME}"):
        if not (folder / rel).is_file():
            return f"{folder / rel} is missing"
    try:
        state = read_json(folder / STATE_NAME, CheckpointError, "the trainer state")
    except CheckpointError as err:
        return str(err)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{folder / STATE_NAME} has no integer 'step'"
    for rel in (OPTIMIZER_NAME, f"model/{WEIGHTS_NAME}"):
        try:
            with safe_open(str(folder / rel), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            return f"{folder / rel} cannot be read ({err})"
    return None


def step_folders(root: Path) -> list[Path]:
    """``step_N`` folders of ``root``, newest (highest N) first."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))] if root.is_dir() else []
    return [p for _, p in sorted(found, reverse=True)]


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from.

    ``path`` is a checkpoint folder (it must be complete), or a run folder / its
    ``checkpoints`` folder: then the checkpoint ``latest`` names when it is complete,
    else the newest complete ``step_N`` (a warning says which and why). Raises
    :class:`CheckpointError` naming what is missing or damaged when there is none."""
    path = Path(path)
    if (path / STATE_NAME).is_file():
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is incomplete or damaged: {problem}")
        return path
    for candidate in (path, path / "checkpoints"):
        latest = candidate / LATEST
        steps = step_folders(candidate)
        if not latest.is_file() and not steps:
            continue
        why = f"{latest} is missing"
        if latest.is_file():
            name = latest.read_text(encoding="utf-8", errors="replace").strip()
            target = candidate / name
            why = checkpoint_problem(target) if name and "/" not in name else f"{latest} holds {name!r}, not a checkpoint name"
            if why is None:
                return target
        problems = []
        for folder in steps:
            problem = checkpoint_problem(folder)
            if problem is None:
                log.warning("%s; resuming from the newest complete checkpoint, %s", why, folder)
                return folder
            problems.append(problem)
        raise CheckpointError(f"no complete checkpoint in {candidate}: {why}"
                              f"{'; ' + '; '.join(problems[:3]) if problems else ''}")
    raise CheckpointError(f"no checkpoint found at {path} (expected {STATE_NAME} or checkpoints/{LATEST})")


def load_checkpoint(path: str | Path, model, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model weights, optimizer and RNG states in place; return the trainer state.

    Raises :class:`CheckpointError` (or :class:`~regionmed.model.towers.WeightsError` for
    the model weights) naming the file that is damaged or does not fit."""
    folder = find_checkpoint(path)
    state = read_json(folder / STATE_NAME, CheckpointError, "the trainer state")
    load_weights(model, folder / "model" / WEIGHTS_NAME)
    try:
        tensors = load_file(str(folder / OPTIMIZER_NAME))
        _restore_optimizer(optimizer, tensors, state["optimizer"])
        restore_rng(tensors, state["rng"])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{folder}: optimizer or RNG state does not fit this run ({type(err).__name__}: {err})") from err
    state["checkpoint"] = str(folder)
    return state
