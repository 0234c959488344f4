"""Subcommands ``regionmed eval`` and ``regionmed ablate``.

Wire them into the main parser with::

    from regionmed.eval.eval.cli import add_ablate_parser, add_eval_parser
    add_eval_parser(sub); add_ablate_parser(sub)

Each ``func(args)`` returns 0 on success and 2 on a usage or input error (the
message names what is wrong). Problems with single inputs (a missing image, a
question whose image is missing, an answer outside the answer set) do not stop a
run: they are counted in the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EVAL_HELP = """\
Evaluate a saved model folder (regionmed.load) and write OUT/results.json and
OUT/report.md with its plots (ROC curves, grounding overlays).

Tasks (--tasks, comma-separated):
  zeroshot   SLAKE test: modality (CT/MRI/X-Ray, softmax), organ (box classes,
             multi-label: cosine with each class's prompts; the positive/negative
             prompt-pair score is reported beside it), abnormality (normal
             vs abnormal from finding boxes and QA facts); plus --medregion (labels
             of a built dataset) and --class-folder (a folder per class).
             Per-class and macro AUC and accuracy with bootstrap 95% CIs.
  retrieval  image<->report and region<->caption R@1/5/10 on --medregion.
  vqa_rad    VQA-RAD 3,064 train / 451 test questions.
  slake_vqa  SLAKE English train / validate (best epoch) / test.
             VQA = an MLP head on [image ; question] embeddings of the frozen model
             (or, with --vqa-finetune, of a copy trained end to end with it),
             answers = the training answer set (normalised: case, whitespace,
             punctuation); the share of test answers outside it is reported.
  grounding  SLAKE test boxes: pointing game, IoU>=0.3/0.5 of two read-outs, the
             thresholded patch-text similarity map ("patch") and sliding windows
             embedded as regions ("windows"); beside them the centre point and a
             location prior (each class's mean SLAKE-train box); overlay PNGs.

Test-time ROIs (--rois): none, given (the dataset's boxes), self (proposed by the
model from patch-text similarity); each result states which was used.

Examples:
  regionmed eval runs/demo/region/model --out runs/eval
  regionmed eval runs/ablation/full/model --tasks zeroshot,grounding --rois self
  regionmed eval MODEL --tasks zeroshot,retrieval --medregion runs/medregion --medregion-split test
"""

ABLATE_HELP = """\
The same-data ablation: build a MedRegion dataset whose training split holds no
image of an official test/validation split (checked), pretrain (a) global-only
CLIP, (b) + ROI processor, (c) + hard negatives, (d) + progressive schedule (the
full method) with the same data, steps, batch and seed, evaluate all four on
SLAKE test (VQA, zero-shot, grounding) and VQA-RAD test (VQA) on the whole image
(plus the region variants with SLAKE's boxes given, in a separate table), and
write OUT/report.md (tables with 95% CIs, plots) and OUT/results.json.

Examples:
  regionmed ablate --config configs/ablation.yaml
  regionmed ablate --config configs/ablation.yaml --set train.steps=8 --set build.limit=40 --out runs/ablation-smoke
"""


def _eval(args: argparse.Namespace) -> int:
    from regionmed.apps.evaluate.report import write_report
    from regionmed.apps.evaluate.run import TASKS, EvalOptions, evaluate
    from regionmed.config import ConfigError
    from regionmed.eval.prompts import PromptError, load_prompts
    from regionmed.eval.vqa import VQAConfig
    from regionmed.model.towers import WeightsError

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        print(f"regionmed eval: error: unknown or no task(s) {unknown or tasks}; choose from {', '.join(TASKS)}", file=sys.stderr)
        return 2
    if not Path(args.data_root).is_dir() and any(t != "retrieval" for t in tasks):
        print(f"regionmed eval: error: data root {args.data_root} does not exist (set --data-root or REGIONMED_DATA)", file=sys.stderr)
        return 2
    try:
        if args.prompts:
            load_prompts(args.prompts)
        from regionmed.model.clip import load

        model = load(args.model)
    except (WeightsError, PromptError, ConfigError, OSError) as err:
        print(f"regionmed eval: error: {err}", file=sys.stderr)
        return 2
    import torch

    torch.manual_seed(args.seed)
    opts = EvalOptions(
        data_root=args.data_root, tasks=tasks, rois=args.rois, image_feature=args.image_feature, prompts=args.prompts,
        medregion=args.medregion, medregion_split=args.medregion_split, class_folder=args.class_folder,
        n_boot=args.n_boot, seed=args.seed, batch_size=args.batch_size, num_workers=args.workers,
        vqa=VQAConfig(epochs=args.vqa_epochs, hidden=args.vqa_hidden, finetune=args.vqa_finetune,
                      finetune_epochs=args.vqa_finetune_epochs, finetune_lr=args.vqa_finetune_lr), overlays=args.overlays,
        grounding_threshold=args.grounding_threshold, grounding_contrast=args.grounding_contrast,
        grounding_readouts=[r.strip() for r in args.grounding_readouts.split(",") if r.strip()],
        limit_images=args.limit_images, limit_questions=args.limit_questions,
    )
    results = evaluate(model, opts, args.out)
    results["model"] = str(args.model)
    json_path, md_path = write_report(results, args.out)
    print(f"wrote {json_path} and {md_path}; {results['problems']['count']} problem(s) counted")
    failed = [t for t in opts.tasks if t not in results.get("tasks", {})]
    if failed:  # bad samples are skipped and counted; a task that produced no result fails the run
        print(f"regionmed eval: task(s) failed: {', '.join(failed)} (see the report's problems)", file=sys.stderr)
        return 1
    return 0


def _default_data_root() -> str:
    try:
        from regionmed.apps import data_root

        return str(data_root())
    except Exception:  # noqa: BLE001
        return "../shared/data"


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate a model: zero-shot AUC, retrieval, VQA-RAD/SLAKE VQA, grounding",
                              description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder written by training (config.json, model.safetensors, ...)")
    p.add_argument("--tasks", default="zeroshot,vqa_rad,slake_vqa,grounding",
                   help="comma-separated tasks: zeroshot, retrieval, vqa_rad, slake_vqa, grounding (default: all but retrieval)")
    p.add_argument("--out", default="runs/eval", help="output folder for results.json, report.md and plots (default runs/eval)")
    p.add_argument("--data-root", default=_default_data_root(),
                   help="folder with slake/ and vqa_rad/ (default $REGIONMED_DATA or ../shared/data)")
    p.add_argument("--rois", choices=("none", "given", "self"), default="given", help="test-time ROIs (default given)")
    p.add_argument("--image-feature", choices=("auto", "global", "fused", "roi"), default="auto",
                   help="image embedding for zero-shot and VQA: auto = fused for ROI models, global otherwise")
    p.add_argument("--prompts", help="prompt-template YAML (default: the packaged eval/prompts/default.yaml)")
    p.add_argument("--medregion", help="a built MedRegion dataset: zero-shot on its labels, and retrieval")
    p.add_argument("--medregion-split", default="test", help="split of --medregion (default test)")
    p.add_argument("--class-folder", help="zero-shot on a folder per class (ROOT/<class>/<image>)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for 95%% CIs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the VQA head (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="images per embedding batch (default 32)")
    p.add_argument("--workers", type=int, default=0, help="image-loading worker processes (default 0)")
    p.add_argument("--vqa-epochs", type=int, default=60, help="VQA head training epochs (default 60)")
    p.add_argument("--vqa-hidden", type=int, default=512, help="VQA head hidden width (default 512)")
    p.add_argument("--vqa-finetune", action="store_true",
                   help="fine-tune the encoders with the VQA head (a copy of the model; default: frozen encoders)")
    p.add_argument("--vqa-finetune-epochs", type=int, default=3, help="epochs when fine-tuning (default 3)")
    p.add_argument("--vqa-finetune-lr", type=float, default=1e-5, help="encoder learning rate when fine-tuning (default 1e-5)")
    p.add_argument("--overlays", type=int, default=8, help="grounding overlay PNGs to write (default 8)")
    p.add_argument("--grounding-threshold", type=float, default=0.5,
                   help="box = component around the peak of the map thresholded at min + T*(max-min) (default 0.5)")
    p.add_argument("--grounding-contrast", action="store_true",
                   help="subtract from each phrase's map the mean map over all phrases of the suite")
    p.add_argument("--grounding-readouts", default="patch,windows",
                   help="comma-separated grounding read-outs: patch, windows (default both)")
    p.add_argument("--limit-images", type=int, help="keep the first N images per suite (smoke runs)")
    p.add_argument("--limit-questions", type=int, help="keep the first N questions per VQA split (smoke runs)")
    p.set_defaults(func=_eval)
    return p


def _ablate(args: argparse.Namespace) -> int:
    from regionmed.apps.ablation import AblationError, load_ablation_config, run_ablation
    from regionmed.apps.curation.builder import BuildError
    from regionmed.apps.curation.sources import SourceError
    from regionmed.config import ConfigError, parse_override
    from regionmed.data.shards import DatasetError

    try:
        overrides = dict(parse_override(o) for o in args.set)
        if args.out:
            overrides["out"] = args.out
        if args.no_progress:
            overrides["progress"] = False
        cfg = load_ablation_config(args.config, overrides)
        run_ablation(cfg)
    except (ConfigError, AblationError, BuildError, SourceError, DatasetError) as err:
        print(f"regionmed ablate: error: {err}", file=sys.stderr)
        return 2
    return 0


def add_ablate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ablate", help="the same-data ablation: global CLIP, +ROI, +hard negatives, +progressive",
                              description=ABLATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="ablation YAML (see configs/ablation.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=8 (repeatable; value read as YAML)")
    p.add_argument("--out", help="override the output folder (out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_ablate)
    return p
