"""Task ``grounding``: phrase grounding on images with annotated boxes.

Scores the annotated regions of a MedRegion split (``--medregion``; each region's label, or
caption with ``--grounding-phrase caption``, is a phrase; regions proposed at build time are
left out) or, with the built-in sets, SLAKE test boxes. Pointing game, IoU hit rates at
0.1/0.3/0.5 and the contrast-to-noise ratio (BioViL's CNR) of two read-outs, the patch-text
similarity map (``patch``) and sliding windows embedded as regions (``windows``), overall and
per label kind (anatomy / finding / unknown: the region's ``kind``); bootstrap 95% CIs over
phrases. Beside them the references that see no pixels (the centre point; two location priors
of the SAME dataset's train split, per label: the centre of the mean box and the point its
boxes cover most often) and one that sees no phrase (the model's mean map over the split's
phrases), with paired differences. Overlay PNGs of the best and the worst cases.
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
from regionmed.eval.grounding import (
    contrast_to_noise,
    coverage_prior,
    location_prior,
    save_overlay,
    score_prediction,
    summarise,
    window_boxes,
)
from regionmed.eval.images import ImageRef, open_image
from regionmed.eval.readout import ground_image
from regionmed.task import grounding_phrase

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
    overlays: int = option_field(8, "--overlays", "grounding overlay PNGs to write per read-out, half of them the best "
                                                  "cases and half the worst (default 8)")
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
    cover: dict[str, list[float]] = field(default_factory=dict)  # prior key -> most-covered relative point [x, y]

    def prior_key(self, image_key: str, phrase: str) -> str:
        return self.prior_keys.get(image_key, {}).get(phrase, phrase)


def _slake_prior_items(data: Datasets, problems: Problems) -> list:
    """The SLAKE *train* boxes, as :func:`location_prior` and :func:`coverage_prior` read them."""
    items = []
    for ref in data.slake.grounding_items("train"):
        try:
            size = displayed_size(ref.path)  # as decode_image returns it (EXIF orientation applied)
        except INPUT_ERRORS as err:
            problems.add("grounding", f"train image {ref.key} not readable for the location prior ({type(err).__name__}); skipped")
            continue
        items.append((ref.boxes, ref.box_labels, size))
    return items


def grounding_suite(data: Datasets, phrase: str, problems: Problems) -> GroundingSuite:
    """The dataset grounding scores: the annotated regions of the MedRegion split when one is
    given (prior: its ``train`` split), else SLAKE test (prior: SLAKE train)."""
    if data.data.medregion:
        split = data.data.medregion_split
        refs, prior_keys, notes = data.medregion.grounding_items(split, phrase)
        prior, cover, source = {}, {}, "none: the dataset has no train split"
        if split == "train":
            problems.add("grounding", "grounding on the train split: the location prior is fitted on the same boxes it is "
                                      "scored on (an optimistic reference)", "note")
        try:
            items = data.medregion.prior_items("train")
            prior, cover = location_prior(items), coverage_prior(items)
            source = f"{notes['dataset']} train regions, per label"
        except INPUT_ERRORS as err:  # no train split: the prior is left out, said so
            problems.add("grounding", f"no location prior: {err}", "note")
        return GroundingSuite(f"{notes['dataset']} {split}", refs, prior, source, prior_keys, notes, cover)
    refs = data.slake.grounding_items("test")
    if not refs:
        raise ValueError("no SLAKE test image with boxes")
    items = _slake_prior_items(data, problems)
    return GroundingSuite("slake test", refs, location_prior(items), "SLAKE train boxes, per class", cover=coverage_prior(items))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


KINDS = ("anatomy", "finding", "unknown")


def _kind_of(ref: ImageRef, label: str) -> str:
    kinds = {k for lab, k in zip(ref.box_labels, ref.box_kinds) if lab == label and k}
    return kinds.pop() if len(kinds) == 1 else "unknown"


def _score(res: dict, gt: list, w: int, h: int) -> dict:
    return {**score_prediction(res["point"], res["box"], gt, ties=res.get("ties")),
            "cnr": contrast_to_noise(res["map"], gt, w, h)}


class Grounding(EvalTask):
    """Pointing game, IoU hit rates at 0.1/0.3/0.5 and CNR (bootstrap 95% CIs over phrases) of the
    patch and windows read-outs, overall and per label kind, beside the centre point, two location
    priors of the same dataset's train split (mean box, most-covered point) and the phrase-blind
    map; overlay PNGs of the best and worst cases."""

    name = "grounding"
    datasets = ("--medregion: the annotated regions of its split (each region's label, or caption with --grounding-phrase "
                "caption, is a phrase; regions proposed at build time are left out); built-in: SLAKE test boxes")
    Options = GroundingOptions
    headline = (
        ("pointing (patch)", ("overall", "pointing_game")),
        ("IoU≥0.3 (patch)", ("overall", "iou@0.3")),
        ("CNR (patch)", ("overall", "cnr")),
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
        prior, cover = suite.prior, suite.cover
        pre = Preprocessor.from_model(model)  # windows are prepared as the model prepares ROIs (crops in crop mode)
        device = model.logit_scale.device
        phrases = sorted({lab for r in refs for lab in r.box_labels})
        text = model.encode_text([grounding_phrase(p) for p in phrases])  # as the grounding term trains them
        # The phrase-blind reference: every score is linear in the phrase's embedding, so the mean
        # map over the split's phrases is the map of their mean embedding (one more row).
        blind = None if options.contrast else len(phrases)
        text_all = text if blind is None else torch.cat([text, text.mean(0, keepdim=True)])
        pidx = {p: i for i, p in enumerate(phrases)}
        readouts = [r for r in READOUTS if r in options.readouts]
        rows: dict[str, list] = {r: [] for r in readouts}
        n_windows = []
        for ref in tqdm(refs, desc="grounding", leave=False, disable=None):  # no bar when not a terminal
            try:
                image = open_image(ref)
            except INPUT_ERRORS as err:
                problems.add(self.name, f"image {ref.key} could not be read ({type(err).__name__}: {err}); skipped")
                continue
            labels = list(dict.fromkeys(ref.box_labels))
            w, h = image.size
            select = [pidx[lab] for lab in labels] + ([blind] if blind is not None else [])
            found = {}
            for readout in readouts:
                found[readout] = ground_image(model, pre, image, text_all, readout, threshold=options.threshold,
                                              contrast=options.contrast, select=select, window_scales=options.window_scales)
                if readout == "windows":
                    n_windows.append(len(window_boxes(w, h, options.window_scales)))
            for i, lab in enumerate(labels):
                gt = [b for b, l2 in zip(ref.boxes, ref.box_labels) if l2 == lab]
                key = suite.prior_key(ref.key, lab)
                base = score_prediction((w / 2, h / 2), [0, 0, w, h], gt)
                pb, pc = prior.get(key), cover.get(key)
                pri = score_prediction(((pb[0] + pb[2]) / 2 * w, (pb[1] + pb[3]) / 2 * h),
                                       [pb[0] * w, pb[1] * h, pb[2] * w, pb[3] * h], gt) if pb else None
                cov = score_prediction((pc[0] * w, pc[1] * h), [0, 0, 0, 0], gt) if pc else None
                for readout, res_list in found.items():
                    res = res_list[i]
                    blind_hit = score_prediction(res_list[-1]["point"], res_list[-1]["box"], gt,
                                                 ties=res_list[-1].get("ties"))["hit"] if blind is not None else None
                    rows[readout].append({
                        "image": ref.key, "source": ref.source, "label": lab, "phrase": grounding_phrase(lab), "kind": _kind_of(ref, lab),
                        **_score(res, gt, w, h),
                        "base_hit": base["hit"], "base_iou": base["iou"],
                        "prior_hit": pri["hit"] if pri else None, "prior_iou": pri["iou"] if pri else None,
                        "cover_hit": cov["hit"] if cov else None, "blind_hit": blind_hit})
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
            "kinds": {k: sum(r["kind"] == k for r in rows[readouts[0]]) for k in KINDS} if readouts else {},
        }
        if suite.notes:
            out["notes"] = suite.notes
        for readout in rows:
            per_class: dict[str, list] = {}
            per_kind: dict[str, list] = {}
            per_source: dict[str, list] = {}
            for r in rows[readout]:
                per_class.setdefault(r["label"], []).append(r)
                per_kind.setdefault(r["kind"], []).append(r)
                per_source.setdefault(r["source"], []).append(r)
            block = {"overall": summarise(rows[readout], ctx.opts.n_boot, ctx.opts.seed),
                     "per_kind": {k: summarise(per_kind[k], ctx.opts.n_boot, ctx.opts.seed) for k in KINDS if k in per_kind},
                     "per_class": {c: summarise(r) for c, r in sorted(per_class.items())}}
            if len(per_source) > 1:  # a dataset built from several sources: each one on its own too
                block["per_source"] = {src: {"overall": summarise(rs, ctx.opts.n_boot, ctx.opts.seed),
                                             "per_kind": {k: summarise(g, ctx.opts.n_boot, ctx.opts.seed)
                                                          for k in KINDS if (g := [r for r in rs if r["kind"] == k])}}
                                       for src, rs in sorted(per_source.items())}
            if readout == "windows":
                block.update(scales=list(options.window_scales), windows_per_image=float(np.mean(n_windows)) if n_windows else 0.0,
                             embedding="ROI path (given windows as boxes)" if model.roi_processor is not None else "window crop as a whole image")
            out[readout] = block
        if "patch" in rows:  # the read-out stays the headline
            out.update(overall=out["patch"]["overall"], per_kind=out["patch"]["per_kind"], per_class=out["patch"]["per_class"])
        odir = ctx.out / "grounding_overlays"
        written = self._overlays(model, pre, suite, refs, text, pidx, rows, options, odir)
        out["overlays"] = str(odir) if written else None
        return out

    def _overlays(self, model, pre, suite, refs, text, pidx, rows, options, odir: Path) -> int:
        """Overlay PNGs of the best half (hit, highest IoU) and the worst half (missed, lowest
        IoU, ties by lower CNR) of ``options.overlays`` cases per read-out; the images are read
        and grounded again (nothing of the maps is kept over the whole split)."""
        if options.overlays <= 0:
            return 0
        by_key = {r.key: r for r in refs}
        written = 0
        for readout, rs in rows.items():
            def goodness(r):
                c = r["cnr"]
                return (r["hit"], r["iou"], c if np.isfinite(c) else -np.inf)
            ranked = sorted(rs, key=goodness)
            n_best = (options.overlays + 1) // 2
            best = ranked[::-1][:n_best]
            worst = [r for r in ranked[: options.overlays - n_best] if r not in best]
            for tag, chosen in (("best", best), ("worst", worst)):
                for k, r in enumerate(chosen):
                    ref = by_key[r["image"]]
                    try:
                        image = open_image(ref)
                    except INPUT_ERRORS:
                        continue
                    res = ground_image(model, pre, image, text, readout, threshold=options.threshold,
                                       contrast=options.contrast, select=[pidx[r["label"]]],
                                       window_scales=options.window_scales)[0]
                    gt = [b for b, l2 in zip(ref.boxes, ref.box_labels) if l2 == r["label"]]
                    odir.mkdir(parents=True, exist_ok=True)
                    save_overlay(image, res, gt, f"{ref.key}: {r['phrase']} ({readout}, {tag})",
                                 odir / f"{readout}_{tag}{k:02d}_{_safe(ref.key)}_{_safe(r['label'])[:40]}.png")
                    written += 1
        return written

    def report(self, r: dict) -> list[str]:
        readouts = r.get("readouts", ["patch"])
        described = []
        if "patch" in readouts:
            described.append(f"**patch** = the patch–text map over the {r.get('grid')} grid, point = centre of its maximal cell "
                             f"inside the image, box = component around it at threshold {r['threshold']}")
        if "windows" in readouts:
            described.append("**windows** = sliding windows embedded as regions, point = centre of the best lattice point, "
                             "box = the best window")
        lines = [f"## Grounding ({r.get('dataset', 'slake test')})", "",
                 "Read-outs: " + "; ".join(described) + f" (contrast, mean over phrases subtracted: {r.get('contrast', False)}). "
                 f"Test-time ROIs: {r['rois']}.",
                 "References: the centre point; two location priors per label from the training boxes of the same dataset "
                 f"({(r.get('prior') or {}).get('source', 'SLAKE train boxes')}): the centre of the mean box and the point "
                 "its boxes cover most often; and the phrase-blind map (the mean map over the split's phrases). Brackets: "
                 "bootstrap 95% CI over phrases; Δ = pointing minus the reference, paired. A phrase is a label in one image "
                 "(its boxes there scored together).", ""]
        for readout in r.get("readouts", ["patch"]):
            block = r.get(readout) or {}
            groups = [("all", block.get("overall") or (r.get("overall") if readout == "patch" else None) or {})]
            groups += [(k, v) for k, v in (block.get("per_kind") or {}).items()]
            for src, b in (block.get("per_source") or {}).items():
                groups += [(f"{src}", b["overall"])] + [(f"{src}: {k}", v) for k, v in b["per_kind"].items()]
            lines += [f"### {readout}", "",
                      "| labels | phrases | pointing game | IoU≥0.1 | IoU≥0.3 | IoU≥0.5 | CNR | centre | mean-box prior | "
                      "most-covered prior | phrase-blind | Δ most-covered |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for name, o in groups:
                if not o.get("n"):
                    continue
                refs = o.get("references") or {}
                iv = o.get("intervals") or {}

                def ref_rate(key: str, o=o, refs=refs, iv=iv) -> str:
                    if key not in refs:
                        return "–"
                    ci = iv.get(f"{key}_pointing")
                    return pct(refs[key]["pointing_game"]) + (f" [{pct(ci[0])}–{pct(ci[1])}]" if ci else "")

                d = (o.get("differences") or {}).get("most_covered_prior")
                delta = f"{100 * d['pointing_game']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]" if d else "–"
                cnr = "–" if o.get("cnr") is None else f"{o['cnr']:.2f}" + (
                    f" [{iv['cnr'][0]:.2f}–{iv['cnr'][1]:.2f}]" if iv.get("cnr") else "")
                lines.append(f"| {name} | {o['n']} | {rate_ci(o, 'pointing_game')} | {rate_ci(o, 'iou@0.1')} | "
                             f"{rate_ci(o, 'iou@0.3')} | {rate_ci(o, 'iou@0.5')} | {cnr} | {rate_ci(o, 'baseline_centre_pointing')} | "
                             f"{ref_rate('mean_box_prior')} | {ref_rate('most_covered_prior')} | {ref_rate('phrase_blind')} | {delta} |")
            lines.append("")
        if r.get("overlays"):
            lines += [f"Overlays of the best and worst cases (green: annotated, red: predicted box and point): "
                      f"`{Path(r['overlays']).name}/`"]
        return lines
