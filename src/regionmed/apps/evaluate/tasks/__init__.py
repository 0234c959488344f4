"""The registry of evaluation tasks: one file per task, found by name.

Each task is an :class:`~.base.EvalTask` subclass in its own module; :func:`register_task` makes it
known (the built-in ones below, in this order: the order of ``--tasks`` by default, of
``report.md`` and of ``regionmed eval --help``). ``regionmed eval`` (its ``--tasks`` and the
arguments of every task's options), :func:`regionmed.apps.evaluate.run.evaluate`, ``results.json``,
``report.md`` and the ablation take the tasks from here, so a new task is one new module plus
one :func:`register_task` line.
"""

from __future__ import annotations

from regionmed.apps.evaluate.tasks.base import EvalTask, NoOptions, option_field
from regionmed.apps.evaluate.tasks.grounding import Grounding
from regionmed.apps.evaluate.tasks.region_zeroshot import RegionZeroShot
from regionmed.apps.evaluate.tasks.retrieval import Retrieval
from regionmed.apps.evaluate.tasks.slake_vqa import SlakeVQA
from regionmed.apps.evaluate.tasks.vqa import QuestionFileVQA
from regionmed.apps.evaluate.tasks.vqa_rad import VqaRadVQA
from regionmed.apps.evaluate.tasks.zeroshot import ZeroShot

__all__ = ["EvalTask", "NoOptions", "get_task", "option_field", "register_task", "task_names", "tasks"]

_REGISTRY: dict[str, EvalTask] = {}


def register_task(task: type[EvalTask]) -> type[EvalTask]:
    """Make the task class ``task`` known by its ``name`` (usable as a class decorator).
    Raises ``ValueError`` for a name that is empty or already taken by another class."""
    if not task.name:
        raise ValueError(f"{task.__name__}: an evaluation task needs a name")
    known = _REGISTRY.get(task.name)
    if known is not None and type(known) is not task:
        raise ValueError(f"evaluation task {task.name!r} is already registered ({type(known).__name__})")
    _REGISTRY[task.name] = task()
    return task


def task_names() -> list[str]:
    """The registered task names, in registration order."""
    return list(_REGISTRY)


def tasks() -> list[EvalTask]:
    """The registered tasks, in registration order."""
    return list(_REGISTRY.values())


def get_task(name: str) -> EvalTask:
    """The task registered as ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown evaluation task {name!r} (known: {', '.join(_REGISTRY)})") from None


for _task in (ZeroShot, VqaRadVQA, SlakeVQA, Grounding, RegionZeroShot, Retrieval, QuestionFileVQA):
    register_task(_task)
