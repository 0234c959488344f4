"""The builder attaches report sentences to the regions they describe (captions.report_captions)."""

from __future__ import annotations

from conftest_build import data_dir, public_build, public_config  # noqa: F401
from regionmed.apps.curation.builder import build
from regionmed.data.shards import MedRegionDataset


def records(root):
    out = []
    for split in ("train", "val", "test"):
        try:
            ds = MedRegionDataset(root, split)
        except Exception:
            continue
        out += [ds.record(i) for i in range(len(ds))]
    return out


def test_real_notes_are_matched_to_lung_boxes_with_their_rule(public_build):  # noqa: F811
    recs = [r for r in records(public_build[0]) if r["source"] == "covid_cxr"]
    regions = [reg for r in recs for reg in r["regions"]]
    assert regions and all(reg["caption_rule"] == "location" for reg in regions)  # "extra": captions unchanged
    matched = [reg for reg in regions if reg.get("report_captions")]
    assert matched, "no covid_cxr note sentence was matched to a lung box"
    for reg in matched:
        for cap in reg["report_captions"]:
            assert cap["text"].strip() and cap["rule"]
    # Each matched sentence is a sentence of that record's own report.
    for r in recs:
        for reg in r["regions"]:
            for cap in reg.get("report_captions", []):
                assert cap["text"].rstrip(".").lower() in r["report"].lower()


def test_replace_makes_the_sentence_the_caption_and_its_negatives(data_dir, tmp_path):  # noqa: F811
    cfg = public_config(data_dir, tmp_path / "ds", limit=12)
    cfg.sources = [s for s in cfg.sources if s.name == "covid_cxr"]
    cfg.captions.report_captions = "replace"
    build(cfg, log=lambda s: None)
    regions = [reg for r in records(tmp_path / "ds") for reg in r["regions"]]
    replaced = [reg for reg in regions if reg["caption_rule"].startswith("report:")]
    assert replaced
    for reg in replaced:
        assert reg["caption"] == reg["report_captions"][0]["text"]
        # negatives are made from the caption the region carries, so they differ from it
        assert all(neg["text"] != reg["caption"] for neg in reg["negatives"])
