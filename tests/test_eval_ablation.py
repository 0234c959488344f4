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
}


def test_variants_share_data_steps_seed_and_differ_as_specified(tmp_path):
    cfg = load_ablation_config(CONFIG, {"train.steps": 40})
    runs = {v: variant_config(cfg, v, tmp_path / "data", tmp_path / v) for v in VARIANTS}
    for v, run in runs.items():
        assert sum(s.steps for s in run.train.stages) == 40 and run.seed == cfg.seed and run.data.split == "train"
        assert run.data.train == str(tmp_path / "data") and run.train.batch_size == cfg.train.batch_size
        assert run.model.image.name == "resnet18"
    assert runs["global"].model.roi.mode == "none" and len(runs["global"].train.stages) == 1
    assert set(runs["global"].train.stages[0].losses) == {"global", "summary"}
    assert runs["roi"].train.stages[0].use_rois and set(runs["roi"].train.stages[0].losses) == {"global", "summary", "region"}
    assert set(runs["roi_hn"].train.stages[0].losses) == {"global", "summary", "region", "hard_negative"}
    full = runs["full"].train.stages
    assert [s.name for s in full] == ["warmup", "refine", "region", "joint"] and not full[0].use_rois and full[2].use_rois
    assert "text_tower" not in full[0].trainable
    with pytest.raises(ConfigError, match="variants"):
        load_ablation_config(CONFIG, {"variants": ["global", "bogus"]})


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
    from regionmed.apps.evaluate.cli import add_ablate_parser

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
        assert r["train"]["steps"] == 4
        tasks = r["eval"]["tasks"]
        assert {"zeroshot", "slake_vqa", "vqa_rad", "grounding"} <= set(tasks), (v, r["eval"]["problems"])
        assert tasks["slake_vqa"]["overall"]["value"] is not None
    assert res["variants"]["global"]["eval"]["tasks"]["slake_vqa"]["rois"].startswith("none")
    assert res["variants"]["full"]["eval"]["tasks"]["slake_vqa"]["rois"] == "none"  # headline: the same input for all
    given = res["variants"]["full"]["eval_given"]["tasks"]  # the region variants again with the boxes given
    assert given["slake_vqa"]["rois"] == "given" and set(given) == {"zeroshot", "slake_vqa"}
    assert "eval_given" not in res["variants"]["global"]
    md = (tmp_path / "abl" / "report.md").read_text()
    assert "(d) + progressive schedule" in md and "SLAKE VQA overall" in md and "annotated boxes given at test time" in md
    assert all((tmp_path / "abl" / v / "eval" / "report.md").is_file() for v in VARIANTS)
    assert (tmp_path / "abl" / "ablation.png").is_file() and (tmp_path / "abl" / "loss_curves.png").is_file()
    bad = parser.parse_args(["ablate", "--config", str(tmp_path / "missing.yaml")])
    assert bad.func(bad) == 2
