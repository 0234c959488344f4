"""``regionmed demo``: phantoms → three models → report.

Trains, with the same data, steps and seed: the full method (``demo.yaml``: crop ROIs
with ``grid_context``, box geometry on), the same model without box geometry
(``model.roi.box_geometry=false``: its ROI tokens see pixels only) and a global-only
CLIP (``demo_global.yaml``). Writes into ``out_dir``: ``data/`` (phantom shards),
``region/``, ``region_pixels/`` and ``global/`` (training runs with their model
folders), ``results.json``, ``loss_curves.png`` and ``report.md``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path

import torch

from regionmed.apps.curation.phantoms import PhantomConfig, write_phantom_dataset
from regionmed.apps.train.config import load_run_config
from regionmed.apps.train.metrics import plot_loss_curves
from regionmed.apps.train.trainer import train
from regionmed.data.shards import DatasetError, read_manifest, write_json_atomic
from regionmed.eval.embed import embed_split
from regionmed.eval.location import hard_negative_accuracy
from regionmed.eval.retrieval import retrieval_recall
from regionmed.model.clip import load

LOCATION_RULES = ("laterality", "zone")

# The demo's phantom findings (nodule, mass, opacity; not effusions) at 0.06 x the generator's
# default size, chosen by a measured criterion (PhantomConfig.finding_scale; measured with
# regionmed.apps.curation.phantoms.finding_contrast; tests/test_phantoms.py checks it): at the
# global input size (256 -> 128 px, as the Preprocessor resizes) a small nodule's peak contrast
# over its surroundings is below the local texture/noise level of the lung around it (median
# contrast/noise ratio 0.51 over the 35 small nodules of the first 150 test phantoms, seed 0),
# while in its ROI crop (box + 25% margin per side, cut at full resolution, resized to 64 px) it
# is clearly above it (median 4.3; all 35 higher than at 128 px). 0.08 gave 0.72 / 5.2, but a
# median above 1 on the first 60 phantoms (1.24). At scale 1.0 the small nodules stand out at
# 128 px too (median 3.2 over the first 60), so the whole image already shows them.
DEMO_FINDING_SCALE = 0.06
MODELS = {  # label -> (run folder, what its region rows are scored with)
    "region-aware (full method)": ("region", "ROI embedding, given boxes, with box geometry"),
    "region-aware, no box geometry": ("region_pixels", "ROI embedding, given boxes, pixels only (no box geometry)"),
    "global-only CLIP": ("global", "whole-image embedding"),
}


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("regionmed") / "configs" / name))


def _ensure_phantoms(data_dir: Path, n_train: int, n_test: int, seed: int, config: PhantomConfig) -> None:
    """Write the phantoms into ``data_dir``, or reuse the folder when its counts, seed and whole
    phantom config (finding_scale included) are the ones asked for."""
    try:
        manifest = read_manifest(data_dir)
        prov = manifest.get("provenance", {})
        if (manifest["splits"].get("train", {}).get("samples") == n_train and manifest["splits"].get("test", {}).get("samples") == n_test
                and prov.get("seed") == seed and prov.get("config") == _json_config(config)):
            print(f"[demo] reusing phantoms in {data_dir}")
            return
    except DatasetError:
        pass
    if data_dir.exists():
        shutil.rmtree(data_dir)
    write_phantom_dataset(data_dir, n_train=n_train, n_test=n_test, seed=seed, config=config)


def _json_config(config: PhantomConfig) -> dict:
    """The phantom config as the manifest's provenance holds it after a JSON round trip (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def evaluate_models(models: dict[str, Path], data_dir: Path, split: str = "test",
                    scored_with: dict[str, str] | None = None) -> dict[str, dict]:
    """Retrieval and the location/side test for each saved model folder; ``scored_with``
    names a region-aware model's ROI rows (default "ROI embedding (given boxes)")."""
    results = {}
    for label, folder in models.items():
        model = load(folder)
        emb = embed_split(model, str(data_dir), split)
        region_aware = emb.region_emb is not None
        image = emb.image_fused if region_aware else emb.image_global
        row = {"retrieval": retrieval_recall(image, emb.report_emb, list(range(len(emb.reports))), emb.reports, ks=(1, 5, 10))}

        def scores(region_side: torch.Tensor) -> dict:
            args = (region_side, emb.caption_emb, emb.negative_emb, emb.negative_rules)
            return {"location": hard_negative_accuracy(*args, only_rules=LOCATION_RULES), "all_negatives": hard_negative_accuracy(*args)}

        if region_aware:
            row.update(scores(emb.region_emb), scored_with=(scored_with or {}).get(label, "ROI embedding (given boxes)"))
            row["no_boxes"] = {
                **scores(emb.image_global[emb.region_image]), "scored_with": "whole-image embedding (no boxes)",
                "retrieval": retrieval_recall(emb.image_global, emb.report_emb, list(range(len(emb.reports))), emb.reports, ks=(1, 5, 10)),
            }
        else:
            row.update(scores(emb.image_global[emb.region_image]), scored_with="whole-image embedding")
            if emb.crop_emb is not None:
                row["crop"] = {**scores(emb.crop_emb), "scored_with": "ROI crop as an image"}
        results[label] = row
    return results


def _table(results: dict[str, dict]) -> str:
    rules = sorted({k[5:] for res in results.values() for k in res["all_negatives"] if k.startswith("rule:")})
    first = next(iter(results.values()))["all_negatives"]
    head = ("| model | scored with | i→t R@1 | i→t R@5 | t→i R@1 | t→i R@5 | location/side | all negatives | "
            + " | ".join(f"vs {r} (n={first.get(f'n:{r}', 0)})" for r in rules) + " |")
    lines = [head, "|" + "---|" * (8 + len(rules))]

    def pct(d: dict, k: str) -> str:
        return f"{100 * d[k]:.1f}" if d and k in d else "–"

    def row(label: str, res: dict, ret: dict | None) -> str:
        loc, alln = res["location"], res["all_negatives"]
        per_rule = " | ".join(pct(alln, f"rule:{r}") for r in rules)
        return (f"| {label} | {res['scored_with']} | {pct(ret, 'i2t_R@1')} | {pct(ret, 'i2t_R@5')} | {pct(ret, 't2i_R@1')} | "
                f"{pct(ret, 't2i_R@5')} | **{pct(loc, 'all')}** (chance {pct(loc, 'chance')}) | {pct(alln, 'all')} "
                f"(chance {pct(alln, 'chance')}) | {per_rule} |")

    for label, res in results.items():
        lines.append(row(label, res, res["retrieval"]))
        if "no_boxes" in res:
            lines.append(row(label, res["no_boxes"], res["no_boxes"]["retrieval"]))
        if "crop" in res:
            lines.append(row(label, res["crop"], None))
    return "\n".join(lines)


def run_demo(out_dir: str | Path = "runs/demo", n_train: int = 2000, n_test: int = 300, steps_scale: float = 1.0,
             seed: int = 0, progress: bool = True, finding_scale: float = DEMO_FINDING_SCALE) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.perf_counter()
    data_dir = out / "data"
    phantoms = PhantomConfig(finding_scale=finding_scale)
    _ensure_phantoms(data_dir, n_train, n_test, seed, phantoms)
    timings["phantoms_s"] = time.perf_counter() - t0

    def region_config(folder: str, **extra):
        cfg = load_run_config(packaged_config("demo.yaml"),
                              {"data.train": str(data_dir), "train.output_dir": str(out / folder), "seed": seed, **extra})
        for stage in cfg.train.stages:
            stage.steps = max(1, round(stage.steps * steps_scale))
            stage.warmup_steps = min(stage.warmup_steps, stage.steps - 1)
        return cfg

    labels = list(MODELS)
    region_cfg = region_config(MODELS[labels[0]][0])
    # the same model, data, steps and seed; its ROI tokens get no box coordinates (pixels only)
    pixels_cfg = region_config(MODELS[labels[1]][0], **{"model.roi.box_geometry": False})
    total = sum(s.steps for s in region_cfg.train.stages)
    global_cfg = load_run_config(packaged_config("demo_global.yaml"),
                                 {"data.train": str(data_dir), "train.output_dir": str(out / MODELS[labels[2]][0]), "seed": seed})
    first, last = global_cfg.train.stages[0], global_cfg.train.stages[-1]
    first.steps = region_cfg.train.stages[0].steps  # the same warm-up, then the rest of the steps
    first.warmup_steps = min(first.warmup_steps, first.steps - 1)
    last.steps = total - sum(s.steps for s in global_cfg.train.stages[:-1])
    last.warmup_steps = min(last.warmup_steps, last.steps - 1)
    if last.steps < 1:
        raise ValueError("demo_global.yaml: its first stages take more steps than the region model has")

    runs = dict(zip(labels, (region_cfg, pixels_cfg, global_cfg)))
    for label, cfg in runs.items():
        shutil.rmtree(cfg.train.output_dir, ignore_errors=True)  # a fresh run: the comparison must not mix runs
        print(f"[demo] training {label}: {total} steps, batch {cfg.train.batch_size}")
        t = time.perf_counter()
        torch.manual_seed(seed)
        train(cfg, progress=progress)
        timings[f"train {label} s"] = time.perf_counter() - t

    t = time.perf_counter()
    print("[demo] evaluating on held-out phantoms")
    results = evaluate_models({label: Path(cfg.train.output_dir) / "model" for label, cfg in runs.items()}, data_dir,
                              scored_with={label: MODELS[label][1] for label in labels})
    timings["eval_s"] = time.perf_counter() - t
    plot = plot_loss_curves({label: Path(cfg.train.output_dir) / "metrics.jsonl" for label, cfg in runs.items()}, out / "loss_curves.png")
    timings["total_s"] = time.perf_counter() - t0
    table = _table(results)
    full, pixels, baseline = (100 * results[label]["location"]["all"] for label in labels)
    roi = region_cfg.model.roi
    report = f"""# regionmed demo

Synthetic phantoms ({n_train} train / {n_test} held-out test images, seed {seed}, findings at
`finding_scale` {finding_scale:g}: nodules, masses and opacities that small fade into the lung texture at the
{region_cfg.model.image.image_size} px global input but stay visible in a full-resolution ROI crop). Three models
trained with the same data, {total} steps, batch {region_cfg.train.batch_size}, seed {seed}, on this machine's CPU.
Image tower `{region_cfg.model.image.name}` at {region_cfg.model.image.image_size} px from random init, text tower
`{region_cfg.model.text.name}` (pretrained). The two region-aware models use ROI mode `{roi.mode}` (crops of
{roi.roi_size} px, margin {roi.context_margin:g}) with `grid_context: {str(roi.grid_context).lower()}` (each ROI token also
gets the whole image's feature grid pooled over its box) and stages {", ".join(s.name for s in region_cfg.train.stages)};
they differ only in `model.roi.box_geometry` (the box's coordinates added to its ROI token, or not).

{table}

* Retrieval: held-out images against their reports (identical report texts count as one caption with
  several images). "Given boxes" rows use the fused embedding computed with the test image's boxes;
  "no boxes" rows use the global path only.
* Location/side: each held-out region's true caption ranked against its own negatives that move it to
  the other side or another zone (rules laterality, zone): correct when the caption beats all of them.
  "All negatives" also counts the finding/size/severity/negation negatives; per-rule columns are
  pairwise accuracies (chance 50%). n = {results[labels[0]]["location"]["n"]} held-out regions.
* Location/side accuracy: region-aware with box geometry {full:.1f}%, region-aware from pixels only (no box
  geometry) {pixels:.1f}%, global-only {baseline:.1f}%. Pixels-only region vs global-only: {pixels - baseline:+.1f} points;
  what box geometry adds on top of the pixels: {full - pixels:+.1f} points.
* Why: with box geometry the ROI token is told the box's coordinates, so side and zone are explicit
  inputs and that row mostly measures how well the model reads them. The pixels-only row is given the
  same boxes, but they only choose which pixels it sees (the crop, and the whole image's feature grid
  pooled over the box): whatever it scores above the global-only model comes from the pixels at the
  box's place, not from its coordinates. The global-only model sees the whole image at
  {region_cfg.model.image.image_size} px, where the small findings have faded. These are synthetic phantoms with a
  small CPU budget: they show what each input contributes here, not clinical accuracy.

![loss curves](loss_curves.png)

Timings (s): {", ".join(f"{k} {v:.0f}" for k, v in timings.items())}
"""
    (out / "report.md").write_text(report, encoding="utf-8")
    write_json_atomic(out / "results.json", {"results": results, "timings": timings, "steps": total,
                                             "phantoms": _json_config(phantoms)})
    print(table)
    print(f"[demo] report: {out / 'report.md'}  plot: {plot}  ({timings['total_s']:.0f} s)")
    return {"results": results, "timings": timings}
