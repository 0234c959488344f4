"""Builds that notice their inputs changed (issue 19, item 2).

A complete build records every file its sources read (build-inputs.jsonl). Re-running it
with the same config after an input changed stops, naming the changed file and --force,
never "up to date" over stale data; --force rebuilds from the new bytes. Each case edits
one kind of input of a real small source (table, COCO file, image, report text file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest_build import jpeg_bytes, read_all_records
from regionmed.apps.curation.builder import BuildError, build
from regionmed.apps.curation.config import BuildConfig, SourceSpec
from regionmed.apps.curation.inputs import LEDGER_NAME
from test_curation_inputs import cli

TABLE = "image,report\na.jpg,small nodule in the right upper zone\nb.jpg,clear lungs\nc.jpg,left pleural effusion\n"
COCO = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "c.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
                        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [30, 5, 20, 30]}],
        "categories": [{"id": 1, "name": "lesion"}]}


def make_source(root: Path) -> Path:
    root.mkdir(parents=True)
    for k, name in enumerate(("a.jpg", "b.jpg", "c.jpg")):
        (root / name).write_bytes(jpeg_bytes((80, 60), seed=k))
    (root / "table.csv").write_text(TABLE)
    (root / "boxes.json").write_text(json.dumps(COCO))
    return root


def config(root: Path, out: Path) -> BuildConfig:
    return BuildConfig(out=str(out), workers=0, progress=False,
                       sources=[SourceSpec("generic", str(root), options={"coco": "boxes.json"})])


def _later(path: Path) -> None:
    """Move a file's modification time on (file systems with coarse times would not see the edit)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def edit_table(root: Path) -> None:
    (root / "table.csv").write_text(TABLE.replace("clear lungs", "clear lungs without effusion"))


def add_a_row(root: Path) -> None:
    (root / "d.jpg").write_bytes(jpeg_bytes((80, 60), seed=9))
    (root / "table.csv").write_text(TABLE + "d.jpg,right basal consolidation\n")


def edit_coco(root: Path) -> None:
    coco = json.loads(json.dumps(COCO))
    coco["annotations"][0]["bbox"] = [40, 20, 30, 30]
    (root / "boxes.json").write_text(json.dumps(coco))


def replace_image(root: Path) -> None:
    (root / "b.jpg").write_bytes(jpeg_bytes((80, 60), seed=7))
    _later(root / "b.jpg")


def replace_image_same_size(root: Path) -> None:
    """Other bytes of the same length (a pixel value changed in the compressed stream)."""
    raw = bytearray((root / "b.jpg").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (root / "b.jpg").write_bytes(bytes(raw))
    _later(root / "b.jpg")


def delete_image(root: Path) -> None:
    (root / "c.jpg").unlink()


# case -> (change, what the stop names)
CASES = {
    "edit the table": (edit_table, "generic: table.csv: other content"),
    "add a row": (add_a_row, "generic: table.csv: other content"),
    "edit the COCO file": (edit_coco, "generic: boxes.json: other content (same size)"),
    "replace an image": (replace_image, "generic: image of table.csv row 2: other content"),
    "replace an image, same size": (replace_image_same_size, "generic: image of table.csv row 2: other content (same size)"),
    "delete an image": (delete_image, "generic: image of table.csv row 3: missing now"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_changed_input_stops_the_rebuild_naming_it_and_force_builds_the_new_bytes(tmp_path, case):
    change, named = CASES[case]
    root, out = make_source(tmp_path / "src"), tmp_path / "out"
    cfg = config(root, out)
    build(cfg, log=lambda s: None)
    before = {r["report"]: r for r in read_all_records(out)}
    assert (out / LEDGER_NAME).is_file() and str(root) not in (out / LEDGER_NAME).read_text()  # no path stored
    assert build(cfg, log=lambda s: None).up_to_date  # nothing changed: up to date
    manifest = (out / "manifest.json").read_bytes()
    change(root)
    with pytest.raises(BuildError) as err:
        build(cfg, log=lambda s: None)
    text = str(err.value)
    assert named in text and "--force" in text and "\n" not in text
    assert (out / "manifest.json").read_bytes() == manifest  # nothing was touched
    # the command line: one line, exit 2
    assert cli(["build", "--source", "generic", "--input", str(root), "--option", "coco=boxes.json", "--out", str(out),
                "--workers", "0", "--no-progress"]) == 2
    summary = build(cfg, force=True, log=lambda s: None)
    after = {r["report"]: r for r in read_all_records(out)}
    if case == "edit the table":
        assert "clear lungs without effusion" in after and "clear lungs" not in after
    elif case == "add a row":
        assert summary.inputs == 4 and "right basal consolidation" in after
    elif case == "edit the COCO file":
        box = after["small nodule in the right upper zone"]["regions"][0]["box"]
        assert box == [40, 20, 70, 50] != before["small nodule in the right upper zone"]["regions"][0]["box"]
    elif case.startswith("replace an image"):
        assert after["clear lungs"]["sha256"] != before["clear lungs"]["sha256"]
    else:
        assert summary.built == 2 and summary.rejected["unreadable_image"] == 1
    assert build(cfg, log=lambda s: None).up_to_date


def test_an_image_touched_with_the_same_bytes_is_not_a_change(tmp_path):
    root, out = make_source(tmp_path / "src"), tmp_path / "out"
    cfg = config(root, out)
    build(cfg, log=lambda s: None)
    _later(root / "a.jpg")
    (root / "table.csv").write_text(TABLE)  # rewritten, same content
    assert build(cfg, log=lambda s: None).up_to_date


def test_a_report_file_that_appears_beside_a_dicom_changes_the_build(tmp_path):
    """Files a source looks for and does not find are inputs too: a <stem>.txt report added later."""
    from infer_helpers import dicom_bytes, dicom_dataset, ramp

    root, out = tmp_path / "dcm", tmp_path / "out"
    root.mkdir()
    for k in range(2):
        ds = dicom_dataset("CR")
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 48, 80, 16, 12, 11
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        ds.PixelData = (ramp() // (k + 1)).tobytes()
        (root / f"f{k}.dcm").write_bytes(dicom_bytes(ds))
        if k == 0:
            (root / f"f{k}.txt").write_text("small nodule")
    cfg = BuildConfig(out=str(out), workers=0, progress=False, sources=[SourceSpec("dicom", str(root))])
    summary = build(cfg, log=lambda s: None)
    assert summary.built == 1 and summary.rejected["empty_report"] == 1
    (root / "f1.txt").write_text("left pleural effusion")
    with pytest.raises(BuildError, match=r"dicom: f1.txt: present now, absent when built.*--force"):
        build(cfg, log=lambda s: None)
    assert build(cfg, force=True, log=lambda s: None).built == 2


def test_a_build_made_before_inputs_were_recorded_stays_up_to_date_with_a_warning(tmp_path):
    root, out = make_source(tmp_path / "src"), tmp_path / "out"
    cfg = config(root, out)
    build(cfg, log=lambda s: None)
    (out / LEDGER_NAME).unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["provenance"]["input_files"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    lines: list[str] = []
    assert build(cfg, log=lines.append).up_to_date
    assert any("before regionmed recorded the inputs" in line and "--force" in line for line in lines)


def test_a_resumed_build_whose_staged_image_changed_starts_over(tmp_path):
    root, out = make_source(tmp_path / "src"), tmp_path / "out"
    cfg = config(root, out)
    build(cfg, stop_after=2, log=lambda s: None)  # a.jpg and b.jpg staged
    replace_image(root)
    lines: list[str] = []
    build(cfg, log=lines.append)
    assert any(line.startswith("not resuming: inputs changed since the interrupted run") and "table.csv row 2" in line
               for line in lines)
    reference = tmp_path / "reference"
    build(config(root, reference), log=lambda s: None)
    assert {r["id"]: r["sha256"] for r in read_all_records(out)} == {r["id"]: r["sha256"] for r in read_all_records(reference)}
    # a table edited between the interruption and the resume: also started over
    out2 = tmp_path / "out2"
    build(config(root, out2), stop_after=1, log=lambda s: None)
    edit_table(root)
    lines = []
    build(config(root, out2), log=lines.append)
    assert any(line.startswith("not resuming") for line in lines)
    assert "clear lungs without effusion" in {r["report"] for r in read_all_records(out2)}


VOC = """<annotation><filename>a.jpg</filename><size><width>80</width><height>60</height></size>
<object><name>lesion</name><bndbox><xmin>{x0}</xmin><ymin>10</ymin><xmax>{x1}</xmax><ymax>30</ymax></bndbox></object>
</annotation>"""


@pytest.mark.parametrize("labels", ["yolo", "voc"])
def test_a_changed_label_file_of_a_detection_export_stops_the_rebuild(tmp_path, labels):
    """Label files are build inputs as much as tables: YOLO text (read through the tables module)
    and VOC XML (parsed from bytes) alike."""
    root, out = tmp_path / "src", tmp_path / "out"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.jpg").write_bytes(jpeg_bytes((80, 60), seed=1))
    if labels == "yolo":
        (root / "labels").mkdir()
        (root / "classes.txt").write_text("lesion\n")
        label = root / "labels" / "a.txt"
        label.write_text("0 0.5 0.5 0.25 0.25\n")
        new = "0 0.25 0.5 0.25 0.25\n"
    else:
        (root / "Annotations").mkdir()
        label = root / "Annotations" / "a.xml"
        label.write_text(VOC.format(x0=10, x1=30))
        new = VOC.format(x0=40, x1=70)
    cfg = BuildConfig(out=str(out), workers=0, progress=False, sources=[SourceSpec("detection", str(root))])
    build(cfg, log=lambda s: None)
    assert build(cfg, log=lambda s: None).up_to_date
    label.write_text(new)
    _later(label)
    with pytest.raises(BuildError) as err:
        build(cfg, log=lambda s: None)
    assert label.name in str(err.value) and "--force" in str(err.value)
