"""The dense grounding term and its cell geometry, on closed-form cases (issue 17)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from regionmed.data.loader import Batch
from regionmed.losses import LossInputs, compute_losses, grounding_loss
from regionmed.model.clip import RegionMedCLIP
from regionmed.model.dense import DenseHead, cell_centres_inside, cell_coverage
from regionmed.task import TrainingTask, grounding_phrase


@pytest.mark.parametrize("box, h, w, expected", [
    ([0.25, 0.0, 0.75, 0.5], 2, 2, [[0.5, 0.5], [0.0, 0.0]]),  # half of each top cell
    ([0.1, 0.1, 0.2, 0.2], 2, 2, [[0.04, 0.0], [0.0, 0.0]]),  # smaller than a cell: its area share
    ([0.0, 0.0, 1.0, 1.0], 2, 3, [[1.0] * 3] * 2),  # the whole image
    ([0.5, 0.5, 0.5, 0.9], 2, 2, [[0.0, 0.0], [0.0, 0.0]]),  # zero width: covers nothing
])
def test_cell_coverage_is_the_exact_area_share(box, h, w, expected):
    got = cell_coverage(torch.tensor(box), h, w)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)


def test_cell_coverage_sums_to_the_box_area_in_cells():
    boxes = torch.rand(50, 4).sort(dim=0).values.reshape(50, 4)
    boxes = torch.stack([boxes[:, 0], boxes[:, 1], boxes[:, 0] + 0.3 * boxes[:, 2], boxes[:, 1] + 0.3 * boxes[:, 3]], 1).clamp(0, 1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    torch.testing.assert_close(cell_coverage(boxes, 7, 5).sum((1, 2)) / 35, area, atol=1e-5, rtol=0)


def test_cells_of_the_letterbox_padding_are_masked():
    # a landscape image letterboxed into the square: content in the middle half of the rows
    valid = cell_centres_inside(torch.tensor([[0.0, 0.25, 1.0, 0.75]]), 4, 4)[0]
    assert valid.tolist() == [[False] * 4, [True] * 4, [True] * 4, [False] * 4]


def _one_image(cos_first: float, h: int = 2, w: int = 2):
    """Cells: cell (0, 0) has cosine ``cos_first`` with the phrase, every other cell 0."""
    phrase = torch.tensor([1.0, 0.0])
    other = torch.tensor([0.0, 1.0])
    first = torch.tensor([cos_first, math.sqrt(1 - cos_first**2)])
    cells = other.repeat(1, h, w, 1)
    cells[0, 0, 0] = first
    return cells, phrase.view(1, 1, 2)


def test_softmax_grounding_is_the_cross_entropy_of_the_spatial_softmax():
    s = 7.0
    cells, phrase = _one_image(0.8)
    target = torch.zeros(1, 1, 2, 2)
    target[0, 0, 0, 0] = 1.0
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss = grounding_loss(cells, valid, phrase, mask, target, s, 1.0)
    expected = -math.log(math.exp(s * 0.8) / (math.exp(s * 0.8) + 3 * math.exp(0.0)))
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # a padding cell is neither target nor competitor
    valid[0, 1, 1] = False
    loss = grounding_loss(cells, valid, phrase, mask, target, s, 1.0)
    assert loss.item() == pytest.approx(-math.log(math.exp(s * 0.8) / (math.exp(s * 0.8) + 2)), rel=1e-5, abs=1e-6)
    # a box over two cells, half each: the target is their area share
    target[0, 0, 0, 1] = 1.0
    valid[0, 1, 1] = True
    logp = torch.tensor([s * 0.8, 0.0, 0.0, 0.0]).log_softmax(0)
    loss = grounding_loss(cells, valid, phrase, mask, target, s, 1.0)
    assert loss.item() == pytest.approx(-(0.5 * logp[0] + 0.5 * logp[1]).item(), rel=1e-5, abs=1e-6)


def test_binary_grounding_is_the_mean_cell_cross_entropy():
    s = 5.0
    cells, phrase = _one_image(0.6)
    target = torch.zeros(1, 1, 2, 2)
    target[0, 0, 0, 0] = 1.0
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    loss = grounding_loss(cells, valid, phrase, torch.ones(1, 1, dtype=torch.bool), target, s, 1.0, mode="binary")
    logits = torch.tensor([s * 0.6, 0.0, 0.0, 0.0]) - s / 2
    expected = F.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0, 0, 0]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_rows_are_counted_once_and_the_local_loss_adds_up():
    torch.manual_seed(0)
    b, p, h, w, d = 6, 3, 4, 4, 8
    cells = F.normalize(torch.randn(b, h, w, d), dim=-1)
    phrases = F.normalize(torch.randn(b, p, d), dim=-1)
    mask = torch.rand(b, p) > 0.3
    target = cell_coverage(torch.tensor([0.1, 0.2, 0.6, 0.7]).repeat(b, p, 1), h, w)
    target[0, 0] = 0  # a real slot covering nothing is not counted
    valid = torch.ones(b, h, w, dtype=torch.bool)
    counted = mask.clone()
    counted[0, 0] = False
    n = int(counted.sum())
    whole = grounding_loss(cells, valid, phrases, mask, target, 10.0, n)
    halves = [grounding_loss(cells[s], valid[s], phrases[s], mask[s], target[s], 10.0, n) for s in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close(whole, sum(halves))
    per_row = [grounding_loss(cells[i:i + 1], valid[i:i + 1], phrases[i:i + 1, j:j + 1], mask[i:i + 1, j:j + 1],
                              target[i:i + 1, j:j + 1], 10.0, 1.0) for i in range(b) for j in range(p) if counted[i, j]]
    torch.testing.assert_close(whole, torch.stack(per_row).mean())


def test_unknown_mode_is_refused():
    cells, phrase = _one_image(0.5)
    with pytest.raises(ValueError, match="grounding mode"):
        grounding_loss(cells, torch.ones(1, 2, 2, dtype=torch.bool), phrase, torch.ones(1, 1, dtype=torch.bool),
                       torch.ones(1, 1, 2, 2), 1.0, 1.0, mode="presence")


def test_a_new_grid_head_leaves_the_grid_unchanged():
    cfg = tiny_model_config()
    head = DenseHead(16, cfg.dense)
    grid = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(head(grid), grid)
    head.expand.weight.data.normal_()
    assert not torch.allclose(head(grid), grid)


def _batch(boxes, labels, content, captions=None) -> Batch:
    k = max(len(b) for b in boxes)
    t = torch.zeros(len(boxes), k, 4)
    mask = torch.zeros(len(boxes), k, dtype=torch.bool)
    for i, bl in enumerate(boxes):
        for j, b in enumerate(bl):
            t[i, j] = torch.tensor(b)
            mask[i, j] = True
    flat = [lab for ls in labels for lab in ls]
    n = len(boxes)
    return Batch(images=torch.zeros(n, 3, 64, 64), boxes=t, roi_mask=mask, roi_crops=None, reports=[f"r{i}" for i in range(n)],
                 summaries=[f"s{i}" for i in range(n)], captions=captions or [f"c {x}" for x in flat],
                 roi_negatives=[[] for _ in flat], image_negatives=[[] for _ in range(n)], ids=[str(i) for i in range(n)],
                 region_labels=flat, content=torch.tensor(content))


def test_task_merges_boxes_of_one_phrase_and_masks_the_padding():
    cfg = tiny_model_config()
    cfg.dense.head = "conv"
    model = RegionMedCLIP(cfg)
    task = TrainingTask(model, 0, 0)
    task.set_stage({"grounding": 1.0}, use_rois=False)
    batch = _batch([[[0.0, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 0.75], [0.0, 0.5, 0.25, 0.75]], [[0.25, 0.25, 0.75, 0.75]]],
                   [["Nodule", " nodule ", "Left Lung"], ["Liver"]], [[0.0, 0.25, 1.0, 0.75], [0.0, 0.0, 1.0, 1.0]])
    inputs = task.loss_inputs(batch)
    h, w = inputs.cells.shape[1:3]
    assert inputs.phrase_mask.tolist() == [[True, False, True], [True, False, False]]
    union = torch.maximum(cell_coverage(batch.boxes[0, 0], h, w), cell_coverage(batch.boxes[0, 1], h, w))
    torch.testing.assert_close(inputs.phrase_target[0, 0], union)
    assert inputs.phrase_target[0, 1].abs().sum() == 0
    # the phrase of "Left Lung" is the grounding phrase of the label, encoded as text
    torch.testing.assert_close(inputs.phrases[0, 2], model.encode_text([grounding_phrase("Left Lung")])[0])
    assert not inputs.cell_valid[0, 0].any() and inputs.cell_valid[1].all()
    terms = compute_losses(inputs, {"grounding": 1.0})
    assert set(terms) == {"grounding", "total"} and torch.isfinite(terms["grounding"])


def test_caption_phrases_and_regions_without_a_label():
    cfg = tiny_model_config()
    model = RegionMedCLIP(cfg)  # no grid head: the term trains the tower's grid and the projection
    batch = _batch([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]], [["", "Liver"]], [[0.0, 0.0, 1.0, 1.0]],
                   captions=["a nodule in the left upper zone", "the liver"])
    assert TrainingTask(model, 0, 0)._grounding_phrases(batch) == ["a nodule in the left upper zone", "liver"]
    assert TrainingTask(model, 0, 0, grounding_text="caption")._grounding_phrases(batch) == batch.captions
    task = TrainingTask(model, 0, 0)
    task.set_stage({"grounding": 1.0, "global": 1.0}, use_rois=False)
    terms = task(batch)
    terms["total"].backward()
    assert model.projections["image"].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="grounding_text"):
        TrainingTask(model, 0, 0, grounding_text="both")


def test_loss_inputs_without_grounding_hold_no_cells():
    inputs = LossInputs(logit_scale=torch.tensor(1.0), image_fused=torch.zeros(1, 2), image_global=torch.zeros(1, 2),
                        report=torch.zeros(1, 2), report_ids=torch.zeros(1, dtype=torch.long))
    assert "grounding" not in compute_losses(inputs, {"global": 1.0, "grounding": 1.0})


@pytest.mark.parametrize("label, phrase", [("Left Lung", "left lung"), ("ActiveTuberculosis", "active tuberculosis"),
                                           ("obsolete_pulmonary_tuberculosis", "obsolete pulmonary tuberculosis"),
                                           ("Brain Non-enhancing Tumor", "brain non-enhancing tumor")])
def test_a_label_is_grounded_as_the_words_of_its_captions(label, phrase):
    """Training, evaluation and the builder's captions read a label by one rule (CamelCase and
    snake_case class names of detection exports become words)."""
    from regionmed.apps.curation.captions import label_words as caption_words
    from regionmed.task import grounding_phrase

    assert grounding_phrase(label) == caption_words(label) == phrase
