"""Task ``zeroshot``: prompt-ensemble zero-shot classification, per-class and macro AUC and accuracy
with bootstrap 95% CIs (:mod:`regionmed.eval.zeroshot`).

Scores the labels of a MedRegion split (``--medregion``), a folder per class (``--class-folder``)
and, with the built-in sets, SLAKE test: modality (softmax), organ (box classes, multi-label:
cosine with each class's prompts; the positive/negative prompt-pair score beside it) and
abnormality (normal vs abnormal from finding boxes and QA facts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from regionmed.apps.evaluate.context import INPUT_ERRORS, EvalContext, EvalData
from regionmed.apps.evaluate.markdown import with_ci
from regionmed.apps.evaluate.suites import restrict_task
from regionmed.apps.evaluate.tasks.base import EvalTask
from regionmed.eval.images import ImageSetEmbeddings
from regionmed.eval.prompts import load_prompts
from regionmed.eval.zeroshot import run_task


@dataclass
class ZeroShotOptions:
    min_positives: int = 5  # SLAKE organ classes need this many positive images


class ZeroShot(EvalTask):
    """Per-class and macro AUC and accuracy with bootstrap 95% CIs (the prompt-pair score beside multi-label ones)."""

    name = "zeroshot"
    datasets = ("--medregion: the labels of its split; --class-folder: a folder per class (--class-names maps folder "
                "names to prompt words); built-in: SLAKE test modality, organ and abnormality")
    Options = ZeroShotOptions
    headline = (
        ("ZS modality AUC", ("slake_modality", "macro_auc", "auc")),
        ("ZS organ AUC", ("slake_organ", "macro_auc", "auc")),
        ("ZS organ AUC (pairs)", ("slake_organ_pairs", "macro_auc", "auc")),
        ("ZS abnormality AUC", ("slake_abnormality", "macro_auc", "auc")),
    )

    def unsupported(self, data: EvalData) -> str | None:
        if data.medregion or data.class_folder or data.uses_builtin:
            return None
        return "zero-shot needs labelled images: --medregion DIR (records with labels), --class-folder DIR, or --builtin (SLAKE test)"

    def uses_data_root(self, data: EvalData) -> bool:
        return data.uses_builtin

    def run(self, model, ctx: EvalContext, options: ZeroShotOptions) -> dict:
        data, problems = ctx.datasets, ctx.problems
        results: dict = {}
        jobs = []  # (result label, prompt dataset, image refs, task, image group)
        if data.data.uses_builtin:
            try:
                refs, tasks, notes = data.slake.zero_shot_tasks("test", options.min_positives)
                results["slake_notes"] = notes
                jobs += [(f"slake_{name}", name, refs, t, "slake") for name, t in tasks.items()]
            except INPUT_ERRORS as err:
                problems.add(self.name, f"SLAKE zero-shot tasks not built: {err}")
        if data.data.medregion:
            try:
                refs, t = data.medregion.zero_shot_task(data.data.medregion_split)
                jobs.append((t.name.replace(":", "_"), "medregion", refs, t, "medregion"))
            except INPUT_ERRORS as err:
                problems.add(self.name, f"MedRegion task not built: {err}")
        if data.data.class_folder:
            try:
                refs, t = data.class_folder()
                jobs.append((t.name.replace(":", "_"), "folder", refs, t, "folder"))
            except INPUT_ERRORS as err:
                problems.add(self.name, f"class-folder task not built: {err}")
        cache: dict[str, ImageSetEmbeddings] = {}  # the SLAKE tasks share their images: embed them once
        feature = ctx.feature(model)
        for label, dataset, refs, task, group in jobs:
            try:
                refs = ctx.limit_images(refs)
                if group not in cache:
                    cache.clear()
                    cache[group] = ctx.embed(model, refs, self.name)
                emb = cache[group]
                task, _ = restrict_task(task, {r.key for r in refs})  # --limit-images: not a problem
                task, dropped = restrict_task(task, set(emb.keys))
                if dropped:
                    problems.add(self.name, f"{label}: {len(dropped)} image(s) without an embedding left out")
                idx = emb.index()
                x = emb.get(feature)[torch.tensor([idx[k] for k in task.keys], dtype=torch.long)]
                prompts = load_prompts(ctx.opts.prompts, dataset, data.data.class_names if group != "slake" else None)
                res = run_task(model, x, task, prompts, ctx.opts.n_boot, ctx.opts.seed, roc_png=str(ctx.out / f"roc_{label}.png"))
                res.update(rois=emb.rois, image_feature=feature)
                results[label] = res
                if task.mode == "similarity":  # the positive/negative prompt-pair score beside it
                    alt = run_task(model, x, replace(task, mode="pairs"), prompts, ctx.opts.n_boot, ctx.opts.seed)
                    alt.update(rois=emb.rois, image_feature=feature)
                    results[f"{label}_pairs"] = alt
            except INPUT_ERRORS as err:
                problems.add(self.name, f"{label}: {err}", "task_failed")
        return results

    def report(self, res: dict) -> list[str]:
        lines = ["## Zero-shot classification", "",
                 "| task | mode | images | test-time ROIs | image feature | macro AUC [95% CI] | accuracy [95% CI] |", "|---|---|---|---|---|---|---|"]
        for name, r in res.items():
            if not isinstance(r, dict) or "macro_auc" not in r:
                continue
            lines.append(f"| {name} | {r['mode']} | {r['n_images']} | {r.get('rois', '')} | {r.get('image_feature', '')} | "
                         f"{with_ci(r['macro_auc'], 'auc')} | {with_ci(r['accuracy'])} |")
        for name, r in res.items():
            if not isinstance(r, dict) or "per_class_auc" not in r:
                continue
            lines += ["", f"Per-class AUC, {name} (prompts {r.get('prompts', {}).get('file')} v{r.get('prompts', {}).get('version')}):", "",
                      "| class | positives | negatives | AUC [95% CI] |", "|---|---|---|---|"]
            for c, a in r["per_class_auc"].items():
                lines.append(f"| {c} | {a['n_pos']} | {a['n_neg']} | {with_ci(a, 'auc')} |")
            if r.get("roc_png"):
                lines += ["", f"![ROC {name}]({Path(r['roc_png']).name})"]
        if "slake_notes" in res:
            lines += ["", f"SLAKE label notes: {json.dumps(res['slake_notes'])}"]
        return lines
