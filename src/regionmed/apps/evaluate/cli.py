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

Datasets: your own (--medregion, --class-folder, --questions) or the built-in
SLAKE / VQA-RAD copies under --data-root. When you give a dataset of your own, the
generic tasks (zeroshot, grounding) score it and only it; add --builtin to also
score SLAKE. A task that none of the given datasets can supply is an error (exit 2)
naming what it needs; it never falls back to another dataset.

Tasks (--tasks, comma-separated; default: every task the given datasets supply):
  zeroshot   --medregion: the labels of its split; --class-folder: a folder per
             class (--class-names maps folder names to prompt words); built-in:
             SLAKE test modality (CT/MRI/X-Ray, softmax), organ (box classes,
             multi-label: cosine with each class's prompts; the positive/negative
             prompt-pair score is reported beside it), abnormality (normal vs
             abnormal from finding boxes and QA facts).
             Per-class and macro AUC and accuracy with bootstrap 95% CIs.
  grounding  --medregion: the annotated regions of its split (each region's label,
             or caption with --grounding-phrase caption, is a phrase; regions
             proposed at build time are left out); built-in: SLAKE test boxes.
             Pointing game, IoU>=0.3/0.5 (bootstrap 95% CIs over phrases) of two
             read-outs, the thresholded patch-text similarity map ("patch") and
             sliding windows embedded as regions ("windows"); beside them the
             centre point and a location prior (each label's mean box over the SAME
             dataset's train split); overlay PNGs.
  retrieval  image<->report and region<->caption R@1/5/10 on --medregion.
  vqa        --questions FILE: a CSV/TSV or JSONL file, one question a row, columns
             image (path, relative to the file or absolute), question, answer,
             split (train / val / test; train and test required), optional
             answer_type (OPEN / CLOSED; default CLOSED for yes/no answers),
             question_type, qid. Errors name the file, row and column.
  vqa_rad    VQA-RAD 3,064 train / 451 test questions (built-in).
  slake_vqa  SLAKE English train / validate (best epoch) / test (built-in).
             VQA = an MLP head on [image ; question] embeddings of the frozen model
             (or, with --vqa-finetune, of a copy trained end to end with it),
             answers = the training answer set (normalised: case, whitespace,
             punctuation); the share of test answers outside it is reported.

Test-time ROIs (--rois): none (default: the whole image, as the ablation's
headline), given (the dataset's boxes; where only positive images carry boxes this
hands a region model the label), self (proposed by the model from patch-text
similarity); each result states which was used.

Prompts (--prompts FILE): laid over the packaged eval/prompts/default.yaml, so the
file needs only `version` and what it changes, e.g.
  version: my-1
  datasets:
    folder:
      class_text: {notumor: "no tumor", glioma: "glioma"}
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

ABLATE_HELP = """\
The same-data ablation: build a MedRegion dataset whose training split holds no
image of an official test/validation split (checked), pretrain the variants of
`variants` -- (a) global-only CLIP, (b) + ROI processor, (c) + hard negatives,
(d) + progressive schedule (the full method); configs/ablation.yaml runs (a) and
(d), about 67 min on a 2-core CPU -- on the recipe `train.base` (default
cpu_pretrained.yaml: ImageNet EfficientNet-Lite0 + MiniLM; demo.yaml: resnet18
from random init) with the same data, steps, batch and seed, evaluate each on
SLAKE test (VQA, zero-shot, grounding) and VQA-RAD test (VQA) on the whole image
(plus the region variants with SLAKE's boxes given, in a separate table), once per
seed of `seeds` (default 0, 1, 2), and write OUT/report.md (per variant and metric
the mean and 95% interval across seeds; full vs global-only paired per seed; plots)
and OUT/results.json.

Started again with the same config and OUT, it keeps every finished variant/seed
(OUT/<variant>/seed-<s>/entry.json) and resumes an unfinished one from its last
checkpoint (train.checkpoint_every); a variant/seed made with another config is
started again. configs/ablation_long.yaml is the longer opt-in setting.

Examples:
  regionmed ablate --config configs/ablation.yaml
  regionmed ablate --config configs/ablation.yaml --set 'variants=[global, roi, roi_hn, full]'   # all four
  regionmed ablate --config configs/ablation.yaml --set 'seeds=[0]' --set train.steps=8 --set build.limit=40 --out runs/ablation-smoke
"""


def _eval(args: argparse.Namespace) -> int:
    from regionmed.apps.evaluate.report import write_report
    from regionmed.apps.evaluate.run import TASKS, EvalOptions, default_tasks, evaluate, unsupported_tasks, uses_builtin
    from regionmed.apps.evaluate.suites import SuiteError, read_class_names
    from regionmed.config import ConfigError
    from regionmed.eval.prompts import PromptError, load_prompts
    from regionmed.eval.vqa import VQAConfig
    from regionmed.model.towers import WeightsError

    try:
        class_names = read_class_names(args.class_names)
    except SuiteError as err:
        print(f"regionmed eval: error: {err}", file=sys.stderr)
        return 2
    opts = EvalOptions(
        data_root=args.data_root, rois=args.rois, image_feature=args.image_feature, prompts=args.prompts,
        medregion=args.medregion, medregion_split=args.medregion_split, class_folder=args.class_folder,
        class_names=class_names, questions=args.questions, builtin=True if args.builtin else None,
        grounding_phrase=args.grounding_phrase,
        n_boot=args.n_boot, seed=args.seed, batch_size=args.batch_size, num_workers=args.workers,
        vqa=VQAConfig(epochs=args.vqa_epochs, hidden=args.vqa_hidden, finetune=args.vqa_finetune,
                      finetune_epochs=args.vqa_finetune_epochs, finetune_lr=args.vqa_finetune_lr), overlays=args.overlays,
        grounding_threshold=args.grounding_threshold, grounding_contrast=args.grounding_contrast,
        grounding_readouts=[r.strip() for r in args.grounding_readouts.split(",") if r.strip()],
        limit_images=args.limit_images, limit_questions=args.limit_questions,
    )
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else default_tasks(opts)
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        print(f"regionmed eval: error: unknown or no task(s) {unknown or tasks}; choose from {', '.join(TASKS)}", file=sys.stderr)
        return 2
    opts.tasks = tasks
    cannot = unsupported_tasks(opts)
    if cannot:
        for t, why in cannot.items():
            print(f"regionmed eval: error: task {t!r} cannot run on the given data: {why}", file=sys.stderr)
        return 2
    needs_root = uses_builtin(opts) and any(t in ("zeroshot", "grounding") for t in tasks)
    if (needs_root or any(t in ("vqa_rad", "slake_vqa") for t in tasks)) and not Path(args.data_root).is_dir():
        print(f"regionmed eval: error: data root {args.data_root} does not exist (set --data-root or REGIONMED_DATA); "
              "it holds the built-in sets that vqa_rad, slake_vqa and (without data of your own) zeroshot/grounding use",
              file=sys.stderr)
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
    results = evaluate(model, opts, args.out)
    results["model"] = str(args.model)
    for t, why in results.get("skipped", {}).items():
        print(f"regionmed eval: task {t!r} skipped: {why}", file=sys.stderr)
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
    p.add_argument("--tasks", default=None,
                   help="comma-separated tasks: zeroshot, grounding, retrieval, vqa, vqa_rad, slake_vqa (default: every task "
                        "the given datasets supply; without data of your own: zeroshot, vqa_rad, slake_vqa, grounding)")
    p.add_argument("--out", default="runs/eval", help="output folder for results.json, report.md and plots (default runs/eval)")
    p.add_argument("--data-root", default=_default_data_root(),
                   help="folder with slake/ and vqa_rad/ (default $REGIONMED_DATA or ../shared/data)")
    p.add_argument("--rois", choices=("none", "given", "self"), default="none",
                   help="test-time ROIs: none = the whole image (default), given = the dataset's boxes (where only positive "
                        "images carry boxes they give away the label), self = proposed by the model")
    p.add_argument("--image-feature", choices=("auto", "global", "fused", "roi"), default="auto",
                   help="image embedding for zero-shot and VQA: auto = fused for ROI models, global otherwise")
    p.add_argument("--prompts", help="prompt-template YAML laid over the packaged eval/prompts/default.yaml (keys: see above)")
    p.add_argument("--medregion", help="a built MedRegion dataset: zero-shot on its labels, grounding on its regions, retrieval")
    p.add_argument("--medregion-split", default="test", help="split of --medregion (default test); the location prior uses its train split")
    p.add_argument("--grounding-phrase", choices=("label", "caption"), default="label",
                   help="--medregion grounding: each region's label (default) or its caption is the phrase")
    p.add_argument("--class-folder", help="zero-shot on a folder per class (ROOT/<class>/<image>)")
    p.add_argument("--class-names", help="words for the classes' prompts: NAME=TEXT,... (notumor=\"no tumor\") or a YAML/JSON mapping file")
    p.add_argument("--questions", help="VQA question file (CSV/TSV/JSONL: image, question, answer, split[, answer_type]) for task vqa")
    p.add_argument("--builtin", action="store_true",
                   help="also use the built-in SLAKE set for zeroshot/grounding when data of your own is given")
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
    p = subparsers.add_parser("ablate", help="the same-data ablation: global CLIP vs the full method (+ROI, +hard negatives opt-in), over seeds",
                              description=ABLATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="ablation YAML (see configs/ablation.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=8 (repeatable; value read as YAML)")
    p.add_argument("--out", help="override the output folder (out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_ablate)
    return p
