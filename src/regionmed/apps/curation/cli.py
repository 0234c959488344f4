"""Subcommands for the ``regionmed`` CLI: ``build``, ``check-source``, ``stats``, ``check-leakage``, ``preview``.

Wire them into the main parser with::

    sub = parser.add_subparsers(dest="command")
    add_build_parser(sub); add_check_source_parser(sub); add_stats_parser(sub); add_check_leakage_parser(sub)
    args = parser.parse_args(); sys.exit(args.func(args))

Each ``func(args)`` returns an exit status: 0 success, 1 a check failed
(``check-leakage`` found overlaps; ``check-source`` found what would stop a build), 2 a
usage or input error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from regionmed.apps.curation.images import NEAR_DUP_THRESHOLD

BUILD_HELP = """\
Build a MedRegion dataset (WebDataset tar shards + manifest.json + rejects.jsonl)
from real images and their text.

Either give a YAML build config (--config FILE; see regionmed.apps.curation.config for all
fields), or one source with flags (--source NAME --input PATH --out DIR), or both:
flags override the config (--source/--input replace its sources).

Sources: generic (folder + CSV/JSONL table, optional COCO / YOLO / VOC boxes),
detection (folder of images + YOLO or VOC labels), dicom, slake, vqa_rad, covid_cxr.
Proposers: annotation, unsupervised, detector, none.

Every input ends in the output or in rejects.jsonl with a reason; the printed
summary accounts for every input. Every row of every source is read first (as
check-source does): what cannot be built as configured stops before anything is
written, with the file, row and option to set. An interrupted build resumes where it stopped
(no duplicates); re-running a complete build with the same config does nothing.

Examples:
  regionmed build --source slake --input ../shared/data/slake --out runs/slake
  regionmed build --source covid_cxr --input ../shared/data/covid_cxr --out runs/cxr \\
      --proposer annotation --fallback unsupervised --workers 2 --limit 100
  regionmed build --source detection --input ../shared/data/tbx11k --out runs/tbx \\
      --option modality=xray --option body=chest --option kind=finding
  regionmed build --config build.yaml      (a YAML build config: see the README, "Using it")
"""


def _config_from_args(args: argparse.Namespace):
    """The build config of ``--config`` with the command-line flags applied."""
    from regionmed.apps.curation.config import BuildConfig, ConfigError, SourceSpec, load_config

    cfg = load_config(args.config) if args.config else BuildConfig()
    if args.source or args.input:
        if not (args.source and args.input):
            raise ConfigError("--source and --input go together")
        options = {}
        for opt in args.option or []:
            if "=" not in opt:
                raise ConfigError(f"--option {opt!r}: expected KEY=VALUE")
            k, v = opt.split("=", 1)
            options[k.strip()] = v
        cfg.sources = [SourceSpec(args.source, args.input, limit=args.limit, options=options)]
    elif args.option:
        raise ConfigError("--option needs --source and --input (in a config, set a source's options:)")
    elif args.limit is not None:
        for spec in cfg.sources:
            spec.limit = args.limit
    return cfg


def _check(cfg, where: str) -> int:
    """Print the check of every source of ``cfg``; exit status 1 when a build would stop (an
    error in a source), else 0, also with warnings and rows or boxes a build would reject
    (a build goes on with those: they end in rejects.jsonl). A config that does not
    validate raises (exit 2, as any usage error)."""
    from regionmed.apps.curation.builder import check_sources

    cfg.validate(where)
    reports = check_sources(cfg, files=True)
    for rep in reports:
        print(rep.format())
    rows = sum(r.rows for r in reports)
    bad = sum(sum(r.problems.values()) for r in reports)
    boxes = sum(sum(r.box_problems.values()) for r in reports)
    errors = sum(len(r.errors) for r in reports)
    warnings = sum(len(r.warnings) for r in reports)
    verdict = "a build would stop" if errors else "a build would run"
    print(f"checked {len(reports)} source(s), {rows} rows: {bad} would be rejected, {boxes} boxes dropped, "
          f"{warnings} warning(s), {errors} error(s): {verdict}; nothing was built")
    return 1 if errors else 0


def _build(args: argparse.Namespace) -> int:
    from regionmed.apps.curation.builder import build
    from regionmed.apps.curation.config import ConfigError

    cfg = _config_from_args(args)
    if args.out:
        cfg.out = args.out
    if args.workers is not None:
        if args.workers < 0:  # named as the flag, not as the config file's field
            raise ConfigError(f"--workers must be >= 0, got {args.workers}")
        cfg.workers = args.workers
    if args.proposer:
        cfg.proposer.name = args.proposer
    if args.fallback:
        cfg.proposer.fallback = args.fallback
    if args.checkpoint:
        cfg.proposer.checkpoint = args.checkpoint
    if args.negatives is not None:
        cfg.captions.negatives_per_region = args.negatives
    if args.no_progress:
        cfg.progress = False
    where = "command line" if not args.config else args.config
    if args.dry_run:
        return _check(cfg, where)
    cfg.validate(where)
    if not cfg.out:
        raise ConfigError("no output folder: give --out DIR (or out: in the config)")
    if args.proposer or cfg.proposer.name == "detector":
        from regionmed.apps.curation.proposers import make_proposer

        make_proposer(cfg.proposer)  # fail early, before any worker starts
    summary = build(cfg, force=args.force)
    nrej = sum(summary.rejected.values())
    return 0 if summary.inputs == summary.built + nrej else 1


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML build config (unknown keys are errors)")
    p.add_argument("--source", metavar="NAME", help="source adapter: generic, dicom, slake, vqa_rad, covid_cxr")
    p.add_argument("--input", metavar="PATH", help="the source's input folder")
    p.add_argument("--option", metavar="KEY=VALUE", action="append",
                   help="a source option, e.g. table=reports.csv, coco=boxes.json, modality=xray, "
                        "box_format=xywh, encoding=cp1252, uncertain_labels=U-Zeros (repeatable)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N items of each source")


CHECK_HELP = """\
Read every row of a build config's sources (or of one source given with flags) as a
build would, decode no image and build nothing, and report the problems a build would
meet, with counts and row references: rows that do not fit the header, label values
that are not labels, empty or placeholder reports (nan, NA, ...), duplicate ids,
missing image files, boxes that are malformed, in the other box format, of an unknown
category or that reach no image, columns the source does not read, and what stops a
build (text encoding, missing columns, broken CSV quoting).

Exit status: 0 a build would run (also when it lists warnings, or rows and boxes a
build would reject into rejects.jsonl), 1 a build would stop (an ERROR line says why),
2 a usage error (bad flags, a config file that cannot be read or does not validate).
"""


def _check_source(args: argparse.Namespace) -> int:
    return _check(_config_from_args(args), args.config or "command line")


def add_check_source_parser(subparsers) -> argparse.ArgumentParser:
    from regionmed.apps.curation.sources import SOURCES_HELP

    p = subparsers.add_parser(
        "check-source", help="dry run: read every row of a build's sources and report problems (builds nothing)",
        description=CHECK_HELP + "\n" + SOURCES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_source_args(p)
    p.set_defaults(func=_check_source)
    return p


def add_build_parser(subparsers) -> argparse.ArgumentParser:
    from regionmed.apps.curation.sources import SOURCES_HELP

    p = subparsers.add_parser(
        "build", help="build a MedRegion dataset from images and reports", description=BUILD_HELP + "\n" + SOURCES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_source_args(p)
    p.add_argument("--out", metavar="DIR", help="output folder")
    p.add_argument("--dry-run", action="store_true",
                   help="read every row of the sources, report problems with counts, build nothing (= check-source)")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (0 or 1: in-process; default 2)")
    p.add_argument("--proposer", choices=["annotation", "unsupervised", "detector", "none"], help="ROI proposer (default annotation)")
    p.add_argument("--fallback", choices=["annotation", "unsupervised", "detector", "none"],
                   help="proposer for images where the main one finds nothing")
    p.add_argument("--checkpoint", metavar="FILE", help="local checkpoint for the detector proposer")
    p.add_argument("--negatives", type=int, metavar="N", help="hard negatives per region (default 3)")
    p.add_argument("--force", action="store_true", help="rebuild from scratch even if DIR holds a dataset or a partial build")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_build)
    return p


def _stats(args: argparse.Namespace) -> int:
    from regionmed.apps.curation.stats import collect, format_table, plot

    st = collect(args.dir)
    print(format_table(st, top=args.top))
    if not args.no_plot:
        path = Path(args.plot) if args.plot else Path(args.dir) / "stats.png"
        plot(st, path)
        print(f"plot: {path}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in st.items()}, indent=1))
    return 0


def add_stats_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "stats", help="statistics of a MedRegion dataset (table + PNG plot)",
        description="Print regions per image, box-size distribution, caption lengths, class, region-label, "
                    "modality and negative-rule counts of a MedRegion dataset (all splits), and save a PNG plot "
                    "(default DIR/stats.png).",
    )
    p.add_argument("dir", metavar="DIR", help="a MedRegion dataset folder (with manifest.json)")
    p.add_argument("--plot", metavar="PNG", help="where to save the plot (default DIR/stats.png)")
    p.add_argument("--no-plot", action="store_true", help="table only")
    p.add_argument("--json", metavar="FILE", help="also write the raw statistics as JSON")
    p.add_argument("--top", type=int, default=15, metavar="N", help="classes listed in the table (default 15)")
    p.set_defaults(func=_stats)
    return p


def _check_leakage(args: argparse.Namespace) -> int:
    from regionmed.apps.curation.leakage import find_overlaps

    rows = find_overlaps(args.a, args.b, threshold=args.threshold)
    what = f"{args.a} vs {args.b}" if args.b else f"splits of {args.a}"
    exact = sum(r["kind"] == "exact" for r in rows)
    print(f"overlaps ({what}): {len(rows)} ({exact} exact, {len(rows) - exact} near, threshold {args.threshold} bits)")
    for r in rows[: args.max_rows]:
        print(f"  {r['kind']:<5} d={r['distance']:<2} A {r['a_split']}:{r['a_id']}  B {r['b_split']}:{r['b_id']}")
    if len(rows) > args.max_rows:
        print(f"  ... {len(rows) - args.max_rows} more (use --json for all)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if rows else 0


def _preview(args: argparse.Namespace) -> int:
    from regionmed.apps.curation.captions import CaptionConfig, make_negatives, make_summary, report_text
    from regionmed.apps.curation.sources import get_source

    cfg = CaptionConfig()
    shown = 0
    for item in get_source(args.source, args.input, limit=args.scan):
        if item.reject:
            continue
        summary = make_summary(report_text(item.report, item.facts, item.summary), cfg)
        negs = make_negatives(summary, args.negatives, cfg, key=item.id)
        if not negs:
            continue
        print(f"[{item.id}] summary: {summary}")
        for n in negs:
            print(f"    {n['rule']:<10} {n['text']}")
        shown += 1
        if shown >= args.n:
            break
    return 0


def add_preview_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "preview", help="show summaries and hard negatives made from a source's text (no images decoded)",
        description="Print the summary and rule-based hard negatives of the first N items of a source, to check "
                    "the caption rules and the confusable vocabulary on real report text before a build.",
    )
    p.add_argument("--source", required=True, metavar="NAME", help="source adapter name")
    p.add_argument("--input", required=True, metavar="PATH", help="the source's input folder")
    p.add_argument("-n", type=int, default=5, help="items to show (default 5)")
    p.add_argument("--negatives", type=int, default=3, metavar="K", help="negatives per summary (default 3)")
    p.add_argument("--scan", type=int, default=None, metavar="N", help="look at the first N items only")
    p.set_defaults(func=_preview)
    return p


def add_check_leakage_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "check-leakage", help="list images shared by two MedRegion datasets (exact + perceptual hash)",
        description="Compare two built MedRegion datasets (e.g. a pretraining set A and an evaluation set B) "
                    "and list the images they share: exact (same stored bytes, SHA-256) and near duplicates "
                    "(256-bit DCT perceptual hashes within --threshold bits). With one dataset, compare its splits "
                    "with each other, and list patient groups found in more than one split. "
                    "Exit status: 0 no overlap, 1 overlaps found, 2 error.",
    )
    p.add_argument("a", metavar="A", help="first dataset folder")
    p.add_argument("b", metavar="B", nargs="?", help="second dataset folder (omit to check the splits of A)")
    p.add_argument("--threshold", type=int, default=NEAR_DUP_THRESHOLD, metavar="BITS",
                   help=f"max Hamming distance for near duplicates (default {NEAR_DUP_THRESHOLD}, as the builder)")
    p.add_argument("--max-rows", type=int, default=50, metavar="N", help="overlaps printed (default 50)")
    p.add_argument("--json", metavar="FILE", help="write all overlaps as JSON")
    p.set_defaults(func=_check_leakage)
    return p

