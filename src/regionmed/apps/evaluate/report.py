"""Results JSON and a Markdown report: each task's section (its ``report``), skipped tasks, problems."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from regionmed.apps.evaluate.tasks import tasks
from regionmed.data.shards import write_json_atomic


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    write_json_atomic(path, json.loads(json.dumps(data, default=_json_default)))
    return path


def markdown_report(results: dict, title: str = "regionmed evaluation") -> str:
    lines = [f"# {title}", ""]
    if results.get("model"):
        lines += [f"Model: `{results['model']}`", ""]
    done = results.get("tasks", {})
    for task in tasks():  # registry order
        if task.name in done:
            lines += task.report(done[task.name]) + [""]
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
