"""Captions: location phrases, summaries, and rule-based hard negatives."""

from __future__ import annotations

import json
import re

import pytest

from conftest_build import data_dir  # noqa: F401 - fixture
from regionmed.apps.curation.captions import (
    RULES,
    CaptionConfig,
    clean_report,
    location,
    make_negatives,
    make_summary,
    normalize,
    region_caption,
)
from regionmed.apps.curation.sources import get_source


def test_side_follows_radiological_convention_by_default():
    cfg = CaptionConfig()
    # A box in the image's left half shows the patient's RIGHT side (radiological convention).
    assert location([10, 40, 60, 80], 200, 200, "xray", cfg)["side"] == "right"
    assert location([140, 40, 190, 80], 200, 200, "ct", cfg)["side"] == "left"
    assert location([90, 40, 110, 80], 200, 200, "xray", cfg)["side"] == "midline"


def test_side_convention_is_configurable_per_modality():
    cfg = CaptionConfig(laterality={"xray": "radiological", "photo": "image", "default": "radiological"})
    box = [10, 40, 60, 80]
    assert location(box, 200, 200, "xray", cfg)["side"] == "right"
    assert location(box, 200, 200, "photo", cfg)["side"] == "left"


def test_vertical_and_radial_phrases():
    cfg = CaptionConfig()
    assert location([10, 0, 40, 30], 300, 300, "xray", cfg) == {"side": "right", "vertical": "upper", "radial": "peripheral"}
    assert location([120, 250, 140, 290], 300, 300, "xray", cfg)["vertical"] == "lower"
    assert location([130, 130, 170, 170], 300, 300, "xray", cfg)["radial"] == "central"
    text, _ = region_caption("Nodule", [10, 0, 40, 30], 300, 300, "xray", "chest", cfg, pixel_spacing=(0.5, 0.5))
    assert text == "Nodule in the right upper zone, peripheral, about 1.5 x 1.5 cm."


def test_slake_left_right_boxes_agree_with_their_labels(data_dir):  # noqa: F811
    """SLAKE boxes named 'Left X' / 'Right X' (the patient's side) must get that side."""
    cfg = CaptionConfig()
    agree = total = 0
    for item in get_source("slake", data_dir / "slake", limit=200):
        from PIL import Image

        with Image.open(item.image_path) as im:
            w, h = im.size
        for b in item.boxes:
            m = re.match(r"^(left|right)\b", b.label.lower())
            if not m:
                continue
            total += 1
            agree += location(b.box, w, h, item.modality, cfg)["side"] == m.group(1)
    assert total >= 30
    assert agree / total >= 0.95, (agree, total)


def test_covid_lung_boxes_agree_with_category(data_dir):  # noqa: F811
    cfg = CaptionConfig()
    coco = json.loads((data_dir / "covid_cxr" / "annotations.json").read_text())
    sizes = {i["id"]: (i["width"], i["height"]) for i in coco["images"]}
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    agree = total = 0
    for ann in coco["annotations"][:300]:
        if "category_id" not in ann:
            continue
        x, y, w, h = ann["bbox"]
        side = location([x, y, x + w, y + h], *sizes[ann["image_id"]], "xray", cfg)["side"]
        total += 1
        agree += side == cats[ann["category_id"]].split()[0].lower()
    assert agree / total >= 0.95, (agree, total)


@pytest.mark.parametrize(
    "text",
    [
        "Left lung in the left middle zone, peripheral.",
        "Liver in the right upper region, peripheral.",
        "Small nodule in the right lower zone, central, about 1.2 x 1.0 cm.",
        "No pleural effusion is seen.",
        "There is mild cardiomegaly without pulmonary edema.",
        "Brain edema in the midline middle region, central.",
    ],
)
def test_negatives_differ_from_positive_and_record_rule(text):
    negs = make_negatives(text, 5, CaptionConfig(), key=text)
    assert negs, text
    norms = [normalize(n["text"]) for n in negs]
    assert normalize(text) not in norms
    assert len(set(norms)) == len(norms)
    for n in negs:
        assert n["rule"] in RULES


def test_each_rule_changes_the_right_thing():
    cfg = CaptionConfig()
    text = "Small nodule in the left upper zone, peripheral."
    by_rule = {n["rule"]: n["text"] for n in make_negatives(text, 5, cfg, key="x")}
    assert by_rule["laterality"] == "Small nodule in the right upper zone, peripheral."
    assert by_rule["zone"] == "Small nodule in the left lower zone, peripheral."
    assert by_rule["size"] == "Large nodule in the left upper zone, peripheral."
    assert by_rule["finding"] in ("Small mass in the left upper zone, peripheral.", "Small cyst in the left upper zone, peripheral.")
    assert by_rule["negation"] == "No small nodule in the left upper zone, peripheral."


def test_negative_count_rules_and_vocabulary_are_configurable():
    cfg = CaptionConfig(rules=["finding"], confusables={"granuloma": ["metastasis"]})
    negs = make_negatives("Granuloma in the right upper zone, central.", 3, cfg)
    assert negs == [{"text": "Metastasis in the right upper zone, central.", "rule": "finding"}]
    assert len(make_negatives("Nodule in the left upper zone, central.", 1, CaptionConfig())) == 1
    assert make_negatives("Nodule in the left upper zone, central.", 0, CaptionConfig()) == []


def test_negatives_on_real_clinical_notes_differ(data_dir):  # noqa: F811
    cfg = CaptionConfig()
    made = 0
    for item in get_source("covid_cxr", data_dir / "covid_cxr", limit=80):
        summary = make_summary(clean_report(item.report), cfg)
        if not summary:
            continue
        assert len(summary) <= cfg.summary_max_chars + 1
        for n in make_negatives(summary, 3, cfg, key=item.id):
            assert normalize(n["text"]) != normalize(summary)
            made += 1
    assert made >= 100


def test_clean_report_and_summary():
    text = "  History:  cough.\n\n(a) PA radiograph on 03/12/2020 shows   right lower lobe consolidation . IMPRESSION: Pneumonia."
    cleaned = clean_report(text)
    assert "03/12/2020" not in cleaned and "[date]" in cleaned
    assert "  " not in cleaned and "(a)" not in cleaned
    assert make_summary(cleaned, CaptionConfig()) == "Pneumonia."
    long = " ".join(["Diffuse bilateral opacities are present in both lungs."] * 20)
    assert len(make_summary(long, CaptionConfig(summary_max_chars=80))) <= 81
