"""Placeholders for "no value", as a kind (issue 19, item 3): every spelling that clinical
exports and spreadsheets write, read as missing in every column the builder reads.

SPELLINGS is the table of cases (pandas' default na_values, spreadsheet error values,
what programs print for an empty value, dashes / dots / question marks, white space and
invisible characters); a new sibling is one line. Each column test puts every spelling
into one column of a real table and reads it through the generic source (CSV and JSONL).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest_build import jpeg_bytes
from regionmed.apps.curation.captions import clean_report, report_text
from regionmed.apps.curation.sources import GenericSource
from regionmed.data.missing import PANDAS_NA_VALUES, PRINTED_EMPTY, SPREADSHEET_ERRORS, is_missing, is_placeholder_id

SPELLINGS = [
    *PANDAS_NA_VALUES,  # '', '#N/A', '#N/A N/A', '#NA', '-1.#IND', ... 'nan', 'null'
    *SPREADSHEET_ERRORS,  # '#VALUE!', '#REF!', '#DIV/0!', '#NAME?', '#NULL!', '#NUM!', ...
    *PRINTED_EMPTY,  # 'NaT', 'nil', '(null)', '<null>', '(blank)', '(empty)', 'n.a.'
    "NAN", "Null", "n/A", "#n/a", "#value!",  # any case
    "-", "--", "---", "\u2014", "\u2013", ".", "..", "?", "??",  # "not recorded" in clinical exports
    " ", "   ", "\t", "\u00a0", "\u200b", "\ufeff", " \u00a0N/A\u200b ",  # blank, invisible, padded
]
NOT_MISSING = ["0", "-1", "1", "no", "n", "unknown", "UNK", "normal", "None seen", "Complications: None.", "NA-1",
               "-5", "1.5", "?effusion", "nanoparticle", "#1"]


@pytest.mark.parametrize("value", SPELLINGS)
def test_every_spelling_of_no_value_is_missing(value):
    assert is_missing(value) and is_placeholder_id(value) and clean_report(value) == ""


@pytest.mark.parametrize("value", NOT_MISSING)
def test_values_are_not_missing(value):
    assert not is_missing(value)


@pytest.mark.parametrize("value", ["0", "0000", "ANONYMOUS", "anonymised", "Unknown", "UNK"] + SPELLINGS[:6])
def test_placeholder_patient_ids_identify_nobody_in_tables_and_dicom(value):
    from infer_helpers import dicom_dataset
    from regionmed.data.dicom import patient_key

    ds = dicom_dataset("CR")
    ds.PatientID = value
    assert is_placeholder_id(value) and patient_key(ds) is None
    ds.PatientID = "PAT-001"
    assert patient_key(ds) is not None


NORMAL = {"image": None, "report": "small nodule in the right upper zone", "summary": "right upper zone nodule",
          "labels": "Nodule", "findings": "1", "patient_id": "p1", "split": "train", "boxes": "[[1, 1, 20, 20]]",
          "modality": "ct"}


def _source(tmp_path: Path, column: str, kind: str) -> tuple[GenericSource, list[str]]:
    """A generic source of one row per spelling, ``column`` holding the spelling."""
    root = tmp_path / "in"
    root.mkdir()
    rows = []
    for k, value in enumerate(SPELLINGS):
        name = f"img{k}.jpg"
        (root / name).write_bytes(jpeg_bytes((40, 30), seed=k))
        row = {**NORMAL, "image": name, "patient_id": f"p{k}"}
        row[column] = value
        rows.append(row)
    if kind == "csv":
        with open(root / "table.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(NORMAL))
            writer.writeheader()
            writer.writerows(rows)
    else:
        (root / "table.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    options = {"label_cols": ["findings"], "modality": "xray"}
    return GenericSource(root, **options), [r["image"] for r in rows]


# column -> what a missing value there gives, checked on each item
COLUMNS = {
    "report": lambda item: report_text(item.report, item.facts, item.summary) == "right upper zone nodule",  # the summary
    "summary": lambda item: clean_report(item.summary) == "" and report_text(item.report) != "",
    "labels": lambda item: "Nodule" not in item.labels and item.reject is None,
    "findings": lambda item: "findings" not in item.labels and item.reject is None,  # a label_cols column
    "patient_id": lambda item: item.group is None,
    "split": lambda item: item.split is None,
    "boxes": lambda item: item.boxes == [],
    "modality": lambda item: item.modality == "xray",  # the source's option
    "image": lambda item: item.image_path is None,
}


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
@pytest.mark.parametrize("column", COLUMNS)
def test_a_missing_value_means_the_same_in_every_column(tmp_path, column, kind):
    source, _ = _source(tmp_path, column, kind)
    items = list(source)
    assert len(items) == len(SPELLINGS)
    wrong = [repr(v) for v, item in zip(SPELLINGS, items) if not COLUMNS[column](item)]
    assert not wrong, f"{column}: {wrong}"
    report = source.check()
    assert not report.errors and not report.problems.get("invalid_label"), report.format()
    assert not report.box_problems, report.format()
    if column == "split":
        assert not any("split value" in w for w in report.warnings), report.warnings


def test_placeholders_inside_cells_are_missing_too():
    from regionmed.apps.curation.sources.fields import LabelParser, parse_boxes

    assert LabelParser().parse_cell('["#N/A", "Edema", "-"]', "labels") == {"Edema": 1}
    assert LabelParser().parse_cell('{"Edema": "#VALUE!", "Mass": 1}', "labels") == {"Mass": 1}
    (box,) = parse_boxes('[{"label": "(null)", "box": [1, 2, 3, 4]}]', "xyxy", "boxes")
    assert box.label == "region" and box.reject is None
    (box,) = parse_boxes('[[1, 2, 3, 4], null, "#N/A", {"label": "Mass", "box": "-"}]', "xyxy", "boxes")
    assert box.box == [1, 2, 3, 4] and box.reject is None  # missing boxes inside a cell give no box
    assert parse_boxes('[[1, 2, "x", 4]]', "xyxy", "boxes")[0].reject == "invalid_box"  # a malformed one is still named
