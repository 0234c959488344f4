"""Evaluation library: zero-shot, test-time ROIs, grounding, VQA (tiny random model, synthetic inputs)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import tiny_model_config
from regionmed.eval.grounding import Geometry, locate, locate_windows, location_prior, score_prediction, summarise, window_boxes
from regionmed.eval.images import ImageRef, embed_images
from regionmed.eval.prompts import load_prompts
from regionmed.eval.vqa import Question, VQAConfig, run_vqa, run_vqa_finetune
from regionmed.eval.zeroshot import ZeroShotError, ZeroShotTask, evaluate_scores, run_task
from regionmed.model.clip import RegionMedCLIP


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return RegionMedCLIP(tiny_model_config()).eval()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        arr = (rng.random((48 + 8 * i, 64, 3)) * 255).astype(np.uint8)  # non-square: letterboxed
        p = d / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def _refs(paths, missing=True):
    refs = [ImageRef(f"k{i}", str(p), boxes=[[2, 2, 30, 30], [10, 5, 60, 40]]) for i, p in enumerate(paths)]
    if missing:
        refs.append(ImageRef("gone", "/nonexistent/image.png", boxes=[[0, 0, 5, 5]]))
    return refs


def test_embed_images_modes_and_missing_images(tiny_model, image_files):
    refs = _refs(image_files)
    none = embed_images(tiny_model, refs, "none", batch_size=4)
    assert none.rois == "none" and len(none.keys) == 6 and none.missing[0][0] == "gone"
    assert torch.allclose(none.global_, none.fused) and torch.allclose(none.global_.norm(dim=-1), torch.ones(6))
    given = embed_images(tiny_model, refs, "given", batch_size=4)
    assert given.rois == "given" and (given.n_rois == 2).all()
    assert torch.allclose(given.global_, none.global_, atol=1e-5)  # the global path does not see the boxes
    assert torch.allclose(given.roi_pooled.norm(dim=-1), torch.ones(6))
    selfp = embed_images(tiny_model, refs, "self", batch_size=4, phrases=["liver", "lung", "heart"])
    assert selfp.rois == "self" and (selfp.n_rois >= 1).all() and (selfp.n_rois <= 3).all()
    for key in selfp.keys:
        assert all(0 <= b[0] < b[2] and 0 <= b[1] < b[3] for b in selfp.boxes[key])
    no_boxes = embed_images(tiny_model, [ImageRef("a", str(image_files[0]))], "given")
    assert torch.allclose(no_boxes.fused, no_boxes.global_, atol=1e-6)  # an image without boxes: fused == global
    glob = RegionMedCLIP(tiny_model_config(mode="none")).eval()
    out = embed_images(glob, refs, "given")
    assert out.rois.startswith("none (asked given") and len(out.keys) == 6


def test_zero_shot_softmax_and_pairs(tiny_model, tmp_path):
    torch.manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(30, tiny_model.cfg.embed_dim), dim=-1)
    task = ZeroShotTask("t", ["ct", "mri", "x-ray"], np.arange(30) % 3, [str(i) for i in range(30)])
    res = run_task(tiny_model, emb, task, load_prompts(dataset="modality"), n_boot=200, roc_png=str(tmp_path / "roc.png"))
    assert set(res["per_class_auc"]) == {"ct", "mri", "x-ray"} and res["macro_auc"]["classes"] == 3
    assert res["accuracy"]["ci"][0] <= res["accuracy"]["value"] <= res["accuracy"]["ci"][1]
    assert (tmp_path / "roc.png").stat().st_size > 0 and res["prompts"]["version"] == 1
    labels = (np.arange(60).reshape(30, 2) % 3 == 0).astype(int)
    pairs = run_task(tiny_model, emb, ZeroShotTask("p", ["liver", "lung"], labels, [str(i) for i in range(30)], "pairs"),
                     load_prompts(dataset="organ"), n_boot=100)
    assert pairs["mode"] == "pairs" and 0 <= pairs["accuracy"]["value"] <= 1
    with pytest.raises(ZeroShotError, match="class list is empty"):
        run_task(tiny_model, emb, ZeroShotTask("e", [], np.zeros(30), [str(i) for i in range(30)]), load_prompts())


def test_similarity_mode_top1_accuracy_leaves_out_images_without_a_class():
    labels = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0], [0, 0, 1], [1, 1, 0]])
    scores = np.array([[.9, .1, .2], [.1, .2, .8], [.5, .4, .3], [.7, .1, .2], [.1, .3, .2]])
    res = evaluate_scores(scores, ZeroShotTask("s", ["a", "b", "c"], labels, list("vwxyz"), "similarity"), n_boot=300)
    # top-1 classes a, c, (x has none: left out), a (wrong), b: 3 of 4
    assert res["accuracy"]["n"] == 4 and res["accuracy"]["value"] == pytest.approx(0.75)
    assert res["accuracy_kind"] == "top-1 class present"
    lo, hi = res["accuracy"]["ci"]
    assert 0 <= lo <= 0.75 <= hi <= 1  # resample means over the four counted images only
    assert res["per_class_auc"]["a"]["auc"] == pytest.approx(roc_auc_score(labels[:, 0], scores[:, 0]))


def test_perfect_scores_give_auc_one():
    y = np.array([0, 1, 2, 1, 0, 2])
    scores = np.eye(3)[y] * 0.9 + 0.05
    res = evaluate_scores(scores, ZeroShotTask("t", ["a", "b", "c"], y, list("abcdef")), n_boot=50)
    assert res["macro_auc"]["auc"] == 1.0 and res["accuracy"]["value"] == 1.0 and res["macro_auc"]["ci"] == [1.0, 1.0]


def test_locate_maps_back_through_the_letterbox():
    geom = Geometry(width=200, height=100, size=64)  # content rows 16..48 of the square
    sim = torch.full((8, 8), -1.0)
    sim[3, 6] = 1.0  # a peak in the right half, middle row of the square
    res = locate(sim, geom, threshold=0.5)
    x, y = res["point"]
    assert 140 < x < 190 and 20 < y < 80
    b = res["box"]
    assert b[0] < x < b[2] and b[1] < y < b[3] and b[2] <= 200 and b[3] <= 100
    assert score_prediction(res["point"], res["box"], [[120, 0, 200, 100]])["hit"]
    rows = [{"hit": True, "iou": 0.6, "base_hit": False, "base_iou": 0.1}, {"hit": False, "iou": 0.2, "base_hit": True, "base_iou": 0.4}]
    s = summarise(rows)
    assert s["pointing_game"] == 0.5 and s["iou@0.3"] == 0.5 and s["iou@0.5"] == 0.5 and s["baseline_centre_pointing"] == 0.5


def test_vqa_head_counts_missing_images_and_out_of_set_answers(tiny_model, image_files):
    emb = embed_images(tiny_model, _refs(image_files), "given", batch_size=8)
    qs = ["is this normal?", "what organ is shown?", "is there a mass?"]
    train = [Question(f"t{i}", f"k{i % 6}", qs[i % 3], ["Yes", "no", "Liver"][i % 3], ["CLOSED", "CLOSED", "OPEN"][i % 3], ["PRES"]) for i in range(30)]
    train.append(Question("tm", "gone", "is this normal?", "yes", "CLOSED", ["PRES"]))  # image missing
    test = [Question(f"s{i}", f"k{i % 6}", qs[i % 3], ["yes", "No", "liver"][i % 3], ["CLOSED", "CLOSED", "OPEN"][i % 3], ["PRES", "ABN"]) for i in range(9)]
    test.append(Question("s-new", "k0", "what organ is shown?", "Spleen", "OPEN", ["ORGAN"]))  # outside the answer set
    test.append(Question("s-gone", "gone", "what organ is shown?", "liver", "OPEN", ["ORGAN"]))
    res = run_vqa(tiny_model, train, test, emb, VQAConfig(epochs=30, hidden=32, n_boot=50), name="toy")
    assert res["answers"] == 3 and res["train_questions"] == 30 and res["test_questions"] == 10
    assert res["skipped"] == {"train": 1, "test": 1} and res["n_problems"] == 2 and "missing" in res["problems"][0]
    assert res["out_of_set"]["count"] == 1 and abs(res["out_of_set"]["share"] - 0.1) < 1e-9
    assert res["overall"]["value"] <= 0.9  # the out-of-set question is always wrong
    assert res["closed"]["n"] == 6 and res["open"]["n"] == 4
    assert set(res["per_question_type"]) == {"PRES", "ABN", "ORGAN"}


def test_vqa_finetune_trains_a_copy_of_the_encoders(tiny_model, image_files):
    qs = ["is this normal?", "what organ is shown?", "is there a mass?"]
    train = [Question(f"t{i}", f"k{i % 6}", qs[i % 3], ["Yes", "no", "Liver"][i % 3], ["CLOSED", "CLOSED", "OPEN"][i % 3], ["PRES"]) for i in range(30)]
    train.append(Question("tm", "gone", "is this normal?", "yes", "CLOSED", ["PRES"]))  # image missing
    test = [Question(f"s{i}", f"k{i % 6}", qs[i % 3], ["yes", "No", "liver"][i % 3], ["CLOSED", "CLOSED", "OPEN"][i % 3], ["PRES"]) for i in range(9)]
    test.append(Question("s-new", "k0", "what organ is shown?", "Spleen", "OPEN", ["ORGAN"]))  # outside the answer set
    val = test[:6]
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    cfg = VQAConfig(finetune=True, finetune_epochs=3, finetune_lr=1e-3, lr=1e-2, epochs=5, hidden=32, n_boot=50, finetune_batch_size=8)
    res = run_vqa_finetune(tiny_model, train, test, _refs(image_files), "given", cfg, name="toy")  # no validation: the last epoch
    assert res["encoders"] == "fine-tuned" and res["rois"] == "given" and res["answers"] == 3
    assert res["train_questions"] == 30 and res["skipped"] == {"train": 1, "test": 0} and res["val_questions_used"] == 0
    assert res["out_of_set"]["count"] == 1 and res["test_questions"] == 10
    t = res["training"]
    assert len(t["losses"]) == 3 and t["losses"][-1] < t["losses"][0] and t["epoch_kept"] == 3
    assert t["encoder_weight_change"] > 0  # the encoders moved ...
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())  # ... in a copy, not the caller's model
    cfg.finetune_epochs = 2
    res = run_vqa_finetune(tiny_model, train, test, _refs(image_files), "none", cfg, val, name="toy")
    t = res["training"]
    assert res["val_questions_used"] == 6 and res["rois"] == "none"
    assert len(t["val_accuracy"]) == 3 and t["val_accuracy"][t["epoch_kept"]] == max(t["val_accuracy"])  # probe + 2 epochs
    frozen_encoders = run_vqa_finetune(tiny_model, train, test, _refs(image_files), "none",
                                       VQAConfig(finetune=True, finetune_epochs=1, finetune_lr=0.0, epochs=2, hidden=32, n_boot=20), name="toy")
    assert frozen_encoders["training"]["encoder_weight_change"] == 0


def test_retrieval_and_medregion_labels_through_evaluate(tiny_model, phantom_data, tmp_path):
    from regionmed.apps.evaluate.context import EvalData, EvalOptions
    from regionmed.apps.evaluate.report import write_report
    from regionmed.apps.evaluate.run import evaluate

    opts = EvalOptions(tasks=["retrieval", "zeroshot", "bogus"], data=EvalData(data_root=str(tmp_path / "no-data"), medregion=str(phantom_data)),
                       n_boot=50)
    res = evaluate(tiny_model, opts, tmp_path / "out")
    ret = res["tasks"]["retrieval"]
    # the default test-time input is the whole image, for retrieval too
    assert ret["rois"] == "none" and ret["n_images"] == 16 and 0 <= ret["reports"]["i2t_R@1"] <= ret["reports"]["i2t_R@10"] <= 1
    given = evaluate(tiny_model, replace(opts, tasks=["retrieval"], rois="given"), tmp_path / "given")["tasks"]["retrieval"]
    assert given["rois"] == "given"
    # given boxes: regions are scored by their ROI embeddings, not by their image's whole-image embedding
    # (with 16 images and more captions, the whole-image side gives every region of one image the same ranking)
    assert given["region_captions"] != ret["region_captions"]
    zs = res["tasks"]["zeroshot"]
    name = next(k for k in zs if k.startswith("medregion_"))
    assert zs[name]["mode"] == "similarity" and zs[name]["n_images"] == 16  # multi-label phantom findings
    assert zs[f"{name}_pairs"]["mode"] == "pairs" and zs[f"{name}_pairs"]["n_images"] == 16  # reported beside it
    msgs = " ".join(res["problems"]["messages"])
    assert "unknown task 'bogus'" in msgs  # counted, not fatal
    # the user's dataset is what zero-shot scores: SLAKE is not tried (and not silently mixed in)
    assert "SLAKE" not in msgs and not any(k.startswith("slake_") for k in zs) and res["builtin_sets"] is False
    _, md = write_report(res, tmp_path / "out")
    assert "Retrieval" in md.read_text()


def test_windows_cover_the_image_and_the_best_window_is_the_box():
    wins = window_boxes(300, 200, scales=(0.25, 0.5), lattice=8)
    arr = np.array(wins)
    assert len(wins) == 2 * 8 * 5  # two scales on an 8 x 5 lattice of centres (8 along the long side)
    assert (arr[:, 0] >= 0).all() and (arr[:, 2] <= 300).all() and (arr[:, 1] >= 0).all() and (arr[:, 3] <= 200).all()
    assert arr[:, 0].min() == 0 and arr[:, 2].max() == 300 and arr[:, 1].min() == 0 and arr[:, 3].max() == 200  # every edge
    # a score that is high only for windows over the point (240, 150): the box contains it, the point is near it
    scores = torch.tensor([1.0 if (b[0] <= 240 <= b[2] and b[1] <= 150 <= b[3]) else 0.0 for b in wins])
    scores += torch.tensor([-(b[2] - b[0]) / 1000 for b in wins])  # ties go to the smaller window
    res = locate_windows(scores, wins, 300, 200, lattice=8)
    assert res["box"][0] <= 240 <= res["box"][2] and res["box"][1] <= 150 <= res["box"][3]
    assert abs(res["point"][0] - 240) < 60 and abs(res["point"][1] - 150) < 40 and res["map"].shape == (5, 8)


def test_location_prior_is_the_mean_relative_box():
    prior = location_prior([([[0, 0, 50, 50]], ["liver"], (100, 100)), ([[100, 100, 200, 200]], ["liver"], (200, 200))])
    assert prior["liver"] == pytest.approx([0.25, 0.25, 0.75, 0.75])


def test_vqa_finetune_uses_the_trainers_step_rules(tiny_model, image_files, monkeypatch):
    """Non-finite fine-tuning losses are skipped and counted as the trainer does, then stop the run."""
    import regionmed.eval.vqa as vqa_mod
    from regionmed.optim import NonFiniteError

    qs = ["is this normal?", "what organ is shown?"]
    train = [Question(f"t{i}", f"k{i % 6}", qs[i % 2], ["yes", "liver"][i % 2], "CLOSED", ["PRES"]) for i in range(16)]
    test = train[:4]
    poison = {"mode": "once", "seen": 0}

    class Poisoned(vqa_mod.nn.CrossEntropyLoss):
        def forward(self, x, y):  # the probe trains on all 16 rows at once; fine-tuning batches hold 8
            out = super().forward(x, y)
            if len(y) == 8:
                poison["seen"] += 1
                if poison["mode"] == "always" or poison["seen"] == 1:
                    return out * float("nan")
            return out

    monkeypatch.setattr(vqa_mod.nn, "CrossEntropyLoss", Poisoned)
    cfg = VQAConfig(finetune=True, finetune_epochs=1, finetune_lr=1e-3, epochs=2, hidden=16, n_boot=20,
                    finetune_batch_size=8, max_nonfinite=2)
    res = run_vqa_finetune(tiny_model, train, test, _refs(image_files), "none", cfg, name="toy")
    assert res["training"]["skipped_nonfinite_steps"] == 1 and poison["seen"] == 2
    assert any("non-finite loss" in p for p in res["problems"])
    poison.update(mode="always", seen=0)
    with pytest.raises(NonFiniteError, match="2 non-finite steps in a row"):
        run_vqa_finetune(tiny_model, train, test, _refs(image_files), "none", cfg, name="toy")
