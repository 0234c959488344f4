"""Run a set of evaluation tasks on one model and collect results + problems.

Tasks (names used by ``regionmed eval --tasks``):

* ``zeroshot`` — the labels of a MedRegion split (``medregion``) and/or a folder per
  class (``class_folder``); SLAKE test (modality, organ, abnormality, see
  :func:`.suites.slake_zero_shot_tasks`) when the built-in sets are used;
* ``retrieval`` — image↔report R@1/5/10 on a MedRegion split (``medregion``);
* ``grounding`` — the annotated regions of a MedRegion split (``medregion``; each
  region's label, or caption, is a phrase) or, with the built-in sets, SLAKE test boxes;
  the centre-point and location-prior references come from the same dataset's
  training split;
* ``vqa`` — a user's question file (``questions``, :func:`.suites.question_file`);
* ``vqa_rad`` — VQA-RAD 3,064 / 451; ``slake_vqa`` — SLAKE English train / validate / test.

The built-in sets (SLAKE, VQA-RAD under ``data_root``) serve the generic tasks
(``zeroshot``, ``grounding``) only when no dataset of the user's is given
(``medregion``, ``class_folder``, ``questions``) or ``builtin`` is set: a task is
never scored on another dataset's data than the one asked for. A task that none of
the given datasets can supply is skipped with its reason (:func:`unsupported_tasks`;
``regionmed eval`` refuses it up front).

Every image-side result states its test-time ROIs (``none`` / ``given`` / ``self``).
A task that fails is recorded as a problem with its message; the run goes on.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from regionmed.apps.evaluate.suites import (
    SuiteError,
    folder_task,
    medregion_grounding_items,
    medregion_prior_items,
    medregion_task,
    question_file,
    restrict_task,
    slake_grounding_items,
    slake_image_refs,
    slake_questions,
    slake_zero_shot_tasks,
    vqa_rad_image_refs,
    vqa_rad_questions,
)
from regionmed.eval.grounding import (
    location_prior,
    save_overlay,
    score_prediction,
    summarise,
    window_boxes,
)
from regionmed.eval.images import ImageRef, ImageSetEmbeddings, embed_images, open_image
from regionmed.eval.prompts import load_prompts, proposal_phrases
from regionmed.eval.readout import ground_image
from regionmed.eval.vqa import VQAConfig, run_vqa, run_vqa_finetune
from regionmed.eval.zeroshot import run_task

log = logging.getLogger(__name__)
GROUNDING_READOUTS = ("patch", "windows")
TASKS = ("zeroshot", "retrieval", "vqa_rad", "slake_vqa", "grounding", "vqa")
BUILTIN_TASKS = ("zeroshot", "vqa_rad", "slake_vqa", "grounding")


@dataclass
class EvalOptions:
    data_root: str = "../shared/data"
    tasks: list[str] = field(default_factory=lambda: ["zeroshot", "vqa_rad", "slake_vqa", "grounding"])
    rois: str = "none"  # none | given | self (models without an ROI path run as none); none = the whole image
    image_feature: str = "auto"  # global | fused | roi | auto (fused for ROI models, global otherwise)
    prompts: str | None = None
    medregion: str | None = None
    medregion_split: str = "test"
    class_folder: str | None = None
    class_names: dict[str, str] = field(default_factory=dict)  # class (folder) name -> words in its prompts
    questions: str | None = None  # a user's VQA question file (task "vqa")
    builtin: bool | None = None  # use SLAKE / VQA-RAD for zeroshot and grounding; None = only without user data
    grounding_phrase: str = "label"  # MedRegion grounding: each region's "label" or "caption" is the phrase
    n_boot: int = 1000
    seed: int = 0
    batch_size: int = 32
    num_workers: int = 0
    vqa: VQAConfig = field(default_factory=VQAConfig)
    vqa_use_val: bool = True
    grounding_threshold: float = 0.5
    grounding_contrast: bool = False  # subtract the mean map over all phrases (removes the phrase-independent part)
    grounding_readouts: list[str] = field(default_factory=lambda: ["patch", "windows"])
    grounding_window_scales: tuple[float, ...] = (0.25, 0.4, 0.6)
    overlays: int = 8
    min_positives: int = 5
    limit_images: int | None = None  # keep the first N images per suite (smoke runs)
    limit_questions: int | None = None


class Problems:
    """Bad inputs and failed tasks: counted, with their messages (the report shows them)."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, task: str, message: str, kind: str = "input") -> None:
        log.warning("%s: %s", task, message)
        self.items.append({"task": task, "kind": kind, "message": message})

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for it in self.items:
            counts[it["task"]] = counts.get(it["task"], 0) + 1
        return {"count": len(self.items), "per_task": counts,
                "messages": [f"[{i['task']}] {i['message']}" for i in self.items[:200]]}


def uses_builtin(opts: EvalOptions) -> bool:
    """Whether the built-in sets serve the generic tasks: ``opts.builtin``, or by default
    only when no dataset of the user's is given."""
    if opts.builtin is not None:
        return bool(opts.builtin)
    return not (opts.medregion or opts.class_folder or opts.questions)


def default_tasks(opts: EvalOptions) -> list[str]:
    """The tasks the given datasets can supply (``regionmed eval`` without ``--tasks``)."""
    tasks = []
    if opts.medregion or opts.class_folder or uses_builtin(opts):
        tasks.append("zeroshot")
    if uses_builtin(opts):
        tasks += ["vqa_rad", "slake_vqa"]
    if opts.medregion or uses_builtin(opts):
        tasks.append("grounding")
    if opts.medregion:
        tasks.append("retrieval")
    if opts.questions:
        tasks.append("vqa")
    return tasks


def unsupported_tasks(opts: EvalOptions, tasks: list[str] | None = None) -> dict[str, str]:
    """``{task: why it cannot run on the given datasets}`` for the tasks of ``tasks`` (default
    ``opts.tasks``) that none of them can supply."""
    builtin = uses_builtin(opts)
    why = {}
    for t in tasks if tasks is not None else opts.tasks:
        if t == "zeroshot" and not (opts.medregion or opts.class_folder or builtin):
            why[t] = "zero-shot needs labelled images: --medregion DIR (records with labels), --class-folder DIR, or --builtin (SLAKE test)"
        elif t == "grounding" and not (opts.medregion or builtin):
            why[t] = ("grounding needs images with annotated boxes: --medregion DIR (its regions, split --medregion-split) "
                      "or --builtin (SLAKE test boxes); --class-folder and --questions carry no boxes")
        elif t == "retrieval" and not opts.medregion:
            why[t] = "retrieval needs a MedRegion dataset with reports: --medregion DIR"
        elif t == "vqa" and not opts.questions:
            why[t] = "vqa needs a question file: --questions FILE (columns image, question, answer, split[, answer_type])"
    return why


def _feature(model, opts: EvalOptions) -> str:
    if opts.image_feature != "auto":
        return opts.image_feature
    return "fused" if model.roi_processor is not None else "global"


def _limit(seq, n):
    return seq if n is None else seq[:n]


def _embed(model, refs, opts: EvalOptions, problems: Problems, task: str, rois: str | None = None) -> ImageSetEmbeddings:
    emb = embed_images(model, refs, rois or opts.rois, opts.batch_size, opts.num_workers,
                       phrases=proposal_phrases(opts.prompts))
    for key, why in emb.missing:
        problems.add(task, f"image {key} could not be read ({why}); skipped")
    for key, why in emb.box_problems:
        problems.add(task, f"image {key}: {why}")
    return emb


def eval_zeroshot(model, opts: EvalOptions, out: Path, problems: Problems) -> dict:
    results = {}
    jobs = []
    slake = Path(opts.data_root) / "slake"
    if uses_builtin(opts):
        try:
            refs, tasks, notes = slake_zero_shot_tasks(slake, "test", opts.min_positives)
            results["slake_notes"] = notes
            jobs += [(f"slake_{name}", name, refs, t, "slake") for name, t in tasks.items()]
        except Exception as err:  # noqa: BLE001
            problems.add("zeroshot", f"SLAKE zero-shot tasks not built: {err}")
    if opts.medregion:
        try:
            refs, t = medregion_task(opts.medregion, opts.medregion_split)
            jobs.append((t.name.replace(":", "_"), "medregion", refs, t, "medregion"))
        except Exception as err:  # noqa: BLE001
            problems.add("zeroshot", f"MedRegion task not built: {err}")
    if opts.class_folder:
        try:
            refs, t = folder_task(opts.class_folder)
            unknown = sorted(set(opts.class_names) - set(t.classes))
            if unknown:
                raise SuiteError(f"class names given for {unknown}, which are not folders of {opts.class_folder} "
                                 f"(its classes: {t.classes})")
            jobs.append((t.name.replace(":", "_"), "folder", refs, t, "folder"))
        except Exception as err:  # noqa: BLE001
            problems.add("zeroshot", f"class-folder task not built: {err}")
    cache: dict[str, ImageSetEmbeddings] = {}  # the SLAKE tasks share their images: embed them once
    feature = _feature(model, opts)
    for label, dataset, refs, task, group in jobs:
        try:
            refs = _limit(refs, opts.limit_images)
            if group not in cache:
                cache.clear()
                cache[group] = _embed(model, refs, opts, problems, "zeroshot")
            emb = cache[group]
            task, _ = restrict_task(task, {r.key for r in refs})  # --limit-images: not a problem
            task, dropped = restrict_task(task, set(emb.keys))
            if dropped:
                problems.add("zeroshot", f"{label}: {len(dropped)} image(s) without an embedding left out")
            idx = emb.index()
            x = emb.get(feature)[torch.tensor([idx[k] for k in task.keys], dtype=torch.long)]
            prompts = load_prompts(opts.prompts, dataset, opts.class_names if group != "slake" else None)
            res = run_task(model, x, task, prompts, opts.n_boot, opts.seed, roc_png=str(out / f"roc_{label}.png"))
            res.update(rois=emb.rois, image_feature=feature)
            results[label] = res
            if task.mode == "similarity":  # the positive/negative prompt-pair score beside it
                alt = run_task(model, x, replace(task, mode="pairs"), prompts, opts.n_boot, opts.seed)
                alt.update(rois=emb.rois, image_feature=feature)
                results[f"{label}_pairs"] = alt
        except Exception as err:  # noqa: BLE001
            problems.add("zeroshot", f"{label}: {err}", "task_failed")
    return results


def eval_vqa(model, opts: EvalOptions, which: str, problems: Problems) -> dict:
    root = Path(opts.data_root) / ("vqa_rad" if which == "vqa_rad" else "slake")
    refs = None
    if which == "vqa":
        split_qs, refs = question_file(opts.questions)
        train, test = split_qs["train"], split_qs["test"]
        val = (split_qs["val"] or None) if opts.vqa_use_val else None
    elif which == "vqa_rad":
        train, test, val = vqa_rad_questions(root, "train"), vqa_rad_questions(root, "test"), None
    else:
        train, test = slake_questions(root, "train"), slake_questions(root, "test")
        val = slake_questions(root, "validate") if opts.vqa_use_val else None
    train, test = _limit(train, opts.limit_questions), _limit(test, opts.limit_questions)
    val = _limit(val, opts.limit_questions) if val else val
    keys = list(dict.fromkeys(q.image_key for q in train + test + (val or [])))
    if which == "vqa":
        refs = [r for r in refs if r.key in set(keys)]
    else:
        refs = vqa_rad_image_refs(root, keys) if which == "vqa_rad" else slake_image_refs(root, keys)[0]
    rois = opts.rois
    note = ""
    if rois == "given" and not any(r.boxes for r in refs):
        rois, note = "none", "no boxes come with these images: given ROIs = none"
    cfg = VQAConfig(**{**opts.vqa.__dict__, "image_feature": _feature(model, opts), "seed": opts.seed, "n_boot": opts.n_boot})
    if cfg.finetune:
        res = run_vqa_finetune(model, train, test, refs, rois, cfg, val, which, phrases=proposal_phrases(opts.prompts), progress=True)
    else:
        emb = _embed(model, refs, opts, problems, which, rois)
        res = run_vqa(model, train, test, emb, cfg, val, which)
    for msg in res.pop("problems"):
        problems.add(which, msg)
    oos = res["out_of_set"]
    if oos["count"]:
        problems.add(which, f"{oos['count']} test answer(s) ({100 * oos['share']:.1f}%) are outside the training answer set "
                            f"and count as wrong, e.g. {oos['examples'][:5]}", "answer_outside_set")
    if note:
        res["rois_note"] = note
    res["dataset"] = str(opts.questions) if which == "vqa" else which
    return res


def _slake_location_prior(root: Path, problems: Problems) -> dict[str, list[float]]:
    """Mean relative box per class over the SLAKE *train* boxes (the prior baseline)."""
    from regionmed.data.decode import displayed_size

    items = []
    for ref in slake_grounding_items(root, "train"):
        try:
            size = displayed_size(ref.path)  # as decode_image returns it (EXIF orientation applied)
        except Exception as err:  # noqa: BLE001
            problems.add("grounding", f"train image {ref.key} not readable for the location prior ({type(err).__name__}); skipped")
            continue
        items.append((ref.boxes, ref.box_labels, size))
    return location_prior(items)


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


def grounding_suite(opts: EvalOptions, problems: Problems) -> GroundingSuite:
    """The dataset grounding scores: the annotated regions of ``opts.medregion``'s split when
    given (prior: its ``train`` split), else SLAKE test with the built-in sets (prior: SLAKE
    train). Raises :class:`SuiteError` when neither is available."""
    if opts.medregion:
        refs, prior_keys, notes = medregion_grounding_items(opts.medregion, opts.medregion_split, opts.grounding_phrase)
        prior, source = {}, "none: the dataset has no train split"
        if opts.medregion_split == "train":
            problems.add("grounding", "grounding on the train split: the location prior is fitted on the same boxes it is "
                                      "scored on (an optimistic reference)", "note")
        try:
            prior = location_prior(medregion_prior_items(opts.medregion, "train"))
            source = f"{notes['dataset']} train regions, mean relative box per label"
        except Exception as err:  # noqa: BLE001 - no train split: the prior is left out, said so
            problems.add("grounding", f"no location prior: {err}", "note")
        return GroundingSuite(f"{notes['dataset']} {opts.medregion_split}", refs, prior, source, prior_keys, notes)
    if not uses_builtin(opts):
        raise SuiteError(unsupported_tasks(opts, ["grounding"])["grounding"])
    root = Path(opts.data_root) / "slake"
    refs = slake_grounding_items(root, "test")
    if not refs:
        raise ValueError("no SLAKE test image with boxes")
    return GroundingSuite("slake test", refs, _slake_location_prior(root, problems), "SLAKE train boxes, mean relative box per class")


def eval_grounding(model, opts: EvalOptions, out: Path, problems: Problems) -> dict:
    from regionmed.data.transforms import Preprocessor

    unknown = [r for r in opts.grounding_readouts if r not in GROUNDING_READOUTS]
    if unknown:
        raise ValueError(f"grounding read-out(s) {unknown} not in {GROUNDING_READOUTS}")
    suite = grounding_suite(opts, problems)
    refs = _limit(suite.refs, opts.limit_images)
    prior = suite.prior
    pre = Preprocessor.from_model(model)  # windows are prepared as the model prepares ROIs (crops in crop mode)
    device = model.logit_scale.device
    phrases = sorted({lab for r in refs for lab in r.box_labels})
    text = model.encode_text([p.lower() for p in phrases])
    pidx = {p: i for i, p in enumerate(phrases)}
    rows: dict[str, list] = {r: [] for r in opts.grounding_readouts}
    per_class: dict[str, dict] = {r: {} for r in opts.grounding_readouts}
    n_overlay, n_windows = 0, []
    odir = out / "grounding_overlays"
    for ref in tqdm(refs, desc="grounding", leave=False, disable=None):  # no bar when not a terminal
        try:
            image = open_image(ref)
        except Exception as err:  # noqa: BLE001
            problems.add("grounding", f"image {ref.key} could not be read ({type(err).__name__}: {err}); skipped")
            continue
        labels = list(dict.fromkeys(ref.box_labels))
        w, h = image.size
        found = {}
        select = [pidx[lab] for lab in labels]
        for readout in [r for r in GROUNDING_READOUTS if r in rows]:  # the Predictor's read-outs too
            found[readout] = ground_image(model, pre, image, text, readout, threshold=opts.grounding_threshold,
                                          contrast=opts.grounding_contrast, select=select,
                                          window_scales=opts.grounding_window_scales)
            if readout == "windows":
                n_windows.append(len(window_boxes(w, h, opts.grounding_window_scales)))
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
                if n_overlay < opts.overlays:
                    odir.mkdir(parents=True, exist_ok=True)
                    save_overlay(image, res, gt, f"{ref.key}: {lab.lower()} ({readout})",
                                 odir / f"{n_overlay:02d}_{_safe(ref.key)}_{_safe(lab)[:40]}_{readout}.png")
            if n_overlay < opts.overlays:
                n_overlay += 1
    out_res: dict = {
        "dataset": suite.dataset,
        "rois": "none (patch: the whole-image patch grid; windows: sliding windows as ROIs)",
        "readouts": list(rows),
        "threshold": opts.grounding_threshold,
        "contrast": opts.grounding_contrast,
        "grid": list(model.patch_embeddings(torch.zeros(1, 3, pre.image_size, pre.image_size, device=device)).shape[1:3]),
        "prior": {"source": suite.prior_source, "classes": len(prior),
                  "test_phrases_without_prior": sorted({lab for r in refs for lab in r.box_labels
                                                        if suite.prior_key(r.key, lab) not in prior})},
        "overlays": str(odir) if n_overlay else None,
    }
    if suite.notes:
        out_res["notes"] = suite.notes
    for readout in rows:
        block = {"overall": summarise(rows[readout], opts.n_boot, opts.seed),
                 "per_class": {c: summarise(r) for c, r in sorted(per_class[readout].items())}}
        if readout == "windows":
            block.update(scales=list(opts.grounding_window_scales), windows_per_image=float(np.mean(n_windows)) if n_windows else 0.0,
                         embedding="ROI path (given windows as boxes)" if model.roi_processor is not None else "window crop as a whole image")
        out_res[readout] = block
    if "patch" in rows:  # the read-out stays the headline
        out_res.update(overall=out_res["patch"]["overall"], per_class=out_res["patch"]["per_class"])
    return out_res


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def eval_retrieval(model, opts: EvalOptions, problems: Problems) -> dict:
    from regionmed.eval.embed import embed_split
    from regionmed.eval.retrieval import retrieval_recall

    if not opts.medregion:
        raise ValueError("retrieval needs a MedRegion dataset (--medregion DIR)")
    emb = embed_split(model, opts.medregion, opts.medregion_split, batch_size=opts.batch_size, progress=False)
    for where, why in emb.skipped:
        problems.add("retrieval", f"sample {where} could not be read ({why}); skipped")
    if opts.rois == "self":
        problems.add("retrieval", "--rois self is not used by retrieval (the split's own boxes or none): scored with none", "note")
    # --rois given: the fused image embedding and the ROI embeddings of the split's boxes; otherwise (the default,
    # none) the whole-image embedding for reports and for each region's caption alike.
    region_aware = emb.region_emb is not None and opts.rois == "given"
    image = emb.image_fused if region_aware else emb.image_global
    res = {"reports": retrieval_recall(image, emb.report_emb, list(range(len(emb.reports))), emb.reports)}
    if len(emb.captions):
        region_side = emb.region_emb if region_aware else emb.image_global[emb.region_image]
        res["region_captions"] = retrieval_recall(region_side, emb.caption_emb, list(range(len(emb.captions))), emb.captions)
    res["rois"] = "given" if region_aware else "none"
    res["n_images"] = len(emb.ids)
    res["n_skipped"] = len(emb.skipped)
    return res


def evaluate(model, opts: EvalOptions, out_dir: str | Path) -> dict:
    """Run ``opts.tasks`` on ``model``; returns the results dict (also see :mod:`.report`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems = Problems()
    unknown = [t for t in opts.tasks if t not in TASKS]
    for t in unknown:
        problems.add("eval", f"unknown task {t!r} (known: {', '.join(TASKS)}); skipped", "task_failed")
    model.eval()
    results: dict = {"tasks": {}, "timings_s": {}, "builtin_sets": uses_builtin(opts)}
    skipped = unsupported_tasks(opts, [t for t in opts.tasks if t in TASKS])
    for task, why in skipped.items():
        problems.add(task, f"skipped: {why}", "skipped")
    if skipped:
        results["skipped"] = skipped
    for task in [t for t in opts.tasks if t in TASKS and t not in skipped]:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                if task == "zeroshot":
                    results["tasks"][task] = eval_zeroshot(model, opts, out, problems)
                elif task in ("vqa_rad", "slake_vqa", "vqa"):
                    with torch.enable_grad():
                        results["tasks"][task] = eval_vqa(model, opts, task, problems)
                elif task == "grounding":
                    results["tasks"][task] = eval_grounding(model, opts, out, problems)
                elif task == "retrieval":
                    results["tasks"][task] = eval_retrieval(model, opts, problems)
        except Exception as err:  # noqa: BLE001 - one failed task must not stop the others
            problems.add(task, f"task failed: {type(err).__name__}: {err}", "task_failed")
            log.debug(traceback.format_exc())
        results["timings_s"][task] = round(time.perf_counter() - t0, 2)
    results["problems"] = problems.summary()
    return results
