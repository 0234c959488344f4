"""One optimisation step with the project's precision, clipping and non-finite handling.

Used by the trainer and by VQA fine-tuning, so both behave the same way:

* **precision** — ``fp32``, or ``bf16`` autocast (:meth:`GuardedStep.autocast`);
* **non-finite losses** — the loss terms are summed over data-parallel ranks
  first (one small all-reduce; the values logged are these global sums), so every
  rank takes the same decision; a non-finite total skips the step (no backward,
  gradients cleared) and ``max_nonfinite`` skips in a row raise
  :class:`NonFiniteError`;
* **backward** — of ``world_size × total``: with DDP averaging the gradients and
  the local loss of :mod:`regionmed.losses`, that is the gradient of the
  single-process loss on the union batch;
* **clipping** — of the global gradient norm to ``grad_clip`` (0 = off); a
  non-finite gradient norm also skips the step;
* **weights** — a finite gradient can still write NaN/inf into the weights (an
  overflowing learning rate): after each optimizer step the stepped weights are
  checked (one synchronisation) and :class:`NonFiniteWeightsError` is raised at
  once, so no caller goes on to save or use them (the step cannot be skipped: the
  optimizer already wrote).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from regionmed.distributed import all_reduce_sum, get_world_size
from regionmed.errors import RegionmedError
from regionmed.finite import nonfinite_tensors

__all__ = ["GuardedStep", "NonFiniteError", "NonFiniteWeightsError", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16")


class NonFiniteError(RegionmedError, RuntimeError):
    """Too many non-finite losses or gradients in a row."""


class NonFiniteWeightsError(NonFiniteError):
    """An optimizer step wrote NaN or inf into the weights."""


@dataclass
class GuardedStep:
    """``step(terms, optimizer, params)`` → the global loss values, or None if skipped."""

    precision: str = "fp32"
    grad_clip: float = 1.0
    max_nonfinite: int = 5
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    last_skip: str = ""  # why the last skipped step was skipped
    check_weights: bool = True  # check the stepped weights for NaN/inf after every optimizer step

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"grad_clip must be a finite number >= 0, got {self.grad_clip!r}")
        if self.max_nonfinite < 1:
            raise ValueError(f"max_nonfinite must be >= 1, got {self.max_nonfinite!r}")

    def autocast(self, device: torch.device | str):
        """The forward pass's precision context (bf16 autocast, or nothing)."""
        if self.precision == "bf16":
            return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, terms: Mapping[str, Tensor], optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter],
             where: str = "", backward: Callable[[float], None] | None = None) -> dict[str, float] | None:
        """Backward, clip and step on ``terms["total"]``; ``where`` names the step in errors.

        ``backward(factor)``, when given, replaces ``(factor * terms["total"]).backward()``
        (gradient accumulation: :func:`regionmed.task.accumulate`, whose ``terms`` carry no
        graph); it is called only when the total is finite.

        Returns every term's value summed over ranks (the single-process value on the
        union batch), or None when the step was skipped for a non-finite loss or
        gradient norm. Raises :class:`NonFiniteError` after ``max_nonfinite`` skips in
        a row, and :class:`NonFiniteWeightsError` when the optimizer step wrote NaN or
        inf into a weight. Every rank must call it (it holds one collective).
        """
        names = list(terms)
        values = all_reduce_sum(torch.stack([terms[n].detach().float() for n in names]))
        out = dict(zip(names, values.tolist()))
        if not math.isfinite(out["total"]):
            return self._skip(optimizer, f"non-finite loss ({out})", where)
        if backward is None:
            (terms["total"] * get_world_size()).backward()
        else:
            backward(float(get_world_size()))
        params = [p for p in params if p.requires_grad]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else torch.zeros(())
        if not torch.isfinite(norm).item():
            return self._skip(optimizer, f"non-finite gradient norm (loss {out['total']:.4g})", where)
        try:
            optimizer.step()
        except RuntimeError as err:  # a learning rate beyond float32 ("value cannot be converted ... without overflow")
            if "overflow" not in str(err):
                raise
            lrs = sorted({g["lr"] for g in optimizer.param_groups})
            raise NonFiniteWeightsError(f"{where + ': ' if where else ''}the optimizer step overflowed float32 with learning "
                                        f"rate(s) {lrs} ({err}): lower the learning rate; the weights are unusable") from err
        optimizer.zero_grad(set_to_none=True)
        if self.check_weights:
            bad = nonfinite_tensors((str(i), p) for i, p in enumerate(params))
            if bad:
                lrs = sorted({g["lr"] for g in optimizer.param_groups})
                raise NonFiniteWeightsError(
                    f"{where + ': ' if where else ''}the optimizer step wrote NaN/inf into {len(bad)} of {len(params)} "
                    f"trained weight tensors (gradient norm {float(norm):.4g}, learning rate(s) {lrs}): "
                    "lower the learning rate; the weights are unusable"
                )
        self.nonfinite_in_row = 0
        return out

    def _skip(self, optimizer: torch.optim.Optimizer, why: str, where: str) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        self.last_skip = f"{where + ': ' if where else ''}{why}, step skipped"
        if self.nonfinite_in_row >= self.max_nonfinite:
            raise NonFiniteError(
                f"{self.nonfinite_in_row} non-finite steps in a row (max_nonfinite = {self.max_nonfinite})"
                f"{' at ' + where if where else ''}: lower the learning rate or check the data"
            )
        return None
