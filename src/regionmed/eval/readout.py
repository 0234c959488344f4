"""One image's grounding read-out: phrases → a point, a box and a map each.

The one home of the read-out used by the inference API
(:meth:`regionmed.inference.Predictor.ground`) and the evaluation
(``regionmed evaluate``'s grounding task); the read-outs themselves are described in
:mod:`regionmed.eval.grounding`. (A module of its own: it needs both
:mod:`.grounding` and :mod:`.images`, and ``images`` imports ``grounding``.)
"""

from __future__ import annotations

from dataclasses import replace

import torch

from regionmed.errors import RegionmedError
from regionmed.eval.grounding import Geometry, locate, locate_windows, similarity_maps, window_boxes
from regionmed.eval.images import window_scores
from regionmed.finite import require_finite

__all__ = ["READ_OUTS", "WINDOW_SCALES", "ReadOutError", "ground_image"]

READ_OUTS = ("windows", "patch")
WINDOW_SCALES = (0.25, 0.4, 0.6)  # window sides, as fractions of the image's long side


class ReadOutError(RegionmedError, ValueError):
    """A grounding read-out that does not exist."""


def ground_image(model, pre, image, text_emb: torch.Tensor, read_out: str, *, threshold: float = 0.5,
                 contrast: bool = False, select: list[int] | None = None,
                 window_scales=WINDOW_SCALES) -> list[dict]:
    """Ground phrases in one image with one read-out: one :func:`locate` /
    :func:`locate_windows` result (``{"point", "box", "peak", "map"}``, original pixels)
    per phrase (:mod:`regionmed.eval.grounding`).

    ``model``: a :class:`~regionmed.model.RegionMedCLIP` in eval mode; ``pre``: its
    :class:`~regionmed.data.transforms.Preprocessor`; ``image``: an RGB PIL image;
    ``text_emb``: (T, D) phrase embeddings (L2-normalised). ``read_out``: ``"windows"``
    (sliding windows at ``window_scales`` through the region path, :func:`window_boxes`)
    or ``"patch"`` (the patch–text map thresholded at ``threshold``, :func:`locate`).
    ``contrast``: subtract from each score the mean over all T phrases (per window, or per
    patch cell) before the read-out. ``select``: the rows of ``text_emb`` to read out
    (default all, in order; with ``contrast`` the mean still runs over all T).
    Raises :class:`ReadOutError` for an unknown read-out and
    :class:`~regionmed.finite.NonFiniteEmbeddingError` when the model computes
    NaN/inf scores.
    """
    if read_out not in READ_OUTS:
        raise ReadOutError(f"read_out {read_out!r} is not one of {list(READ_OUTS)}")
    rows = list(range(text_emb.shape[0])) if select is None else list(select)
    w, h = image.size
    device = model.logit_scale.device
    text_emb = text_emb.to(device)
    if read_out == "windows":
        boxes = window_boxes(w, h, window_scales)
        scores = require_finite(window_scores(model, pre, image, boxes, text_emb), "window").float().cpu()  # (K, T)
        if contrast:
            scores = scores - scores.mean(1, keepdim=True)
        return [locate_windows(scores[:, t], boxes, w, h) for t in rows]
    with torch.no_grad():
        x = replace(pre, roi_mode="none")(image)["image"][None].to(device)  # no crops needed for the patch grid
        if contrast:  # (T, h, w) for every phrase, less their mean, then the selected rows
            maps = require_finite(similarity_maps(model, x, text_emb), "patch")[0]
            maps = (maps - maps.mean(0, keepdim=True))[rows]
        else:  # only the selected phrases' maps
            maps = require_finite(similarity_maps(model, x, text_emb[rows]), "patch")[0]
    geom = Geometry(w, h, pre.image_size)
    return [locate(m, geom, threshold) for m in maps]
