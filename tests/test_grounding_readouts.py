"""Grounding read-outs prefer no place under random scores, and the scorer tells the truth
(ties are no free hits, flat maps are not dropped, CNR and priors by their definitions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from regionmed.eval.grounding import (
    Geometry,
    contrast_to_noise,
    coverage_prior,
    locate,
    locate_windows,
    location_prior,
    score_prediction,
    summarise,
    window_boxes,
    window_lattice,
)

DRAWS = 3000


def _lattice_counts(points, width, height, nx, ny):
    counts = np.zeros((ny, nx))
    for x, y in points:
        counts[min(int(y / height * ny), ny - 1), min(int(x / width * nx), nx - 1)] += 1
    return counts


def _assert_uniform(counts: np.ndarray, cells: np.ndarray | None = None):
    """Points spread like a uniform pick among the lattice's cells: a chi-square test of the
    counts (p > 0.001), and the share in the central half and in the outer ring of width 1/8,
    against their exact expectation (3 standard errors)."""
    cells = np.ones_like(counts, dtype=bool) if cells is None else cells
    assert counts[~cells].sum() == 0, "a point outside the image"
    observed = counts[cells]
    assert chisquare(observed).pvalue > 1e-3, counts
    ny, nx = counts.shape
    n = counts.sum()
    for name, region in (("central half", (slice(ny // 4, ny - ny // 4), slice(nx // 4, nx - nx // 4))),
                         ("outer ring", None)):
        inner = np.zeros_like(cells)
        if region is None:
            inner[ny // 8: ny - ny // 8, nx // 8: nx - nx // 8] = True
            part = cells & ~inner
        else:
            inner[region] = True
            part = cells & inner
        p = part.sum() / cells.sum()
        share = counts[part].sum() / n
        assert abs(share - p) < 3 * np.sqrt(p * (1 - p) / n), (name, share, p)


@pytest.mark.parametrize("width, height, grid", [(512, 512, 8), (640, 400, 16), (300, 600, 8)])
def test_patch_readout_point_is_uniform_under_random_scores(width, height, grid):
    rng = torch.Generator().manual_seed(0)
    geom = Geometry(width, height, 128)
    points = [locate(torch.randn(grid, grid, generator=rng), geom)["point"] for _ in range(DRAWS)]
    # the valid cells: those whose centre lies inside the letterboxed image
    ox, oy, nw, nh = geom.content
    centres = (np.arange(grid) + 0.5) * 128 / grid
    valid = ((centres >= oy) & (centres <= oy + nh))[:, None] & ((centres >= ox) & (centres <= ox + nw))[None, :]
    s = geom.scale
    in_input = [(x * s + ox, y * s + oy) for x, y in points]  # back into the letterboxed frame
    counts = _lattice_counts(in_input, 128, 128, grid, grid)
    _assert_uniform(counts, valid)


@pytest.mark.parametrize("width, height", [(512, 512), (400, 640), (1000, 300)])
def test_windows_readout_point_is_uniform_under_random_scores(width, height):
    rng = np.random.default_rng(0)
    boxes = window_boxes(width, height)
    nx, ny = window_lattice(width, height)
    assert len(boxes) == 3 * nx * ny
    points = [locate_windows(torch.from_numpy(rng.standard_normal(len(boxes))), boxes, width, height)["point"]
              for _ in range(DRAWS)]
    _assert_uniform(_lattice_counts(points, width, height, nx, ny))


def test_the_old_coverage_average_would_fail_this_test():
    """The windows read-out before issue 17 (each pixel the mean score of the windows covering it)
    put 3.1% of random points in the central 40% square; the check above catches such a bias."""
    rng = np.random.default_rng(0)
    n, cells = 8, 64
    width = height = 512
    side = [s * 512 for s in (0.25, 0.4, 0.6)]
    wins = [(x, y, x + sd, y + sd) for sd in side for y in np.linspace(0, 512 - sd, int(np.ceil((512 - sd) / (sd / 2))) + 1)
            for x in np.linspace(0, 512 - sd, int(np.ceil((512 - sd) / (sd / 2))) + 1)]
    pts = []
    for _ in range(1000):
        sc = rng.standard_normal(len(wins))
        acc, cnt = np.zeros((cells, cells)), np.zeros((cells, cells))
        for v, (x0, y0, x1, y1) in zip(sc, wins):
            sl = (slice(int(y0 / 8), int(np.ceil(y1 / 8))), slice(int(x0 / 8), int(np.ceil(x1 / 8))))
            acc[sl] += v
            cnt[sl] += 1
        py, px = np.unravel_index(np.argmax(acc / cnt), acc.shape)
        pts.append(((px + 0.5) * 8, (py + 0.5) * 8))
    with pytest.raises(AssertionError):
        _assert_uniform(_lattice_counts(pts, width, height, n, n))


def test_a_flat_map_ties_everywhere_and_scores_like_a_random_point():
    geom = Geometry(100, 100, 64)
    res = locate(torch.zeros(4, 4), geom)
    assert len(res["ties"]) == 16
    left_half = [[0, 0, 50, 100]]
    assert score_prediction(res["point"], res["box"], left_half, res["ties"])["hit"] == pytest.approx(0.5)
    assert score_prediction(res["point"], res["box"], left_half)["hit"] in (0.0, 1.0)  # without ties: the first point only
    # a peaked map: one point, inside its box
    m = torch.zeros(4, 4)
    m[1, 2] = 1.0
    res = locate(m, geom)
    assert res["ties"] == [res["point"]] and score_prediction(res["point"], res["box"], [[50, 25, 75, 50]], res["ties"])["hit"] == 1.0


def test_letterbox_padding_is_never_the_point():
    geom = Geometry(200, 100, 64)  # content in the middle half of the rows
    m = torch.zeros(8, 8)
    m[0, :] = 5.0  # the padding above the image scores highest
    m[3, 6] = 1.0
    res = locate(m, geom)
    assert 0 <= res["point"][1] <= 100 and res["ties"] == [res["point"]]
    assert res["point"][0] == pytest.approx((6.5 * 8 - 0) / geom.scale)


def test_contrast_to_noise_by_its_definition():
    values = np.zeros((256, 256))
    checker = (np.add.outer(np.arange(256), np.arange(256)) % 2).astype(float)
    values[:] = 2 * checker  # outside: 0 / 2, mean 1, variance 1
    values[64:192, 64:192] = 1 + 2 * checker[64:192, 64:192]  # inside: 1 / 3, mean 2, variance 1
    cnr = contrast_to_noise(values, [[64, 64, 192, 192]], 256, 256)
    assert cnr == pytest.approx(1 / np.sqrt(2), rel=1e-4)
    assert contrast_to_noise(-values, [[64, 64, 192, 192]], 256, 256) == pytest.approx(-1 / np.sqrt(2), rel=1e-4)
    assert contrast_to_noise(np.ones((4, 4)), [[0, 0, 10, 10]], 20, 20) == 0.0
    assert np.isnan(contrast_to_noise(values, [[0, 0, 256, 256]], 256, 256))


def test_most_covered_point_stays_on_a_finding_of_either_side():
    refs = [([[0, 0, 40, 100]], ["lesion"], (100, 100)), ([[2, 10, 38, 90]], ["lesion"], (100, 100)),
            ([[0, 20, 40, 80]], ["lesion"], (100, 100)), ([[60, 0, 100, 100], [60, 0, 100, 100]], ["lesion"] * 2, (100, 100))]
    mean = location_prior(refs)["lesion"]
    centre = ((mean[0] + mean[2]) / 2, (mean[1] + mean[3]) / 2)
    assert 0.40 < centre[0] < 0.60  # the mean box lies between the lungs: on no lesion
    x, y = coverage_prior(refs)["lesion"]
    assert 0.02 <= x <= 0.38 and 0.2 <= y <= 0.8  # on the side covered three times


def test_summary_counts_every_row_and_pairs_the_references():
    rows = [{"hit": 1.0, "iou": 0.6, "cnr": 1.5, "base_hit": False, "base_iou": 0.1, "prior_hit": True, "prior_iou": 0.4,
             "cover_hit": True, "blind_hit": False},
            {"hit": 0.5, "iou": 0.0, "cnr": float("nan"), "base_hit": True, "base_iou": 0.2, "prior_hit": None, "prior_iou": None,
             "cover_hit": None, "blind_hit": True},
            {"hit": 0.0, "iou": 0.2, "cnr": -0.5, "base_hit": False, "base_iou": 0.0, "prior_hit": False, "prior_iou": 0.0,
             "cover_hit": True, "blind_hit": False}]
    out = summarise(rows, n_boot=200)
    assert out["n"] == 3 and out["pointing_game"] == pytest.approx(0.5)
    assert out["iou@0.1"] == pytest.approx(2 / 3) and out["iou@0.5"] == pytest.approx(1 / 3)
    assert out["cnr"] == pytest.approx(0.5) and out["cnr_undefined"] == 1
    ref = out["references"]
    assert ref["mean_box_prior"]["n"] == 2 and ref["mean_box_prior"]["pointing_game"] == pytest.approx(0.5)
    assert ref["most_covered_prior"]["pointing_game"] == 1.0 and ref["phrase_blind"]["pointing_game"] == pytest.approx(1 / 3)
    assert out["differences"]["most_covered_prior"]["pointing_game"] == pytest.approx(0.5 - 1.0)
    lo, hi = out["intervals"]["pointing_game"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0
    assert out["baseline_prior_pointing"] == ref["mean_box_prior"]["pointing_game"]  # the earlier key stays
