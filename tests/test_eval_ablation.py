"""The same-data ablation: variant definitions, the training-only check, and a shortened end-to-end run."""

from __future__ import annotations

import argparse
import json

import pytest

from conftest_build import data_dir, jpeg_bytes  # noqa: F401
from regionmed.apps.ablation import (
    VARIANTS,
    AblationError,
    assert_training_only,
    held_out_images,
    load_ablation_config,
    variant_config,
)
from regionmed.config import ConfigError

CONFIG = "src/regionmed/configs/ablation.yaml"

# A shortened ablation: tiny encoders, a few steps, small subsets (< 2 minutes on 2 CPU cores).
SMOKE = {
    "build.limit": 30,
    "train.steps": 4,
    "train.batch_size": 8,
    "train.warmup_steps": 1,
    "train.overrides": {
        "model.embed_dim": 64,
        "model.image.image_size": 64,
        "model.roi.roi_size": 32,
        "model.text.pretrained": False,
        "model.text.context_length": 32,
        "model.text.config_overrides": {"num_hidden_layers": 2},
    },
    "eval.n_boot": 50,
    "eval.vqa_epochs": 2,
    "eval.overlays": 1,
    "eval.limit_images": 12,
    "eval.limit_questions": 40,
    "progress": False,
    "seeds": [0],
    "variants": list(VARIANTS),  # all four (the default runs global and full)
}


def test_variants_share_data_steps_seed_and_differ_as_specified(tmp_path):
    cfg = load_ablation_config(CONFIG, {"train.steps": 40})
    runs = {v: variant_config(cfg, v, tmp_path / "data", tmp_path / v) for v in VARIANTS}
    for v, run in runs.items():
        assert sum(s.steps for s in run.train.stages) == 40 and run.seed == cfg.seeds[0] and run.data.split == "train"
        assert run.data.train == str(tmp_path / "data") and run.train.batch_size == cfg.train.batch_size
        assert run.model.image.name == "efficientnet_lite0" and run.model.image.output_stride == 16  # cpu_pretrained.yaml
        assert {s.lr_scale.get("image_tower") for s in run.train.stages} == {0.2}  # every variant alike
    assert runs["global"].model.roi.mode == "none" and len(runs["global"].train.stages) == 1
    assert set(runs["global"].train.stages[0].losses) == {"global", "summary"}
    assert runs["roi"].train.stages[0].use_rois and set(runs["roi"].train.stages[0].losses) == {"global", "summary", "region"}
    assert set(runs["roi_hn"].train.stages[0].losses) == {"global", "summary", "region", "hard_negative"}
    full = runs["full"].train.stages
    assert [s.name for s in full] == ["warmup", "refine", "region", "joint"] and not full[0].use_rois and full[2].use_rois
    assert "text_tower" not in full[0].trainable
    with pytest.raises(ConfigError, match="variants"):
        load_ablation_config(CONFIG, {"variants": ["global", "bogus"]})
    # three seeds by default; `seed` (one) replaces them; each seed reaches its run config
    assert cfg.seeds == [0, 1, 2] and load_ablation_config(CONFIG, {"seed": 7}).seeds == [7]
    assert variant_config(cfg, "roi", tmp_path / "data", tmp_path / "r", seed=2).seed == 2
    with pytest.raises(ConfigError, match="seeds"):
        load_ablation_config(CONFIG, {"seeds": [1, 1]})
    assert cfg.variants == ["global", "full"]  # (b) and (c) are opt-in: see ablation.yaml
    # train.image_lr_scale overrides the single-stage variants' rate; the random-init recipe trains at the full rate
    assert variant_config(load_ablation_config(CONFIG, {"train.image_lr_scale": 0.5}),
                          "global", tmp_path / "data", tmp_path / "g").train.stages[0].lr_scale["image_tower"] == 0.5
    demo_base = load_ablation_config(CONFIG, {"train.base": "demo.yaml"})
    scratch = variant_config(demo_base, "roi", tmp_path / "data", tmp_path / "s")
    assert scratch.model.image.name == "resnet18" and "image_tower" not in scratch.train.stages[0].lr_scale
    # demo.yaml's crop-mode grid_context does not reach the global variant, which has no ROI path
    assert scratch.model.roi.grid_context and not variant_config(demo_base, "global", tmp_path / "data", tmp_path / "g2").model.roi.grid_context
    long = load_ablation_config("src/regionmed/configs/ablation_long.yaml")
    assert long.train.steps > cfg.train.steps and len(long.seeds) > len(cfg.seeds)


def test_training_split_with_a_test_image_is_refused(data_dir, tmp_path):  # noqa: F811
    from regionmed.data.shards import MedRegionWriter, write_manifest

    held = held_out_images(data_dir)
    leaked = sorted(i for i in held if i.startswith("slake-"))[0]
    out = tmp_path / "ds"
    with MedRegionWriter(out, "train") as w:
        for rid in ("covid_cxr-1", leaked):
            w.write({"schema_version": 1, "id": rid, "split": "train", "width": 64, "height": 48, "summary": "s", "report": "r"},
                    jpeg_bytes(), "jpg")
    write_manifest(out, {"train": w.summary()})
    with pytest.raises(AblationError, match="official test/validation split"):
        assert_training_only(out, data_dir)


@pytest.mark.slow
def test_shortened_ablation_end_to_end(data_dir, tmp_path):  # noqa: F811
    from regionmed.apps.ablation import add_ablate_parser
    from regionmed.apps.cli import main

    parser = argparse.ArgumentParser()
    add_ablate_parser(parser.add_subparsers())
    sets = [f"{k}={json.dumps(v)}" for k, v in SMOKE.items()]
    args = parser.parse_args(["ablate", "--config", CONFIG, "--out", str(tmp_path / "abl"), "--set", f"data_root={data_dir}"]
                             + [x for s in sets for x in ("--set", s)])
    assert args.func(args) == 0
    res = json.loads((tmp_path / "abl" / "results.json").read_text())
    assert set(res["variants"]) == set(VARIANTS)
    assert res["data"]["train_images"] >= 8 and set(res["data"]["per_source"]) <= {"slake", "vqa_rad", "covid_cxr"}
    for v, r in res["variants"].items():
        assert list(r["seeds"]) == ["0"]
        e = r["seeds"]["0"]
        assert e["train"]["steps"] == 4 and e["status"] == "trained"
        tasks = e["eval"]["tasks"]
        assert {"zeroshot", "slake_vqa", "vqa_rad", "grounding"} <= set(tasks), (v, e["eval"]["problems"])
        assert tasks["slake_vqa"]["overall"]["value"] is not None
        assert r["aggregate"]["eval"]["SLAKE VQA overall"]["mean"] == tasks["slake_vqa"]["overall"]["value"]
    full = res["variants"]["full"]["seeds"]["0"]
    assert res["variants"]["global"]["seeds"]["0"]["eval"]["tasks"]["slake_vqa"]["rois"].startswith("none")
    assert full["eval"]["tasks"]["slake_vqa"]["rois"] == "none"  # headline: the same input for all
    given = full["eval_given"]["tasks"]  # the region variants again with the boxes given
    assert given["slake_vqa"]["rois"] == "given" and set(given) == {"zeroshot", "slake_vqa"}
    assert "eval_given" not in res["variants"]["global"]["seeds"]["0"]
    assert res["paired"]["seeds"] == [0] and "SLAKE VQA overall" in res["paired"]["columns"]
    md = (tmp_path / "abl" / "report.md").read_text()
    assert "(d) + progressive schedule" in md and "SLAKE VQA overall" in md and "annotated boxes given at test time" in md
    assert "Paired comparison" in md
    assert all((tmp_path / "abl" / v / "seed-0" / "eval" / "report.md").is_file() for v in VARIANTS)
    assert (tmp_path / "abl" / "ablation.png").is_file() and (tmp_path / "abl" / "loss_curves.png").is_file()
    assert main(["ablate", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_interval_across_seeds_and_the_paired_comparison():
    from regionmed.apps.ablation import aggregate_variant, paired_comparison, seed_interval

    one = seed_interval([0.5])
    assert one["mean"] == 0.5 and one["interval"] == [None, None]
    three = seed_interval([0.60, 0.64, 0.62])
    # t(0.975, 2) = 4.303; sd = 0.02; half width = 4.303 * 0.02 / sqrt(3)
    assert three["mean"] == pytest.approx(0.62)
    assert three["interval"] == pytest.approx([0.62 - 4.3027 * 0.02 / 3 ** 0.5, 0.62 + 4.3027 * 0.02 / 3 ** 0.5], abs=1e-4)

    def entry(vqa, ci):
        return {"eval": {"tasks": {"slake_vqa": {"overall": {"value": vqa, "ci": ci}}}}}

    results = {"variants": {
        "global": {"label": "(a)", "seeds": {"0": entry(0.60, [0.58, 0.62]), "1": entry(0.61, [0.59, 0.63]), "2": entry(0.62, [0.60, 0.64])}},
        "full": {"label": "(d)", "seeds": {"0": entry(0.66, [0.64, 0.68]), "1": entry(0.62, [0.60, 0.64]), "2": entry(0.60, [0.58, 0.62])}},
    }}
    agg = aggregate_variant(results["variants"]["full"])["eval"]["SLAKE VQA overall"]
    assert agg["values"] == [0.66, 0.62, 0.60] and agg["n"] == 3
    p = paired_comparison(results)["columns"]["SLAKE VQA overall"]
    assert p["per_seed"] == pytest.approx({"0": 0.06, "1": 0.01, "2": -0.02})
    assert p["seeds_favouring_variant"] == 2 and p["seeds_with_cis_apart"] == ["0"]
    assert p["mean"] == pytest.approx(0.05 / 3)
    assert "ZS organ AUC" not in paired_comparison(results)["columns"]  # no value: no row


@pytest.mark.slow
def test_a_stopped_ablation_keeps_finished_seeds_and_resumes_the_rest(data_dir, tmp_path):  # noqa: F811
    """Two seeds of one variant; then seed 1 is cut back to its step-2 checkpoint (as a run
    stopped there leaves it) and the ablation is started again: seed 0 is kept untouched,
    seed 1 resumes from step 2 and trains only the two steps left."""
    import shutil

    from regionmed.apps.ablation import run_ablation
    from regionmed.apps.train.checkpoint import step_folders

    overrides = {**SMOKE, "data_root": str(data_dir), "out": str(tmp_path / "abl"), "variants": ["global"], "seeds": [0, 1],
                 "train.checkpoint_every": 2, "eval.tasks": ["zeroshot"], "eval.given_rois_tasks": []}
    cfg = load_ablation_config(CONFIG, overrides)
    first = run_ablation(cfg, log=lambda *a: None)
    assert [first["variants"]["global"]["seeds"][s]["status"] for s in ("0", "1")] == ["trained", "trained"]
    s0, s1 = tmp_path / "abl" / "global" / "seed-0", tmp_path / "abl" / "global" / "seed-1"
    kept = (s0 / "entry.json").read_text()
    weights = (s0 / "model" / "model.safetensors").stat().st_mtime_ns
    # seed 1 stopped after its step-2 checkpoint: no final model, summary, entry or later checkpoint
    for name in ("entry.json", "train_summary.json"):
        (s1 / name).unlink()
    shutil.rmtree(s1 / "model")
    ckpts = step_folders(s1 / "checkpoints")  # newest first: steps 4 and 2
    assert [int(p.name.split("_")[1]) for p in ckpts] == [4, 2]
    shutil.rmtree(ckpts[0])
    again = run_ablation(load_ablation_config(CONFIG, overrides), log=lambda *a: None)
    e0, e1 = again["variants"]["global"]["seeds"]["0"], again["variants"]["global"]["seeds"]["1"]
    assert e0["status"] == "kept" and (s0 / "entry.json").read_text() == kept
    assert (s0 / "model" / "model.safetensors").stat().st_mtime_ns == weights  # not trained again
    assert e1["status"] == "resumed" and e1["train"]["steps"] == 4 and e1["train"]["steps_this_run"] == 2
    assert again["variants"]["global"]["aggregate"]["eval"]["ZS modality AUC"]["n"] == 2
    # a changed config starts the variant/seed again instead of mixing runs
    changed = run_ablation(load_ablation_config(CONFIG, {**overrides, "seeds": [0], "train.lr": 1e-4}), log=lambda *a: None)
    assert changed["variants"]["global"]["seeds"]["0"]["status"] == "trained"


def test_seed_intervals_are_cut_at_the_metric_range():
    from regionmed.apps.ablation import _agg_cell, seed_interval

    wide = seed_interval([0.98, 0.5])
    assert wide["interval"][1] > 1.0 and not wide["clipped"]
    cut = seed_interval([0.98, 0.5], bounds=(0.0, 1.0))
    assert cut["interval"] == [0.0, 1.0] and cut["clipped"] and cut["mean"] == wide["mean"]
    assert _agg_cell(cut).endswith("*")
    inside = seed_interval([0.70, 0.71, 0.72], bounds=(0.0, 1.0))
    assert not inside["clipped"] and inside["interval"] == pytest.approx([0.71 - 0.0248, 0.71 + 0.0248], abs=1e-3)
