"""Real-world inputs to dataset curation (issue 10): tables, text, labels and boxes.

Kinds: 1 text encodings of tables and configs, 4 label values, 5 placeholder text,
6 box formats, 7 joining boxes to images, 15 columns a source does not use,
16 rows with more fields than the header; and the dry run (check-source).
Every test builds from small real files in tmp_path (workers=0, tiny images).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest_build import data_dir, jpeg_bytes, read_all_records, read_rejects  # noqa: F401
from regionmed.apps.cli import main
from regionmed.apps.curation.builder import build
from regionmed.apps.curation.captions import clean_report
from regionmed.apps.curation.config import BuildConfig, SourceSpec, load_config
from regionmed.apps.curation.sources import DicomSource, GenericSource, SourceError
from regionmed.apps.curation.sources.fields import FieldError, LabelParser, parse_boxes, parse_label_value
from regionmed.apps.curation.tables import Table, TableError, is_missing, read_json
from regionmed.config import ConfigError, load_yaml_config
from regionmed.errors import RegionmedError

# --------------------------------------------------------------------------- helpers


def make_source(root: Path, table: str, content: str | bytes, images=("a.jpg", "b.jpg", "c.jpg"), folder="",
                encoding="utf-8") -> Path:
    """A generic source folder: tiny JPEGs (80x60) under ``folder`` and one table file."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(images):
        (root / folder / name).write_bytes(jpeg_bytes((80, 60), seed=k))
    (root / table).write_bytes(content if isinstance(content, bytes) else content.encode(encoding))
    return root


def run_build(tmp_path: Path, root: Path, name="generic", out="out", **options):
    lines: list[str] = []
    cfg = BuildConfig(out=str(tmp_path / out), workers=0, progress=False,
                      sources=[SourceSpec(name, str(root), options=options)])
    summary = build(cfg, log=lines.append)
    return summary, "\n".join(lines), tmp_path / out


def records_by_report(out: Path) -> dict[str, dict]:
    return {r["report"]: r for r in read_all_records(out)}


def cli(argv: list[str]) -> int:
    return main(argv)  # the command line, with its one error boundary


# --------------------------------------------------------------------------- kind 1: text encodings


def test_bom_crlf_csv_from_a_spreadsheet_builds_every_row(tmp_path):
    text = ("image,report,patient_id\r\n"
            "a.jpg,Small nodule in the right upper zone.,p1\r\n"
            "b.jpg,Normal chest.,p2\r\n"
            "c.jpg,Left pleural effusion.,p3\r\n")
    root = make_source(tmp_path / "in", "table.csv", "\ufeff" + text)
    assert (root / "table.csv").read_bytes()[:3] == b"\xef\xbb\xbf"
    summary, _, out = run_build(tmp_path, root)
    assert summary.inputs == 3 and summary.built == 3 and not summary.rejected
    assert set(records_by_report(out)) == {"Small nodule in the right upper zone.", "Normal chest.", "Left pleural effusion."}


def test_utf16_and_cr_only_tables_read_the_same(tmp_path):
    rows = "image\treport\na.jpg\tNormal chest.\nb.jpg\tSmall left effusion.\n"
    root = make_source(tmp_path / "u16", "table.tsv", b"\xff\xfe" + rows.encode("utf-16-le"))
    assert [r.cells for r in Table(root / "table.tsv").rows()] == [
        {"image": "a.jpg", "report": "Normal chest."}, {"image": "b.jpg", "report": "Small left effusion."}]
    cr = tmp_path / "cr.csv"
    cr.write_bytes(b"image,report\ra.jpg,Normal chest.\rb.jpg,Small left effusion.\r")
    assert [r.cells["report"] for r in Table(cr).rows()] == ["Normal chest.", "Small left effusion."]


def test_missing_column_is_named_with_the_header_found(tmp_path):
    root = make_source(tmp_path / "in", "table.csv", "img,report\na.jpg,Normal chest.\n")
    with pytest.raises(SourceError) as err:
        run_build(tmp_path, root)
    msg = str(err.value)
    assert "no column 'image' (image_col)" in msg and "['img', 'report']" in msg
    assert not (tmp_path / "out").exists()  # stopped before anything was written
    # a semicolon-separated "CSV" (a European spreadsheet) is one column: the hint names the option
    root2 = make_source(tmp_path / "in2", "table.csv", "image;report\na.jpg;Normal chest.\n")
    with pytest.raises(SourceError, match=r"delimiter: ';'"):
        run_build(tmp_path, root2, out="out2")
    # with the option the same file builds
    summary, _, _ = run_build(tmp_path, root2, out="out3", delimiter=";")
    assert summary.built == 1


def test_legacy_single_byte_table_stops_naming_byte_and_option_then_reads_with_it(tmp_path):
    text = "image,report\na.jpg,Opacité in the left lung.\n"
    root = make_source(tmp_path / "in", "table.csv", text.encode("cp1252"))
    offset = text.encode("cp1252").index(b"\xe9")
    with pytest.raises(SourceError) as err:
        run_build(tmp_path, root)
    msg = str(err.value)
    assert f"at byte {offset} (line 2)" in msg and "0xe9" in msg and "encoding: cp1252" in msg and "table.csv" in msg
    summary, _, out = run_build(tmp_path, root, encoding="cp1252")
    assert summary.built == 1 and list(records_by_report(out)) == ["Opacité in the left lung."]
    assert "\ufffd" not in json.dumps(read_all_records(out), ensure_ascii=False)
    # an unknown encoding name is a clear error, not a traceback
    with pytest.raises(SourceError, match="unknown text encoding"):
        GenericSource(root, encoding="latin-42")


def test_json_and_report_text_files_are_decoded_strictly(tmp_path):
    bad = tmp_path / "coco.json"
    data = '{"images": [{"id": 1,\n "file_name": "Ö.png"}]}'.encode("latin-1")
    bad.write_bytes(data)
    with pytest.raises(TableError, match=rf"coco\.json: not valid utf-8 text at byte {data.index(0xd6)} \(line 2\)"):
        read_json(bad)
    good = tmp_path / "bom.json"
    good.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a": "é"}).encode())
    assert read_json(good) == {"a": "é"}
    # a DICOM folder's <stem>.txt report in cp1252: that item is rejected, with the option to set
    dcm = tmp_path / "dcm"
    dcm.mkdir()
    (dcm / "x1.dcm").write_bytes(b"not read here")
    (dcm / "x1.txt").write_bytes("Opacité droite.".encode("cp1252"))
    (dcm / "x2.dcm").write_bytes(b"not read here")
    (dcm / "x2.txt").write_text("Normal chest.", encoding="utf-8")
    rep = DicomSource(dcm).check()
    assert rep.problems == {"undecodable_text": 1} and "encoding" in rep.examples["undecodable_text"][0]
    assert "x1" not in rep.examples["undecodable_text"][0]  # file names may hold identifiers
    items = list(DicomSource(dcm, encoding="cp1252"))
    assert [i.report for i in items] == ["Opacité droite.", "Normal chest."] and not any(i.reject for i in items)


def test_config_files_accept_a_bom_and_reject_other_encodings(tmp_path):
    (tmp_path / "data").mkdir()
    path = tmp_path / "b.yaml"
    path.write_bytes(b"\xef\xbb\xbfout: x\nsources:\n  - {name: generic, root: data}\n")
    cfg = load_config(path)
    assert cfg.out == "x" and cfg.sources[0].name == "generic"
    path.write_bytes("out: x  # Résumé\nsources:\n  - {name: generic, root: data}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"b\.yaml: build config is not UTF-8 text: byte 0xe9 at offset 11 \(line 1\)"):
        load_config(path)
    path.write_bytes("out: x\n".encode("utf-16"))
    with pytest.raises(ConfigError, match="UTF-16"):
        load_yaml_config(BuildConfig, path)
    assert cli(["build", "--config", str(path)]) == 2  # one line on stderr, no traceback


# --------------------------------------------------------------------------- kind 4: label values


@pytest.mark.parametrize("value,expected", [
    ("1", 1), ("0", 0), ("1.0", 1), ("0.0", 0), ("-1", -1), ("-1.0", -1), (1, 1), (0, 0), (-1.0, -1), (True, 1),
    (False, 0), ("yes", 1), ("No", 0), ("TRUE", 1), ("false", 0), (" positive ", 1), ("negative", 0),
    ("uncertain", -1), ("", None), ("nan", None), (None, None), (float("nan"), None)])
def test_label_value_spellings(value, expected):
    assert parse_label_value(value) == expected


@pytest.mark.parametrize("value", ["2", "0.5", "maybe", 3, -2.0, "1 0"])
def test_other_label_values_are_errors(value):
    with pytest.raises(FieldError, match="not a label value"):
        parse_label_value(value)


def test_label_cells_and_uncertain_policies():
    p = LabelParser("U-Ignore")
    assert p.parse_cell('{"Edema": "0", "Effusion": "1", "Atelectasis": "-1", "Mass": null}', "labels") == {"Edema": 0, "Effusion": 1}
    assert p.parse_cell("Edema|Nodule", "labels") == {"Edema": 1, "Nodule": 1}
    assert p.parse_cell(["Edema"], "labels") == {"Edema": 1}
    assert p.parse_cell("0", "pneumonia") == {"pneumonia": 0}  # one value: the column is the class
    assert p.parse_cell("nan", "labels") == {}
    assert p.stats["uncertain"] == 1 and p.stats["not_given"] == 1
    assert LabelParser("U-Zeros").parse_cell({"A": -1}, "labels") == {"A": 0}
    assert LabelParser("u-ones").parse_cell({"A": "-1.0"}, "labels") == {"A": 1}
    for bad in ('{"Edema": 2}', "1|0", "[1, 0]", '{"Edema": "maybe"'):
        with pytest.raises(FieldError, match="column 'labels'"):
            LabelParser().parse_cell(bad, "labels")
    with pytest.raises(FieldError, match="U-Ignore, U-Zeros, U-Ones"):
        LabelParser("U-Maybe")


def test_label_column_with_strings_1_and_0_builds_right_labels(tmp_path):
    table = ("image,report,pneumonia\n"
             "a.jpg,Right lower lobe consolidation.,1\n"
             "b.jpg,Normal chest.,0\n"
             "c.jpg,Possible left basal opacity.,-1\n"
             "d.jpg,Clear lungs.,2\n")
    root = make_source(tmp_path / "in", "table.csv", table, images=("a.jpg", "b.jpg", "c.jpg", "d.jpg"))
    expected = {"U-Ignore": {}, "U-Zeros": {"pneumonia": 0}, "U-Ones": {"pneumonia": 1}}
    for policy, uncertain in expected.items():
        summary, _, out = run_build(tmp_path, root, out=policy, labels_col="pneumonia", uncertain_labels=policy)
        recs = records_by_report(out)
        assert recs["Right lower lobe consolidation."]["labels"] == {"pneumonia": 1}
        assert recs["Normal chest."]["labels"] == {"pneumonia": 0}
        assert recs["Possible left basal opacity."]["labels"] == uncertain
        assert summary.rejected == {"invalid_label": 1}
        rej = [r for r in read_rejects(out) if r["level"] == "item"]
        assert rej[0]["ref"] == "table.csv row 4" and "'2' is not a label value" in rej[0]["detail"]
        prov = json.loads((out / "manifest.json").read_text())["provenance"]
        assert prov["source_checks"][0]["uncertain_labels"] == policy


def test_one_column_per_class_chexpert_style(tmp_path):
    table = ("image,report,Edema,Pleural Effusion\n"
             "a.jpg,Mild interstitial edema.,1.0,0.0\n"
             "b.jpg,Normal chest.,,0.0\n"
             "c.jpg,Possible small effusion.,0,-1.0\n")
    root = make_source(tmp_path / "in", "table.csv", table)
    _, log, out = run_build(tmp_path, root, label_cols="Edema,Pleural Effusion", uncertain_labels="U-Ones")
    recs = records_by_report(out)
    assert recs["Mild interstitial edema."]["labels"] == {"Edema": 1, "Pleural Effusion": 0}
    assert recs["Normal chest."]["labels"] == {"Pleural Effusion": 0}  # blank: not mentioned, left out
    assert recs["Possible small effusion."]["labels"] == {"Edema": 0, "Pleural Effusion": 1}
    assert "not used" not in log  # every column is read


# --------------------------------------------------------------------------- kind 5: placeholder text


@pytest.mark.parametrize("text", ["nan", "NaN", " N/A ", "None", "null", "#N/A", "NA", "<NA>", "Findings: nan Impression: nan"])
def test_placeholder_reports_are_empty(text):
    assert is_missing(text) or "Findings" in text
    assert clean_report(text) == ""


def test_jsonl_null_and_nan_cells_are_missing(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"image": "a.jpg", "report": NaN, "patient_id": null, "labels": "N/A"}\r\n\r\n'
                    '{"image": "b.jpg", "report": "Normal.", "patient_id": 1234.0}\r\n')
    table = Table(path)
    rows = list(table.rows())
    assert [r.text("report") for r in rows] == ["", "Normal."] and table.blank_rows == 1
    assert rows[0].value("patient_id") is None and rows[0].value("labels") is None
    assert rows[1].text("patient_id") == "1234"  # a number written as a float is not "1234.0"


def test_placeholder_sections_are_removed_not_real_words():
    assert clean_report("Findings: nan Impression: Normal chest.") == "Impression: Normal chest."
    assert clean_report("Heart normal. NaN. Lungs clear.") == "Heart normal. Lungs clear."
    assert clean_report("Complications: None.") == "Complications: None."  # clinical language, kept
    assert clean_report("Nanoparticle contrast. Banana nan bread.") == "Nanoparticle contrast. Banana nan bread."


def test_nan_report_is_empty_report_and_makes_no_no_nan_negatives(tmp_path):
    table = ("image,report,summary,patient_id\n"
             "a.jpg,nan,nan,nan\n"
             "b.jpg,Small right pleural effusion.,NaN,NA\n"
             "c.jpg,N/A,Left lower lobe pneumonia.,p3\n")
    root = make_source(tmp_path / "in", "table.csv", table)
    summary, _, out = run_build(tmp_path, root)
    assert summary.rejected == {"empty_report": 1}
    assert [r["ref"] for r in read_rejects(out) if r["level"] == "item"] == ["table.csv row 1"]
    recs = read_all_records(out)
    assert len(recs) == 2
    assert "Left lower lobe pneumonia." in records_by_report(out)  # the summary is what is left of row 3
    blob = json.dumps(recs).lower()
    assert "nan" not in blob.replace("nanc", "")  # no report, summary or negative made of "nan"
    rec = records_by_report(out)["Small right pleural effusion."]
    assert rec["summary"] == "Small right pleural effusion."  # a placeholder summary falls back to the report
    # a placeholder patient id groups nothing: "NA" is no patient
    assert rec["group"] != "g-" and len({r["group"] for r in recs}) == 2


# --------------------------------------------------------------------------- kind 6: box formats

XYWH_ROWS = ('image,report,boxes\n'
             'a.jpg,Nodule in the right lung.,"[{""label"": ""Nodule"", ""box"": [40, 30, 10, 12]}]"\n'
             'b.jpg,Mass in the left lung.,"[{""label"": ""Mass"", ""box"": [50, 20, 15, 15]}]"\n'
             'c.jpg,Opacity in the upper zone.,"[{""label"": ""Opacity"", ""box"": [5, 5, 30, 20]}]"\n')


def test_xywh_boxes_in_an_xyxy_column_stop_naming_the_option(tmp_path):
    root = make_source(tmp_path / "in", "table.csv", XYWH_ROWS)
    with pytest.raises(SourceError) as err:
        run_build(tmp_path, root)
    msg = str(err.value)
    assert "2 of 3 boxes in column 'boxes'" in msg and "box_format: xywh" in msg
    # with the option, all three boxes are kept, in the right place
    _, _, out = run_build(tmp_path, root, out="ok", box_format="xywh")
    boxes = {g["label"]: g["box"] for r in read_all_records(out) for g in r["regions"]}
    assert boxes == {"Nodule": [40.0, 30.0, 50.0, 42.0], "Mass": [50.0, 20.0, 65.0, 35.0], "Opacity": [5.0, 5.0, 35.0, 25.0]}
    # box_format given explicitly: the build goes on, warns naming the option as set (not suggesting it), drops the 2
    summary, log, out2 = run_build(tmp_path, root, out="explicit", box_format="xyxy")
    assert "WARNING" in log and "box_format: xyxy is set explicitly" in log and "set the source option" not in log
    assert summary.region_rejects == {"invalid_box": 2}


def test_few_or_degenerate_misfits_warn_without_stopping(tmp_path):
    table = ('image,report,boxes\n'
             'a.jpg,Nodule.,"[[40, 30, 10, 12]]"\n'  # inverted as xyxy: one box is too few to stop
             'b.jpg,Mass.,"[[10, 10, 10, 40]]"\n'  # zero width: says nothing about the format
             'c.jpg,Cyst.,"[[5, 5, 30, 20]]"\n')
    root = make_source(tmp_path / "in", "table.csv", table)
    summary, log, _ = run_build(tmp_path, root)
    assert "1 of 3 boxes in column 'boxes' are invalid as [x0, y0, x1, y1]" in log and "box_format: xywh" in log
    assert summary.region_rejects == {"invalid_box": 1, "zero_area_box": 1} and summary.regions == 1
    # two inverted boxes stop; declared xywh, the same numbers fit and nothing is reported
    neg = 'image,report,boxes\na.jpg,A.,"[[40, 30, 10, 12]]"\nb.jpg,B.,"[[50, 40, 20, 25]]"\n'
    root2 = make_source(tmp_path / "in2", "table.csv", neg, images=("a.jpg", "b.jpg"))
    rep = GenericSource(root2).check()
    assert rep.errors and "box_format: xywh" in rep.errors[0]
    rep2 = GenericSource(root2, box_format="xywh").check()
    assert not rep2.errors and not rep2.warnings


def test_box_cell_variants(tmp_path):
    (b,) = parse_boxes("[10, 20, 30, 40]", "xyxy", "boxes")  # one bare box, not four broken ones
    assert b.box == [10.0, 20.0, 30.0, 40.0] and b.reject is None
    (b,) = parse_boxes({"bbox": [1, 2, 3, 4], "class": "nan"}, "xywh", "boxes")
    assert b.box == [1.0, 2.0, 4.0, 6.0] and b.label == "region"  # a placeholder label is no label
    bad = parse_boxes('[{"label": "X", "box": [1, 2, "x", 4]}, [1, 2, 3]]', "xyxy", "roi")
    assert [x.reject for x in bad] == ["invalid_box", "invalid_box"] and "column 'roi'" in bad[0].detail
    (j,) = parse_boxes("[[1, 2, 3, 4]", "xyxy", "boxes")
    assert j.reject == "invalid_box" and "not valid JSON" in j.detail
    assert parse_boxes("nan", "xyxy", "boxes") == [] and parse_boxes(None, "xyxy", "boxes") == []


def test_boxes_given_but_none_kept_warns_loudly(tmp_path):
    table = ('image,report,boxes\n'
             'a.jpg,Nodule.,"[[100, 100, 140, 120]]"\n'
             'b.jpg,Mass.,"[[200, 10, 240, 40]]"\n')
    root = make_source(tmp_path / "in", "table.csv", table, images=("a.jpg", "b.jpg"))
    summary, log, out = run_build(tmp_path, root)
    assert summary.regions == 0 and summary.region_rejects == {"box_outside": 2}
    assert "generic: 2 boxes were given but NONE was kept" in log
    assert any("NONE was kept" in w for w in json.loads((out / "manifest.json").read_text())["provenance"]["warnings"])


# --------------------------------------------------------------------------- kind 7: joining boxes to images


def _coco(images, annotations, categories=({"id": 1, "name": "Nodule"},)):
    return json.dumps({"images": images, "annotations": annotations, "categories": list(categories)})


def test_coco_file_name_joins_table_paths_under_images(tmp_path):
    table = "image,report\nimages/X.jpg,Nodule in the right lung.\nimages/Y.jpg,Normal chest.\n"
    root = make_source(tmp_path / "in", "table.csv", table, images=("X.jpg", "Y.jpg"), folder="images")
    (root / "boxes.json").write_text(_coco([{"id": 7, "file_name": "X.jpg"}],
                                           [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 20, 15]}]))
    summary, _, out = run_build(tmp_path, root, coco="boxes.json")
    rec = records_by_report(out)["Nodule in the right lung."]
    assert [(g["label"], g["box"]) for g in rec["regions"]] == [("Nodule", [10.0, 10.0, 30.0, 25.0])]
    assert summary.regions == 1 and not summary.region_rejects


def test_coco_paths_relative_to_the_coco_file_and_table_folder(tmp_path):
    root = tmp_path / "in"
    (root / "meta").mkdir(parents=True)
    make_source(root, "meta/table.csv", "image,report\n../images/X.jpg,Nodule in the right lung.\n", images=("X.jpg",),
                folder="images")
    (root / "ann").mkdir()
    (root / "ann" / "coco.json").write_text(_coco([{"id": 1, "file_name": "..\\images\\X.jpg"}],
                                                  [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]}]))
    summary, _, out = run_build(tmp_path, root, table="meta/table.csv", coco="ann/coco.json")
    assert summary.built == 1 and summary.regions == 1


def test_unknown_category_and_orphan_annotations_are_region_rejects(tmp_path):
    table = "image,report\na.jpg,Nodule in the right lung.\nb.jpg,Normal chest.\n"
    root = make_source(tmp_path / "in", "table.csv", table, images=("a.jpg", "b.jpg"))
    (root / "coco.json").write_text(_coco(
        [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20]},
         {"id": 11, "image_id": 1, "category_id": 99, "bbox": [30, 5, 20, 20]},
         {"id": 12, "image_id": 5, "category_id": 1, "bbox": [5, 5, 20, 20]},
         {"id": 13, "image_id": 2, "category_id": 1, "bbox": [5, 5, "w", 20]}]))
    summary, log, out = run_build(tmp_path, root, coco="coco.json")
    assert summary.built == 2 and summary.regions == 1
    assert summary.region_rejects == {"unknown_category": 1, "unmatched_box": 1, "invalid_box": 1}
    regions = [r for r in read_rejects(out) if r["level"] == "region"]
    by_reason = {r["reason"]: r for r in regions}
    assert "category_id 99 is not among the categories ['1']" in by_reason["unknown_category"]["detail"]
    assert by_reason["unmatched_box"]["id"] is None and "image_id 5" in by_reason["unmatched_box"]["detail"]
    assert by_reason["invalid_box"]["id"] and "annotation 13" in by_reason["invalid_box"]["detail"]
    labels = [g["label"] for r in read_all_records(out) for g in r["regions"]]
    assert labels == ["Nodule"]  # no region silently labelled "region"
    assert "accounted: 2 inputs = 2 built + 0 rejected [OK]" in log


def test_coco_that_reaches_no_image_stops_and_ambiguous_names_are_rejects(tmp_path):
    table = "image,report\nimages/X.jpg,Nodule in the right lung.\n"
    root = make_source(tmp_path / "in", "table.csv", table, images=("X.jpg",), folder="images")
    (root / "coco.json").write_text(_coco([{"id": 1, "file_name": "other/Z.jpg"}],
                                          [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]}]))
    with pytest.raises(SourceError) as err:
        run_build(tmp_path, root, coco="coco.json")
    msg = str(err.value)
    assert "none of the 1 boxes in coco.json reaches an image" in msg
    assert "'other/<name>.jpg'" in msg and "'images/<name>.jpg'" in msg and "Z.jpg" not in msg
    # the same file name in two folders of the table: not guessed
    table2 = "image,report\nleft/X.jpg,Nodule in the right lung.\nright/X.jpg,Normal chest.\nY.jpg,Mass.\n"
    root2 = make_source(tmp_path / "in2", "table.csv", table2, images=("Y.jpg",))
    for d in ("left", "right"):
        make_source(root2, "table.csv", table2, images=("X.jpg",), folder=d)
    (root2 / "coco.json").write_text(_coco([{"id": 1, "file_name": "X.jpg"}, {"id": 2, "file_name": "Y.jpg"}],
                                           [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]},
                                            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10]}]))
    summary, log, out = run_build(tmp_path, root2, out="out2", coco="coco.json")
    assert summary.region_rejects == {"unmatched_box": 1} and summary.regions == 1
    assert "shared by 2 table images" in [r for r in read_rejects(out) if r["level"] == "region"][0]["detail"]
    assert "1 of 2 boxes in coco.json reach no image" in log


# --------------------------------------------------------------------------- kind 15: unused columns


def test_unused_label_column_is_named_at_build_time(tmp_path):
    table = "image,report,label,notes\na.jpg,Right lower lobe pneumonia.,pneumonia,x\n"
    root = make_source(tmp_path / "in", "table.csv", table, images=("a.jpg",))
    summary, log, out = run_build(tmp_path, root)
    assert "columns not used: 'label', 'notes'" in log and "labels_col: label" in log
    assert any("'label'" in w for w in summary.warnings)
    # named, the column is read
    _, log2, out2 = run_build(tmp_path, root, out="o2", labels_col="label")
    assert read_all_records(out2)[0]["labels"] == {"pneumonia": 1}
    assert "columns not used: 'notes';" in log2 and "boxes_col: notes" not in log2  # no far-fetched guess
    # JSONL tables: keys never read are named the same way
    rows = [{"image": "a.jpg", "report": "Normal chest.", "lables": ["x"]}]
    root3 = make_source(tmp_path / "in3", "table.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n", images=("a.jpg",))
    _, log3, _ = run_build(tmp_path, root3, out="o3")
    assert "columns not used: 'lables'" in log3 and "labels_col: lables" in log3
    # an unread patient column would silently lose the patient grouping: it gets its hint
    root4 = make_source(tmp_path / "in4", "table.csv", "image,report,PatientID\na.jpg,Normal chest.,MRN123\n", images=("a.jpg",))
    _, log4, out4 = run_build(tmp_path, root4, out="o4")
    assert "patient_col: PatientID" in log4 and "MRN123" not in log4


def test_help_documents_the_columns_each_source_reads(capsys):
    with pytest.raises(SystemExit):
        cli(["build", "--help"])
    text = capsys.readouterr().out
    for word in ("image_col: image", "report_col: report", "labels_col: labels", "label_cols", "uncertain_labels",
                 "box_format", "encoding", "covid_cxr", "clinical_notes", "check-source"):
        assert word in text, word
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for word in ("image_col", "labels_col", "label_cols", "uncertain_labels", "check-source", "encoding"):
        assert word in readme, word


# --------------------------------------------------------------------------- kind 16: rows longer than the header


def test_unquoted_comma_row_is_rejected_not_truncated(tmp_path):
    table = ("image,report,labels\n"
             "a.jpg,Normal heart size. No effusion.,\n"
             "b.jpg,Opacity in the left lung, likely pneumonia.,pneumonia\n"
             "c.jpg,\"Small nodule, right upper zone.\",nodule\n")
    root = make_source(tmp_path / "in", "table.csv", table)
    summary, _, out = run_build(tmp_path, root)
    assert summary.built == 2 and summary.rejected == {"malformed_row": 1}
    (rej,) = [r for r in read_rejects(out) if r["level"] == "item"]
    assert rej["ref"] == "table.csv row 2" and "line 3" in rej["detail"] and "4 fields, the header has 3" in rej["detail"]
    reports = set(records_by_report(out))
    assert reports == {"Normal heart size. No effusion.", "Small nodule, right upper zone."}
    assert not any(r.startswith("Opacity in the left lung") for r in reports)


def test_short_rows_bad_json_lines_broken_quotes_and_duplicate_headers(tmp_path):
    root = make_source(tmp_path / "in", "table.csv", "image,report,labels\na.jpg,Normal chest.,\nb.jpg\n",
                       images=("a.jpg", "b.jpg"))
    summary, _, _ = run_build(tmp_path, root)
    assert summary.rejected == {"malformed_row": 1} and summary.built == 1
    lines = [json.dumps({"image": "a.jpg", "report": "Normal chest."}), '{"image": "b.jpg", "report": "Cut', "[1, 2]", ""]
    root2 = make_source(tmp_path / "in2", "table.jsonl", "\n".join(lines) + "\n", images=("a.jpg", "b.jpg"))
    summary2, _, out2 = run_build(tmp_path, root2, out="o2")
    assert summary2.built == 1 and summary2.rejected == {"malformed_row": 2}
    refs = sorted(r["ref"] for r in read_rejects(out2) if r["level"] == "item")
    assert refs == ["table.jsonl row 2", "table.jsonl row 3"]
    root3 = make_source(tmp_path / "in3", "table.csv", 'image,report\na.jpg,"Never closed.\nb.jpg,Normal.\n')
    with pytest.raises(SourceError, match=r"table\.csv: line 3: not valid CSV"):
        run_build(tmp_path, root3, out="o3")
    root4 = make_source(tmp_path / "in4", "table.csv", "image,report,report\na.jpg,x,y\n")
    with pytest.raises(SourceError, match="column 'report' appears twice"):
        run_build(tmp_path, root4, out="o4")


def test_header_with_trailing_delimiter_fits_rows_with_one(tmp_path):
    root = make_source(tmp_path / "in", "table.csv", "image,report,\na.jpg,Normal chest.,\n", images=("a.jpg",))
    summary, _, _ = run_build(tmp_path, root)
    assert summary.built == 1 and not summary.rejected


# --------------------------------------------------------------------------- the dry run


def test_check_source_counts_every_kind_and_builds_nothing(tmp_path, capsys):
    table = ("image,report,labels,label\n"
             "a.jpg,Nodule in the right lung.,Nodule,x\n"
             "b.jpg,nan,,\n"
             "c.jpg,Opacity, left lung.,,\n"
             "d.jpg,Normal chest.,\"{\"\"Edema\"\": 5}\",\n"
             "missing.jpg,Normal chest.,,\n")
    root = make_source(tmp_path / "in", "table.csv", table, images=("a.jpg", "b.jpg", "c.jpg", "d.jpg"))
    (root / "coco.json").write_text(_coco([{"id": 1, "file_name": "a.jpg"}],
                                          [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]}]))
    argv = ["--source", "generic", "--input", str(root), "--option", "coco=coco.json"]
    assert cli(["check-source", *argv]) == 0  # rows and boxes a build would reject: the build runs
    text = capsys.readouterr().out
    for line in ("5 rows read", "malformed_row", "invalid_label", "empty_report", "missing_image", "unknown_category",
                 "columns NOT used: label", "nothing was built"):
        assert line in text, line
    assert "table.csv row 3" in text and "missing.jpg" not in text  # rows named, paths never
    assert cli(["build", "--dry-run", *argv, "--out", str(tmp_path / "o")]) == 0
    assert not (tmp_path / "o").exists()
    # a source that cannot be built: exit 1, the reason printed
    bad = make_source(tmp_path / "bad", "table.csv", "img,report\na.jpg,x\n", images=("a.jpg",))
    assert cli(["check-source", "--source", "generic", "--input", str(bad)]) == 1
    assert "no column 'image'" in capsys.readouterr().out
    clean = make_source(tmp_path / "clean", "table.csv", "image,report\na.jpg,Normal chest.\n", images=("a.jpg",))
    assert cli(["check-source", "--source", "generic", "--input", str(clean)]) == 0


def test_public_sources_check_clean(data_dir):  # noqa: F811
    from regionmed.apps.curation.sources import get_source

    for name in ("slake", "vqa_rad", "covid_cxr"):
        rep = get_source(name, data_dir / name, limit=40).check()
        assert rep.rows == 40 and not rep.errors and not rep.problems.get("malformed_row"), rep.format()
    cov = get_source("covid_cxr", data_dir / "covid_cxr").check()
    assert "sex" in cov.columns_unused and "clinical_notes" in cov.columns_read and not cov.box_problems


def test_every_deliberate_error_here_is_a_regionmed_error():
    for cls in (TableError, SourceError, FieldError, ConfigError):
        assert issubclass(cls, RegionmedError) and issubclass(cls, ValueError)


def test_u_ignore_labels_are_unknown_in_zero_shot_not_negative(tmp_path):
    """Under U-Ignore an uncertain label is left out of the record; the zero-shot task built
    from the dataset marks it unknown (-1), so the class's AUC leaves that image out."""
    from regionmed.apps.evaluate.suites import MedRegionSet

    table = ("image,report,Edema,Pleural Effusion\n"
             "a.jpg,Mild interstitial edema.,1,0\n"
             "b.jpg,Normal chest.,0,1\n"
             "c.jpg,Possible small effusion.,0,-1\n")
    root = make_source(tmp_path / "in", "table.csv", table)
    _, _, out = run_build(tmp_path, root, label_cols="Edema,Pleural Effusion", uncertain_labels="U-Ignore")
    from regionmed.data.shards import read_manifest

    rows, dataset = {}, MedRegionSet(out)
    for s in read_manifest(out)["splits"]:
        refs, task = dataset.zero_shot_task(s, mode="similarity", classes=["Edema", "Pleural Effusion"])
        rows.update({r.key: list(task.labels[i]) for i, r in enumerate(refs)})
    recs = records_by_report(out)
    key = {rep: f"medregion/{rec['id']}" for rep, rec in recs.items()}
    assert rows[key["Possible small effusion."]] == [0, -1]  # uncertain effusion: unknown, not negative
    assert rows[key["Mild interstitial edema."]] == [1, 0]
    assert rows[key["Normal chest."]] == [0, 1]


# --------------------------------------------------------------------------- check-source: exit status and hints

# case -> (table, options, exit status, words the output must hold, words it must not hold)
CHECK_CASES = {
    "clean": ("image,report\na.jpg,Normal chest.\n", [], 0, ["a build would run"], ["WARNING", "ERROR"]),
    "warnings only": ("image,report,sex\na.jpg,Normal chest.,F\n", [], 0, ["WARNING", "columns not used: 'sex'"], ["ERROR"]),
    "rows a build rejects": ("image,report\na.jpg,Normal, chest.\nb.jpg,nan\n", [], 0, ["malformed_row", "empty_report"], []),
    "a missing column": ("img,report\na.jpg,x\n", [], 1, ["no column 'image'", "a build would stop"], []),
    "an unknown option": ("image,report\na.jpg,x\n", ["colour=red"], 1, ["unknown option(s) ['colour']"], []),
    # hints never suggest an option that is already set
    "label_cols set": ("image,report,Edema,sex\na.jpg,x,1,F\n", ["label_cols=Edema"], 0, ["labels_col"], ["label_cols"]),
    "labels_col set": ("image,report,findings,sex\na.jpg,x,Edema,F\n", ["labels_col=findings"], 0, ["label_cols"],
                       ["labels_col"]),
    "patient_col set": ("image,report,pid,subject\na.jpg,x,p1,s1\n", ["patient_col=pid"], 0, ["'subject'"],
                        ["patient_col"]),
    "every column option set": ("image,report,s,l,p,sp,b,m,sex\na.jpg,x,,,,,,,F\n",
                                ["summary_col=s", "labels_col=l", "patient_col=p", "split_col=sp", "boxes_col=b",
                                 "modality_col=m", "label_cols=l"], 0, ["Every column option is set already"],
                                ["option not set", "Did you mean"]),
    "box_format set": ('image,report,boxes\na.jpg,x,"[10, 10, 5, 5]"\nb.jpg,y,"[20, 20, 4, 4]"\n', ["box_format=xyxy"], 0,
                       ["set explicitly"], ["set the source option box_format"]),
}


@pytest.mark.parametrize("case", CHECK_CASES)
def test_check_source_exit_status_and_hints(tmp_path, capsys, case):
    table, options, status, present, absent = CHECK_CASES[case]
    root = make_source(tmp_path / "in", "table.csv", table, images=("a.jpg", "b.jpg"))
    argv = ["--source", "generic", "--input", str(root)] + [a for o in options for a in ("--option", o)]
    assert cli(["check-source", *argv]) == status
    out = capsys.readouterr()
    text = out.out + out.err
    for word in present:
        assert word in text, word
    for word in absent:
        assert word not in text, word
    assert cli(["build", "--dry-run", *argv]) == status


@pytest.mark.parametrize("argv", [["--source", "generic"], ["--option", "table=x.csv"], ["--config", "missing.yaml"],
                                  ["--source", "generic", "--input", ".", "--option", "no-equals-sign"]])
def test_check_source_usage_errors_exit_2_with_one_line(argv, capsys):
    assert cli(["check-source", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("regionmed check-source: error:") and err.count("\n") == 1
