"""Evaluation on the user's own data (issue 12, item 7): grounding on a MedRegion split with
its own references, a generic VQA question file, a class folder with class names, prompt
files that extend the packaged one, only the tasks asked for, and whole-image input by default."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model_config
from conftest_build import data_dir, public_build  # noqa: F401 - fixtures
from regionmed.apps.cli import main
from regionmed.apps.evaluate.context import Datasets, EvalContext, EvalData, EvalOptions, Problems
from regionmed.apps.evaluate.run import default_tasks, evaluate, plan_tasks
from regionmed.apps.evaluate.suites import MedRegionSet, SuiteError, question_file, read_class_names
from regionmed.apps.evaluate.tasks import get_task
from regionmed.apps.evaluate.tasks.grounding import GroundingOptions
from regionmed.apps.evaluate.tasks.vqa import VQAOptions
from regionmed.data.shards import MedRegionDataset
from regionmed.eval.grounding import location_prior, score_prediction
from regionmed.eval.images import open_image
from regionmed.eval.prompts import PromptError, load_prompts
from regionmed.model.clip import RegionMedCLIP


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return RegionMedCLIP(tiny_model_config()).eval()


def _run_task(name, model, opts, out, problems):
    """One task's ``run`` with its default options, as :func:`evaluate` calls it."""
    task = get_task(name)
    with torch.no_grad():
        return task.run(model, EvalContext(opts, Datasets(opts.data), problems, out), task.Options())


def _parser():
    from regionmed.apps.evaluate.cli import add_eval_parser

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    return parser


def test_grounding_scores_the_medregion_split_with_its_own_references(tiny_model, phantom_data, tmp_path):
    opts = EvalOptions(tasks=["grounding"], data=EvalData(data_root=str(tmp_path / "no-builtin-data"), medregion=str(phantom_data)),
                       n_boot=200, task_options={"grounding": GroundingOptions(overlays=1)})
    res = evaluate(tiny_model, opts, tmp_path / "out")
    g = res["tasks"]["grounding"]
    assert g["dataset"] == f"medregion:{phantom_data.name} test" and res["builtin_sets"] is False
    # every (image, phrase) of the test split's annotated regions is scored, and nothing else
    refs, _, notes = MedRegionSet(phantom_data).grounding_items("test")
    pairs = {(r.key, p) for r in refs for p in r.box_labels}
    assert g["overall"]["n"] == len(pairs) == g["windows"]["overall"]["n"] > 0
    assert notes["images"] == len(MedRegionDataset(phantom_data, "test"))
    # the centre reference, recomputed from the records' own boxes
    ds = MedRegionDataset(phantom_data, "test")
    hits = []
    for i in range(len(ds)):
        rec = ds.record(i)
        for label in dict.fromkeys(r["label"] for r in rec["regions"]):
            gt = [r["box"] for r in rec["regions"] if r["label"] == label]
            hits.append(score_prediction((rec["width"] / 2, rec["height"] / 2), [0, 0, rec["width"], rec["height"]], gt)["hit"])
    assert g["overall"]["baseline_centre_pointing"] == pytest.approx(np.mean(hits))
    # the location prior comes from this dataset's TRAIN split
    prior = location_prior(MedRegionSet(phantom_data).prior_items("train"))
    assert g["prior"]["classes"] == len(prior) > 0 and "train" in g["prior"]["source"]
    assert g["overall"]["baseline_prior_n"] == g["overall"]["n"]
    # bootstrap CIs around every rate
    for key in ("pointing_game", "iou@0.3", "baseline_centre_pointing", "baseline_prior_pointing"):
        lo, hi = g["overall"]["intervals"][key]
        assert lo <= g["overall"][key] <= hi, key
    assert "SLAKE" not in json.dumps(res["problems"])


def test_grounding_phrase_can_be_the_region_caption(phantom_data):
    refs, keys, notes = MedRegionSet(phantom_data).grounding_items("test", phrase="caption")
    assert notes["phrase"] == "caption"
    ds = MedRegionDataset(phantom_data, "test")
    captions = {r["caption"].rstrip(".") for i in range(len(ds)) for r in ds.record(i)["regions"]}
    assert {p for r in refs for p in r.box_labels} <= captions
    # the prior of a caption phrase is its region's label
    labels = {r["label"].lower() for i in range(len(ds)) for r in ds.record(i)["regions"]}
    assert {k for per in keys.values() for k in per.values()} <= labels
    with pytest.raises(SuiteError, match="phrase"):
        MedRegionSet(phantom_data).grounding_items("test", phrase="word")


def test_a_task_the_given_data_cannot_supply_is_refused_not_scored_elsewhere(tmp_path, data_dir, phantom_data):  # noqa: F811
    RegionMedCLIP(tiny_model_config()).save_pretrained(tmp_path / "model")
    classes = tmp_path / "classes"
    (classes / "a").mkdir(parents=True)
    # grounding on a class folder: no boxes there, and SLAKE is not used in its place
    assert main(["eval", str(tmp_path / "model"), "--class-folder", str(classes), "--tasks", "grounding",
                 "--data-root", str(data_dir), "--out", str(tmp_path / "o1")]) == 2
    assert not (tmp_path / "o1" / "results.json").exists()
    # the library records the skip with its reason
    opts = EvalOptions(tasks=["grounding", "vqa"], data=EvalData(data_root=str(data_dir), class_folder=str(classes)))
    why = plan_tasks(opts.tasks, opts.data).unsupported
    assert set(why) == {"grounding", "vqa"} and "--medregion" in why["grounding"] and "--questions" in why["vqa"]
    res = evaluate(RegionMedCLIP(tiny_model_config()).eval(), opts, tmp_path / "o2")
    assert res["tasks"] == {} and set(res["skipped"]) == {"grounding", "vqa"}
    # with --medregion, grounding scores that dataset (the data root is not even needed)
    args = _parser().parse_args(["eval", str(tmp_path / "model"), "--medregion", str(phantom_data), "--tasks", "grounding",
                              "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "o3"), "--n-boot", "50",
                              "--overlays", "0", "--grounding-readouts", "patch"])
    assert args.func(args) == 0
    res = json.loads((tmp_path / "o3" / "results.json").read_text())
    assert set(res["tasks"]) == {"grounding"} and res["tasks"]["grounding"]["dataset"].startswith("medregion:")
    assert "Grounding (medregion:" in (tmp_path / "o3" / "report.md").read_text()


def test_default_tasks_follow_the_given_data_and_rois_default_to_the_whole_image():
    assert default_tasks(EvalData()) == ["zeroshot", "vqa_rad", "slake_vqa", "grounding"] == EvalOptions().tasks
    assert default_tasks(EvalData(medregion="x")) == ["zeroshot", "grounding", "retrieval"]
    assert default_tasks(EvalData(class_folder="x")) == ["zeroshot"]
    assert default_tasks(EvalData(questions="q.csv")) == ["vqa"]
    assert default_tasks(EvalData(questions="q.csv", builtin=True))[:4] == ["zeroshot", "vqa_rad", "slake_vqa", "grounding"]
    assert EvalOptions().rois == "none"
    args = _parser().parse_args(["eval", "model"])
    assert args.rois == "none" and args.tasks is None


def _images(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        p = folder / f"im{i}.png"
        Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(p)
        names.append(p.name)
    return names


def test_vqa_from_a_question_file(tiny_model, tmp_path):
    names = _images(tmp_path / "imgs", 6)
    rows = ["image,question,answer,answer_type,split"]
    for i in range(24):
        img = names[i % 6]
        q, a = ("is there a nodule?", "yes" if i % 2 else "no") if i % 3 else ("which side?", "left" if i % 2 else "right")
        rows.append(f"imgs/{img},{q},{a},,{'test' if i >= 18 else ('val' if i >= 15 else 'train')}")
    rows.append("imgs/missing.png,is there a nodule?,no,CLOSED,test")
    path = tmp_path / "q.csv"
    path.write_text("\n".join(rows) + "\n")
    qs, refs = question_file(path)
    assert [len(qs[s]) for s in ("train", "val", "test")] == [15, 3, 7]
    assert {q.answer_type for q in qs["train"]} == {"OPEN", "CLOSED"}  # inferred from the answer when empty
    res = evaluate(tiny_model, EvalOptions(tasks=["vqa"], data=EvalData(questions=str(path)), n_boot=50,
                                           task_options={"vqa": VQAOptions(epochs=2, hidden=16)}),
                   tmp_path / "out")
    v = res["tasks"]["vqa"]
    assert v["dataset"] == str(path) and v["test_questions"] == 6 and v["skipped"]["test"] == 1
    assert any("missing.png" in m for m in res["problems"]["messages"])  # counted, not fatal
    # JSONL works the same
    jl = tmp_path / "q.jsonl"
    jl.write_text("\n".join(json.dumps({"image": f"imgs/{names[0]}", "question": "q?", "answer": "a", "split": s})
                            for s in ("train", "test")) + "\n")
    assert len(question_file(jl)[0]["test"]) == 1


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("image,question,split\nimgs/a.png,q,train\n", r"column\(s\) \['answer'\] missing"),
        ("image,question,answer,split\nimgs/a.png,q,a,train\nimgs/a.png,q,a,dev\n", r"row 2 \(line 3\): column 'split': 'dev'"),
        ("image,question,answer,split\nimgs/a.png,q,,train\n", r"row 1 \(line 2\): column 'answer' is empty"),
        ("image,question,answer,answer_type,split\nimgs/a.png,q,a,MAYBE,test\n", r"column 'answer_type': 'MAYBE'"),
        ("image,question,answer,split\nimgs/a.png,q,a,train\n", r"no test question"),
        ("image,question,answer,split\nimgs/a.png,q,a,b,train\n", r"row 1 \(line 2\) has 5 fields"),
    ],
)
def test_question_file_errors_name_file_row_and_column(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(SuiteError, match=match) as err:
        question_file(path)
    assert "bad.csv" in str(err.value)


def test_class_folder_with_class_names_and_only_the_tasks_asked(tiny_model, tmp_path):
    root = tmp_path / "classes"
    for i, c in enumerate(("glioma", "notumor")):
        _images(root / c, 4, seed=i)
    assert read_class_names("notumor=no tumor, glioma=glioma tumor") == {"notumor": "no tumor", "glioma": "glioma tumor"}
    mapping = tmp_path / "names.yaml"
    mapping.write_text("notumor: no tumor\n")
    assert read_class_names(str(mapping)) == {"notumor": "no tumor"}
    with pytest.raises(SuiteError, match="NAME=TEXT"):
        read_class_names("notumor")
    prompts = load_prompts(None, "folder", {"notumor": "no tumor"})
    assert "a medical image showing no tumor." in prompts.class_prompts("notumor")
    data = EvalData(data_root=str(tmp_path / "nothing"), class_folder=str(root), class_names={"notumor": "no tumor"})
    res = _run_task("zeroshot", tiny_model, EvalOptions(tasks=["zeroshot"], data=data, n_boot=20), tmp_path, Problems())
    assert list(res) == ["folder_classes"] and res["folder_classes"]["n_images"] == 8  # no SLAKE task beside it
    bad = Problems()
    _run_task("zeroshot", tiny_model, EvalOptions(tasks=["zeroshot"], data=dataclasses.replace(data, class_names={"no_tumour": "x"})),
              tmp_path, bad)
    assert any("no_tumour" in m["message"] and "not folders" in m["message"] for m in bad.items)


def test_a_users_prompt_file_extends_the_packaged_one(tmp_path):
    base = load_prompts(dataset="modality")
    user = tmp_path / "mine.yaml"
    user.write_text("version: mine-1\ndatasets:\n  folder:\n    class_text: {notumor: no tumor}\n")
    ext = load_prompts(user, "modality")
    assert ext.templates == base.templates and ext.class_text == base.class_text  # the rest comes from the package
    assert ext.source == "default.yaml+mine.yaml" and ext.version == "1+mine-1"
    assert load_prompts(user, "folder").text_of("notumor") == "no tumor"
    user.write_text("version: 2\ntemplates: ['{} scan.']\n")
    assert load_prompts(user).templates == ["{} scan."] and load_prompts(user, "organ").templates != ["{} scan."]
    user.write_text("version: 2\ntemplate: ['{}']\n")
    with pytest.raises(PromptError, match=r"unknown key\(s\) \['template'\]"):
        load_prompts(user)
    user.write_text("version: 2\nextends: none\ntemplates: ['{}']\n")
    with pytest.raises(PromptError, match="positive"):
        load_prompts(user)


def test_retrieval_on_a_real_build_follows_rois(tiny_model, public_build, tmp_path):  # noqa: F811
    """Retrieval on a MedRegion build of the real public sets (images without boxes, ragged
    region counts): the default scores whole images; --rois given scores the ROI embeddings."""
    root, _, _ = public_build
    opts = EvalOptions(tasks=["retrieval"], data=EvalData(data_root=str(tmp_path / "no-data"), medregion=str(root),
                                                          medregion_split="train"), n_boot=20)
    none = evaluate(tiny_model, opts, tmp_path / "none")["tasks"]["retrieval"]
    given = evaluate(tiny_model, dataclasses.replace(opts, rois="given"), tmp_path / "given")["tasks"]["retrieval"]
    n_images = len(MedRegionDataset(str(root), "train"))
    assert none["rois"] == "none" and given["rois"] == "given"
    assert none["n_images"] == given["n_images"] == n_images - none["n_skipped"] > 0
    assert "region_captions" in none and given["region_captions"] != none["region_captions"]


def test_grounding_reports_cnr_kinds_the_most_covered_point_phrase_blind_and_best_and_worst_overlays(tiny_model, phantom_data, tmp_path):
    from regionmed.eval.grounding import coverage_prior

    opts = EvalOptions(tasks=["grounding"], data=EvalData(data_root=str(tmp_path / "no-builtin-data"), medregion=str(phantom_data)),
                       n_boot=100, task_options={"grounding": GroundingOptions(overlays=4, readouts=["patch"])})
    res = evaluate(tiny_model, opts, tmp_path / "out")
    g = res["tasks"]["grounding"]
    o = g["overall"]
    refs, keys, _ = MedRegionSet(phantom_data).grounding_items("test")
    # the most-covered point of each label's TRAIN boxes, scored on the test boxes, recomputed here
    cover = coverage_prior(MedRegionSet(phantom_data).prior_items("train"))
    hits = []
    for r in refs:
        for lab in dict.fromkeys(r.box_labels):
            pc = cover.get(keys[r.key][lab])
            if pc is None:
                continue
            w, h = open_image(r).size
            gt = [b for b, l2 in zip(r.boxes, r.box_labels) if l2 == lab]
            hits.append(score_prediction((pc[0] * w, pc[1] * h), [0, 0, 0, 0], gt)["hit"])
    assert o["references"]["most_covered_prior"]["pointing_game"] == pytest.approx(np.mean(hits))
    # the phrase-blind map is scored for every phrase, with a paired difference and its interval
    assert o["references"]["phrase_blind"]["n"] == o["n"]
    d = o["differences"]["phrase_blind"]
    assert d["ci"][0] <= d["pointing_game"] <= d["ci"][1]
    # CNR and IoU at three levels; every phrase in exactly one kind
    assert o["cnr"] is not None and {"iou@0.1", "iou@0.3", "iou@0.5"} <= set(o)
    assert sum(v["n"] for v in g["per_kind"].values()) == o["n"] == sum(g["kinds"].values())
    # overlays: the best two and the worst two
    names = sorted(p.name for p in (tmp_path / "out" / "grounding_overlays").iterdir())
    assert len([n for n in names if n.startswith("patch_best")]) == 2 and len([n for n in names if n.startswith("patch_worst")]) == 2
    from regionmed.apps.evaluate.report import markdown_report

    text = markdown_report(res)
    assert "most-covered prior" in text and "phrase-blind" in text and "| all |" in text


def test_region_zeroshot_scores_each_labelled_box_by_its_roi_embedding_and_by_its_crop(tiny_model, phantom_data, tmp_path):
    from collections import Counter

    from regionmed.eval.embed import embed_split
    from regionmed.eval.prompts import load_prompts
    from regionmed.eval.zeroshot import class_scores

    opts = EvalOptions(tasks=["region_zeroshot"], data=EvalData(data_root=str(tmp_path / "none"), medregion=str(phantom_data)),
                       n_boot=100)
    res = evaluate(tiny_model, opts, tmp_path / "out")
    r = res["tasks"]["region_zeroshot"]
    emb = embed_split(tiny_model, MedRegionDataset(phantom_data, "test"), progress=False)
    counts = Counter(lab for lab in emb.region_labels if lab)
    classes = sorted(c for c, n in counts.items() if n >= 5)
    assert r["classes"] == classes and len(classes) >= 2 and r["regions"] == len(emb.region_labels)
    rows = [i for i, lab in enumerate(emb.region_labels) if lab in classes]
    y = np.array([classes.index(emb.region_labels[i]) for i in rows])
    from regionmed.data.schema import label_words

    scores = class_scores(tiny_model, emb.region_emb[rows], [label_words(c) for c in classes], load_prompts(None, "medregion"),
                          "softmax")
    from sklearn.metrics import roc_auc_score

    macro = np.mean([roc_auc_score(y == c, scores[:, c]) for c in range(len(classes))])
    assert r["roi"]["n_images"] == len(rows) and r["roi"]["macro_auc"]["auc"] == pytest.approx(macro)
    assert r["crop"]["n_images"] == len(rows)
    d = r["roi_minus_crop"]
    assert d["auc"] == pytest.approx(r["roi"]["macro_auc"]["auc"] - r["crop"]["macro_auc"]["auc"])
    assert d["ci"][0] <= d["auc"] <= d["ci"][1]
    # a global-only model has no region embedding: only the crop read-out
    torch.manual_seed(0)
    glob = RegionMedCLIP(tiny_model_config(mode="none")).eval()
    g = evaluate(glob, opts, tmp_path / "out2")["tasks"]["region_zeroshot"]
    assert g["roi"] is None and g["crop"]["n_images"] == len(rows)
