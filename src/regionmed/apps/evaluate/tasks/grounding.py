"""Task ``grounding``: phrase grounding on images with annotated boxes.

Scores the annotated regions of a MedRegion split (``--medregion``; each region's label, or
caption with ``--grounding-phrase caption``, is a phrase; regions proposed at build time are
left out) or, with the built-in sets, SLAKE test boxes. Pointing game, IoU>=0.3/0.5 (bootstrap
95% CIs over phrases) of two read-outs, the thresholded patch-text similarity map (``patch``)
and sliding windows embedded as regions (``windows``); beside them the centre point and a
location prior (each label's mean box over the SAME dataset's train split); overlay PNGs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from regionmed.apps.evaluate.context import INPUT_ERRORS, Datasets, EvalContext, EvalData, Problems
from regionmed.apps.evaluate.markdown import pct, rate_ci
from regionmed.apps.evaluate.suites import GROUNDING_PHRASES
from regionmed.apps.evaluate.tasks.base import EvalTask, option_field
from regionmed.data.decode import displayed_size
from regionmed.data.transforms import Preprocessor
from regionmed.eval.grounding import location_prior, save_overlay, score_prediction, summarise, window_boxes
from regionmed.eval.images import ImageRef, open_image
from regionmed.eval.readout import ground_image

READOUTS = ("patch", "windows")


@dataclass
class GroundingOptions:
    phrase: str = option_field("label", "--grounding-phrase",
                               "--medregion grounding: each region's label (default) or its caption is the phrase",
                               choices=GROUNDING_PHRASES)
    threshold: float = option_field(0.5, "--grounding-threshold",
                                    "box = component around the peak of the map thresholded at min + T*(max-min) (default 0.5)")
    contrast: bool = option_field(False, "--grounding-contrast",
                                  "subtract from each phrase's map the mean map over all phrases of the suite")
    readouts: list[str] = option_field(list(READOUTS), "--grounding-readouts",
                                       "comma-separated grounding read-outs: patch, windows (default both)")
    overlays: int = option_field(8, "--overlays", "grounding overlay PNGs to write (default 8)")
    window_scales: tuple[float, ...] = (0.25, 0.4, 0.6)


@dataclass
class GroundingSuite:
    """Images with phrases and their boxes, and the no-pixel location prior of the same dataset.

    ``refs[i].box_labels`` are the phrases (one per box; equal phrases in an image are
    scored together); ``prior`` maps a prior key to a mean relative box and
    ``prior_key(image key, phrase)`` gives a phrase's key."""

    dataset: str
    refs: list[ImageRef]
    prior: dict[str, list[float]]
    prior_source: str
    prior_keys: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    def prior_key(self, image_key: str, phrase: str) -> str:
        return self.prior_keys.get(image_key, {}).get(phrase, phrase)


def _slake_location_prior(data: Datasets, problems: Problems) -> dict[str, list[float]]:
    """Mean relative box per class over the SLAKE *train* boxes (the prior baseline)."""
    items = []
    for ref in data.slake.grounding_items("train"):
        try:
            size = displayed_size(ref.path)  # as decode_image returns it (EXIF orientation applied)
        except INPUT_ERRORS as err:
            problems.add("grounding", f"train image {ref.key} not readable for the location prior ({type(err).__name__}); skipped")
            continue
        items.append((ref.boxes, ref.box_labels, size))
    return location_prior(items)


def grounding_suite(data: Datasets, phrase: str, problems: Problems) -> GroundingSuite:
    """The dataset grounding scores: the annotated regions of the MedRegion split when one is
    given (prior: its ``train`` split), else SLAKE test (prior: SLAKE train)."""
    if data.data.medregion:
        split = data.data.medregion_split
        refs, prior_keys, notes = data.medregion.grounding_items(split, phrase)
        prior, source = {}, "none: the dataset has no train split"
        if split == "train":
            problems.add("grounding", "grounding on the train split: the location prior is fitted on the same boxes it is "
                                      "scored on (an optimistic reference)", "note")
        try:
            prior = location_prior(data.medregion.prior_items("train"))
            source = f"{notes['dataset']} train regions, mean relative box per label"
        except INPUT_ERRORS as err:  # no train split: the prior is left out, said so
            problems.add("grounding", f"no location prior: {err}", "note")
        return GroundingSuite(f"{notes['dataset']} {split}", refs, prior, source, prior_keys, notes)
    refs = data.slake.grounding_items("test")
    if not refs:
        raise ValueError("no SLAKE test image with boxes")
    return GroundingSuite("slake test", refs, _slake_location_prior(data, problems), "SLAKE train boxes, mean relative box per class")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


class Grounding(EvalTask):
    """Pointing game, IoU>=0.3/0.5 (bootstrap 95% CIs over phrases) of the patch and windows
    read-outs, beside the centre point and a location prior of the same dataset's train split;
    overlay PNGs."""

    name = "grounding"
    datasets = ("--medregion: the annotated regions of its split (each region's label, or caption with --grounding-phrase "
                "caption, is a phrase; regions proposed at build time are left out); built-in: SLAKE test boxes")
    Options = GroundingOptions
    headline = (
        ("pointing (patch)", ("overall", "pointing_game")),
        ("IoU≥0.3 (patch)", ("overall", "iou@0.3")),
        ("pointing (windows)", ("windows", "overall", "pointing_game")),
        ("IoU≥0.3 (windows)", ("windows", "overall", "iou@0.3")),
    )

    def unsupported(self, data: EvalData) -> str | None:
        if data.medregion or data.uses_builtin:
            return None
        return ("grounding needs images with annotated boxes: --medregion DIR (its regions, split --medregion-split) "
                "or --builtin (SLAKE test boxes); --class-folder and --questions carry no boxes")

    def uses_data_root(self, data: EvalData) -> bool:
        return not data.medregion

    def run(self, model, ctx: EvalContext, options: GroundingOptions) -> dict:
        unknown = [r for r in options.readouts if r not in READOUTS]
        if unknown:
            raise ValueError(f"grounding read-out(s) {unknown} not in {READOUTS}")
        problems = ctx.problems
        suite = grounding_suite(ctx.datasets, options.phrase, problems)
        refs = ctx.limit_images(suite.refs)
        prior = suite.prior
        pre = Preprocessor.from_model(model)  # windows are prepared as the model prepares ROIs (crops in crop mode)
        device = model.logit_scale.device
        phrases = sorted({lab for r in refs for lab in r.box_labels})
        text = model.encode_text([p.lower() for p in phrases])
        pidx = {p: i for i, p in enumerate(phrases)}
        rows: dict[str, list] = {r: [] for r in options.readouts}
        per_class: dict[str, dict] = {r: {} for r in options.readouts}
        n_overlay, n_windows = 0, []
        odir = ctx.out / "grounding_overlays"
        for ref in tqdm(refs, desc="grounding", leave=False, disable=None):  # no bar when not a terminal
            try:
                image = open_image(ref)
            except INPUT_ERRORS as err:
                problems.add(self.name, f"image {ref.key} could not be read ({type(err).__name__}: {err}); skipped")
                continue
            labels = list(dict.fromkeys(ref.box_labels))
            w, h = image.size
            found = {}
            select = [pidx[lab] for lab in labels]
            for readout in [r for r in READOUTS if r in rows]:  # the Predictor's read-outs too
                found[readout] = ground_image(model, pre, image, text, readout, threshold=options.threshold,
                                              contrast=options.contrast, select=select, window_scales=options.window_scales)
                if readout == "windows":
                    n_windows.append(len(window_boxes(w, h, options.window_scales)))
            for i, lab in enumerate(labels):
                gt = [b for b, l2 in zip(ref.boxes, ref.box_labels) if l2 == lab]
                base = score_prediction((w / 2, h / 2), [0, 0, w, h], gt)
                pb = prior.get(suite.prior_key(ref.key, lab))
                pri = score_prediction(((pb[0] + pb[2]) / 2 * w, (pb[1] + pb[3]) / 2 * h), [pb[0] * w, pb[1] * h, pb[2] * w, pb[3] * h], gt) if pb else None
                for readout, res_list in found.items():
                    res = res_list[i]
                    sc = score_prediction(res["point"], res["box"], gt)
                    row = {"image": ref.key, "phrase": lab.lower(), **sc, "base_hit": base["hit"], "base_iou": base["iou"],
                           "prior_hit": pri["hit"] if pri else None, "prior_iou": pri["iou"] if pri else None}
                    rows[readout].append(row)
                    per_class[readout].setdefault(lab, []).append(row)
                    if n_overlay < options.overlays:
                        odir.mkdir(parents=True, exist_ok=True)
                        save_overlay(image, res, gt, f"{ref.key}: {lab.lower()} ({readout})",
                                     odir / f"{n_overlay:02d}_{_safe(ref.key)}_{_safe(lab)[:40]}_{readout}.png")
                if n_overlay < options.overlays:
                    n_overlay += 1
        out: dict = {
            "dataset": suite.dataset,
            "rois": "none (patch: the whole-image patch grid; windows: sliding windows as ROIs)",
            "readouts": list(rows),
            "threshold": options.threshold,
            "contrast": options.contrast,
            "grid": list(model.patch_embeddings(torch.zeros(1, 3, pre.image_size, pre.image_size, device=device)).shape[1:3]),
            "prior": {"source": suite.prior_source, "classes": len(prior),
                      "test_phrases_without_prior": sorted({lab for r in refs for lab in r.box_labels
                                                            if suite.prior_key(r.key, lab) not in prior})},
            "overlays": str(odir) if n_overlay else None,
        }
        if suite.notes:
            out["notes"] = suite.notes
        for readout in rows:
            block = {"overall": summarise(rows[readout], ctx.opts.n_boot, ctx.opts.seed),
                     "per_class": {c: summarise(r) for c, r in sorted(per_class[readout].items())}}
            if readout == "windows":
                block.update(scales=list(options.window_scales), windows_per_image=float(np.mean(n_windows)) if n_windows else 0.0,
                             embedding="ROI path (given windows as boxes)" if model.roi_processor is not None else "window crop as a whole image")
            out[readout] = block
        if "patch" in rows:  # the read-out stays the headline
            out.update(overall=out["patch"]["overall"], per_class=out["patch"]["per_class"])
        return out

    def report(self, r: dict) -> list[str]:
        lines = [f"## Grounding ({r.get('dataset', 'slake test')})", "",
                 f"Read-outs: **patch** = patch–text map over the {r.get('grid')} patch grid, thresholded at {r['threshold']}; "
                 "**windows** = sliding windows embedded as regions, best window = box, mean-score map = point "
                 f"(contrast, mean over phrases subtracted: {r.get('contrast', False)}). Test-time ROIs: {r['rois']}.",
                 "References that see no pixels: the centre point / whole-image box, and the class's mean box over the "
                 f"training boxes of the same dataset (location prior: {(r.get('prior') or {}).get('source', 'SLAKE train boxes')}). "
                 "Brackets: bootstrap 95% CI over phrases.", "",
                 "| read-out | phrases | pointing game | IoU≥0.3 | IoU≥0.5 | mean IoU | centre pointing | prior pointing | prior IoU≥0.3 | prior IoU≥0.5 |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for readout in r.get("readouts", ["patch"]):
            o = (r.get(readout) or {}).get("overall") or (r["overall"] if readout == "patch" else {})
            if o.get("n"):
                lines.append(f"| {readout} | {o['n']} | {rate_ci(o, 'pointing_game')} | {rate_ci(o, 'iou@0.3')} | {pct(o['iou@0.5'])} | "
                             f"{o['mean_iou']:.3f} | {rate_ci(o, 'baseline_centre_pointing')} | {rate_ci(o, 'baseline_prior_pointing')} | "
                             f"{pct(o.get('baseline_prior_iou@0.3'))} | {pct(o.get('baseline_prior_iou@0.5'))} |")
        if r.get("overlays"):
            lines += ["", f"Overlays (green: annotated, red: predicted box and point): `{Path(r['overlays']).name}/`"]
        return lines
