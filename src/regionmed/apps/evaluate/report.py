"""Results JSON and a Markdown report (tables + links to the plots)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from regionmed.data.shards import write_json_atomic


def pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def with_ci(d: dict | None, key: str = "value") -> str:
    if not d or d.get(key) is None:
        return "–"
    lo, hi = d.get("ci", [None, None])
    ci = f" [{pct(lo)}–{pct(hi)}]" if lo is not None else ""
    return f"{pct(d[key])}{ci}"


def _json_default(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    write_json_atomic(path, json.loads(json.dumps(data, default=_json_default)))
    return path


def zeroshot_md(res: dict) -> list[str]:
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


def vqa_md(name: str, r: dict) -> list[str]:
    lines = [f"## VQA: {name}", "",
             f"Answers (training set only): {r['answers']}; train questions {r['train_questions']}, test questions {r['test_questions']}; "
             f"test-time ROIs: {r['rois']}; image feature: {r['image_feature']}; head kept at epoch {r['training']['epoch_kept']}.",
             "", "| overall [95% CI] | open | closed | out-of-set test answers | in-set accuracy |", "|---|---|---|---|---|",
             f"| {with_ci(r['overall'])} | {with_ci(r['open'])} (n={r['open']['n']}) | {with_ci(r['closed'])} (n={r['closed']['n']}) | "
             f"{r['out_of_set']['count']} ({pct(r['out_of_set']['share'])}%) | {pct(r['in_set_accuracy'])} |",
             "", "| question type | n | accuracy |", "|---|---|---|"]
    for t, d in r["per_question_type"].items():
        lines.append(f"| {t} | {d['n']} | {pct(d['accuracy'])} |")
    if r.get("rois_note"):
        lines += ["", r["rois_note"]]
    return lines


def _rate_ci(o: dict, key: str) -> str:
    ci = (o.get("intervals") or {}).get(key)
    if o.get(key) is None:
        return "–"
    return f"{pct(o[key])} [{pct(ci[0])}–{pct(ci[1])}]" if ci and ci[0] is not None else pct(o[key])


def grounding_md(r: dict) -> list[str]:
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
            lines.append(f"| {readout} | {o['n']} | {_rate_ci(o, 'pointing_game')} | {_rate_ci(o, 'iou@0.3')} | {pct(o['iou@0.5'])} | "
                         f"{o['mean_iou']:.3f} | {_rate_ci(o, 'baseline_centre_pointing')} | {_rate_ci(o, 'baseline_prior_pointing')} | "
                         f"{pct(o.get('baseline_prior_iou@0.3'))} | {pct(o.get('baseline_prior_iou@0.5'))} |")
    if r.get("overlays"):
        lines += ["", f"Overlays (green: annotated, red: predicted box and point): `{Path(r['overlays']).name}/`"]
    return lines


def retrieval_md(r: dict) -> list[str]:
    lines = ["## Retrieval", "", f"{r.get('n_images')} images; test-time ROIs: {r.get('rois')}", "",
             "| texts | i→t R@1 | R@5 | R@10 | t→i R@1 | R@5 | R@10 |", "|---|---|---|---|---|---|---|"]
    for name in ("reports", "region_captions"):
        d = r.get(name)
        if d:
            lines.append(f"| {name} | " + " | ".join(pct(d[f"{w}_R@{k}"]) for w in ("i2t", "t2i") for k in (1, 5, 10)) + " |")
    return lines


def markdown_report(results: dict, title: str = "regionmed evaluation") -> str:
    lines = [f"# {title}", ""]
    if results.get("model"):
        lines += [f"Model: `{results['model']}`", ""]
    tasks = results.get("tasks", {})
    if "zeroshot" in tasks:
        lines += zeroshot_md(tasks["zeroshot"]) + [""]
    for name in ("vqa", "vqa_rad", "slake_vqa"):
        if name in tasks:
            lines += vqa_md(name, tasks[name]) + [""]
    if "grounding" in tasks:
        lines += grounding_md(tasks["grounding"]) + [""]
    if "retrieval" in tasks:
        lines += retrieval_md(tasks["retrieval"]) + [""]
    if results.get("skipped"):
        lines += ["## Skipped tasks", ""] + [f"- {t}: {why}" for t, why in results["skipped"].items()] + [""]
    p = results.get("problems", {})
    lines += ["## Problems", "", f"{p.get('count', 0)} problem(s) counted: {json.dumps(p.get('per_task', {}))}", ""]
    lines += [f"- {m}" for m in p.get("messages", [])[:50]]
    if results.get("timings_s"):
        lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items())]
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str | Path, title: str = "regionmed evaluation") -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j = write_json(out / "results.json", results)
    md = out / "report.md"
    md.write_text(markdown_report(results, title), encoding="utf-8")
    return j, md
