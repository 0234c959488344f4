"""Subcommand ``regionmed eval``.

``regionmed`` runs it through :func:`main` (its arguments parsed here, where the task registry
is loaded); ``add_eval_parser(sub)`` adds it to another parser. ``func(args)`` returns 0 on
success and 1 when a task produced no result; a usage or input error raises a
:class:`~regionmed.errors.RegionmedError` (``regionmed`` prints it on one line, exit 2).
Problems with single inputs (a missing image, a question whose image is missing, an answer
outside the answer set) do not stop a run: they are counted in the report.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

import torch

from regionmed.apps.evaluate.context import Datasets, EvalData, EvalOptions
from regionmed.apps.evaluate.report import write_report
from regionmed.apps.evaluate.run import TaskError, default_tasks, evaluate, plan_tasks
from regionmed.apps.evaluate.suites import read_class_names
from regionmed.apps.evaluate.tasks import task_names, tasks
from regionmed.apps.evaluate.tasks.base import add_option_arguments, options_from_args
from regionmed.eval.prompts import load_prompts
from regionmed.model.clip import load
from regionmed.outputs import refuse_inside_inputs

EVAL_HELP = """\
Evaluate a saved model folder (regionmed.load) and write OUT/results.json and
OUT/report.md with its plots (ROC curves, grounding overlays).

Datasets: your own (--medregion, --class-folder, --questions) or the built-in
SLAKE / VQA-RAD copies under --data-root. When you give a dataset of your own, the
generic tasks (zeroshot, grounding) score it and only it; add --builtin to also
score SLAKE. A task that none of the given datasets can supply is an error (exit 2)
naming what it needs; it never falls back to another dataset.

Tasks (--tasks, comma-separated; default: every task the given datasets supply):
{tasks}

Test-time ROIs (--rois): none (default: the whole image, as the ablation's
headline), given (the dataset's boxes; where only positive images carry boxes this
hands a region model the label), self (proposed by the model from patch-text
similarity); each result states which was used.

Prompts (--prompts FILE): laid over the packaged eval/prompts/default.yaml, so the
file needs only `version` and what it changes, e.g.
  version: my-1
  datasets:
    folder:
      class_text: {{notumor: "no tumor", glioma: "glioma"}}
Keys: version, extends (default | none), templates, positive, negative,
class_text, datasets.<modality|organ|abnormality|medregion|folder>, proposal_phrases
(documented in regionmed/eval/prompts.py).

Examples:
  regionmed eval runs/demo/region/model --out runs/eval
  regionmed eval runs/ablation/full/seed-0/model --tasks zeroshot,grounding --rois self
  regionmed eval MODEL --medregion runs/nodules --tasks grounding
  regionmed eval MODEL --class-folder brain_mri/test --class-names notumor="no tumor"
  regionmed eval MODEL --questions my_vqa.csv --tasks vqa
"""


def _tasks_help() -> str:
    out = []
    for t in tasks():
        measures = " ".join((t.__doc__ or "").strip().split("\n\n")[0].split())  # its docstring's first paragraph
        body = textwrap.wrap(f"{t.datasets.rstrip('.')}. {measures}".strip(), 68)
        out += [f"  {t.name:<10} {body[0]}"] + [f"             {line}" for line in body[1:]]
    return "\n".join(out)


def _options_classes() -> dict[type, list[str]]:
    """Each distinct options class of the registered tasks and the tasks that use it."""
    classes: dict[type, list[str]] = {}
    for t in tasks():
        classes.setdefault(t.Options, []).append(t.name)
    return classes


def eval_options(args: argparse.Namespace) -> EvalOptions:
    """The :class:`EvalOptions` of parsed ``regionmed eval`` arguments; raises :class:`TaskError`
    for an unknown task, or one the given datasets cannot supply."""
    data = EvalData(data_root=args.data_root, medregion=args.medregion, medregion_split=args.medregion_split,
                    class_folder=args.class_folder, class_names=read_class_names(args.class_names), questions=args.questions,
                    builtin=True if args.builtin else None)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else default_tasks(data)
    plan = plan_tasks(names, data)
    if not names or plan.unknown:
        raise TaskError(f"unknown or no task(s) {plan.unknown or names}; choose from {', '.join(task_names())}")
    if plan.unsupported:
        raise TaskError("; ".join(f"task {t!r} cannot run on the given data: {why}" for t, why in plan.unsupported.items()))
    return EvalOptions(tasks=names, data=data, rois=args.rois, image_feature=args.image_feature, prompts=args.prompts,
                       n_boot=args.n_boot, seed=args.seed, batch_size=args.batch_size, num_workers=args.workers,
                       limit_images=args.limit_images, limit_questions=args.limit_questions,
                       task_options={t.name: options_from_args(t.Options, args) for t in tasks()})


def _eval(args: argparse.Namespace) -> int:
    opts = eval_options(args)
    if any(t.uses_data_root(opts.data) for t in tasks() if t.name in opts.tasks):
        Datasets(opts.data).require_root("the built-in sets that vqa_rad, slake_vqa and (without data of your own) "
                                         "zeroshot/grounding use")
    if args.prompts:
        load_prompts(args.prompts)  # a bad prompt file stops the run before the model is loaded
    data = opts.data  # before the model is loaded: never into an input
    refuse_inside_inputs(args.out, inputs=[("the model folder", args.model), ("the --medregion dataset", data.medregion),
                                   ("the --class-folder", data.class_folder), ("the --questions file", data.questions)])
    model = load(args.model)
    torch.manual_seed(args.seed)
    results = evaluate(model, opts, args.out)
    results["model"] = str(args.model)
    json_path, md_path = write_report(results, args.out)
    print(f"wrote {json_path} and {md_path}; {results['problems']['count']} problem(s) counted")
    failed = [t for t in opts.tasks if t not in results.get("tasks", {})]
    if failed:  # bad samples are skipped and counted; a task that produced no result fails the run
        print(f"regionmed eval: task(s) failed: {', '.join(failed)} (see the report's problems)", file=sys.stderr)
        return 1
    return 0


HELP = "evaluate a model: zero-shot AUC, retrieval, VQA-RAD/SLAKE VQA, grounding"


def main(argv: list[str]) -> int:
    """``regionmed eval ARGV``: parse and run (errors are :class:`~regionmed.errors.RegionmedError`)."""
    parser = _arguments(argparse.ArgumentParser(prog="regionmed eval", description=EVAL_HELP.format(tasks=_tasks_help()),
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return args.func(args)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    return _arguments(subparsers.add_parser("eval", help=HELP, description=EVAL_HELP.format(tasks=_tasks_help()),
                                            formatter_class=argparse.RawDescriptionHelpFormatter))


def _arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", help="model folder written by training (config.json, model.safetensors, ...)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated tasks: {', '.join(task_names())} (default: every task the given datasets supply; "
                        "without data of your own: zeroshot, vqa_rad, slake_vqa, grounding)")
    p.add_argument("--out", default="runs/eval", help="output folder for results.json, report.md and plots (default runs/eval)")
    p.add_argument("--data-root", default=None, help="folder with slake/ and vqa_rad/ (default $REGIONMED_DATA)")
    p.add_argument("--rois", choices=("none", "given", "self"), default="none",
                   help="test-time ROIs: none = the whole image (default), given = the dataset's boxes (where only positive "
                        "images carry boxes they give away the label), self = proposed by the model")
    p.add_argument("--image-feature", choices=("auto", "global", "fused", "roi"), default="auto",
                   help="image embedding for zero-shot and VQA: auto = fused for ROI models, global otherwise")
    p.add_argument("--prompts", help="prompt-template YAML laid over the packaged eval/prompts/default.yaml (keys: see above)")
    p.add_argument("--medregion", help="a built MedRegion dataset: zero-shot on its labels, grounding on its regions, retrieval, "
                                           "region_zeroshot on its labelled boxes (opt-in)")
    p.add_argument("--medregion-split", default="test", help="split of --medregion (default test); the location prior uses its train split")
    p.add_argument("--class-folder", help="zero-shot on a folder per class (ROOT/<class>/<image>)")
    p.add_argument("--class-names", help="words for the classes' prompts: NAME=TEXT,... (notumor=\"no tumor\") or a YAML/JSON mapping file")
    p.add_argument("--questions", help="VQA question file (CSV/TSV/JSONL: image, question, answer, split[, answer_type]) for task vqa")
    p.add_argument("--builtin", action="store_true",
                   help="also use the built-in SLAKE set for zeroshot/grounding when data of your own is given")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for 95%% CIs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the VQA head (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="images per embedding batch (default 32)")
    p.add_argument("--workers", type=int, default=0, help="image-loading worker processes (default 0)")
    p.add_argument("--limit-images", type=int, help="keep the first N images per suite (smoke runs)")
    p.add_argument("--limit-questions", type=int, help="keep the first N questions per VQA split (smoke runs)")
    for options_cls, names in _options_classes().items():
        add_option_arguments(p.add_argument_group(f"options of {', '.join(names)}"), options_cls)
    p.set_defaults(func=_eval)
    return p
