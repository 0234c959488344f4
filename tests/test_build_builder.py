"""The builder: accounting, rejects, splits, leakage, resume and idempotence."""

from __future__ import annotations

import io
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest_build import data_dir, jpeg_bytes, public_build, public_config, read_all_records, read_rejects  # noqa: F401
from regionmed.apps.curation.builder import STAGING, BuildError, build
from regionmed.apps.curation.config import BuildConfig, ConfigError, ImageConfig, SourceSpec, load_config
from regionmed.apps.curation.leakage import find_overlaps
from regionmed.data.schema import validate_record
from regionmed.data.shards import MedRegionDataset, read_manifest


def test_every_input_is_accounted_for(public_build):  # noqa: F811
    out, cfg, summary = public_build
    records = read_all_records(out)
    rejects = [r for r in read_rejects(out) if r["level"] == "item"]
    assert summary.inputs == 3 * 40
    assert len(records) + len(rejects) == summary.inputs
    ids = [r["id"] for r in records] + [r["id"] for r in rejects]
    assert len(set(ids)) == len(ids)
    prov = read_manifest(out)["provenance"]
    assert prov["inputs"] == summary.inputs and prov["built"] == len(records)
    assert prov["config_hash"] == cfg.config_hash() and prov["builder_version"]
    for src in prov["sources"]:
        assert src["inputs"] == src["built"] + sum(src["rejected"].values()) == 40
    for r in rejects:
        assert r["reason"] and r["source"] in ("slake", "vqa_rad", "covid_cxr")


def test_records_are_valid_and_have_all_caption_kinds(public_build):  # noqa: F811
    out, _, _ = public_build
    records = read_all_records(out)
    manifest = read_manifest(out)
    for split, info in manifest["splits"].items():
        assert info["samples"] == sum(r["split"] == split for r in records)
        assert set(info["modalities"])  # counts per modality are in the manifest
    n_regions = 0
    for r in records:
        validate_record(r)
        assert r["summary"] and r["report"]
        assert len(r["phash"]) == 64 and len(r["sha256"]) == 64
        for g in r["regions"]:
            x0, y0, x1, y1 = g["box"]
            assert 0 <= x0 < x1 <= r["width"] and 0 <= y0 < y1 <= r["height"]
            assert g["caption"] and g["negatives"]
            assert all(n["text"] != g["caption"] and n["rule"] for n in g["negatives"])
            n_regions += 1
    assert n_regions > 100
    # the shards read back with the one reader, images included
    ds = MedRegionDataset(out, "train")
    img, rec = ds[0]
    assert img.size == (rec["width"], rec["height"])


def test_official_test_split_never_in_train(public_build, data_dir):  # noqa: F811
    out, _, _ = public_build
    records = read_all_records(out)
    slake_test = {q["img_name"].split("/")[0] for q in json.loads((data_dir / "slake" / "test.json").read_text())}
    rad_test = {q["image_name"].rsplit(".", 1)[0] for q in json.loads((data_dir / "vqa_rad" / "testset.json").read_text())}
    checked = 0
    for r in records:
        name = r["id"].split("-", 1)[1]
        if (r["source"] == "slake" and name in slake_test) or (r["source"] == "vqa_rad" and name in rad_test):
            assert r["split"] == "test", r["id"]
            checked += 1
    assert checked > 10


def test_groups_and_near_duplicates_never_cross_splits(public_build):  # noqa: F811
    out, _, _ = public_build
    splits_of_group = defaultdict(set)
    for r in read_all_records(out):
        splits_of_group[r["group"]].add(r["split"])
    assert all(len(s) == 1 for s in splits_of_group.values())
    assert find_overlaps(out) == []  # no exact or near-duplicate image across splits


def test_covid_split_is_by_patient(data_dir, tmp_path):  # noqa: F811
    cfg = BuildConfig(out=str(tmp_path / "c"), workers=0, progress=False,
                      sources=[SourceSpec("covid_cxr", str(data_dir / "covid_cxr"), limit=150)])
    build(cfg, log=lambda s: None)
    recs = read_all_records(tmp_path / "c")
    by_group = defaultdict(set)
    for r in recs:
        by_group[r["group"]].add(r["split"])
    assert any(len([1 for x in recs if x["group"] == g]) > 1 for g in by_group)  # patients with several images
    assert all(len(s) == 1 for s in by_group.values())
    assert {r["split"] for r in recs} == {"train", "val", "test"}
    # no patient identifier in records: groups are salted hashes
    assert all(r["group"].startswith("g-") for r in recs)


def test_check_leakage_between_datasets(public_build, data_dir, tmp_path):  # noqa: F811
    out, _, _ = public_build
    other = tmp_path / "slake10"
    build(BuildConfig(out=str(other), workers=0, progress=False,
                      sources=[SourceSpec("slake", str(data_dir / "slake"), limit=10)]), log=lambda s: None)
    rows = find_overlaps(out, other)
    exact = {r["b_id"] for r in rows if r["kind"] == "exact"}
    assert exact == {f"slake-xmlab{i}" for i in range(10)}


def _write_generic(root: Path, rows: list[dict], files: dict[str, bytes]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    with open(root / "table.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def test_crafted_bad_inputs_are_rejected_with_reasons(tmp_path):
    good = jpeg_bytes((80, 60), seed=1)
    big = io.BytesIO()
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(big, format="PNG")
    files = {
        "good.jpg": good,
        "trunc.jpg": jpeg_bytes((200, 150), seed=2)[:700],
        "noreport.jpg": jpeg_bytes(seed=3),
        "boxes.jpg": jpeg_bytes((80, 60), seed=4),
        "bomb.png": big.getvalue(),
        "junk.jpg": b"this is not an image",
    }
    rows = [
        {"image": "good.jpg", "report": "Right lower lobe nodule.", "patient_id": "p1",
         "boxes": [{"label": "Nodule", "box": [5, 30, 25, 50]}]},
        {"image": "trunc.jpg", "report": "Normal chest.", "patient_id": "p2"},
        {"image": "noreport.jpg", "report": "   ", "patient_id": "p3"},
        {"image": "boxes.jpg", "report": "Two boxes: one outside, one flat.", "patient_id": "p4",
         "boxes": [{"label": "Mass", "box": [100, 100, 140, 120]}, {"label": "Nodule", "box": [10, 10, 10, 40]},
                   {"label": "Cyst", "box": [70, 50, 95, 70]}]},
        {"image": "bomb.png", "report": "Huge image.", "patient_id": "p5"},
        {"image": "junk.jpg", "report": "Not an image.", "patient_id": "p6"},
        {"image": "missing.jpg", "report": "File missing.", "patient_id": "p7"},
    ]
    src = tmp_path / "in"
    _write_generic(src, rows, files)
    cfg = BuildConfig(out=str(tmp_path / "out"), workers=2, progress=False, image=ImageConfig(max_pixels=50_000),
                      sources=[SourceSpec("generic", str(src))])
    lines: list[str] = []
    summary = build(cfg, log=lines.append)
    rejects = read_rejects(tmp_path / "out")
    items = {r["ref"]: r["reason"] for r in rejects if r["level"] == "item"}
    assert items == {
        "table.jsonl row 2": "truncated_image",
        "table.jsonl row 3": "empty_report",
        "table.jsonl row 5": "decompression_bomb",
        "table.jsonl row 6": "unreadable_image",
        "table.jsonl row 7": "unreadable_image",
    }
    regions = Counter(r["reason"] for r in rejects if r["level"] == "region")
    assert regions == {"box_outside": 1, "zero_area_box": 1}
    recs = {r["id"]: r for r in read_all_records(tmp_path / "out")}
    assert len(recs) == 2 and summary.built == 2 and summary.inputs == 7
    boxed = [r for r in recs.values() if len(r["regions"]) == 1 and r["regions"][0]["label"] == "Cyst"]
    assert boxed and boxed[0]["regions"][0]["box"] == [70.0, 50.0, 80.0, 60.0]  # clipped to the 80x60 image
    text = "\n".join(lines)
    assert "accounted: 7 inputs = 2 built + 5 rejected [OK]" in text
    # the good JPEG is stored as it was, without re-encoding
    ds = MedRegionDataset(tmp_path / "out", next(iter(read_manifest(tmp_path / "out")["splits"])))
    assert any(ds._entries[i].image_ext == "jpg" for i in range(len(ds)))


def test_interrupted_build_resumes_without_duplicates(data_dir, tmp_path):  # noqa: F811
    out = tmp_path / "r"
    cfg = public_config(data_dir, out, limit=12)
    build(cfg, stop_after=17, log=lambda s: None)
    assert (out / STAGING).is_dir() and not (out / "manifest.json").exists()
    # simulate a crash in the middle of writing the next entry
    with open(out / STAGING / "index.jsonl", "a") as fh:
        fh.write('{"status": "ok", "id": "half-writ')
    summary = build(cfg, log=lambda s: None)
    assert summary.resumed == 17
    recs = read_all_records(out)
    ids = [r["id"] for r in recs] + [r["id"] for r in read_rejects(out) if r["level"] == "item"]
    assert len(ids) == len(set(ids)) == 36
    # the same as a build in one go
    ref = tmp_path / "ref"
    build(public_config(data_dir, ref, limit=12), log=lambda s: None)
    strip = lambda rs: sorted(json.dumps(r, sort_keys=True) for r in rs)  # noqa: E731
    assert strip(recs) == strip(read_all_records(ref))


def test_rerun_is_idempotent(data_dir, tmp_path):  # noqa: F811
    out = tmp_path / "i"
    cfg = public_config(data_dir, out, limit=5, workers=0)
    build(cfg, log=lambda s: None)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    lines: list[str] = []
    s2 = build(cfg, log=lines.append)
    assert s2.up_to_date and "up to date" in lines[0]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    # a rebuild gives the same records
    recs = read_all_records(out)
    build(cfg, force=True, log=lambda s: None)
    assert read_all_records(out) == recs
    # another config does not silently overwrite
    cfg.captions.negatives_per_region = 1
    with pytest.raises(BuildError, match="--force"):
        build(cfg, log=lambda s: None)


def test_config_unknown_key_names_field_and_file(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("out: x\nsources:\n  - {name: slake, root: .}\ncaptions:\n  negatives_per_regoin: 2\n")
    with pytest.raises(ConfigError, match=r"b\.yaml.*captions\.negatives_per_regoin"):
        load_config(path)
    path.write_text("out: x\nsources:\n  - {name: slake, root: ., limt: 3}\n")
    with pytest.raises(ConfigError, match=r"sources\[0\]\.limt"):
        load_config(path)
    path.write_text("out: x\nworkers: two\nsources:\n  - {name: slake, root: .}\n")
    with pytest.raises(ConfigError, match="workers"):
        load_config(path)
    path.write_text("out: x\nsources:\n  - {name: slake, root: data/slake, limit: 3}\nproposer: {name: annotation, fallback: unsupervised}\n")
    cfg = load_config(path)
    assert cfg.sources[0].root == str((tmp_path / "data" / "slake").resolve()) and cfg.proposer.fallback == "unsupervised"


def test_refuses_a_foreign_non_empty_folder(data_dir, tmp_path):  # noqa: F811
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.tar").write_bytes(b"precious")
    with pytest.raises(BuildError, match="not empty"):
        build(public_config(data_dir, out, limit=2, workers=0), log=lambda s: None)
    assert (out / "notes.tar").read_bytes() == b"precious"
