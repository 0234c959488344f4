"""Task ``region_zeroshot``: given a box, what is in it?

Each labelled region of a MedRegion split (``--medregion``; boxes from the records, as given at
build time) is classified among the split's region labels that have at least
``--region-min-positives`` boxes (softmax over the classes' prompt ensembles,
:mod:`regionmed.eval.zeroshot`), in two ways:

* ``roi``: the model's region embedding of the box (its ROI path, with the whole image around
  it), for a model that has one;
* ``crop``: the box's crop (as the ROI path would crop it, at least 64 px) embedded as a whole
  image by the global path: what a global-only CLIP can do with a box.

Per-class one-vs-rest AUC, macro AUC and accuracy with bootstrap 95% CIs over boxes; the
paired difference ``roi - crop`` of the macro AUC on the same resamples. In the ablation, the
full method's ``roi`` stands beside global-only CLIP's ``crop``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from regionmed.apps.evaluate.context import EvalContext, EvalData
from regionmed.apps.evaluate.markdown import with_ci
from regionmed.apps.evaluate.tasks.base import EvalTask, option_field
from regionmed.data.schema import label_words
from regionmed.eval.embed import embed_split
from regionmed.eval.prompts import load_prompts
from regionmed.eval.stats import bootstrap_counts, macro_auc_resamples
from regionmed.eval.zeroshot import ZeroShotTask, class_scores, evaluate_scores


@dataclass
class RegionZeroShotOptions:
    min_positives: int = option_field(5, "--region-min-positives",
                                      "region zero-shot: a label needs this many boxes in the split to be a class (default 5)")


class RegionZeroShot(EvalTask):
    """Region-level zero-shot: each labelled box classified among the split's region labels, by the
    model's ROI embedding and by its crop embedded as a whole image; macro AUC with bootstrap 95% CIs."""

    name = "region_zeroshot"
    datasets = "--medregion: the labelled regions (given boxes) of its split"
    Options = RegionZeroShotOptions
    headline = (
        ("region ZS AUC (roi)", ("roi", "macro_auc", "auc")),
        ("region ZS AUC (crop)", ("crop", "macro_auc", "auc")),
    )

    def unsupported(self, data: EvalData) -> str | None:
        return None if data.medregion else "region zero-shot needs labelled boxes: --medregion DIR (its split's regions)"

    def default(self, data: EvalData) -> bool:
        """Opt-in (``--tasks region_zeroshot``): it embeds the split once more, as retrieval does."""
        return False

    def uses_data_root(self, data: EvalData) -> bool:
        return False

    def run(self, model, ctx: EvalContext, options: RegionZeroShotOptions) -> dict:
        data = ctx.datasets
        emb = embed_split(model, data.medregion.split(data.data.medregion_split), batch_size=ctx.opts.batch_size, progress=False)
        for where, why in emb.skipped:
            ctx.problems.add(self.name, f"sample {where} unreadable ({why}); left out")
        labels = [" ".join(lab.split()) for lab in emb.region_labels]
        counts = Counter(lab for lab in labels if lab)
        classes = sorted(c for c, n in counts.items() if n >= options.min_positives)
        out: dict = {"dataset": data.medregion.name, "split": data.data.medregion_split, "classes": classes,
                     "regions": len(labels), "unlabelled_regions": sum(not lab for lab in labels),
                     "regions_of_rare_labels": sum(n for c, n in counts.items() if c not in classes),
                     "min_positives": options.min_positives}
        if len(classes) < 2:
            ctx.problems.add(self.name, f"fewer than two region labels with {options.min_positives} boxes or more "
                                        f"({dict(counts)}); nothing to classify", "task_failed")
            return out
        rows = np.array([i for i, lab in enumerate(labels) if lab in classes], dtype=int)
        # each class in words, as its boxes' captions and the grounding term say it ("ActiveTuberculosis"
        # -> "active tuberculosis"); the labels themselves where two would read alike
        words = [label_words(c) for c in classes]
        names = words if len(set(words)) == len(words) else classes
        task = ZeroShotTask(f"{data.medregion.name}:regions", names, np.array([classes.index(labels[i]) for i in rows]),
                            [str(i) for i in rows], "softmax")
        prompts = load_prompts(ctx.opts.prompts, "medregion")
        counts_boot = bootstrap_counts(len(rows), ctx.opts.n_boot, ctx.opts.seed)
        scores = {}
        for name, x in (("roi", emb.region_emb), ("crop", emb.crop_emb)):
            if x is None:
                out[name] = None
                continue
            scores[name] = class_scores(model, x[rows], classes, prompts, "softmax")
            out[name] = evaluate_scores(scores[name], task, ctx.opts.n_boot, ctx.opts.seed)
        if len(scores) == 2:  # paired on the same resamples of boxes
            onehot = np.eye(len(classes), dtype=int)[task.labels]
            a, a_boot, _ = macro_auc_resamples(scores["roi"], onehot, counts_boot)
            b, b_boot, _ = macro_auc_resamples(scores["crop"], onehot, counts_boot)
            diff = (a_boot - b_boot)[np.isfinite(a_boot - b_boot)]
            if a is not None and b is not None:
                out["roi_minus_crop"] = {"auc": a - b, "ci": [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))]
                                         if diff.size else None}
        out["prompts"] = {"file": prompts.source, "version": prompts.version}
        return out

    def report(self, r: dict) -> list[str]:
        lines = [f"## Region-level zero-shot ({r.get('dataset')} {r.get('split')})", "",
                 f"{r.get('regions', 0)} regions; classes: labels with at least {r.get('min_positives')} boxes "
                 f"({len(r.get('classes') or [])}: {', '.join((r.get('classes') or [])[:12])}"
                 f"{' ...' if len(r.get('classes') or []) > 12 else ''}); softmax over the classes' prompt ensembles. **roi**: the model's region "
                 "embedding of the box; **crop**: the box's crop embedded as a whole image.", "",
                 "| read-out | boxes | macro AUC [95% CI] | accuracy [95% CI] |", "|---|---|---|---|"]
        for name in ("roi", "crop"):
            x = r.get(name)
            if x:
                lines.append(f"| {name} | {x['n_images']} | {with_ci(x['macro_auc'], 'auc')} | {with_ci(x['accuracy'])} |")
            elif name in r:
                lines.append(f"| {name} | – | (the model has no ROI path) | – |")
        d = r.get("roi_minus_crop")
        if d and d.get("ci"):
            lines += ["", f"roi − crop, macro AUC, paired over boxes: {100 * d['auc']:+.1f} "
                          f"[{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]"]
        return lines
