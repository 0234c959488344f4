"""Bootstrap AUC / accuracy, prompt files, answer normalisation (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from regionmed.eval.prompts import PromptError, load_prompts
from regionmed.eval.stats import auc_with_ci, bootstrap_counts, macro_auc_with_ci, mean_with_ci, weighted_auc
from regionmed.eval.vqa import Question, answer_vocabulary, normalize_answer


def test_weighted_auc_equals_sklearn_with_unit_and_integer_weights():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(60), 1)  # many ties
    labels = rng.random(60) < 0.4
    assert np.isclose(weighted_auc(scores, labels, np.ones((1, 60)))[0], roc_auc_score(labels, scores))
    counts = bootstrap_counts(60, 5, seed=1)
    for b in range(5):
        idx = np.repeat(np.arange(60), counts[b])
        assert np.isclose(weighted_auc(scores, labels, counts[b : b + 1])[0], roc_auc_score(labels[idx], scores[idx]))


def test_bootstrap_is_seeded_and_ci_brackets_the_estimate():
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.5
    scores = labels + rng.normal(0, 1.0, 200)
    c1, c2 = bootstrap_counts(200, 500, 3), bootstrap_counts(200, 500, 3)
    assert (c1 == c2).all() and (c1.sum(1) == 200).all()
    r = auc_with_ci(scores, labels, c1)
    assert r["ci"][0] < r["auc"] < r["ci"][1] and r["n_pos"] + r["n_neg"] == 200
    assert auc_with_ci(scores, np.ones(200), c1)["auc"] is None  # one class only: undefined, no crash
    m = mean_with_ci(labels.astype(float), c1)
    assert m["ci"][0] <= m["value"] <= m["ci"][1]
    macro = macro_auc_with_ci(np.stack([scores, -scores, scores], 1), np.stack([labels, labels, np.zeros(200)], 1), c1)
    assert macro["classes"] == 2 and np.isclose(macro["auc"], 0.5)


def test_prompt_file_overrides_per_dataset(tmp_path):
    base = load_prompts()
    assert base.version and len(base.class_prompts("Liver")) == len(base.templates)
    mod = load_prompts(dataset="modality")
    assert "a x-ray image." in mod.class_prompts("X-Ray")
    pos, neg = load_prompts(dataset="organ").pair_prompts("Left Lung")
    assert "the left lung is visible." in pos and "the left lung is not visible." in neg
    bad = tmp_path / "p.yaml"
    bad.write_text("templates: ['{}']\npositive: ['{}']\nnegative: ['{}']\n")
    with pytest.raises(PromptError, match="version"):
        load_prompts(bad)
    bad.write_text("version: 2\ntemplates: ['no placeholder']\npositive: ['{}']\nnegative: ['{}']\n")
    with pytest.raises(PromptError, match="templates"):
        load_prompts(bad)


@pytest.mark.parametrize("raw, norm", [
    ("X-Ray", "x ray"), (" x-ray. ", "x ray"), ("Left  Lung", "left lung"), ("YES", "yes"), ("2.5 cm", "2.5 cm"),
    ("1,000", "1000"), ("right, left", "right left"), (10, "10"), ("Brain_Tissue", "brain tissue"), ("T2\u00a0weighted", "t2 weighted"),
])
def test_answer_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_answer_set_comes_from_training_answers_only():
    train = [Question("1", "a", "q", "Yes", "CLOSED"), Question("2", "a", "q", "yes ", "CLOSED"), Question("3", "a", "q", "X-Ray", "OPEN")]
    assert answer_vocabulary(train) == ["x ray", "yes"]


def test_unknown_labels_are_left_out_of_the_auc_not_counted_negative():
    """U-Ignore: an uncertain label (-1) leaves the example out of that class's AUC."""
    from regionmed.eval.stats import auc_with_ci, bootstrap_counts, macro_auc_with_ci

    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.95])
    labels = np.array([1, 1, 0, 0, -1])  # the unknown one scores high: as a negative it would cost AUC
    counts = bootstrap_counts(5, 200, 0)
    out = auc_with_ci(scores, labels, counts)
    assert out["auc"] == 1.0 and out["n_pos"] == 2 and out["n_neg"] == 2 and out["n_unknown"] == 1
    assert auc_with_ci(scores, np.array([1, 1, 0, 0, 0]), counts)["auc"] < 1.0
    both = macro_auc_with_ci(np.stack([scores, scores], 1), np.stack([labels, [1, 1, 0, 0, 1]], 1), counts)
    assert both["auc"] == 1.0 and both["classes"] == 2
