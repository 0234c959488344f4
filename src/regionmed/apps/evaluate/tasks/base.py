"""The evaluation task interface (the role of open_clip's ``task`` classes) and its options helpers.

A task is a subclass of :class:`EvalTask` that declares

* ``name`` — what ``--tasks`` and ``results.json`` call it;
* ``datasets`` — which datasets it can score (shown by ``regionmed eval --help``), with
  :meth:`EvalTask.unsupported` saying why the given ones cannot supply it, and
  :meth:`EvalTask.default` whether it runs when ``--tasks`` is not given;
* ``Options`` — its own options dataclass; a field whose ``metadata`` holds ``flag`` and ``help``
  is a command-line argument (:func:`option_field`), the others keep their defaults;
* :meth:`EvalTask.run` — the task on one model: its results (a JSON-able dict; the figures it
  writes under the run's output folder are named in it);
* :meth:`EvalTask.report` — its section of ``report.md``; ``headline`` — the metrics a summary
  table shows (the ablation's), as ``(label, path in its results)``.

It is found through the registry of :mod:`regionmed.apps.evaluate.tasks` (:func:`register_task`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from regionmed.apps.evaluate.context import EvalContext, EvalData


def option_field(default: Any, flag: str, help: str, **kwargs) -> Any:  # noqa: A002 - argparse's name
    """A dataclass field that is also the command-line argument ``flag`` (``help`` as its help;
    ``kwargs`` go to ``add_argument``: ``type`` defaults to the default's type, a bool is a switch,
    a list is given comma-separated)."""
    factory = (lambda: list(default)) if isinstance(default, list) else None
    meta = {"flag": flag, "help": help, "argparse": kwargs}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class NoOptions:
    """A task without options of its own."""


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _dest(options_cls: type, name: str) -> str:
    return f"{options_cls.__name__}.{name}"  # one namespace entry per options class and field


def add_option_arguments(parser: argparse.ArgumentParser | Any, options_cls: type) -> None:
    """Add the command-line arguments of ``options_cls``'s option fields to ``parser``."""
    defaults = options_cls()
    for f in dataclasses.fields(options_cls):
        if "flag" not in f.metadata:
            continue
        default, dest, helptext = getattr(defaults, f.name), _dest(options_cls, f.name), f.metadata["help"]
        extra = {"metavar": f.name.upper(), **f.metadata["argparse"]}
        if isinstance(default, bool):
            parser.add_argument(f.metadata["flag"], dest=dest, action="store_true", help=helptext)
            continue
        if "choices" in extra:
            extra.pop("metavar")
        if isinstance(default, list):
            parser.add_argument(f.metadata["flag"], dest=dest, type=_comma_list, default=list(default), help=helptext, **extra)
        else:
            extra.setdefault("type", type(default))
            parser.add_argument(f.metadata["flag"], dest=dest, default=default, help=helptext, **extra)


def options_from_args(options_cls: type, args: argparse.Namespace) -> Any:
    """``options_cls`` with its option fields read from parsed ``args`` (others at their defaults)."""
    given = {f.name: getattr(args, _dest(options_cls, f.name)) for f in dataclasses.fields(options_cls)
             if "flag" in f.metadata and hasattr(args, _dest(options_cls, f.name))}
    return options_cls(**given)


class EvalTask:
    """One evaluation task; see the module docstring. Subclasses set the class attributes and
    implement :meth:`run` (and usually :meth:`unsupported`, :meth:`report`); the first paragraph of a
    subclass's docstring says what it measures (``regionmed eval --help``)."""

    name: ClassVar[str] = ""
    datasets: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    needs_grad: ClassVar[bool] = False  # run with gradients (a VQA head trains)
    headline: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = ()

    def unsupported(self, data: EvalData) -> str | None:
        """Why the datasets ``data`` cannot supply this task, or None when they can."""
        return None

    def default(self, data: EvalData) -> bool:
        """Whether the task runs on ``data`` when ``--tasks`` is not given."""
        return self.unsupported(data) is None

    def uses_data_root(self, data: EvalData) -> bool:
        """Whether the task reads the built-in sets under the data root."""
        return False

    def run(self, model, ctx: EvalContext, options: Any) -> dict:
        raise NotImplementedError

    def report(self, results: dict) -> list[str]:
        """Markdown lines of its section of ``report.md``."""
        return []
