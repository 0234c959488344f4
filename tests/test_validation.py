"""Validation in the training loop: loss terms and R@1 on a held-out split, without
touching the training run's random state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from conftest import tiny_model_config
from regionmed.apps.train.validation import ValidationConfig, Validator, _subset, validate_validation_config
from regionmed.config import ConfigError
from regionmed.data.loader import collate
from regionmed.data.transforms import Preprocessor
from regionmed.model.clip import RegionMedCLIP
from regionmed.task import TrainingTask

ALL = {"global": 1.0, "summary": 0.5, "region": 1.0, "hard_negative": 1.0}


def setup(phantom_data, max_samples=16, batch_size=8, use_rois=True):
    torch.manual_seed(0)
    model = RegionMedCLIP(tiny_model_config())
    task = TrainingTask(model, 3, 2)
    task.set_stage(ALL if use_rois else {"global": 1.0}, use_rois=use_rois)
    cfg = ValidationConfig(every=5, split="test", max_samples=max_samples)
    val = Validator(cfg, str(phantom_data), Preprocessor.from_model(model), batch_size, model.cfg.roi.max_rois, 3, 2)
    return task, val


def test_figures_of_a_stage_with_rois(phantom_data):
    task, val = setup(phantom_data)
    out = val.run(task)
    assert out["samples"] == 16 and out["bad_samples"] == 0
    assert {"loss.total", "loss.global", "loss.region", "i2t_R@1", "t2i_R@1", "region_i2t_R@1"} <= set(out)
    for key in ("i2t_R@1", "t2i_R@1", "region_i2t_R@1", "region_t2i_R@1"):
        assert 0.0 <= out[key] <= 1.0
    assert out["regions"] > 0
    assert val.run(task) == out  # the same subset, the same weights: the same figures


def test_a_global_stage_has_no_region_figures(phantom_data):
    task, val = setup(phantom_data, use_rois=False)
    out = val.run(task)
    assert "loss.global" in out and "loss.region" not in out and "region_i2t_R@1" not in out


def test_loss_is_the_mean_over_full_batches_of_the_eval_mode_loss(phantom_data):
    """Cross-check against the task's own forward on the same two batches, in eval mode."""
    task, val = setup(phantom_data, max_samples=16, batch_size=8)
    out = val.run(task)
    task.model.eval()
    with torch.no_grad():
        want = [float(task(collate([val.data[i] for i in val.indices[s : s + 8]], max_rois=3))["total"]) for s in (0, 8)]
    assert out["loss.total"] == pytest.approx(sum(want) / 2, abs=1e-5)


def test_validation_leaves_the_training_state_as_it_was(phantom_data):
    task, val = setup(phantom_data)
    task.model.train()

    def draws(validate_first: bool):
        torch.manual_seed(123)
        random.seed(123)
        np.random.seed(123)
        if validate_first:
            val.run(task)
        return torch.rand(3), random.random(), float(np.random.rand())

    (t0, r0, n0), (t1, r1, n1) = draws(False), draws(True)
    assert torch.equal(t0, t1) and r0 == r1 and n0 == n1
    assert task.model.training


def test_subset_is_fixed_and_spread_over_the_split():
    idx = _subset(1000, 10)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 999
    assert _subset(5, 10) == [0, 1, 2, 3, 4] and _subset(5, 0) == [0, 1, 2, 3, 4]


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="validation.every"):
        validate_validation_config(ValidationConfig(every=-1))
    with pytest.raises(ConfigError, match="validation.split"):
        validate_validation_config(ValidationConfig(every=3, split=" "))
