"""The same-data ablation: four pretraining variants, one dataset, one step budget, several seeds.

``regionmed ablate --config configs/ablation.yaml``:

1. **data** — a MedRegion dataset is built (:mod:`regionmed.apps.curation`) from SLAKE,
   VQA-RAD and the chest radiographs in ``data_root``; the builder sends every image
   asked about in an official test (or validation) split, and its near-duplicates,
   to that split. Pretraining reads the ``train`` split ONLY, and this module checks
   (:func:`assert_training_only`) that none of its images is named by SLAKE
   ``test.json`` / ``validate.json`` or VQA-RAD ``testset.json``.
2. **pretraining** (the CPU recipe's encoders: ``base`` run config, by default
   ``cpu_pretrained.yaml``: ImageNet EfficientNet-Lite0 @128 px with output stride 16 +
   pretrained MiniLM; ``demo.yaml``: resnet18 from random init), the same data, total
   steps, batch and seed, for the variants of ``variants`` (default (a) and (d)):

   * ``global`` (a) — global-only CLIP: no ROI path; ``global`` + ``summary`` losses;
   * ``roi`` (b) — + ROI processor (crop ROIs) and the ``region`` loss; one stage;
   * ``roi_hn`` (c) — + ``hard_negative`` loss; one stage;
   * ``full`` (d) — + the progressive schedule: the base run config's own stages
     (warmup → refine → region → joint), rescaled to the same steps:
     the full method.

   (a)–(c) train everything from step 0 (text tower at ``text_lr_scale`` of the
   learning rate, image tower at ``image_lr_scale``: by default the base recipe's);
   (d) splits the same steps into the four stages.
3. **evaluation** of each model (:func:`regionmed.apps.evaluate.run.evaluate`): SLAKE test
   (VQA, zero-shot modality / organ / abnormality, grounding) and VQA-RAD test (VQA),
   every variant on the whole image (``eval.rois: none``, the same input for all);
   the region variants again with SLAKE's annotated boxes given
   (``eval.given_rois_tasks``), reported apart because those boxes carry label
   information.
4. **seeds** — steps 2–3 run once per seed of ``seeds`` (default 0, 1, 2) in
   ``<out>/<variant>/seed-<s>/``. The report gives, per variant and metric, the mean and
   the 95% interval across seeds (Student t: mean ± t(0.975, n−1)·sd/√n), and a paired
   comparison of the full method against global-only CLIP seed by seed.
5. **resume** — a finished variant/seed (its ``entry.json``) is kept; an unfinished one
   resumes from its last checkpoint (``train.checkpoint_every``) through the trainer's
   resume; the dataset build resumes by itself. A variant/seed folder made with another
   config (its ``ablation_run.json`` fingerprint differs) is started again, said so.
6. **report** — ``<out>/report.md`` (tables with 95% intervals, plots) and ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from regionmed.apps import data_root
from regionmed.apps.curation.builder import build
from regionmed.apps.curation.config import BuildConfig, SourceSpec
from regionmed.apps.evaluate.context import EvalData, EvalOptions
from regionmed.apps.evaluate.markdown import pct
from regionmed.apps.evaluate.report import write_json, write_report
from regionmed.apps.evaluate.run import evaluate, plan_tasks
from regionmed.apps.evaluate.tasks import get_task, tasks
from regionmed.apps.evaluate.tasks.grounding import GroundingOptions
from regionmed.apps.evaluate.tasks.vqa import VQAOptions
from regionmed.apps.train.checkpoint import step_folders
from regionmed.apps.train.config import RunConfig, StageConfig, load_run_config, validate_run_config
from regionmed.apps.train.metrics import plot_loss_curves
from regionmed.apps.train.trainer import train
from regionmed.config import ConfigError, load_yaml_config, overrides_named, parse_override
from regionmed.data.shards import MedRegionDataset
from regionmed.errors import RegionmedError
from regionmed.model.clip import load

VARIANTS = ("global", "roi", "roi_hn", "full")
LABELS = {
    "global": "(a) global-only CLIP",
    "roi": "(b) + ROI processor",
    "roi_hn": "(c) + hard negatives",
    "full": "(d) + progressive schedule (full method)",
}


class AblationError(RegionmedError, RuntimeError):
    pass


@dataclass
class AblationBuild:
    # folders of data_root; each is read by the source of its name unless source_options says otherwise
    sources: list[str] = field(default_factory=lambda: ["slake", "vqa_rad", "covid_cxr"])
    # per folder: {"source": adapter name (default: the folder's name), other keys: that source's
    # options}, e.g. {"tbx11k": {"source": "detection", "modality": "xray", "body": "chest", "kind": "finding"}}
    source_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    limit: int | None = None  # items per source (smoke runs)
    workers: int = 2


@dataclass
class AblationTrain:
    base: str = "cpu_pretrained.yaml"  # packaged run config (model, data) or a path
    steps: int = 120  # total steps of every variant
    batch_size: int = 32
    # The single-stage variants (global, roi, roi_hn): their one stage's settings. The
    # progressive variant (full) is the base run config's own stages, rescaled to `steps`.
    lr: float = 5.0e-4
    text_lr_scale: float = 0.1
    # The image tower's learning-rate multiplier in the single-stage variants; null = the base
    # run config's own (its first stage's lr_scale.image_tower, else 1): a pretrained tower
    # (cpu_pretrained.yaml) trains at a fifth of the rate in every variant alike.
    image_lr_scale: float | None = None
    warmup_steps: int = 5
    checkpoint_every: int = 20  # steps: a stopped run resumes from here (0 = stage ends only)
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted run-config overrides for every variant


@dataclass
class AblationEval:
    tasks: list[str] = field(default_factory=lambda: ["zeroshot", "slake_vqa", "vqa_rad", "grounding"])
    # Test-time ROIs of the headline tables: "none" gives every variant the same input
    # (the whole image). SLAKE's annotated boxes carry label information (a finding box
    # means "abnormal"), so results with them given are a separate table.
    rois: str = "none"
    given_rois_tasks: list[str] = field(default_factory=lambda: ["zeroshot", "slake_vqa"])  # also run with given boxes ([] = no)
    n_boot: int = 1000
    batch_size: int = 32
    vqa_epochs: int = 60
    vqa_hidden: int = 512
    vqa_finetune: bool = False  # fine-tune the encoders with the VQA head (slow on CPU: see the README)
    vqa_finetune_epochs: int = 3
    vqa_finetune_lr: float = 1.0e-5
    grounding_readouts: list[str] = field(default_factory=lambda: ["patch", "windows"])
    overlays: int = 6
    limit_images: int | None = None
    limit_questions: int | None = None


@dataclass
class AblationConfig:
    out: str = "runs/ablation"
    data_root: str | None = None  # default: $REGIONMED_DATA
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    seed: int | None = None  # a single seed: replaces `seeds`
    variants: list[str] = field(default_factory=lambda: ["global", "full"])  # all four: list(VARIANTS)
    build: AblationBuild = field(default_factory=AblationBuild)
    train: AblationTrain = field(default_factory=AblationTrain)
    eval: AblationEval = field(default_factory=AblationEval)
    progress: bool = True


def load_ablation_config(path: str | Path, overrides: dict[str, Any] | None = None) -> AblationConfig:
    path = Path(path)
    cfg = load_yaml_config(AblationConfig, path, overrides, what="ablation config", option_names={"out": "--out"})
    with overrides_named(path, overrides, {"out": "--out"}):
        return _checked_ablation_config(cfg, path)


def _checked_ablation_config(cfg: AblationConfig, path: Path) -> AblationConfig:
    bad = [v for v in cfg.variants if v not in VARIANTS]
    if bad or not cfg.variants:
        raise ConfigError(f"{path}: variants {bad or cfg.variants} (known: {', '.join(VARIANTS)})")
    for field_name, names in (("eval.tasks", cfg.eval.tasks), ("eval.given_rois_tasks", cfg.eval.given_rois_tasks)):
        unknown = plan_tasks(names, EvalData(builtin=True)).unknown
        if unknown:
            raise ConfigError(f"{path}: {field_name} names unknown task(s) {unknown} (known: {', '.join(t.name for t in tasks())})")
    if cfg.train.steps < 4:
        raise ConfigError(f"{path}: train.steps must be >= 4 (the progressive variant has four stages)")
    stray = sorted(set(cfg.build.source_options) - set(cfg.build.sources))
    if stray:
        raise ConfigError(f"{path}: build.source_options names folders that are not in build.sources: {stray}")
    if cfg.seed is not None:
        cfg.seeds = [cfg.seed]
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of distinct integers, got {cfg.seeds}")
    return cfg


def _data_root(cfg: AblationConfig) -> Path:
    return data_root(cfg.data_root)


# --------------------------------------------------------------------------- data


def source_spec(b: AblationBuild, folder: str, root: Path) -> SourceSpec:
    """The build source of ``root / folder``: the source named in ``b.source_options[folder]``
    (``source``; default: the folder's own name) with the rest of that mapping as its options."""
    options = dict(b.source_options.get(folder) or {})
    name = str(options.pop("source", folder))
    return SourceSpec(name, str(root / folder), limit=b.limit, options=options)


def build_training_data(cfg: AblationConfig, out: Path, log=print) -> Path:
    """Build the MedRegion dataset (all images, so that near-duplicates of held-out
    images are pushed out of train) and check its train split."""
    root = _data_root(cfg)
    missing = [s for s in cfg.build.sources if not (root / s).is_dir()]
    if missing:
        raise AblationError(f"data root {root} lacks {missing} (set data_root or REGIONMED_DATA)")
    bcfg = BuildConfig(out=str(out), workers=cfg.build.workers, progress=cfg.progress,
                       sources=[source_spec(cfg.build, s, root) for s in cfg.build.sources])
    summary = build(bcfg, log=log)
    assert_training_only(out, root)
    return Path(summary.out)


def held_out_images(root: Path) -> set[str]:
    """Record ids of every image named by an official test or validation split."""
    ids: set[str] = set()
    for fname in ("test.json", "validate.json"):
        path = root / "slake" / fname
        if path.is_file():
            ids |= {f"slake-{str(q['img_name']).split('/')[0]}" for q in json.loads(path.read_text(encoding="utf-8"))}
    path = root / "vqa_rad" / "testset.json"
    if path.is_file():
        ids |= {f"vqa_rad-{Path(str(q['image_name'])).stem}" for q in json.loads(path.read_text(encoding="utf-8"))}
    return ids


def assert_training_only(dataset: Path, root: Path) -> dict:
    """Fail unless the ``train`` split holds no image of an official test/validation split."""
    ds = MedRegionDataset(dataset, "train")
    held = held_out_images(root)
    ids = [ds.record(i)["id"] for i in range(len(ds))]
    ds.close()
    leaked = sorted({i.split("~")[0] for i in ids} & held)
    if leaked:
        raise AblationError(f"{dataset}: {len(leaked)} image(s) of an official test/validation split are in the training split "
                            f"(e.g. {leaked[:3]}); refusing to pretrain on them")
    counts: dict[str, int] = {}
    for i in ids:
        counts[i.split("-")[0]] = counts.get(i.split("-")[0], 0) + 1
    return {"train_images": len(ids), "per_source": counts, "held_out_images_checked": len(held)}


# --------------------------------------------------------------------------- variants


def _base_config(cfg: AblationConfig) -> Path:
    p = Path(cfg.train.base)
    if p.is_file():
        return p
    packaged = Path(str(resources.files("regionmed") / "configs" / cfg.train.base))
    if not packaged.is_file():
        raise ConfigError(f"train.base {cfg.train.base!r} is neither a file nor a packaged config")
    return packaged


def _stage(name, steps, lr, t: AblationTrain, losses, use_rois, image_lr_scale: float = 1.0) -> StageConfig:
    scales = {"text_tower": t.text_lr_scale}
    if image_lr_scale != 1.0:
        scales["image_tower"] = image_lr_scale
    return StageConfig(name=name, steps=steps, lr=lr, warmup_steps=min(t.warmup_steps, steps - 1), min_lr_ratio=1.0,
                       trainable=["all"], lr_scale=scales, losses=losses, use_rois=use_rois)


def rescale_stages(stages: list[StageConfig], total: int, source: str) -> list[StageConfig]:
    """The same stages with their step counts scaled to sum to ``total``: each gets one
    step, the rest is shared in proportion to the stages' own steps (largest remainder);
    warm-up steps scaled alike. The recipe itself (losses, trainable modules, learning
    rates, ROIs) stays in the run config."""
    if any(st.steps is None for st in stages):
        raise ConfigError(f"{source}: the progressive variant needs every stage in steps, not epochs")
    if total < len(stages):
        raise ConfigError(f"{source}: train.steps = {total} is fewer than the {len(stages)} stages of the recipe")
    base = sum(st.steps for st in stages)
    share = [st.steps * (total - len(stages)) / base for st in stages]
    steps = [1 + int(x) for x in share]
    for i in sorted(range(len(stages)), key=lambda i: int(share[i]) - share[i])[: total - sum(steps)]:
        steps[i] += 1
    return [dataclasses.replace(st, steps=n, warmup_steps=min(round(st.warmup_steps * n / st.steps), n - 1))
            for st, n in zip(stages, steps)]


def variant_config(cfg: AblationConfig, variant: str, data: Path, out: Path, seed: int | None = None) -> RunConfig:
    t = cfg.train
    overrides = {"data.train": str(data), "data.split": "train", "train.output_dir": str(out),
                 "seed": cfg.seeds[0] if seed is None else seed, "train.batch_size": t.batch_size,
                 "train.checkpoint_every": t.checkpoint_every, **t.overrides}
    run = load_run_config(_base_config(cfg), overrides)
    run = copy.deepcopy(run)
    run.train.tensorboard = False
    g = {"global": 1.0, "summary": 0.5}
    image_scale = t.image_lr_scale
    if image_scale is None:
        image_scale = run.train.stages[0].lr_scale.get("image_tower", 1.0) if run.train.stages else 1.0
    if variant == "global":
        run.model.roi.mode = "none"
        run.model.roi.grid_context = False  # a crop-mode option (demo.yaml sets it): no ROI path here
        run.train.stages = [_stage("clip", t.steps, t.lr, t, dict(g), False, image_scale)]
    elif variant == "roi":
        run.train.stages = [_stage("roi", t.steps, t.lr, t, {**g, "region": 1.0}, True, image_scale)]
    elif variant == "roi_hn":
        run.train.stages = [_stage("roi_hn", t.steps, t.lr, t, {**g, "region": 1.0, "hard_negative": 1.0}, True, image_scale)]
    elif variant == "full":
        run.train.stages = rescale_stages(run.train.stages, t.steps, f"{_base_config(cfg)}")
    else:
        raise ConfigError(f"unknown variant {variant!r}")
    validate_run_config(run, f"ablation variant {variant}")
    assert sum(s.steps for s in run.train.stages) == t.steps
    return run


# --------------------------------------------------------------------------- run


def _eval_options(cfg: AblationConfig, seed: int | None = None) -> EvalOptions:
    """The evaluation of every variant: ``eval``'s settings; the VQA and grounding settings go to every task
    that takes those options, any other task runs with its defaults."""
    e = cfg.eval
    by_options = {VQAOptions: VQAOptions(epochs=e.vqa_epochs, hidden=e.vqa_hidden, finetune=e.vqa_finetune,
                                         finetune_epochs=e.vqa_finetune_epochs, finetune_lr=e.vqa_finetune_lr),
                  GroundingOptions: GroundingOptions(readouts=list(e.grounding_readouts), overlays=e.overlays)}
    return EvalOptions(tasks=list(e.tasks), data=EvalData(data_root=str(_data_root(cfg))), rois=e.rois, n_boot=e.n_boot,
                       seed=cfg.seeds[0] if seed is None else seed, batch_size=e.batch_size,
                       limit_images=e.limit_images, limit_questions=e.limit_questions,
                       task_options={t.name: by_options[t.Options] for t in tasks() if t.Options in by_options})


def run_fingerprint(run: RunConfig, opts: EvalOptions, given_tasks: list[str]) -> str:
    """A hash of what makes a variant/seed's result: its run config (without the output
    folder and the checkpoint cadence) and its evaluation options."""
    cfg = asdict(run)
    cfg["train"].pop("output_dir", None)
    cfg["train"].pop("checkpoint_every", None)
    blob = json.dumps({"run": cfg, "eval": asdict(opts), "given": list(given_tasks)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_variant_seed(cfg: AblationConfig, variant: str, seed: int, data: Path, out: Path, log=print) -> tuple[dict, dict]:
    """Train and evaluate one variant with one seed in ``out/<variant>/seed-<seed>``, or keep /
    resume what an earlier run left there. Returns ``(entry, timings)``; ``entry["status"]`` is
    ``kept`` (finished earlier), ``resumed`` (training continued from a checkpoint),
    ``evaluated`` (trained earlier, evaluated now) or ``trained``."""
    run_dir = out / variant / f"seed-{seed}"
    run = variant_config(cfg, variant, data, run_dir, seed)
    opts = _eval_options(cfg, seed)
    fp = run_fingerprint(run, opts, cfg.eval.given_rois_tasks)
    marker = run_dir / "ablation_run.json"
    state = _read_json(marker)
    if run_dir.exists() and (state is None or state.get("fingerprint") != fp):
        log(f"[ablate] {variant} seed {seed}: {run_dir} was made with another config (or is not an ablation run); "
            "starting it again")
        shutil.rmtree(run_dir, ignore_errors=True)
    entry = _read_json(run_dir / "entry.json")
    if entry is not None:
        log(f"[ablate] {variant} seed {seed}: finished earlier, kept ({run_dir / 'entry.json'})")
        return {**entry, "status": "kept"}, {}
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fp, "variant": variant, "seed": seed}), encoding="utf-8")
    timings: dict[str, float] = {}
    summary = _read_json(run_dir / "train_summary.json")
    status = "evaluated"
    if summary is None or not (run_dir / "model").is_dir():
        resume = bool(step_folders(run_dir / "checkpoints"))
        status = "resumed" if resume else "trained"
        log(f"[ablate] {LABELS[variant]}, seed {seed}: {cfg.train.steps} steps, batch {run.train.batch_size}, "
            f"stages {[st.name for st in run.train.stages]}" + (" (resuming from the last checkpoint)" if resume else ""))
        t = time.perf_counter()
        torch.manual_seed(seed)
        summary = train(run, resume=True if resume else None, progress=cfg.progress)
        summary = {"steps": summary["steps"], "steps_this_run": summary.get("steps_this_run", summary["steps"]),
                   "final_losses": summary["final_losses"]}
        (run_dir / "train_summary.json").write_text(json.dumps(summary), encoding="utf-8")
        timings["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model = load(run_dir / "model")
    res = evaluate(model, opts, run_dir / "eval")
    res["model"] = str(run_dir / "model")
    write_report(res, run_dir / "eval", f"evaluation: {LABELS[variant]}, seed {seed}")
    entry = {"label": LABELS[variant], "seed": seed, "train": summary, "stages": [asdict(st) for st in run.train.stages],
             "eval": res}
    if cfg.eval.given_rois_tasks and cfg.eval.rois != "given" and model.roi_processor is not None:
        no_overlays = {name: replace(o, overlays=0) if isinstance(o, GroundingOptions) else o for name, o in opts.task_options.items()}
        given = replace(opts, rois="given", tasks=list(cfg.eval.given_rois_tasks), task_options=no_overlays)
        entry["eval_given"] = evaluate(model, given, run_dir / "eval_given")
        write_report(entry["eval_given"], run_dir / "eval_given", f"evaluation with given boxes: {LABELS[variant]}, seed {seed}")
    timings["eval_s"] = time.perf_counter() - t
    entry["timings_s"] = timings
    write_json(run_dir / "entry.json", entry)  # written last: its presence means "finished"
    return {**entry, "status": status}, timings


def run_ablation(cfg: AblationConfig, log=print) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    log(f"[ablate] building the training data in {out / 'data'} (kept when already built with this config)")
    data = build_training_data(cfg, out / "data", log=log)
    data_info = assert_training_only(data, _data_root(cfg))
    timings["build_s"] = time.perf_counter() - t0
    log(f"[ablate] training split: {data_info}; seeds {cfg.seeds}")
    results: dict[str, Any] = {"config": asdict(cfg), "data": data_info, "variants": {}}
    for seed in cfg.seeds:  # seed-major: a stopped run has whole seeds to compare
        for variant in cfg.variants:
            entry, tm = run_variant_seed(cfg, variant, seed, data, out, log)
            for k, v in tm.items():
                timings[f"{k[:-2]}_{variant}_seed{seed}_s"] = v
            results["variants"].setdefault(variant, {"label": LABELS[variant], "seeds": {}})["seeds"][str(seed)] = entry
            write_json(out / "results.json", {**results, "timings_s": timings})
            if tm:
                log(f"[ablate] {variant} seed {seed} ({entry['status']}): "
                    + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in tm.items()))
    for v, r in results["variants"].items():
        r["aggregate"] = aggregate_variant(r, COLUMNS + other_columns(results))
    results["paired"] = paired_comparison(results)
    timings["total_s"] = time.perf_counter() - t0
    results["timings_s"] = timings
    plots = make_plots(results, out)
    results["plots"] = plots
    write_json(out / "results.json", results)
    (out / "report.md").write_text(ablation_report(results), encoding="utf-8")
    log(f"[ablate] report: {out / 'report.md'} ({timings['total_s']:.0f} s)")
    return results


# --------------------------------------------------------------------------- report

def task_columns(names: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """``(label, path in results["tasks"])`` of the headline metrics of the tasks ``names`` (each task's ``headline``)."""
    return [(label, (name, *path)) for name in names for label, path in get_task(name).headline]


VQA_COLUMNS = task_columns(["slake_vqa", "vqa_rad"])
ZS_GROUNDING_COLUMNS = task_columns(["zeroshot", "grounding"])
COLUMNS = VQA_COLUMNS + ZS_GROUNDING_COLUMNS


def other_columns(results: dict) -> list[tuple[str, tuple[str, ...]]]:
    """The headline metrics of the evaluated tasks outside the two standard tables."""
    standard = {path[0] for _, path in COLUMNS}
    names = [t for t in dict.fromkeys((results.get("config") or {}).get("eval", {}).get("tasks", [])) if t not in standard]
    return task_columns(names)


def _get(d, path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _ci_of(tasks, path) -> list | None:
    """The bootstrap CI of the value at ``path`` (``ci`` of its parent, or the grounding
    ``intervals`` entry), or ``None``."""
    parent = _get(tasks, path[:-1])
    if not isinstance(parent, dict):
        return None
    ci = parent.get("ci")
    if ci is None:
        ci = (parent.get("intervals") or {}).get(path[-1])
    return ci if ci and ci[0] is not None else None


def _cell(tasks, path) -> str:
    value = _get(tasks, path)
    if value is None:
        return "–"
    ci = _ci_of(tasks, path)
    return f"{pct(value)} [{pct(ci[0])}–{pct(ci[1])}]" if ci else pct(value)


def seed_interval(values: list[float], bounds: tuple[float, float] | None = None) -> dict:
    """Mean and 95% interval across seeds: mean ± t(0.975, n−1)·sd/√n (Student t; sd with
    n−1). ``interval`` is ``[None, None]`` with one seed. ``bounds``: the metric's range
    (e.g. (0, 1) for an accuracy); an interval reaching past it is cut to it and marked
    ``clipped`` (with two seeds t(0.975, 1) = 12.7, so intervals are wide)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return {"mean": None, "interval": [None, None], "n": 0, "values": []}
    mean = sum(vals) / n
    if n < 2:
        return {"mean": mean, "interval": [None, None], "n": 1, "values": vals}
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    clipped = bounds is not None and (lo < bounds[0] or hi > bounds[1])
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": mean, "interval": [lo, hi], "n": n, "sd": sd, "values": vals, "clipped": clipped}


def _seeds(r: dict) -> list[dict]:
    return [r["seeds"][k] for k in sorted(r.get("seeds", {}), key=int)]


def aggregate_variant(r: dict, columns: list | None = None) -> dict:
    """Per metric of the tables (``columns``, default :data:`COLUMNS`): its values over the variant's
    seeds, mean and 95% interval."""
    out = {"eval": {}, "eval_given": {}}
    for label, path in columns or COLUMNS:
        out["eval"][label] = seed_interval([_get(e["eval"]["tasks"], path) for e in _seeds(r)], bounds=(0.0, 1.0))
    for label, path in GIVEN_COLUMNS:
        vals = [_get(e["eval_given"]["tasks"], path) for e in _seeds(r) if e.get("eval_given")]
        if vals:
            out["eval_given"][label] = seed_interval(vals, bounds=(0.0, 1.0))
    return out


def paired_comparison(results: dict, variant: str = "full", reference: str = "global") -> dict | None:
    """The full method against global-only CLIP, seed by seed (the same seed's data order and
    initialisation): per metric, each seed's difference (variant − reference), whether that
    seed's bootstrap CIs are apart, how many seeds favour the variant, and the mean
    difference with its 95% interval across seeds (a paired t interval)."""
    vs = results["variants"]
    if variant not in vs or reference not in vs:
        return None
    seeds = sorted(set(vs[variant]["seeds"]) & set(vs[reference]["seeds"]), key=int)
    cols = {}
    for label, path in COLUMNS + other_columns(results):
        diffs, apart = {}, []
        for s in seeds:
            a, b = (vs[x]["seeds"][s]["eval"]["tasks"] for x in (variant, reference))
            va, vb = _get(a, path), _get(b, path)
            if va is None or vb is None:
                continue
            diffs[s] = va - vb
            ca, cb = _ci_of(a, path), _ci_of(b, path)
            if ca and cb and (ca[0] > cb[1] or cb[0] > ca[1]):
                apart.append(s)
        if diffs:
            cols[label] = {**seed_interval(list(diffs.values()), bounds=(-1.0, 1.0)), "per_seed": diffs,
                           "seeds_favouring_variant": sum(d > 0 for d in diffs.values()), "seeds_with_cis_apart": apart}
    return {"variant": variant, "reference": reference, "seeds": [int(s) for s in seeds], "columns": cols}


def _agg_cell(agg: dict | None) -> str:
    if not agg or agg.get("mean") is None:
        return "–"
    lo, hi = agg["interval"]
    mark = "*" if agg.get("clipped") else ""
    return f"{pct(agg['mean'])} [{pct(lo)}–{pct(hi)}]{mark}" if lo is not None else pct(agg["mean"])


def _ordered(results: dict) -> list[str]:
    """The variants in the config's order (results.json is written with sorted keys)."""
    order = [v for v in results.get("config", {}).get("variants", []) if v in results["variants"]]
    return order + [v for v in results["variants"] if v not in order]


def _n_seeds(results: dict) -> int:
    return max((len(r.get("seeds", {})) for r in results["variants"].values()), default=0)


def ablation_table(results: dict, columns=None, which: str = "eval") -> str:
    """One row per variant: with several seeds the mean [95% interval across seeds], with one
    seed its value [bootstrap 95% CI]."""
    columns = columns or COLUMNS
    head = "| variant | " + " | ".join(c for c, _ in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    many = _n_seeds(results) > 1
    for v in _ordered(results):
        r = results["variants"][v]
        entries = [e for e in _seeds(r) if e.get(which)]
        if not entries:
            continue
        if many:
            agg = r.get("aggregate") or aggregate_variant(r, COLUMNS + other_columns(results))
            cells = [_agg_cell(agg[which].get(c)) for c, _ in columns]
        else:
            cells = [_cell(entries[0][which]["tasks"], p) for _, p in columns]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(results: dict) -> str | None:
    p = results.get("paired")
    if not p or not p["columns"]:
        return None
    seeds = [str(s) for s in p["seeds"]]
    lines = ["| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean difference [95% interval] | seeds favouring full | seeds with CIs apart |",
             "|" + "---|" * (len(seeds) + 4)]
    for label, c in p["columns"].items():
        per = [(f"{100 * c['per_seed'][s]:+.1f}" if s in c["per_seed"] else "–") for s in seeds]
        lo, hi = c["interval"]
        mean = f"{100 * c['mean']:+.1f}" + (f" [{100 * lo:+.1f} to {100 * hi:+.1f}]" if lo is not None else "")
        lines.append(f"| {label} | " + " | ".join(per) + f" | {mean} | {c['seeds_favouring_variant']}/{c['n']} | "
                     f"{', '.join(f'seed {x}' for x in c['seeds_with_cis_apart']) or 'none'} |")
    return "\n".join(lines)


GIVEN_COLUMNS = [
    ("SLAKE VQA overall", ("slake_vqa", "overall", "value")),
    ("SLAKE open", ("slake_vqa", "open", "value")),
    ("SLAKE closed", ("slake_vqa", "closed", "value")),
    ("ZS modality AUC", ("zeroshot", "slake_modality", "macro_auc", "auc")),
    ("ZS organ AUC", ("zeroshot", "slake_organ", "macro_auc", "auc")),
    ("ZS abnormality AUC", ("zeroshot", "slake_abnormality", "macro_auc", "auc")),
]


def given_table(results: dict) -> str | None:
    """The region variants again with SLAKE's annotated boxes given at test time."""
    if not any(e.get("eval_given") for r in results["variants"].values() for e in _seeds(r)):
        return None
    return ablation_table(results, GIVEN_COLUMNS, which="eval_given")


def _grounding_references(results: dict) -> str:
    """The no-pixel references of the grounding suite (the same for every variant and seed)."""
    for r in results["variants"].values():
        for e in _seeds(r):
            o = _get(e["eval"]["tasks"], ("grounding", "overall")) or _get(e["eval"]["tasks"], ("grounding", "windows", "overall"))
            if o and o.get("n"):
                return (f"centre point: pointing {pct(o['baseline_centre_pointing'])}; the phrase's mean SLAKE-train box: pointing "
                        f"{pct(o.get('baseline_prior_pointing'))}, IoU≥0.3 {pct(o.get('baseline_prior_iou@0.3'))} (n = {o['n']} phrases)")
    return "not computed"


def make_plots(results: dict, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend


    plots = {}
    columns = COLUMNS + other_columns(results)
    variants = _ordered(results)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(columns)), 4))
    width = 0.8 / max(1, len(variants))
    many = _n_seeds(results) > 1
    for j, v in enumerate(variants):
        r = results["variants"][v]
        agg = (r.get("aggregate") or aggregate_variant(r))["eval"]
        first = _seeds(r)[0]["eval"]["tasks"]
        vals, lo, hi = [], [], []
        for label, path in columns:
            x = agg[label]["mean"]
            ci = agg[label]["interval"] if many else _ci_of(first, path)
            vals.append(np.nan if x is None else 100 * x)
            lo.append(0 if not ci or ci[0] is None or x is None else 100 * (x - ci[0]))
            hi.append(0 if not ci or ci[1] is None or x is None else 100 * (ci[1] - x))
        ax.bar(np.arange(len(columns)) + j * width, vals, width, yerr=[lo, hi], capsize=2, label=r["label"])
    ax.set_xticks(np.arange(len(columns)) + width * (len(variants) - 1) / 2)
    ax.set_xticklabels([c for c, _ in columns], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("% (mean, 95% interval across seeds)" if many else "% (95% CI where it applies)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=90)
    plt.close(fig)
    plots["metrics"] = "ablation.png"
    try:
        runs = {}
        for v in variants:
            first = sorted(results["variants"][v]["seeds"], key=int)[0]
            runs[results["variants"][v]["label"]] = out / v / f"seed-{first}" / "metrics.jsonl"
        plot_loss_curves(runs, out / "loss_curves.png")
        plots["loss_curves"] = "loss_curves.png"
    except Exception as err:  # noqa: BLE001 - a plot must never fail a finished run
        plots["loss_curves_error"] = str(err)
    return plots


def ablation_report(results: dict) -> str:
    c = results["config"]
    t = c["train"]
    problems = {v: sum(e["eval"]["problems"]["count"] for e in _seeds(r)) for v, r in results["variants"].items()}
    rois = {v: sorted({str(_get(e["eval"]["tasks"], (task, "rois"))) for e in _seeds(r) for task in ("slake_vqa", "vqa_rad")})
            for v, r in results["variants"].items()}
    seeds = sorted({int(s) for r in results["variants"].values() for s in r.get("seeds", {})})
    many = len(seeds) > 1
    paired = paired_table(results)
    paired_block = "" if not paired else f"""
**Paired comparison, (d) full method − (a) global-only CLIP, seed by seed** (percentage points; the same seed
gives both the same data order and initialisation; "CIs apart": that seed's bootstrap 95% CIs do not overlap)

{paired}
"""
    timings = ", ".join(f"{k} {v:.0f}" for k, v in results.get("timings_s", {}).items())
    other = other_columns(results)
    other_block = "" if not other else f"""
**Other tasks** (each task's headline metrics, %)

{ablation_table(results, other)}
"""
    given = given_table(results)
    given_block = "" if not given else f"""
**The region variants with SLAKE's annotated boxes given at test time** (not a fair comparison with (a),
which cannot use them: the boxes carry label information, e.g. a finding box means "abnormal", and organ
boxes name the organs present)

{given}
"""
    return f"""# Same-data ablation

Pretraining data: the `train` split of a MedRegion dataset built from {", ".join(c["build"]["sources"])}
({results["data"]["train_images"]} images: {json.dumps(results["data"]["per_source"])}); checked to contain no image
of SLAKE test/validate or VQA-RAD test ({results["data"]["held_out_images_checked"]} held-out images checked).
Every variant: base recipe `{t["base"]}`, {t["steps"]} steps, batch {t["batch_size"]}, seeds {seeds}
({"each cell: mean [95% interval across seeds, Student t; * = cut at the metric's range]" if many else "one seed: each cell its value [bootstrap 95% CI]"}).

**VQA** (accuracy, %)

{ablation_table(results, VQA_COLUMNS)}

**Zero-shot classification (macro AUC, %) and grounding (%)**

{ablation_table(results, ZS_GROUNDING_COLUMNS)}
{other_block}{paired_block}{given_block}
* Percentages. With several seeds, [95% interval across seeds]; each seed's own bootstrap CIs ({c["eval"]["n_boot"]}
  resamples) are in `results.json` and `<variant>/seed-<s>/eval/report.md`.
* VQA: an MLP head on [image ; question] embeddings of the {"model fine-tuned with it (" + str(c["eval"]["vqa_finetune_epochs"]) + " epochs)" if c["eval"].get("vqa_finetune") else "frozen model"}, answers = the training answer set;
  SLAKE English train (best epoch on validate) → test, VQA-RAD 3,064 → 451. Test-time ROIs of the
  headline tables: {json.dumps(rois)} (VQA-RAD images come without boxes in any case).
* Zero-shot on SLAKE test: modality (softmax over CT/MRI/X-Ray), organ (multi-label box classes: cosine with each
  class's prompt ensemble; "(pairs)" = softmax over a positive/negative prompt pair), abnormality (normal vs abnormal from finding boxes and whole-image QA facts).
* Grounding on SLAKE test boxes, each box class of an image a phrase: pointing game and IoU≥0.3 of the box from
  (patch) the thresholded patch–text similarity map and (windows) the best of the sliding windows embedded as regions.
  References that see no pixels: {_grounding_references(results)}.
* Problems counted per variant (all seeds): {json.dumps(problems)} (details in each `<variant>/seed-<s>/eval/report.md`).

![metrics](ablation.png)

![loss curves](loss_curves.png)

Timings (s): {timings}
"""


# --------------------------------------------------------------------------- command line

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

HELP = "the same-data ablation: global CLIP vs the full method (+ROI, +hard negatives opt-in), over seeds"


def _ablate(args) -> int:
    overrides = dict(parse_override(o) for o in args.set)
    if args.out:
        overrides["out"] = args.out
    if args.no_progress:
        overrides["progress"] = False
    run_ablation(load_ablation_config(args.config, overrides))
    return 0


def _arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", required=True, help="ablation YAML (see configs/ablation.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=8 (repeatable; value read as YAML)")
    p.add_argument("--out", help="override the output folder (out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_ablate)
    return p


def add_ablate_parser(subparsers) -> argparse.ArgumentParser:
    """``regionmed ablate`` on another parser's subcommands."""
    return _arguments(subparsers.add_parser("ablate", help=HELP, description=ABLATE_HELP,
                                            formatter_class=argparse.RawDescriptionHelpFormatter))


def main(argv: list[str]) -> int:
    """``regionmed ablate ARGV``: parse and run (errors are :class:`~regionmed.errors.RegionmedError`)."""
    parser = _arguments(argparse.ArgumentParser(prog="regionmed ablate", description=ABLATE_HELP,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return args.func(args)
