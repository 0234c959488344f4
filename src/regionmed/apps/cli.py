"""The ``regionmed`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from regionmed import __version__
from regionmed.config import ConfigError, parse_override
from regionmed.errors import RegionmedError
from regionmed.threads import ENV as THREADS_ENV
from regionmed.threads import ThreadsError, set_threads


def _cmd_synth(args: argparse.Namespace) -> int:
    from regionmed.apps.curation.phantoms import PhantomConfig, write_phantom_dataset

    cfg = PhantomConfig(image_size=args.image_size, negatives_per_region=args.negatives)
    if args.shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {args.shard_size}")
    manifest = write_phantom_dataset(args.out, n_train=args.train, n_test=args.test, n_val=args.val, seed=args.seed, config=cfg,
                                     shard_max_count=args.shard_size)
    counts = ", ".join(f"{split}: {info['samples']} images / {info['regions']} regions" for split, info in manifest["splits"].items())
    print(f"wrote {args.out} ({counts})")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from regionmed.apps.train.config import load_run_config
    from regionmed.apps.train.trainer import train

    overrides = dict(parse_override(o) for o in args.set)
    if args.data:
        overrides["data.train"] = args.data
    if args.output_dir:
        overrides["train.output_dir"] = args.output_dir
    cfg = load_run_config(args.config, overrides, {"data.train": "--data", "train.output_dir": "--output-dir"})
    resume: str | bool | None = None
    if args.resume is not None:
        resume = True if args.resume == "auto" else args.resume
    if args.allow_config_changes and resume is None:
        raise ConfigError("--allow-config-changes only applies with --resume")
    summary = train(cfg, resume=resume, progress=not args.no_progress, allow_config_changes=args.allow_config_changes)
    if int(os.environ.get("RANK", "0")) == 0:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in summary["final_losses"].items())
        done = summary["steps_this_run"]
        ran = f"{summary['steps']} steps" if done == summary["steps"] else f"to step {summary['steps']} ({done} this run)"
        print(f"trained {ran}; last losses: {losses}; model: {cfg.train.output_dir}/model")
    return 0


def _cmd_index_shards(args: argparse.Namespace) -> int:
    from regionmed.data.shards import index_dataset

    done = index_dataset(args.dataset, args.split or None, progress=not args.no_progress and sys.stderr.isatty())
    for split, info in done.items():
        bad = f", {info['records_unreadable']} unreadable record(s) left out of the statistics" if info["records_unreadable"] else ""
        print(f"{args.dataset}: split {split}: indexed {info['samples']} samples ({split}-index.npz, statistics in manifest.json){bad}")
        for change in info.get("changes", []):
            print(f"  changed since the last index: {change}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from regionmed.apps.demo import run_demo

    run_demo(out_dir=args.out, n_train=args.train, n_test=args.test, steps_scale=args.steps_scale, seed=args.seed)
    return 0


# Commands whose module imports torch (and, for eval, the task registry): named here, parsed by their
# own module's main(argv) when they run, so that `regionmed --help` and the builder's commands start
# without importing them.
DELEGATED = {
    "eval": ("regionmed.apps.evaluate.cli", "evaluate a model: zero-shot AUC, retrieval, VQA-RAD/SLAKE VQA, grounding"),
    "ablate": ("regionmed.apps.ablation", "the same-data ablation: global CLIP vs the full method (+ROI, +hard negatives "
                                          "opt-in), over seeds"),
    "models": ("regionmed.apps.models", "list the named model architectures (model.name in a run config), or show one"),
}


# The dataset builder's commands: no torch computation in the main process, so no thread choice at start.
BUILDER_COMMANDS = ("synth", "build", "check-source", "stats", "check-leakage", "preview", "index-shards")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regionmed",
        description="Region-aware vision-language pretraining for medical images (RegionMed-CLIP).",
    )
    parser.add_argument("--version", action="version", version=f"regionmed {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch threads per process, for this command and the processes it starts (sets "
                             "REGIONMED_THREADS; default: the cores this process has, shared among torchrun's local "
                             "ranks, less the cores other processes keep busy; a run config's train.threads wins; the "
                             "dataset builder's workers use one thread each whatever it says)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("synth", help="write synthetic region-annotated phantoms as a MedRegion dataset",
                       description="Generate deterministic radiograph-like phantoms with findings, boxes, reports, "
                                   "summaries, region captions and hard negatives, written as WebDataset shards + manifest.json.")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--val", type=int, default=0, help="validation images (default 0)")
    p.add_argument("--test", type=int, default=400, help="held-out test images (default 400)")
    p.add_argument("--image-size", type=int, default=256, help="stored image side in pixels (default 256)")
    p.add_argument("--negatives", type=int, default=3, help="hard-negative captions per region (default 3)")
    p.add_argument("--shard-size", type=int, default=500,
                   help="samples per shard (default 500; smaller gives the several shards that streaming over "
                        "several ranks x workers needs)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("train", help="train a model with a progressive schedule from a YAML config",
                       description="Train RegionMed-CLIP. Runs in one process, or under torchrun "
                                   "(e.g. torchrun --nproc_per_node 2 -m regionmed train --config ...; gloo on CPU, nccl on GPU).")
    p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    p.add_argument("--data", help="override data.train (MedRegion dataset folder)")
    p.add_argument("--output-dir", help="override train.output_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set train.batch_size=16 (repeatable; value read as YAML)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue exactly from a checkpoint folder, or from the latest complete one in the output dir when no "
                        "path is given; a config that differs from the checkpoint's in a field that changes the run's "
                        "trajectory (batch size, seed, learning rates, stages, losses, model, data) is refused")
    p.add_argument("--allow-config-changes", action="store_true",
                   help="with --resume: accept such config changes (listed in the log and metrics.jsonl); the run then "
                        "no longer equals an uninterrupted one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="phantoms → train the full method, the same without box geometry, and a global-only "
                                    "CLIP → compare (CPU)",
                       description="Generate phantoms whose small findings vanish at the global input size, train three models "
                                   "with the same data, steps and seed (the region-aware full method; the same without box "
                                   "geometry, so its ROI tokens hold pixels only; a global-only CLIP), evaluate them on held-out "
                                   "phantoms (retrieval R@1/R@5 and a location/side test against hard negatives), and write "
                                   "OUT/report.md with a loss-curve plot. The README gives the measured time.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--train", type=int, default=2000, help="training phantoms (default 2000)")
    p.add_argument("--test", type=int, default=300, help="held-out phantoms (default 300)")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps (e.g. 0.1 for a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("index-shards", help="describe a MedRegion dataset's shards as they are now: index, statistics, "
                                            "sizes and digests (older datasets, or shards changed since they were built)",
                       description="Walk the tar headers and read the records of each split once, then write "
                                   "<split>-index.npz beside the shards and, into manifest.json, the split's statistics "
                                   "and counts and each shard's size, head/tail digest and sample count. Datasets built "
                                   "by this regionmed have all of them; readers refuse a shard that no longer matches "
                                   "them (edited, re-packed or truncated) and name this command: run it when the "
                                   "change was meant. What changed is printed; a shard cut short keeps its complete "
                                   "samples.")
    p.add_argument("dataset", help="MedRegion dataset folder")
    p.add_argument("--split", action="append", help="only this split (repeatable; default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_index_shards)

    from regionmed.apps.serve import add_serve_parser

    add_serve_parser(sub)

    for name, (_, helptext) in DELEGATED.items():
        # Parsed by the command's own module when it runs (main); prefix_chars="\0": its options pass through.
        sub.add_parser(name, help=helptext, add_help=False, prefix_chars="\0").add_argument("argv", nargs="*")

    from regionmed.apps.infer import add_infer_parsers  # embed, classify, ground, index, search

    add_infer_parsers(sub)

    from regionmed.apps.interop import add_interop_parsers

    add_interop_parsers(sub)

    try:  # the dataset builder's commands (regionmed.apps.curation)
        from regionmed.apps.curation.cli import (
            add_build_parser,
            add_check_leakage_parser,
            add_check_source_parser,
            add_preview_parser,
            add_stats_parser,
        )
    except ImportError as err:  # the builder's optional dependencies (pip install 'regionmed[build]')
        missing = str(err)

        def _unavailable(args: argparse.Namespace) -> int:
            print(f"regionmed {args.command}: the dataset builder needs its extras ({missing}): "
                  "pip install 'regionmed[build]'", file=sys.stderr)
            return 2

        for name in ("build", "check-source", "stats", "check-leakage", "preview"):
            sub.add_parser(name, help=f"(unavailable: {missing})").set_defaults(func=_unavailable)
    else:
        add_build_parser(sub)
        add_check_source_parser(sub)
        add_stats_parser(sub)
        add_check_leakage_parser(sub)
        add_preview_parser(sub)
    return parser


# Exit statuses: 0 done; 1 done, some inputs were problems (the commands that take many
# inputs); 2 the command could not run (a one-line error); EXIT_INTERNAL an unexpected
# exception, i.e. a bug (the traceback is printed): never 1, so that a script does not take
# a crash for "some inputs were problems". 70 is EX_SOFTWARE of BSD's sysexits.h.
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is printed escaped, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ThreadsError(f"--threads must be >= 1, got {args.threads}")
            os.environ[THREADS_ENV] = str(args.threads)  # inherited by the processes the command starts
        if args.command not in BUILDER_COMMANDS:  # they compute nothing with torch (their workers: one thread each)
            set_threads()
        if args.command in DELEGATED:
            return importlib.import_module(DELEGATED[args.command][0]).main(args.argv)
        return args.func(args)
    except RegionmedError as err:
        print(f"regionmed {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"regionmed {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout went away (`regionmed search ... | head`)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - no flush error at exit
        return 0
    except OSError as err:  # the file system refused (permissions, a full disk): not a bug in regionmed
        where = f"{err.filename}: " if err.filename else ""
        print(f"regionmed {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the boundary: a bug must not exit 1
        import traceback

        traceback.print_exc()
        print(f"regionmed {args.command}: internal error ({type(err).__name__}): a bug in regionmed, the traceback is "
              f"above; exit status {EXIT_INTERNAL}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
