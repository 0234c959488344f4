"""Detection label exports as box inputs (issue 17, item 3) and region label kinds.

YOLO text labels and Pascal VOC XML, read by the ``detection`` source (a folder of images +
labels) and the ``generic`` source's ``yolo`` / ``voc`` options: every box ends in the shards
or in rejects.jsonl with a reason; label files that match no image are named; boxes outside
the image are clipped or dropped as for COCO. Built for real (workers=0) from files in
tmp_path: tiny JPEGs for the malformed cases, a copied subset of the real TBX11K export.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from conftest_build import data_dir, jpeg_bytes, read_all_records, read_rejects  # noqa: F401
from regionmed.apps.curation.builder import build
from regionmed.apps.curation.config import BuildConfig, SourceSpec
from regionmed.apps.curation.sources import SourceError, get_source
from regionmed.apps.curation.sources.kinds import KindError, LabelKinds, kind_of_supercategory
from regionmed.apps.curation.sources.labelfiles import LabelFileError, read_class_names
from regionmed.data.schema import RecordError, validate_record

W, H = 80, 60  # the tiny test images


def run_build(tmp_path: Path, root: Path, name="detection", out="out", **options):
    lines: list[str] = []
    cfg = BuildConfig(out=str(tmp_path / out), workers=0, progress=False,
                      sources=[SourceSpec(name, str(root), options=options)])
    summary = build(cfg, log=lines.append)
    return summary, "\n".join(lines), tmp_path / out


def by_id(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_all_records(out)}


def region_rejects(out: Path) -> list[dict]:
    return [r for r in read_rejects(out) if r["level"] == "region"]


def write_images(folder: Path, names, size=(W, H)) -> None:
    for k, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(jpeg_bytes(size, seed=100 + k))


# --------------------------------------------------------------------------- TBX11K, the real export


def tbx_root(data: Path) -> Path:
    src = data / "tbx11k"
    if not (src / "labels").is_dir():
        pytest.fail(f"{src} is missing: the TBX11K export of ../shared/data (see its README)", pytrace=False)
    return src


def tbx_subset(data: Path, dest: Path, n: int = 29) -> tuple[Path, list[str]]:
    """The first ``n`` TBX11K images (sorted) plus tb1199 (empty label file), with labels and classes.txt."""
    src = tbx_root(data)
    stems = sorted(p.stem for p in (src / "images").glob("*.jpg"))[:n] + ["tb1199"]
    for d in ("images", "labels"):
        (dest / d).mkdir(parents=True)
    for s in stems:
        shutil.copy(src / "images" / f"{s}.jpg", dest / "images" / f"{s}.jpg")
        shutil.copy(src / "labels" / f"{s}.txt", dest / "labels" / f"{s}.txt")
    shutil.copy(src / "classes.txt", dest / "classes.txt")
    return dest, stems


TBX_OPTIONS = {"modality": "xray", "body": "chest", "kind": "finding", "id_from": "stem"}


def test_tbx11k_subset_every_box_accounted_and_text_made_from_labels(data_dir, tmp_path):  # noqa: F811
    root, stems = tbx_subset(data_dir, tmp_path / "tbx")
    classes = (root / "classes.txt").read_text().split()
    lines = {s: [ln.split() for ln in (root / "labels" / f"{s}.txt").read_text().splitlines() if ln.strip()]
             for s in stems}
    declared = sum(len(v) for v in lines.values())
    summary, log, out = run_build(tmp_path, root, **TBX_OPTIONS)
    recs = by_id(out)
    assert summary.built == len(stems) == len(recs) and "[OK]" in log
    kept = sum(len(r["regions"]) for r in recs.values())
    rejected = region_rejects(out)
    assert kept + len(rejected) == declared  # every box of the label files is in the shards or the rejects
    assert kept == declared - len(rejected) and all(r["reason"] for r in rejected)
    empty = recs["detection-tb1199"]
    assert empty["regions"] == [] and lines["tb1199"] == []
    assert empty["labels"] == {c: 0 for c in classes}
    assert empty["summary"] == "Chest radiograph with no labelled boxes."
    for s in stems:
        rec = recs[f"detection-{s}"]
        present = {classes[int(v[0])] for v in lines[s]}
        assert rec["labels"] == {c: int(c in present) for c in classes}
        assert rec["modality"] == "xray" and rec["width"] == rec["height"] == 512
        if not lines[s]:
            continue
        assert rec["summary"].startswith("Chest radiograph with ") and "tuberculosis" in rec["summary"]
        # the first box: YOLO centre/size x 512, caption = class name as words + the box's place
        c, xc, yc, w, h = lines[s][0]
        reg = rec["regions"][0]
        want = [(float(xc) - float(w) / 2) * 512, (float(yc) - float(h) / 2) * 512,
                (float(xc) + float(w) / 2) * 512, (float(yc) + float(h) / 2) * 512]
        assert reg["box"] == pytest.approx([min(max(v, 0), 512) for v in want], abs=0.01)
        assert reg["label"] == classes[int(c)] and reg["kind"] == "finding" and reg["source"] == "annotation"
        words = {"ActiveTuberculosis": "Active tuberculosis", "ObsoletePulmonaryTuberculosis": "Obsolete pulmonary tuberculosis"}
        assert reg["caption"].startswith(f"{words[reg['label']]} in the ") and "zone" in reg["caption"]
        validate_record(rec)


def test_tbx11k_check_source_counts_rows_boxes_and_the_empty_file(data_dir):  # noqa: F811
    rep = get_source("detection", tbx_root(data_dir), **TBX_OPTIONS).check(files=True)
    n_lines = sum(1 for p in (data_dir / "tbx11k" / "labels").glob("*.txt")
                  for ln in p.read_text().splitlines() if ln.strip())
    assert rep.rows == 600 and rep.boxes == n_lines == 902 and not rep.box_problems and not rep.errors, rep.format()
    assert rep.kinds == {"finding": 902} and not rep.problems
    assert any("1 label files hold no box" in n for n in rep.notes)
    assert get_source("detection", data_dir / "tbx11k", id_from="stem").label_files()[0].name == "classes.txt"


# --------------------------------------------------------------------------- malformed YOLO lines, one image each

GOOD = "0 0.5 0.5 0.25 0.5"
# (case, the second line of the image's label file, reason or "kept", detail fragment / expected box in pixels)
YOLO_CASES = [
    ("unknown_class_id", "2 0.5 0.5 0.1 0.1", "unknown_category", "class id 2 is not among the 2 class names"),
    ("non_numeric", "0 0.5 abc 0.1 0.1", "invalid_box", "'abc' is not a number"),
    ("four_fields", "0 0.5 0.5 0.1", "invalid_box", "4 values; a YOLO box line has 5"),
    ("six_fields", "0 0.5 0.5 0.1 0.1 0.9", "invalid_box", "6 values"),
    ("above_one", "1 1.5 0.5 0.1 0.1", "invalid_box", "coordinate 1.5 is outside [0, 1]"),
    ("negative", "1 0.5 0.5 -0.1 0.1", "invalid_box", "coordinate -0.1 is outside [0, 1]"),
    ("pixel_coordinates", "0 40 30 10 10", "invalid_box", "outside [0, 1]"),
    ("fractional_class", "0.5 0.5 0.5 0.1 0.1", "invalid_box", "class id '0.5' is not a whole number"),
    ("negative_class", "-1 0.5 0.5 0.1 0.1", "invalid_box", "class id '-1' is not a whole number"),
    ("not_finite", "0 0.5 0.5 nan 0.1", "invalid_box", "'nan' is not a finite number"),
    ("zero_width", "1 0.5 0.5 0 0.2", "zero_area_box", "box"),
    ("partly_outside", "1 0.95 0.5 0.2 0.2", "kept", [68.0, 24.0, 80.0, 36.0]),
    ("segment_polygon", "1 0.1 0.1 0.3 0.1 0.2 0.5", "kept", [8.0, 6.0, 24.0, 30.0]),
]


@pytest.fixture(scope="module")
def yolo_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("yolo")
    root = tmp / "in"
    names = [f"{case}.jpg" for case, *_ in YOLO_CASES]
    write_images(root / "images", names)
    (root / "labels").mkdir()
    for case, line, *_ in YOLO_CASES:
        (root / "labels" / f"{case}.txt").write_text(f"{GOOD}\n{line}\n")
    (root / "classes.txt").write_text("Nodule\nMass\n")
    summary, log, out = run_build(tmp, root, id_from="stem", kind="finding")
    rep = get_source("detection", root, id_from="stem").check()
    return summary, log, out, rep


@pytest.mark.parametrize("case,line,reason,expect", YOLO_CASES, ids=[c[0] for c in YOLO_CASES])
def test_malformed_yolo_lines_end_in_rejects_with_their_reason(yolo_build, case, line, reason, expect):
    summary, log, out, _ = yolo_build
    rec = by_id(out)[f"detection-{case}"]
    assert rec["regions"][0]["box"] == [30.0, 15.0, 50.0, 45.0]  # the good line of every file is kept
    rejects = [r for r in region_rejects(out) if r["id"] == f"detection-{case}"]
    if reason == "kept":
        assert not rejects and len(rec["regions"]) == 2
        assert rec["regions"][1]["box"] == pytest.approx(expect, abs=0.01)
        return
    assert len(rec["regions"]) == 1 and [r["reason"] for r in rejects] == [reason]
    assert expect in rejects[0]["detail"]
    if reason != "zero_area_box":  # known when the file is read: named with its file and line
        assert f"labels/{case}.txt line 2" in rejects[0]["detail"]


def test_yolo_cases_accounted_and_counted_by_check_source(yolo_build):
    summary, log, out, rep = yolo_build
    read_time = Counter(r for _, _, r, _ in YOLO_CASES if r not in ("kept", "zero_area_box"))
    assert rep.box_problems == read_time and rep.boxes == 2 * len(YOLO_CASES)
    kept = sum(len(r["regions"]) for r in read_all_records(out))
    assert kept + len(region_rejects(out)) == 2 * len(YOLO_CASES)
    assert summary.region_rejects == Counter(r for _, _, r, _ in YOLO_CASES if r != "kept")
    assert "accounted: 13 inputs = 13 built + 0 rejected [OK]" in log


# --------------------------------------------------------------------------- label files that match no image


@pytest.mark.parametrize("id_from,named", [("stem", "labels/extra/ghost.txt"), ("hash", "labels/extra/<name>.txt (label file #")])
def test_label_file_without_image_is_named_and_its_boxes_rejected(tmp_path, id_from, named):
    root = tmp_path / "in"
    write_images(root / "images", ["a.jpg"])
    (root / "labels" / "extra").mkdir(parents=True)
    (root / "labels" / "a.txt").write_text(GOOD + "\n")
    (root / "labels" / "extra" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n1 0.2 0.2 0.1 0.1\n")
    (root / "labels" / "extra" / "empty_ghost.txt").write_text("")
    (root / "classes.txt").write_text("Nodule\nMass\n")
    rep = get_source("detection", root, id_from=id_from).check()
    assert rep.boxes == 3 and rep.box_problems == {"unmatched_box": 2}
    warning = next(w for w in rep.warnings if "match no image" in w)
    assert "2 of 3 YOLO label files match no image" in warning and named in warning
    summary, log, out = run_build(tmp_path, root, id_from=id_from)
    orphans = region_rejects(out)
    assert [(o["reason"], o["id"], o["label"]) for o in orphans] == [("unmatched_box", None, "Nodule"),
                                                                      ("unmatched_box", None, "Mass")]
    assert all(named in o["detail"] for o in orphans)
    if id_from == "hash":
        assert "ghost" not in json.dumps(orphans) + warning  # file names may hold identifiers
    assert summary.regions == 1 and "match no image" in log


def test_labels_that_reach_no_image_stop_naming_both_layouts(tmp_path):
    root = tmp_path / "in"
    write_images(root / "images", ["a.jpg"])
    (root / "labels").mkdir()
    (root / "labels" / "b.txt").write_text(GOOD + "\n")
    (root / "classes.txt").write_text("Nodule\n")
    with pytest.raises(SourceError, match=r"none of the 1 label files .* matches one of the 1 images"):
        run_build(tmp_path, root)


def test_images_without_label_file_have_no_boxes_and_unknown_labels(tmp_path):
    root = tmp_path / "in"
    write_images(root / "images", ["a.jpg", "b.jpg", "c.jpg"])
    (root / "labels").mkdir()
    (root / "labels" / "a.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    (root / "labels" / "b.txt").write_text("\n")
    (root / "classes.txt").write_text("Nodule\nMass\n")
    summary, log, out = run_build(tmp_path, root, id_from="stem", body="chest", modality="CT")
    recs = by_id(out)
    assert recs["detection-a"]["labels"] == {"Mass": 1, "Nodule": 0}
    assert recs["detection-a"]["report"] == "Chest CT image with mass. Labelled boxes: mass (1)."
    assert recs["detection-b"]["labels"] == {"Mass": 0, "Nodule": 0} and recs["detection-b"]["regions"] == []
    assert recs["detection-c"]["labels"] == {} and recs["detection-c"]["summary"] == "Chest CT image."
    rep = get_source("detection", root).check()
    assert any("1 images have no YOLO label file" in n for n in rep.notes)
    assert any("1 label files hold no box" in n for n in rep.notes)
    _, _, out2 = run_build(tmp_path, root, out="out2", id_from="stem", absent_labels="unknown")
    assert by_id(out2)["detection-a"]["labels"] == {"Mass": 1}


def test_ultralytics_layout_keeps_folder_splits_and_data_yaml_names(tmp_path):
    root = tmp_path / "in"
    write_images(root / "images", ["train/a.jpg", "train/b.jpg", "val/c.jpg", "test/d.jpg"])
    for rel in ("train/a", "train/b", "val/c", "test/d"):
        (root / "labels" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"{rel}.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  0: nodule\n  1: pleural_effusion\n")
    summary, log, out = run_build(tmp_path, root, id_from="stem")
    recs = by_id(out)
    assert {k: r["split"] for k, r in recs.items()} == {"detection-train_a": "train", "detection-train_b": "train",
                                                         "detection-val_c": "val", "detection-test_d": "test"}
    reg = recs["detection-val_c"]["regions"][0]
    assert reg["label"] == "pleural_effusion" and reg["caption"].startswith("Pleural effusion in the ")
    assert "kind" not in reg  # no kind option, no supercategory: unknown


@pytest.mark.parametrize("text,expected", [
    ("Nodule\nMass\n\n", {0: "Nodule", 1: "Mass"}),
    ("0 Nodule\n1 Pleural Effusion\n", {0: "Nodule", 1: "Pleural Effusion"}),
])
def test_class_names_files(tmp_path, text, expected):
    (tmp_path / "classes.txt").write_text(text)
    assert read_class_names(tmp_path / "classes.txt") == expected


@pytest.mark.parametrize("name,text,message", [
    ("classes.txt", "Nodule\n\nMass\n", "line 2 is blank"),
    ("classes.txt", "Nodule\nNodule\n", "given to ids 0 and 1"),
    ("classes.txt", "\n", "no class names"),
    ("data.yaml", "nc: 2\n", "expected 'names' as a list or a mapping"),
    ("data.yaml", "names: {a: Nodule}\n", "not a class id"),
    ("data.yaml", "names: [Nodule\n", "not valid YAML"),
])
def test_bad_class_names_files_stop_naming_the_file(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(LabelFileError, match=message):
        read_class_names(tmp_path / name)


def test_yolo_without_class_names_and_bad_options_stop(tmp_path):
    root = tmp_path / "in"
    write_images(root / "images", ["a.jpg"])
    (root / "labels").mkdir()
    (root / "labels" / "a.txt").write_text(GOOD + "\n")
    with pytest.raises(SourceError, match="need class names: set the option classes"):
        get_source("detection", root)
    for opts, msg in (({"yolo": "labels", "voc": "labels"}, "not both"), ({"voc_origin": "2", "voc": "labels"}, "voc_origin"),
                      ({"difficult": "drop", "voc": "labels"}, "difficult must be"),
                      ({"absent_labels": "no", "classes": ["A"]}, "absent_labels")):
        with pytest.raises(SourceError, match=msg):
            get_source("detection", root, **opts)
    assert get_source("detection", root, classes=["Nodule"]).check().boxes == 1


# --------------------------------------------------------------------------- Pascal VOC


def voc_xml(filename="a.jpg", size=(W, H), objects=(("Nodule", (11, 21, 30, 40)),), difficult=(), extra="") -> str:
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>1</depth></size>" if size else ""
    objs = ""
    for k, (name, box) in enumerate(objects):
        name_xml = f"<name>{name}</name>" if name is not None else ""
        tags = ("xmin", "ymin", "xmax", "ymax")
        bb = "".join(f"<{t}>{v}</{t}>" for t, v in zip(tags, box) if v is not None)
        objs += (f"<object>{name_xml}<pose>Unspecified</pose><truncated>0</truncated>"
                 f"<difficult>{int(k in difficult)}</difficult><bndbox>{bb}</bndbox></object>")
    return f"<annotation><folder>images</folder><filename>{filename}</filename>{size_xml}{objs}{extra}</annotation>"


GOOD_VOC = ("Nodule", (11, 21, 30, 40))  # 1-based inclusive -> [10, 20, 30, 40]
# (case, the xml of the image (its second object, or the whole file), reason or "kept", detail / expected box)
VOC_CASES = [
    ("inverted", voc_xml(objects=(GOOD_VOC, ("Mass", (30, 21, 11, 40)))), "invalid_box", "inverted box (xmax 11 < xmin 30"),
    ("missing_value", voc_xml(objects=(GOOD_VOC, ("Mass", (30, 21, None, 40)))), "invalid_box",
     "a <bndbox> value is missing or not a number"),
    ("non_numeric", voc_xml(objects=(GOOD_VOC, ("Mass", (30, "x", 40, 40)))), "invalid_box", "missing or not a number"),
    ("no_name", voc_xml(objects=(GOOD_VOC, (None, (1, 1, 10, 10)))), "unknown_category", "object 2: no <name>"),
    ("outside", voc_xml(objects=(GOOD_VOC, ("Mass", (200, 200, 300, 300)))), "box_outside", "box"),
    # xmin = xmax is a 1-pixel-wide VOC box; clipped to a half-pixel sliver at the border it has no area
    ("zero_area", voc_xml(objects=(GOOD_VOC, ("Mass", (80.5, 5, 85, 30)))), "zero_area_box", "box"),
    ("size_mismatch", voc_xml(size=(160, 120), objects=(GOOD_VOC, GOOD_VOC)), "size_mismatch",
     "drawn on a 160x120 image, the image is 80x60"),
    ("not_xml", "<annotation><object>", "invalid_box", "not valid XML"),
    ("not_voc", "<coco><images/></coco>", "invalid_box", "root element <coco>, a VOC file has <annotation>"),
    ("no_size", voc_xml(size=None, objects=(GOOD_VOC, ("Mass", (41, 11, 60, 30)))), "kept", [40.0, 10.0, 60.0, 30.0]),
    ("partly_outside", voc_xml(objects=(GOOD_VOC, ("Mass", (61, 41, 100, 90)))), "kept", [60.0, 40.0, 80.0, 60.0]),
    ("difficult", voc_xml(objects=(GOOD_VOC, ("Mass", (41, 11, 60, 30))), difficult=(1,)), "kept", [40.0, 10.0, 60.0, 30.0]),
]


@pytest.fixture(scope="module")
def voc_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("voc")
    root = tmp / "in"
    write_images(root / "JPEGImages", [f"{c[0]}.jpg" for c in VOC_CASES])
    (root / "Annotations").mkdir()
    for case, xml, *_ in VOC_CASES:
        (root / "Annotations" / f"{case}.xml").write_text(xml.replace("<filename>a.jpg", f"<filename>{case}.jpg"))
    summary, log, out = run_build(tmp, root, images="JPEGImages", id_from="stem", label_kinds={"Nodule": "finding"})
    return summary, log, out, get_source("detection", root, images="JPEGImages", id_from="stem").check()


@pytest.mark.parametrize("case,xml,reason,expect", VOC_CASES, ids=[c[0] for c in VOC_CASES])
def test_voc_cases_end_in_shards_or_rejects_with_their_reason(voc_build, case, xml, reason, expect):
    summary, log, out, _ = voc_build
    rec = by_id(out)[f"detection-{case}"]
    rejects = [r for r in region_rejects(out) if r["id"] == f"detection-{case}"]
    whole_file = case in ("not_xml", "not_voc")
    if not whole_file and reason != "size_mismatch":
        assert rec["regions"][0]["box"] == [10.0, 20.0, 30.0, 40.0]  # VOC devkit: 1-based, inclusive
        assert rec["regions"][0]["kind"] == "finding"
    if reason == "kept":
        assert not rejects and rec["regions"][1]["box"] == pytest.approx(expect) and "kind" not in rec["regions"][1]
        return
    assert {r["reason"] for r in rejects} == {reason} and expect in rejects[0]["detail"]
    if reason == "size_mismatch":
        assert rec["regions"] == [] and len(rejects) == 2


def test_voc_cases_accounted_and_counted_by_check_source(voc_build):
    summary, log, out, rep = voc_build
    declared = sum(max(1, xml.count("<object>")) for _, xml, _, _ in VOC_CASES)
    kept = sum(len(r["regions"]) for r in read_all_records(out))
    assert kept + len(region_rejects(out)) == declared == rep.boxes
    assert rep.box_problems == {"invalid_box": 5, "unknown_category": 1}  # the rest is known once the image is decoded
    notes = " ".join(rep.notes)
    assert "1 VOC files have no <size>" in notes and "1 VOC objects are marked difficult (kept)" in notes


def test_voc_matched_by_filename_origin_0_difficult_reject_and_classes(tmp_path):
    root = tmp_path / "in"
    write_images(root / "images", ["scan_01.jpg"])
    (root / "ann").mkdir()
    xml = voc_xml("scan_01.jpg", objects=(("Nodule", (10, 20, 30, 40)), ("Mass", (40, 10, 60, 30)), ("Cyst", (1, 1, 9, 9))),
                  difficult=(1,))
    (root / "ann" / "0001.xml").write_text(xml)  # the xml stem differs: matched by <filename>
    summary, log, out = run_build(tmp_path, root, voc="ann", voc_origin="0", difficult="reject",
                                  classes=["Nodule", "Mass"], id_from="stem", anatomy_labels="nodule")
    rec = by_id(out)["detection-scan_01"]
    assert [(g["label"], g["box"], g.get("kind")) for g in rec["regions"]] == [("Nodule", [10.0, 20.0, 30.0, 40.0], "anatomy")]
    assert sorted(r["reason"] for r in region_rejects(out)) == ["difficult_box", "unknown_category"]
    assert rec["labels"] == {"Nodule": 1, "Mass": 1}  # a difficult box still says its class is present


# --------------------------------------------------------------------------- generic + YOLO / VOC


def test_generic_table_with_yolo_labels(tmp_path):
    root = tmp_path / "in"
    write_images(root / "images", ["a.jpg", "b.jpg"])
    (root / "table.csv").write_text("image,report\nimages/a.jpg,Nodule in the right lung.\nimages/b.jpg,Normal chest.\n")
    (root / "labels").mkdir()
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.25 0.5\n3 0.5 0.5 0.1 0.1\n")
    (root / "labels" / "c.txt").write_text("0 0.5 0.5 0.25 0.5\n")
    (root / "labels" / "classes.txt").write_text("Nodule\n")
    summary, log, out = run_build(tmp_path, root, name="generic", yolo="labels", finding_labels=["Nodule"])
    recs = {r["report"]: r for r in read_all_records(out)}
    reg = recs["Nodule in the right lung."]["regions"]
    assert [(g["label"], g["box"], g["kind"]) for g in reg] == [("Nodule", [30.0, 15.0, 50.0, 45.0], "finding")]
    assert sorted(r["reason"] for r in region_rejects(out)) == ["unknown_category", "unmatched_box"]
    assert "1 of 2 YOLO label files match no image of the table" in log
    src = get_source("generic", root, yolo="labels")
    assert {p.name for p in src.label_files()} == {"classes.txt", "a.txt", "c.txt"}


# --------------------------------------------------------------------------- label kinds


@pytest.mark.parametrize("kind,ok", [("anatomy", True), ("finding", True), (None, True), ("organ", False), (3, False)])
def test_region_kind_in_the_schema(kind, ok):
    rec = {"schema_version": 1, "id": "x", "split": "train", "summary": "s", "report": "r", "width": 8, "height": 8,
           "regions": [{"box": [0, 0, 4, 4], "caption": "c", **({} if kind is None else {"kind": kind})}]}
    if ok:
        assert validate_record(rec) is rec
    else:
        with pytest.raises(RecordError, match=r"regions\[0\]\.kind"):
            validate_record(rec)


def test_label_kind_options_precedence_and_errors():
    k = LabelKinds({"label_kinds": '{"Liver": "anatomy"}', "finding_labels": "Nodule, Mass", "kind": "finding"}, "s")
    assert k.of("liver ", known="finding") == "anatomy"  # an option beats what the input says
    assert k.of("NODULE") == "finding" and k.of("Spleen", known="anatomy") == "anatomy"
    assert k.of("Cyst") == "finding" and LabelKinds({}).of("Cyst") is None
    assert k.unused() == ["Mass"]
    for opts, msg in (({"label_kinds": {"Liver": "organ"}}, "kind must be one of"),
                      ({"finding_labels": ["Liver"], "anatomy_labels": ["liver"]}, "given both kinds"),
                      ({"label_kinds": "[1]"}, "expected a mapping")):
        with pytest.raises(KindError, match=msg):
            LabelKinds(opts, "s")
    assert kind_of_supercategory("Organs") == "anatomy" and kind_of_supercategory("lesion") == "finding"
    assert kind_of_supercategory("COVID-19 Lungs") is None and kind_of_supercategory(None) is None


def test_public_sources_set_label_kinds(data_dir):  # noqa: F811
    slake = get_source("slake", data_dir / "slake").check()
    assert set(slake.kinds) == {"anatomy", "finding"} and slake.kinds["finding"] > 300, slake.format()
    cov = get_source("covid_cxr", data_dir / "covid_cxr").check()
    assert set(cov.kinds) == {"anatomy"}
    with pytest.raises(SourceError, match="unknown option"):
        get_source("slake", data_dir / "slake", kinds="finding")
    wrong = get_source("covid_cxr", data_dir / "covid_cxr", label_kinds={"Right Lung": "finding", "Rigth Lung": "anatomy"})
    rep = wrong.check()
    assert rep.kinds["finding"] > 0 and any("'Rigth Lung'" in w for w in rep.warnings)


def test_coco_supercategory_sets_the_region_kind(tmp_path):
    root = tmp_path / "in"
    write_images(root, ["a.jpg"])
    (root / "table.csv").write_text("image,report\na.jpg,Nodule near the liver.\n")
    (root / "coco.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20]},
                        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 5, 20, 20]},
                        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 30, 20, 20]}],
        "categories": [{"id": 1, "name": "Nodule", "supercategory": "lesion"},
                       {"id": 2, "name": "Liver", "supercategory": "organ"},
                       {"id": 3, "name": "Marker", "supercategory": "object"}]}))
    summary, log, out = run_build(tmp_path, root, name="generic", coco="coco.json")
    regs = read_all_records(out)[0]["regions"]
    assert [(g["label"], g.get("kind")) for g in regs] == [("Nodule", "finding"), ("Liver", "anatomy"), ("Marker", None)]


def test_check_source_command_reports_detection_boxes_and_kinds(yolo_build, tmp_path, capsys):
    import argparse

    from regionmed.apps.curation.cli import add_build_parser, add_check_source_parser

    p = argparse.ArgumentParser(prog="regionmed")
    sub = p.add_subparsers(dest="command")
    add_check_source_parser(sub)
    add_build_parser(sub)
    root = Path(yolo_build[3].where)
    args = p.parse_args(["check-source", "--source", "detection", "--input", str(root), "--option", "id_from=stem",
                         "--option", 'label_kinds={"Nodule": "finding", "Mass": "anatomy"}'])
    assert args.func(args) == 0  # a build would run (the dropped boxes go to rejects.jsonl); 1 = it would stop
    text = capsys.readouterr().out
    for line in ("13 rows read", "boxes declared: 26", "unknown_category       1", "invalid_box            9",
                 "labels/four_fields.txt line 2: 4 values", "box label kinds: anatomy=3, finding=13"):
        assert line in text, (line, text)
    with pytest.raises(SystemExit):
        p.parse_args(["build", "--help"])
    help_text = capsys.readouterr().out
    for word in ("detection", "yolo: labels", "voc_origin", "absent_labels", "label_kinds", "finding_labels", "kind: finding"):
        assert word in help_text, word


def test_dicom_folder_with_yolo_labels(tmp_path):
    from test_build_dicom import make_dicom, ramp

    root = tmp_path / "in"
    (root / "scans").mkdir(parents=True)
    (root / "scans" / "s1.dcm").write_bytes(make_dicom(ramp(60, 80)))
    (root / "scans" / "s1.txt").write_text("Nodule in the right upper lobe.")
    (root / "labels" / "scans").mkdir(parents=True)
    (root / "labels" / "scans" / "s1.txt").write_text("0 0.25 0.25 0.25 0.5\n")
    (root / "labels" / "classes.txt").write_text("Nodule\n")
    summary, log, out = run_build(tmp_path, root, name="dicom", yolo="labels", kind="finding")
    (rec,) = read_all_records(out)
    assert [(g["label"], g["box"], g["kind"]) for g in rec["regions"]] == [("Nodule", [10.0, 0.0, 30.0, 30.0], "finding")]
