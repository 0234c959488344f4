"""Report sentences attached to the boxes they describe (issue 12, item 4), on real covid_cxr
notes and made-up reports; the side follows the same convention as the location captions."""

from __future__ import annotations

import pytest
from PIL import Image

from conftest_build import data_dir  # noqa: F401 - fixture
from regionmed.apps.curation.captions import (
    _SIDE_TERMS,
    REPORT_CAPTION_RULES,
    CaptionConfig,
    _terms,
    apply_report_captions,
    attach_report_captions,
    location,
    match_report_sentences,
    region_caption,
    report_text,
)
from regionmed.apps.curation.sources import get_source
from regionmed.data.schema import SCHEMA_VERSION, RecordError, validate_record

CFG = CaptionConfig()


def _regions(boxes, w, h, modality="xray"):
    out = []
    for label, box in boxes:
        caption, loc = region_caption(label, box, w, h, modality, "chest", CFG)
        out.append({"label": label, "box": box, "caption": caption, "location": loc})
    return out


@pytest.fixture(scope="module")
def covid_matches(data_dir):  # noqa: F811
    rows = []
    for item in get_source("covid_cxr", data_dir / "covid_cxr"):
        if not item.boxes:
            continue
        with Image.open(item.image_path) as im:
            w, h = im.size
        regs = _regions([(b.label, b.box) for b in item.boxes], w, h)
        report = report_text(item.report)
        rows.append((item, regs, report, match_report_sentences(report, regs, h, CFG)))
    return rows


def test_real_notes_attach_sentences_to_the_lung_of_their_side(covid_matches):
    counts = {r: 0 for r in REPORT_CAPTION_RULES}
    for _, regs, report, matches in covid_matches:
        for reg, found in zip(regs, matches):
            side = reg["label"].split()[0].lower()  # the category names the patient's side
            if side not in ("left", "right"):  # a box whose category names no side
                continue
            assert reg["location"]["side"] in (side, "midline")  # the box side agrees (radiological convention)
            for m in found:
                counts[m["rule"]] += 1
                assert m["text"] in report
                sides = _terms(m["text"], _SIDE_TERMS)
                if m["rule"] in ("laterality", "laterality+zone"):
                    assert sides == {side}, (reg["label"], m)
                elif m["rule"] == "bilateral":
                    assert "bilateral" in sides
    assert counts["laterality"] >= 50 and counts["bilateral"] >= 100, counts


def test_a_right_upper_lobe_note_goes_to_the_right_lung_only(covid_matches):
    seen = 0
    for _, regs, report, matches in covid_matches:
        if "Extensive right upper lobe consolidation" not in report:
            continue
        seen += 1
        by_label = {r["label"]: [m["text"] for m in found] for r, found in zip(regs, matches)}
        assert any("right upper lobe consolidation" in t for t in by_label["Right Lung"])
        assert not any("right upper lobe" in t for t in by_label.get("Left Lung", []))
    assert seen >= 1


def test_zonal_boxes_match_side_and_zone_and_views_or_history_never_match():
    w = h = 300
    report = ("PA chest radiograph. History of left mastectomy. Right upper lobe consolidation. "
              "Small left basal pleural effusion. No pneumothorax.")
    regs = _regions([
        ("Right Lung", [20, 20, 140, 280]),  # whole lung, image left = patient's right
        ("Left Lung", [160, 20, 280, 280]),
        ("Opacity", [30, 20, 110, 90]),  # zonal, image left top: the patient's right upper zone
        ("Opacity", [30, 220, 110, 290]),  # zonal, the patient's right lower zone
    ], w, h)
    m = match_report_sentences(report, regs, h, CFG)
    assert [x["text"] for x in m[0]] == ["Right upper lobe consolidation."] and m[0][0]["rule"] == "laterality"
    assert [x["text"] for x in m[1]] == ["Small left basal pleural effusion."]
    assert m[2] == [{"text": "Right upper lobe consolidation.", "rule": "laterality+zone"}]
    assert m[3] == []  # the sentence says upper, the box is in the lower zone
    assert not any("PA chest radiograph" in x["text"] or "mastectomy" in x["text"] for found in m for x in found)
    # bilateral findings go to both lungs
    both = match_report_sentences("Bilateral patchy opacities on the radiograph.", regs[:2], h, CFG)
    assert [x["rule"] for x in both[0]] == [x["rule"] for x in both[1]] == ["bilateral"]


def test_slake_facts_match_by_anatomy():
    regs = _regions([("Cardiomegaly", [100, 150, 220, 260]), ("Liver", [20, 150, 120, 260])], 300, 300)
    facts = "Findings: Cardiomegaly. Liver is located in the Right. The imaging modality is X-Ray."
    m = match_report_sentences(facts, regs, 300, CFG)
    assert m[0] == [{"text": "Findings: Cardiomegaly.", "rule": "anatomy"}]
    # "Liver" names no finding term: it is no finding sentence and is not attached
    assert m[1] == []


def test_attached_captions_record_their_rule_and_fit_the_schema():
    w = h = 300
    regs = _regions([("Right Lung", [20, 20, 140, 280]), ("Left Lung", [160, 20, 280, 280])], w, h)
    plain = [dict(r) for r in regs]
    n = attach_report_captions(plain, "Right lower lobe consolidation on the radiograph.", h, CFG)
    assert n == 1 and [r["caption_rule"] for r in plain] == ["location", "location"]
    assert plain[0]["report_captions"] == [{"text": "Right lower lobe consolidation on the radiograph.", "rule": "laterality"}]
    assert plain[0]["caption"] == regs[0]["caption"] and "report_captions" not in plain[1]
    replaced = [dict(r) for r in regs]
    attach_report_captions(replaced, "Right lower lobe consolidation on the radiograph.", h, CFG, replace=True)
    assert replaced[0]["caption"] == "Right lower lobe consolidation on the radiograph."
    assert replaced[0]["caption_rule"] == "report:laterality" and replaced[1]["caption_rule"] == "location"
    for mode, rule in (("off", None), ("extra", "location"), ("replace", "report:laterality")):
        regs_m = [dict(r) for r in regs]
        apply_report_captions(regs_m, "Right lower lobe consolidation on the radiograph.", h, CaptionConfig(report_captions=mode))
        assert regs_m[0].get("caption_rule") == rule
    with pytest.raises(ValueError, match="report_captions"):
        apply_report_captions(regs, "x", h, CaptionConfig(report_captions="all"))
    record = {"schema_version": SCHEMA_VERSION, "id": "x", "split": "train", "width": w, "height": h, "summary": "s",
              "report": "r", "regions": [{k: v for k, v in r.items() if k != "location"} for r in replaced]}
    validate_record(record)
    record["regions"][0]["caption_rule"] = 3
    with pytest.raises(RecordError, match="caption_rule"):
        validate_record(record)


def test_side_is_the_patients_under_the_image_convention_too():
    cfg = CaptionConfig(laterality={"photo": "image", "default": "radiological"})
    loc = location([20, 20, 140, 280], 300, 300, "photo", cfg)
    assert loc["side"] == "left"
    m = match_report_sentences("Left lower zone opacity in the image.", [{"label": "ROI", "box": [20, 20, 140, 280],
                                                                          "location": loc}], 300, cfg)
    assert m[0][0]["rule"] == "laterality"
