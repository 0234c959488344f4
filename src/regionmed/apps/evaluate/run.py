"""Run a set of evaluation tasks on one model and collect results + problems.

The tasks are those of the registry (:mod:`.tasks`; ``regionmed eval --help`` lists them with
the datasets each scores). :func:`plan_tasks` is the one place task names are checked: an
unknown name, and a task that none of the given datasets can supply, are reported with their
reason (``regionmed eval`` refuses them up front; :func:`evaluate` counts them as problems and
runs the rest). A task is never scored on another dataset's data than the one asked for.

Every image-side result states its test-time ROIs (``none`` / ``given`` / ``self``). A task
that fails is recorded as a problem with its message; the run goes on.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from regionmed.apps.evaluate.context import Datasets, EvalContext, EvalData, EvalOptions, Problems
from regionmed.apps.evaluate.tasks import get_task, task_names, tasks
from regionmed.errors import RegionmedError
from regionmed.outputs import refuse_inside_inputs

log = logging.getLogger(__name__)


class TaskError(RegionmedError, ValueError):
    """An evaluation task that is unknown, or that the given datasets cannot supply."""


@dataclass
class TaskPlan:
    """The asked tasks sorted out: those to run (in the asked order), the unknown names, and
    ``{task: why the given datasets cannot supply it}``."""

    run: list[str]
    unknown: list[str]
    unsupported: dict[str, str]


def plan_tasks(names: list[str], data: EvalData) -> TaskPlan:
    """Check the task ``names`` against the registry and the datasets ``data``."""
    known = set(task_names())
    unknown = [t for t in names if t not in known]
    why = {t: reason for t in names if t in known and (reason := get_task(t).unsupported(data))}
    return TaskPlan([t for t in names if t in known and t not in why], unknown, why)


def default_tasks(data: EvalData) -> list[str]:
    """The tasks the datasets ``data`` supply (``regionmed eval`` without ``--tasks``), in registry order."""
    return [t.name for t in tasks() if t.default(data)]


def evaluate(model, opts: EvalOptions, out_dir: str | Path) -> dict:
    """Run ``opts.tasks`` on ``model``; returns the results dict (``report.write_report`` writes it).

    Each task runs with ``opts.task_options[name]`` (its options dataclass; its defaults when
    absent), sharing one :class:`~.context.Datasets` (each dataset opened once) and one
    :class:`~.context.Problems`; figures are written under ``out_dir``."""
    data = opts.data
    out = refuse_inside_inputs(out_dir, inputs=[("the --medregion dataset", data.medregion), ("the --class-folder", data.class_folder),
                                        ("the --questions file", data.questions), ("the data root", data.data_root)])
    out.mkdir(parents=True, exist_ok=True)
    problems = Problems()
    plan = plan_tasks(opts.tasks, opts.data)
    for t in plan.unknown:
        problems.add("eval", f"unknown task {t!r} (known: {', '.join(task_names())}); skipped", "task_failed")
    model.eval()
    results: dict = {"tasks": {}, "timings_s": {}, "builtin_sets": opts.data.uses_builtin}
    for task, why in plan.unsupported.items():
        problems.add(task, f"skipped: {why}", "skipped")
    if plan.unsupported:
        results["skipped"] = plan.unsupported
    ctx = EvalContext(opts, Datasets(opts.data), problems, out)
    for name in plan.run:
        task = get_task(name)
        t0 = time.perf_counter()
        try:
            with torch.set_grad_enabled(task.needs_grad):  # a VQA head trains; everything else runs without gradients
                results["tasks"][name] = task.run(model, ctx, opts.task_options.get(name) or task.Options())
        except Exception as err:  # noqa: BLE001 - one failed task must not stop the others
            problems.add(name, f"task failed: {type(err).__name__}: {err}", "task_failed")
            log.debug(traceback.format_exc())
        results["timings_s"][name] = round(time.perf_counter() - t0, 2)
    results["problems"] = problems.summary()
    return results
