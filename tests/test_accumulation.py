"""Gradient accumulation for the contrastive losses: A micro-batches give the loss and the
gradient of the one large batch (open_clip's accum_freq; GradCache)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model_mapping
from regionmed.config import from_dict
from regionmed.data.loader import RegionSampleDataset, collate
from regionmed.data.transforms import Preprocessor
from regionmed.model.clip import RegionMedCLIP
from regionmed.model.config import ModelConfig
from regionmed.optim import GuardedStep
from regionmed.task import TrainingTask, accumulate, concat_loss_inputs, split_batch

ALL = {"global": 1.0, "summary": 0.5, "region": 1.0, "hard_negative": 1.0}


def make_task(text_dropout: float = 0.0, seed: int = 0) -> TrainingTask:
    data = tiny_model_mapping(text={"config_overrides": {"hidden_dropout_prob": text_dropout, "attention_probs_dropout_prob": text_dropout}})
    torch.manual_seed(seed)
    model = RegionMedCLIP(from_dict(ModelConfig, data))
    task = TrainingTask(model, max_negatives=3, max_image_negatives=2)
    task.set_stage(ALL, use_rois=True)
    return task.train()


def batch_of(data_dir, model, n):
    ds = RegionSampleDataset(str(data_dir), "train", Preprocessor.from_model(model), 3, max_image_negatives=2)
    return collate([ds[i] for i in range(n)], max_rois=model.cfg.roi.max_rois)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_split_batch_cuts_per_roi_fields_at_the_rows_roi_counts(phantom_data):
    task = make_task()
    batch = batch_of(phantom_data, task.model, 8)
    parts = split_batch(batch, 4)
    assert [len(p) for p in parts] == [2, 2, 2, 2]
    assert sum((p.captions for p in parts), []) == batch.captions
    assert sum((p.roi_negatives for p in parts), []) == batch.roi_negatives
    torch.testing.assert_close(torch.cat([p.roi_crops for p in parts]), batch.roi_crops)
    for p in parts:  # each part's per-ROI fields match its own mask
        assert len(p.captions) == int(p.roi_mask.sum()) == p.roi_crops.shape[0]
    with pytest.raises(ValueError, match="cannot be split into 3"):
        split_batch(batch, 3)


def test_concat_of_micro_batch_inputs_equals_the_large_batch_inputs(phantom_data):
    task = make_task()
    batch = batch_of(phantom_data, task.model, 8)
    with torch.no_grad():
        whole = task.loss_inputs(batch)
        joined = concat_loss_inputs([task.loss_inputs(p) for p in split_batch(batch, 2)])
    for name in ("image_fused", "report", "report_ids", "roi", "roi_mask", "caption", "roi_negatives", "image_negatives_mask"):
        torch.testing.assert_close(getattr(joined, name), getattr(whole, name), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parts", [2, 4])
def test_accumulated_loss_and_gradient_equal_the_large_batch(phantom_data, parts):
    """Loss within 1e-5 and every gradient within 1e-4 of one batch of A x B rows."""
    task = make_task()
    batch = batch_of(phantom_data, task.model, 8)
    terms = task(batch)
    terms["total"].backward()
    want = grads(task.model)
    task.model.zero_grad(set_to_none=True)

    acc = accumulate(task, task, split_batch(batch, parts))
    for name, value in terms.items():
        torch.testing.assert_close(acc.terms[name], value.detach(), atol=1e-5, rtol=0)
    acc.backward(1.0)
    got = grads(task.model)
    assert got.keys() == want.keys()
    assert "logit_scale" in got  # the temperature's gradient counted once, not A times
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
    assert len(acc.pass_totals) == parts


def test_recomputed_passes_reuse_the_dropout_masks_of_the_cached_features(phantom_data):
    """With dropout on, each recomputing pass sees the features it cached (the RNG state is
    restored), so every pass's whole-batch loss equals the cached one."""
    task = make_task(text_dropout=0.3)
    batch = batch_of(phantom_data, task.model, 8)
    acc = accumulate(task, task, split_batch(batch, 2))
    acc.backward(1.0)
    total = float(acc.terms["total"])
    assert acc.pass_totals == pytest.approx([total, total], abs=1e-5)
    # Without the restore the two passes would draw new masks and differ:
    task.model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    fresh = [float(task(batch)["total"].detach()) for _ in range(2)]
    assert abs(fresh[0] - fresh[1]) > 1e-4


def test_guarded_step_with_accumulation_matches_the_large_batch_step(phantom_data):
    """One optimizer step through GuardedStep (clipping included): the same weights after it
    either way. SGD, whose step is linear in the gradient (Adam's first step is about
    lr x sign(g), which float rounding can flip where g is ~0)."""
    results = []
    for parts in (1, 2):
        task = make_task()
        opt = torch.optim.SGD(task.model.parameters(), lr=0.5)
        batch = batch_of(phantom_data, task.model, 8)
        guard = GuardedStep(grad_clip=1.0)
        if parts == 1:
            out = guard.step(task(batch), opt, task.model.parameters())
        else:
            acc = accumulate(task, task, split_batch(batch, parts))
            out = guard.step(acc.terms, opt, task.model.parameters(), backward=acc.backward)
        results.append((out, {n: p.detach().clone() for n, p in task.model.named_parameters()}))
    (a, wa), (b, wb) = results
    assert a["total"] == pytest.approx(b["total"], abs=1e-5)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-5, rtol=1e-4)
