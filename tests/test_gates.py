"""The ROI processor's gates: model.roi.gate_scale moves them gate_scale times faster under Adam,
and changes nothing else (the same initial gate values give the same outputs)."""

from __future__ import annotations

import pytest
import torch

from regionmed.config import ConfigError
from regionmed.model.config import RoiConfig
from regionmed.model.roi import ROIProcessor


def processor(scale: float, init: float = 0.0) -> ROIProcessor:
    torch.manual_seed(0)
    return ROIProcessor(16, RoiConfig(gate_init=init, gate_scale=scale))


def inputs():
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    return (torch.randn(2, 16, generator=g), torch.randn(2, 16, 3, 3, generator=g), torch.randn(2, 3, 16, generator=g),
            torch.rand(2, 3, 4, generator=g).sort(-1).values, mask)


def test_same_initial_gates_give_the_same_outputs_whatever_the_scale():
    a, b = processor(1.0, init=0.3), processor(50.0, init=0.3)
    torch.testing.assert_close(torch.stack(a.gates()), torch.stack(b.gates()))
    for x, y in zip(a(*inputs()), b(*inputs())):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_adam_moves_the_gate_about_scale_times_lr_per_step(scale):
    p = processor(scale)
    opt = torch.optim.Adam([p.global_gate, p.region_gate], lr=1e-3)
    for _ in range(10):
        opt.zero_grad()
        (-sum(p.gates())).backward()  # push both gates up
        opt.step()
    moved = torch.atanh(p.gates()[0].detach())  # the pre-tanh gate
    assert moved.item() == pytest.approx(scale * 10 * 1e-3, rel=0.05)


def test_gate_scale_must_be_positive():
    from regionmed.model.config import ModelConfig, validate_model_config

    cfg = ModelConfig()
    cfg.roi.gate_scale = 0.0
    with pytest.raises(ConfigError, match="model.roi.gate_scale"):
        validate_model_config(cfg, "test")


def test_context_grid_attends_to_the_pooled_grid():
    """model.roi.context_grid: the context is the grid average-pooled first, so a processor with
    context_grid=1 on a 3x3 grid gives what the plain processor gives on the grid's mean; a grid
    already no finer than context_grid is left as it is."""
    torch.manual_seed(0)
    pooled = ROIProcessor(16, RoiConfig(gate_init=0.5, context_grid=1))
    torch.manual_seed(0)
    plain = ROIProcessor(16, RoiConfig(gate_init=0.5))
    g, grid, rois, boxes, mask = inputs()
    mean = grid.mean(dim=(-2, -1), keepdim=True)
    for x, y in zip(pooled(g, grid, rois, boxes, mask), plain(g, mean, rois, boxes, mask)):
        torch.testing.assert_close(x, y)
    torch.manual_seed(0)
    coarse = ROIProcessor(16, RoiConfig(gate_init=0.5, context_grid=3))
    for x, y in zip(coarse(g, grid, rois, boxes, mask), plain(g, grid, rois, boxes, mask)):
        torch.testing.assert_close(x, y)
    assert not torch.allclose(pooled(g, grid, rois, boxes, mask)[1], plain(g, grid, rois, boxes, mask)[1])
