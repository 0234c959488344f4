"""Benchmark readers on the real data (../shared/data or $REGIONMED_DATA; fail, not skip, when missing)
and the `regionmed eval` command end to end on small subsets."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from conftest import tiny_model_config
from conftest_build import data_dir  # noqa: F401
from regionmed.apps.evaluate.suites import SLAKE_FINDINGS, SlakeSet, VqaRadSet
from regionmed.eval.vqa import answer_vocabulary, normalize_answer


def test_official_splits_and_answer_sets(data_dir):  # noqa: F811
    slake = SlakeSet(data_dir / "slake")
    tr, va, te = (slake.questions(s) for s in ("train", "validate", "test"))
    assert (len(tr), len(va), len(te)) == (4919, 1053, 1061)  # English only
    assert {q.answer_type for q in tr} == {"OPEN", "CLOSED"}
    vqa_rad = VqaRadSet(data_dir / "vqa_rad")
    vtr, vte = vqa_rad.questions("train"), vqa_rad.questions("test")
    assert (len(vtr), len(vte)) == (3064, 451)
    assert {q.answer_type for q in vtr} == {"OPEN", "CLOSED"}  # "CLOSED " is stripped
    vocab = set(answer_vocabulary(vtr))
    outside = [q for q in vte if normalize_answer(q.answer) not in vocab]
    assert 0 < len(outside) < 0.2 * len(vte)


def test_slake_zero_shot_tasks_and_grounding_items(data_dir):  # noqa: F811
    slake = SlakeSet(data_dir / "slake")
    refs, tasks, notes = slake.zero_shot_tasks("test")
    assert tasks["modality"].classes == ["CT", "MRI", "X-Ray"] and len(tasks["modality"].keys) == 180
    organ = tasks["organ"]
    assert organ.mode == "similarity" and organ.labels.shape == (len(organ.keys), len(organ.classes))
    assert not set(organ.classes) & SLAKE_FINDINGS and (organ.labels.sum(0) >= 5).all()
    ab = tasks["abnormality"]
    assert set(ab.labels.tolist()) == {0, 1} and len(ab.keys) + sum(notes["abnormality_left_out"].values()) == 180
    items = slake.grounding_items("test")
    assert items and all(len(r.boxes) == len(r.box_labels) > 0 for r in items)


@pytest.mark.slow
def test_eval_command_end_to_end_with_bad_inputs(data_dir, tmp_path):  # noqa: F811
    from regionmed.apps.cli import main
    from regionmed.apps.evaluate.cli import add_eval_parser
    from regionmed.model.clip import RegionMedCLIP

    RegionMedCLIP(tiny_model_config()).save_pretrained(tmp_path / "model")
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    empty = tmp_path / "classes"
    empty.mkdir()
    out = tmp_path / "eval"
    args = parser.parse_args(["eval", str(tmp_path / "model"), "--out", str(out), "--data-root", str(data_dir),
                              "--tasks", "zeroshot,vqa_rad,slake_vqa,grounding", "--class-folder", str(empty), "--builtin",
                              "--limit-images", "24", "--limit-questions", "60", "--n-boot", "50", "--vqa-epochs", "3",
                              "--overlays", "2"])
    assert args.func(args) == 0
    res = json.loads((out / "results.json").read_text())
    tasks = res["tasks"]
    assert {"slake_modality", "slake_organ", "slake_abnormality"} <= set(tasks["zeroshot"])
    # the default test-time input is the whole image
    assert tasks["zeroshot"]["slake_modality"]["rois"] == "none"
    assert tasks["vqa_rad"]["rois"] == "none" and "rois_note" not in tasks["vqa_rad"]
    assert tasks["slake_vqa"]["test_questions"] > 0 and tasks["slake_vqa"]["rois"] == "none"
    assert tasks["grounding"]["dataset"] == "slake test" and res["builtin_sets"] is True
    g = tasks["grounding"]
    assert g["overall"]["n"] > 0 and g["windows"]["overall"]["n"] == g["overall"]["n"]
    # --overlays 2: per read-out the best case and the worst case
    assert sorted(p.name.split("_")[0] + "_" + p.name.split("_")[1][:-2] for p in (out / "grounding_overlays").glob("*.png")) == \
        ["patch_best", "patch_worst", "windows_best", "windows_worst"]
    assert (out / "roc_slake_modality.png").is_file()
    # the empty class folder is a counted problem, not a crash
    assert any("class list is empty" in m for m in res["problems"]["messages"])
    md = (out / "report.md").read_text()
    assert "Zero-shot" in md and "VQA: vqa_rad" in md and "Grounding" in md and "Problems" in md
    # input errors exit with 2
    assert main(["eval", str(tmp_path / "nope"), "--out", str(out), "--data-root", str(data_dir)]) == 2
    assert main(["eval", str(tmp_path / "model"), "--tasks", "zeroshot,nonsense", "--data-root", str(data_dir)]) == 2


def test_grounding_with_contrast_maps(data_dir, tmp_path):  # noqa: F811
    from regionmed.apps.evaluate.context import Datasets, EvalContext, EvalData, EvalOptions, Problems
    from regionmed.apps.evaluate.tasks import get_task
    from regionmed.apps.evaluate.tasks.grounding import GroundingOptions
    from regionmed.model.clip import RegionMedCLIP

    def eval_grounding(model, limit_images, **options):
        opts = EvalOptions(tasks=["grounding"], data=EvalData(data_root=str(data_dir)), limit_images=limit_images)
        with torch.no_grad():
            return get_task("grounding").run(model, EvalContext(opts, Datasets(opts.data), Problems(), tmp_path),
                                             GroundingOptions(overlays=0, **options))

    model = RegionMedCLIP(tiny_model_config()).eval()
    for contrast in (False, True):
        res = eval_grounding(model, 3, contrast=contrast)
        o = res["overall"]
        assert res["contrast"] is contrast and o["n"] >= 3 and 0 <= o["pointing_game"] <= 1 and 0 <= o["mean_iou"] <= 1
        assert set(res["per_class"]) and res["grid"] == [4, 4]
        w = res["windows"]
        assert w["overall"]["n"] == o["n"] and w["windows_per_image"] > 10 and w["embedding"].startswith("ROI path")
        # the location prior comes from SLAKE *train* boxes and sees no test pixels
        assert res["prior"]["classes"] > 10 and 0 <= o["baseline_prior_pointing"] <= 1
        assert o["baseline_prior_pointing"] == w["overall"]["baseline_prior_pointing"]
    glob = RegionMedCLIP(tiny_model_config(mode="none")).eval()
    res = eval_grounding(glob, 2, readouts=["windows"])
    assert res["readouts"] == ["windows"] and "overall" not in res and res["windows"]["embedding"] == "window crop as a whole image"
    with pytest.raises(ValueError, match="read-out"):
        eval_grounding(glob, 1, readouts=["pixels"])
