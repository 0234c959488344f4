"""Loss terms against closed forms and their defining properties (single process)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

import regionmed.losses as losses_mod
from regionmed.distributed import gather_tensor, gather_with_grad
from regionmed.losses import (
    LOSS_NAMES,
    LossInputs,
    compute_losses,
    local_infonce,
    multi_positive_infonce,
    text_ids,
)

ALL_WEIGHTS = {"global": 1.0, "summary": 0.5, "region": 2.0, "hard_negative": 0.25}


def unit(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return F.normalize(x, dim=-1)


def clip_loss(a, b, scale):
    logits = scale * a @ b.t()
    target = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


ROIS_PER_IMAGE = (2, 0, 3, 1)  # ragged, with an image without any region


def make_inputs(B=4, K=3, N=3, M=2, D=8, requires_grad=False, rois=ROIS_PER_IMAGE) -> LossInputs:
    """Fixed-shape inputs: K ROI slots per image, ``rois[i]`` of them real; padding slots
    hold random (finite) values, so a padding leak would change the results."""

    def leaf(t):
        return t.clone().requires_grad_(requires_grad)

    roi_mask = torch.zeros(B, K, dtype=torch.bool)
    for i in range(B):
        roi_mask[i, : rois[i % len(rois)]] = True
    neg_mask = roi_mask[..., None].expand(B, K, N).clone()
    neg_mask[0, 1, 1:] = False  # ragged negatives
    img_neg_mask = torch.ones(B, M, dtype=torch.bool)
    img_neg_mask[1, 1:] = False
    caption_ids = torch.tensor([1, 2, 1, 3, 4, 5, 6, 7, 8, 9, 1, 2] * K)[: B * K].reshape(B, K)
    return LossInputs(
        logit_scale=leaf(torch.tensor(7.0)),
        image_fused=leaf(unit(B, D, seed=1)),
        image_global=leaf(unit(B, D, seed=2)),
        report=leaf(unit(B, D, seed=3)),
        report_ids=torch.tensor([10, 11, 10, 12, 13, 11, 14, 15][:B]),
        summary=leaf(unit(B, D, seed=4)),
        summary_ids=torch.arange(B),
        roi=leaf(unit(B, K, D, seed=5)),
        roi_mask=roi_mask,
        caption=leaf(unit(B, K, D, seed=6)),
        caption_ids=caption_ids,
        roi_negatives=leaf(unit(B, K, N, D, seed=7)),
        roi_negatives_mask=neg_mask,
        image_negatives=leaf(unit(B, M, D, seed=8)),
        image_negatives_mask=img_neg_mask,
    )


def valid(inp: LossInputs, name: str) -> torch.Tensor:
    """The real ROI rows of a per-slot field, flattened in batch order."""
    return getattr(inp, name)[inp.roi_mask]


# --- multi_positive_infonce: closed forms ------------------------------------


def test_two_by_two_identity_closed_form():
    eye = torch.eye(2)
    # logits = I: each row's CE is -log(e / (e + 1)) = log(1 + e^-1), both directions.
    loss = multi_positive_infonce(eye, eye, None, torch.tensor([0, 1]), 1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_two_by_two_asymmetric_closed_form():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # scale 2: logits = [[2, 1.2], [0, 1.6]]
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    rows = (-2 + lse(2, 1.2)) + (-1.6 + lse(0, 1.6))
    cols = (-2 + lse(2, 0)) + (-1.6 + lse(1.2, 1.6))
    expected = 0.5 * (rows / 2 + cols / 2)
    loss = multi_positive_infonce(a, b, None, torch.tensor([5, 6]), torch.tensor(2.0))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_three_by_three_duplicate_text_closed_form():
    # Texts 0 and 1 are identical (same id); logits = scale * I with scale 1.
    eye = torch.eye(3)
    ids = torch.tensor([7, 7, 9])
    e = math.e
    # rows 0 and 1: target (1/2, 1/2, 0) over logits e.g. (1, 0, 0):
    #   -(1/2)(1 - lse) - (1/2)(0 - lse) = lse - 1/2, lse = log(e + 2)
    # row 2: -(1 - log(e + 2))
    lse = math.log(e + 2)
    per_dir = (2 * (lse - 0.5) + (lse - 1)) / 3
    loss = multi_positive_infonce(eye, eye, None, ids, 1.0)
    assert loss.item() == pytest.approx(per_dir, abs=1e-6)  # both directions are equal here


@pytest.mark.parametrize("n", [1, 3, 16])
def test_distinct_ids_equal_clip(n):
    a, b = unit(n, 8, seed=1), unit(n, 8, seed=2)
    scale = torch.tensor(14.3)
    ids = text_ids([f"text {i}" for i in range(n)])
    got = multi_positive_infonce(a, b, None, ids, scale)
    torch.testing.assert_close(got, clip_loss(a, b, scale), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(multi_positive_infonce(a, b, None, None, scale), got)


def test_duplicate_ids_are_positives_soft_target_ce():
    a, b = unit(5, 8, seed=3), unit(5, 8, seed=4)
    ids = torch.tensor([3, 8, 3, 9, 3])
    scale = 10.0
    logits = scale * a @ b.t()
    same = (ids[:, None] == ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)  # uniform over identical texts
    expected = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    got = multi_positive_infonce(a, b, None, ids, scale)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # ... and it is not the CLIP loss, which would treat the duplicates as negatives.
    assert abs(got.item() - clip_loss(a, b, scale).item()) > 1e-3


def test_a_ids_add_positives():
    a, b = unit(4, 8, seed=5), unit(4, 8, seed=6)
    a_ids = torch.tensor([0, 0, 1, 2])
    b_ids = torch.tensor([5, 6, 7, 7])
    logits = 3.0 * a @ b.t()
    same = ((a_ids[:, None] == a_ids[None, :]) | (b_ids[:, None] == b_ids[None, :])).float()
    target = same / same.sum(1, keepdim=True)
    expected = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    torch.testing.assert_close(multi_positive_infonce(a, b, a_ids, b_ids, 3.0), expected)


def test_extra_negatives_closed_form_and_effect():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = a.clone()
    neg = torch.tensor([[[0.0, 1.0]], [[0.6, 0.8]]])  # one negative per row
    # a->b row 0 logits (1, 0 | 0); row 1 logits (0, 1 | 0.8)
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    expected = ((-1 + lse(1, 0, 0)) + (-1 + lse(0, 1, 0.8))) / 2
    got = multi_positive_infonce(a, b, None, None, 1.0, neg, symmetric=False)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # Symmetric: the b->a direction has no extra columns.
    sym = multi_positive_infonce(a, b, None, None, 1.0, neg)
    assert sym.item() == pytest.approx(0.5 * (expected + math.log(1 + math.exp(-1))), abs=1e-6)


def test_hard_negatives_increase_loss():
    a, b = unit(6, 8, seed=9), unit(6, 8, seed=10)
    neg = unit(6, 4, 8, seed=11)
    ids = torch.tensor([1, 2, 3, 1, 4, 5])
    base = multi_positive_infonce(a, b, None, ids, 5.0, symmetric=False)
    with_neg = multi_positive_infonce(a, b, None, ids, 5.0, neg, symmetric=False)
    assert with_neg.item() > base.item() + 1e-4


def test_masked_negatives_have_no_effect():
    a, b = unit(4, 8, seed=12), unit(4, 8, seed=13)
    neg = unit(4, 3, 8, seed=14)
    none_real = torch.zeros(4, 3, dtype=torch.bool)
    base = multi_positive_infonce(a, b, None, None, 5.0)
    torch.testing.assert_close(multi_positive_infonce(a, b, None, None, 5.0, neg, none_real), base)
    # A partial mask equals dropping the masked columns; masked values do not matter.
    mask = torch.tensor([[True, False, True]] * 4)
    kept = multi_positive_infonce(a, b, None, None, 5.0, neg[:, [0, 2]])
    garbage = neg.clone()
    garbage[:, 1] = 1e6
    torch.testing.assert_close(multi_positive_infonce(a, b, None, None, 5.0, garbage, mask), kept)
    assert torch.isfinite(multi_positive_infonce(a, b, None, None, 5.0, garbage, mask))


def test_gradcheck_multi_positive_infonce():
    a = unit(3, 4, seed=15, dtype=torch.float64).requires_grad_(True)
    b = unit(3, 4, seed=16, dtype=torch.float64).requires_grad_(True)
    neg = unit(3, 2, 4, seed=17, dtype=torch.float64).requires_grad_(True)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False], [True, True], [False, False]])
    ids = torch.tensor([1, 2, 1])
    assert torch.autograd.gradcheck(
        lambda a, b, n, s: multi_positive_infonce(a, b, None, ids, s, n, mask), (a, b, neg, scale)
    )


def test_bad_shapes_raise():
    a = unit(3, 4, seed=1)
    with pytest.raises(ValueError, match="a and b"):
        multi_positive_infonce(a, a[:2], None, None, 1.0)
    with pytest.raises(ValueError, match="b_ids"):
        multi_positive_infonce(a, a, None, torch.arange(2), 1.0)
    with pytest.raises(ValueError, match="extra_mask"):
        multi_positive_infonce(
            a, a, None, None, 1.0, unit(3, 2, 4, seed=2), torch.ones(3, 3, dtype=torch.bool)
        )


# --- compute_losses -----------------------------------------------------------


def test_compute_losses_terms_and_total():
    inp = make_inputs()
    out = compute_losses(inp, ALL_WEIGHTS)
    assert set(out) == {*ALL_WEIGHTS, "total"} and set(LOSS_NAMES) - set(ALL_WEIGHTS) == {"grounding"}  # its own tests
    s = inp.logit_scale
    torch.testing.assert_close(
        out["global"], multi_positive_infonce(inp.image_fused, inp.report, None, inp.report_ids, s)
    )
    torch.testing.assert_close(
        out["summary"],
        multi_positive_infonce(inp.image_global, inp.summary, None, inp.summary_ids, s),
    )
    torch.testing.assert_close(
        out["region"], multi_positive_infonce(valid(inp, "roi"), valid(inp, "caption"), None, valid(inp, "caption_ids"), s)
    )
    roi_part = multi_positive_infonce(
        valid(inp, "roi"), valid(inp, "caption"), None, valid(inp, "caption_ids"), s, valid(inp, "roi_negatives"),
        valid(inp, "roi_negatives_mask"), symmetric=False,
    )  # fmt: skip
    img_part = multi_positive_infonce(
        inp.image_fused, inp.report, None, inp.report_ids, s, inp.image_negatives,
        inp.image_negatives_mask, symmetric=False,
    )  # fmt: skip
    torch.testing.assert_close(out["hard_negative"], 0.5 * (roi_part + img_part))
    expected_total = sum(ALL_WEIGHTS[k] * out[k] for k in ALL_WEIGHTS)
    torch.testing.assert_close(out["total"], expected_total)


def test_hard_negative_uses_the_parts_that_exist():
    inp = make_inputs()
    inp.image_negatives = inp.image_negatives_mask = None
    out = compute_losses(inp, {"hard_negative": 1.0})
    roi_part = multi_positive_infonce(
        valid(inp, "roi"), valid(inp, "caption"), None, valid(inp, "caption_ids"), inp.logit_scale,
        valid(inp, "roi_negatives"), valid(inp, "roi_negatives_mask"), symmetric=False,
    )  # fmt: skip
    torch.testing.assert_close(out["hard_negative"], roi_part)
    inp.roi_negatives = inp.roi_negatives_mask = None
    assert "hard_negative" not in compute_losses(inp, {"hard_negative": 1.0})


def test_inactive_terms_are_left_out():
    inp = make_inputs()
    out = compute_losses(inp, {"global": 1.0, "region": 0.0})
    assert set(out) == {"global", "total"}
    torch.testing.assert_close(out["total"], out["global"])
    inp.summary = inp.summary_ids = None
    assert "summary" not in compute_losses(inp, {"summary": 1.0})


def test_empty_rois_are_skipped_not_nan():
    inp = make_inputs(rois=(0,), requires_grad=True)
    out = compute_losses(inp, ALL_WEIGHTS)
    assert "region" not in out
    # hard_negative keeps its image part only
    img_part = multi_positive_infonce(
        inp.image_fused, inp.report, None, inp.report_ids, inp.logit_scale, inp.image_negatives,
        inp.image_negatives_mask, symmetric=False,
    )  # fmt: skip
    torch.testing.assert_close(out["hard_negative"], img_part)
    assert torch.isfinite(out["total"])
    out["total"].backward()
    assert torch.isfinite(inp.image_fused.grad).all()


def test_no_active_term_gives_a_backpropagating_zero():
    inp = make_inputs(rois=(0,), requires_grad=True)
    out = compute_losses(inp, {"region": 1.0})
    assert set(out) == {"total"} and out["total"].item() == 0.0
    out["total"].backward()
    assert inp.logit_scale.grad is not None and inp.logit_scale.grad.item() == 0.0


def test_unknown_or_negative_weight_raises():
    inp = make_inputs()
    with pytest.raises(ValueError, match=r"'globl'.*global, summary, region, hard_negative"):
        compute_losses(inp, {"globl": 1.0})
    with pytest.raises(ValueError, match="region"):
        compute_losses(inp, {"region": -1.0})


def test_gradient_reaches_every_input():
    inp = make_inputs(requires_grad=True)
    compute_losses(inp, ALL_WEIGHTS)["total"].backward()
    for name in (
        "logit_scale", "image_fused", "image_global", "report", "summary", "roi", "caption",
        "roi_negatives", "image_negatives",
    ):  # fmt: skip
        grad = getattr(inp, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # Masked-out negatives and padding ROI slots get no gradient.
    assert inp.roi_negatives.grad[0, 1, 1:].abs().max() == 0
    assert inp.roi.grad[~inp.roi_mask].abs().max() == 0 and inp.caption.grad[~inp.roi_mask].abs().max() == 0
    assert inp.roi_negatives.grad[~inp.roi_mask].abs().max() == 0


def test_gather_is_identity_in_one_process():
    inp = make_inputs()
    assert gather_with_grad(inp.roi) is inp.roi and gather_tensor(inp.roi_mask) is inp.roi_mask


def test_local_infonce_in_one_process_is_multi_positive_infonce():
    a, b = unit(6, 8, seed=11), unit(6, 8, seed=12)
    ids = torch.tensor([1, 2, 1, 3, 4, 2])
    extra, emask = unit(6, 2, 8, seed=13), torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1], [1, 0], [1, 1]]).bool()
    for kw in ({}, {"extra_negatives": extra, "extra_mask": emask, "symmetric": False}):
        ref = multi_positive_infonce(a, b, None, ids, 5.0, kw.get("extra_negatives"), kw.get("extra_mask"),
                                     symmetric=kw.get("symmetric", True))
        torch.testing.assert_close(local_infonce(a, b, ids, a, b, ids, 0, 6, 5.0, **kw), ref)


def _split(inp: LossInputs, parts: int) -> list[LossInputs]:
    """Cut fixed-shape inputs into equal per-rank slices along the batch."""
    b = inp.image_fused.shape[0] // parts
    out = []
    for r in range(parts):
        fields = {f: (v if f == "logit_scale" or v is None else v[r * b : (r + 1) * b]) for f, v in vars(inp).items()}
        out.append(LossInputs(**fields))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_local_loss_summed_over_ranks_equals_the_union_batch(world, monkeypatch):
    """The local loss, simulated in one process: each 'rank' scores its rows against the
    gathered union; the per-rank terms sum to the union's terms, and the gradient of their
    sum (what autograd all-gather + a sum over ranks gives) equals the union's gradient."""
    union = make_inputs(B=8, requires_grad=True)
    expected = compute_losses(union, ALL_WEIGHTS)
    grads_expected = torch.autograd.grad(expected["total"], [union.image_fused, union.roi, union.caption, union.logit_scale,
                                                             union.roi_negatives])
    ranks = _split(union, world)
    current = {"rank": 0}

    def gather(x):
        # Union of every rank's tensor for the same field; flattened ROI fields too.
        for f, v in vars(ranks[current["rank"]]).items():
            if v is x:
                return torch.cat([getattr(p, f) for p in ranks])
            if v is not None and v.dim() >= 2 and x.shape == (v.shape[0] * v.shape[1], *v.shape[2:]) and f.startswith(("roi", "caption")):
                if torch.equal(x, v.reshape(x.shape)):
                    return torch.cat([getattr(p, f).reshape(-1, *v.shape[2:]) for p in ranks])
        raise AssertionError("unexpected gather")

    monkeypatch.setattr(losses_mod, "gather_with_grad", gather)
    monkeypatch.setattr(losses_mod, "gather_tensor", gather)
    monkeypatch.setattr(losses_mod, "get_world_size", lambda: world)
    summed = {}
    for r in range(world):
        current["rank"] = r
        monkeypatch.setattr(losses_mod, "get_rank", lambda r=r: r)
        for k, v in compute_losses(ranks[r], ALL_WEIGHTS).items():
            summed[k] = summed.get(k, 0) + v
    assert set(summed) == set(expected)
    for k in expected:
        torch.testing.assert_close(summed[k], expected[k], rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(summed["total"], [union.image_fused, union.roi, union.caption, union.logit_scale,
                                                  union.roi_negatives])
    for g, e in zip(grads, grads_expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


# --- text_ids -----------------------------------------------------------------


def test_text_ids_stable_and_distinct():
    texts = [f"finding {i}: {'left' if i % 2 else 'right'} lobe" for i in range(5000)]
    ids = text_ids(texts)
    assert ids.dtype == torch.long and ids.shape == (5000,)
    assert (ids >= 0).all()
    assert len(set(ids.tolist())) == 5000
    assert torch.equal(text_ids(texts), ids)  # deterministic
    again = text_ids(["no acute cardiopulmonary process", "x", "no acute cardiopulmonary process"])
    assert again[0] == again[2] != again[1]
    # Pinned: the id is BLAKE2b-64 of the UTF-8 text with the top bit cleared,
    # independent of PYTHONHASHSEED and of the process.
    digest = hashlib.blake2b("pneumothorax".encode(), digest_size=8).digest()
    assert text_ids(["pneumothorax"]).item() == int.from_bytes(digest, "big") & (2**63 - 1)
    assert text_ids([]).shape == (0,)
