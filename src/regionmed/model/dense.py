"""The grid head and the cell targets of grounding (issue 17: grounding that sees).

Everything region-level that regionmed reads off an image goes through the image tower's
feature grid ``(B, C, h, w)``: the patch–text map (``regionmed ground``, ``--rois self``,
the grounding evaluation), ``align`` ROI features, ``roi.grid_context`` and the ROI
processor's context. :class:`DenseHead` is a residual layer on that grid, so the
``grounding`` loss term (:func:`regionmed.losses.grounding_loss`) trains exactly what those
read. Projected by the image projection (a linear map), a cell lives in the same space as
the whole-image and ROI embeddings: the RoIAlign mean of projected cells over a box is the
projection of the RoIAlign feature, the ``align`` ROI token before the ROI processor.

Cell geometry: cell ``(i, j)`` of an ``h x w`` grid covers ``[j / w, (j + 1) / w] x
[i / h, (i + 1) / h]`` of the model's square (letterboxed) input, in the normalised
coordinates boxes reach the model in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from regionmed.model.config import DenseConfig

__all__ = ["DenseHead", "cell_coverage", "cell_centres_inside"]


class DenseHead(nn.Module):
    """``grid (B, C, h, w) -> grid + expand(GELU(x))`` (same shape); see
    :class:`~regionmed.model.config.DenseConfig` for ``x``. ``expand`` starts at zero: a new
    head is the identity, so adding one to a trained model changes nothing until it trains.

    ``logit_scale``: the grounding term's temperature (a log; :meth:`scale` = ``exp``, clamped
    at 100 as CLIP's)."""

    def __init__(self, width: int, cfg: DenseConfig):
        super().__init__()
        self.reduce = nn.Conv2d(width, cfg.width, 1)
        self.position = nn.Parameter(torch.zeros(1, cfg.width, cfg.position_grid, cfg.position_grid)) if cfg.position else None
        self.convs = nn.ModuleList(nn.Conv2d(cfg.width, cfg.width, 3, padding=1) for _ in range(cfg.layers))
        self.expand = nn.Conv2d(cfg.width, width, 1)
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = self.reduce(grid)
        if self.position is not None:
            pos = self.position
            if pos.shape[-2:] != x.shape[-2:]:  # another input size: the table resized to the grid
                pos = F.interpolate(pos, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + pos.to(x.dtype)
        for conv in self.convs:
            x = x + conv(F.gelu(x))
        return grid + self.expand(F.gelu(x))


def _overlap_1d(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """(..., ) intervals [lo, hi] in [0, 1] -> (..., n): the share of each of ``n`` equal cells covered."""
    edges = torch.arange(n + 1, device=lo.device, dtype=lo.dtype) / n
    left, right = edges[:-1], edges[1:]
    return ((torch.minimum(hi[..., None], right) - torch.maximum(lo[..., None], left)).clamp_min(0) * n).clamp(max=1)


def cell_coverage(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The share of each cell of an ``h x w`` grid that a box covers (exact area fractions).

    ``boxes``: ``(..., 4)`` normalised xyxy in [0, 1] -> ``(..., h, w)`` in [0, 1]. A box
    smaller than a cell gives that cell its area share (never 0 for a box of positive area)."""
    cov_x = _overlap_1d(boxes[..., 0], boxes[..., 2], w)  # (..., w)
    cov_y = _overlap_1d(boxes[..., 1], boxes[..., 3], h)  # (..., h)
    return cov_y[..., :, None] * cov_x[..., None, :]


def cell_centres_inside(content: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(B, 4)`` normalised xyxy boxes of each image's content in the letterboxed input ->
    ``(B, h, w)`` bool: the cells whose centre lies inside (cells of the padding are False).

    Masking the padding is what the grounding read-outs of BioViL (NaN) and RadZero (-999) do
    before the arg-max; a cell centre rule keeps the valid cells an equally spaced lattice."""
    cy = (torch.arange(h, device=content.device, dtype=content.dtype) + 0.5) / h
    cx = (torch.arange(w, device=content.device, dtype=content.dtype) + 0.5) / w
    inside_y = (cy[None, :] >= content[:, 1:2]) & (cy[None, :] <= content[:, 3:4])  # (B, h)
    inside_x = (cx[None, :] >= content[:, 0:1]) & (cx[None, :] <= content[:, 2:3])  # (B, w)
    return inside_y[:, :, None] & inside_x[:, None, :]


