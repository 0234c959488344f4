"""ROI features and the ROI processor (METHOD.md, "ROI features" and "ROI processor").

Boxes reach the model normalised to the model's input frame: ``(B, K, 4)``
``x0, y0, x1, y1`` in [0, 1], with a ``(B, K)`` validity mask (padding = False).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import roi_align

from regionmed.model.config import RoiConfig

GEOMETRY_FREQS = (1.0, 2.0, 4.0)


def box_geometry_features(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` normalised xyxy → ``(..., 9 + 4 * len(GEOMETRY_FREQS))`` geometry features:
    corners, centre, size, log-area and sin/cos of the centre at a few frequencies."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = (x1 - x0).clamp_min(0), (y1 - y0).clamp_min(0)
    feats = [x0, y0, x1, y1, cx, cy, w, h, torch.log(w * h + 1e-4)]
    for f in GEOMETRY_FREQS:
        feats += [torch.sin(math.pi * f * cx), torch.cos(math.pi * f * cx), torch.sin(math.pi * f * cy), torch.cos(math.pi * f * cy)]
    return torch.stack(feats, dim=-1)


GEOMETRY_DIM = 9 + 4 * len(GEOMETRY_FREQS)


def align_roi_features(grid: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor, output: int) -> torch.Tensor:
    """RoIAlign over the patch grid ``(B, C, h, w)`` for the valid boxes → ``(N_valid, C)``."""
    b_idx, k_idx = mask.nonzero(as_tuple=True)
    h, w = grid.shape[-2:]
    scale = boxes.new_tensor([w, h, w, h])
    rois = torch.cat([b_idx.to(boxes.dtype).unsqueeze(1), boxes[b_idx, k_idx] * scale], dim=1)
    pooled = roi_align(grid, rois.to(grid.dtype), output_size=output, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return pooled.mean(dim=(2, 3))


def scatter_rois(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put ``(N_valid, C)`` rows back into a zero-padded ``(B, K, C)`` tensor."""
    out = values.new_zeros(*mask.shape, values.shape[-1])
    out[mask] = values
    return out


class ROIProcessor(nn.Module):
    """Fuse region features with the global context by gated cross-attention both ways.

    * region ← context: each ROI token attends over the global patch tokens;
      ``roi = roi + tanh(g_r) * attn``;
    * global ← regions: the pooled global token attends over the ROI tokens;
      ``fused = global + tanh(g_g) * attn``.

    Gates start at ``cfg.gate_init`` (0: the model starts as plain CLIP). Each gate is
    ``cfg.gate_scale × raw`` (a reparametrisation: Adam moves ``raw`` by about the learning
    rate per step whatever its gradient's size, so the gate moves ``gate_scale`` times
    faster; as a per-parameter learning-rate multiplier, without an optimizer change).
    Padded ROIs are masked; an image with no ROI gets ``fused == global`` exactly.
    With ``cfg.context_grid`` the context is the grid average-pooled to at most that many
    cells a side (the attention's keys and values cost a tower-width projection per cell).

    With ``cfg.box_geometry`` (default) each ROI token first gets ``geometry(box features)``
    added (:func:`box_geometry_features`); without it there is no ``geometry`` module and the
    boxes enter only through the pixels they select.
    """

    def __init__(self, width: int, cfg: RoiConfig):
        super().__init__()
        heads = cfg.num_heads if width % cfg.num_heads == 0 else 1
        # cfg.box_geometry False: no box-coordinate features at all (the token holds only pixel features)
        self.geometry = (nn.Sequential(nn.Linear(GEOMETRY_DIM, width), nn.GELU(), nn.Linear(width, width))
                         if cfg.box_geometry else None)
        self.roi_norm = nn.LayerNorm(width)
        self.context_norm = nn.LayerNorm(width)
        self.region_from_context = nn.MultiheadAttention(width, heads, batch_first=True)
        self.gate_scale = float(cfg.gate_scale)
        self.context_grid = cfg.context_grid
        self.region_gate = nn.Parameter(torch.tensor(float(cfg.gate_init) / self.gate_scale))
        self.global_norm = nn.LayerNorm(width)
        self.region_kv_norm = nn.LayerNorm(width)
        self.global_from_regions = nn.MultiheadAttention(width, heads, batch_first=True)
        self.global_gate = nn.Parameter(torch.tensor(float(cfg.gate_init) / self.gate_scale))

    def gates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate values ``(tanh(scale · g_global), tanh(scale · g_region))``, each in (-1, 1)."""
        return torch.tanh(self.gate_scale * self.global_gate), torch.tanh(self.gate_scale * self.region_gate)

    def forward(
        self, pooled: torch.Tensor, grid: torch.Tensor, roi_feats: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pooled (B, C), grid (B, C, h, w), roi_feats (B, K, C), boxes (B, K, 4), mask (B, K)
        → fused (B, C), rois (B, K, C) (padded rows are zero)."""
        mask = mask.bool()
        if mask.shape[1] == 0:
            return pooled, roi_feats
        rois = roi_feats
        if self.geometry is not None:
            rois = rois + self.geometry(box_geometry_features(boxes).to(roi_feats.dtype))
        if self.context_grid is not None and (grid.shape[-2] > self.context_grid or grid.shape[-1] > self.context_grid):
            grid = torch.nn.functional.adaptive_avg_pool2d(
                grid, (min(grid.shape[-2], self.context_grid), min(grid.shape[-1], self.context_grid)))
        context = self.context_norm(grid.flatten(2).transpose(1, 2))
        attn, _ = self.region_from_context(self.roi_norm(rois), context, context, need_weights=False)
        rois = (rois + torch.tanh(self.gate_scale * self.region_gate) * attn) * mask.unsqueeze(-1)

        has_roi = mask.any(dim=1)
        # A row with every key masked gives NaN; unmask one padded key there and zero the result.
        key_padding = ~mask
        key_padding[:, 0] &= has_roi
        kv = self.region_kv_norm(rois)
        g_attn, _ = self.global_from_regions(
            self.global_norm(pooled).unsqueeze(1), kv, kv, key_padding_mask=key_padding, need_weights=False
        )
        g_attn = g_attn.squeeze(1) * has_roi.unsqueeze(-1).to(g_attn.dtype)
        fused = pooled + torch.tanh(self.gate_scale * self.global_gate) * g_attn
        return fused, rois
