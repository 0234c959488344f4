"""Table structure as a kind (issue 19, item 3): every column a source reads, by option or
by default, is checked. A missing one is one clear error naming the column (and the
option), the file and the header (or keys) found; never a silent empty value.

The cases are made from the sources' own lists (the generic column options, covid_cxr's
metadata columns, the question keys of slake and vqa_rad), so a new column or key is
checked here without a new line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest_build import jpeg_bytes
from regionmed.apps.curation.builder import check_sources
from regionmed.apps.curation.config import BuildConfig, SourceSpec
from regionmed.apps.curation.sources.covid_cxr import READ_COLUMNS
from regionmed.apps.curation.sources.generic import COLUMN_OPTIONS
from regionmed.apps.curation.sources.slake import QUESTION_KEYS as SLAKE_KEYS
from regionmed.apps.curation.sources.vqa_rad import QUESTION_KEYS as VQA_RAD_KEYS


def _errors(name: str, root: Path, **options) -> list[str]:
    (report,) = check_sources(BuildConfig(sources=[SourceSpec(name, str(root), options=options)]))
    return report.errors


def _table(root: Path, kind: str, header: list[str]) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.jpg").write_bytes(jpeg_bytes((40, 30)))
    row = {h: ("a.jpg" if h == "image" else "x") for h in header}
    if kind == "csv":
        (root / "t.csv").write_text(",".join(header) + "\n" + ",".join(row.values()) + "\n")
    else:
        (root / "t.jsonl").write_text(json.dumps(row) + "\n")
    return f"t.{kind}"


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
@pytest.mark.parametrize("source", ["generic", "dicom"])
@pytest.mark.parametrize("option", [*COLUMN_OPTIONS, "label_cols"])
def test_a_column_an_option_names_must_be_in_the_table(tmp_path, option, source, kind):
    table = _table(tmp_path / "in", kind, ["image", "report"])
    (error,) = _errors(source, tmp_path / "in", table=table, **{option: "Findings Col"})
    assert f"no column 'Findings Col' ({option})" in error and table in error
    assert "The header found is ['image', 'report']" in error


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
@pytest.mark.parametrize("header, missing", [
    (["img", "report"], "no column 'image' (image_col)"),  # the image column, by default
    (["image", "notes"], "no column 'report' (report_col)"),  # a report or a summary column, by default
])
def test_the_columns_taken_by_default_must_be_in_the_table(tmp_path, header, missing, kind):
    table = _table(tmp_path / "in", kind, header)
    (error,) = _errors("generic", tmp_path / "in", table=table)
    assert missing in error and f"The header found is {header!r}" in error


def test_a_summary_column_alone_is_enough(tmp_path):
    table = _table(tmp_path / "in", "csv", ["image", "summary"])
    assert _errors("generic", tmp_path / "in", table=table) == []


def _covid(root: Path, columns: list[str]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.jpg").write_bytes(jpeg_bytes((40, 30)))
    (root / "annotations.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [],
                                                       "categories": []}))
    values = {"filename": "a.jpg", "patientid": "7", "finding": "COVID-19", "clinical_notes": "Opacity.", "view": "PA"}
    (root / "metadata.csv").write_text(",".join(columns) + "\n" + ",".join(values.get(c, "x") for c in columns) + "\n")
    return root


@pytest.mark.parametrize("column", READ_COLUMNS)
def test_every_covid_cxr_metadata_column_is_checked(tmp_path, column):
    header = [c for c in READ_COLUMNS if c != column] + ["sex"]
    (error,) = _errors("covid_cxr", _covid(tmp_path / "cxr", header))
    assert f"no column {column!r}" in error and "metadata.csv" in error and "The header found is" in error
    assert _errors("covid_cxr", _covid(tmp_path / "ok", [*READ_COLUMNS, "sex"])) == []


QUESTION_CASES = [("slake", "train.json", key, SLAKE_KEYS) for key in SLAKE_KEYS] + \
                 [("vqa_rad", "trainset.json", key, VQA_RAD_KEYS) for key in VQA_RAD_KEYS]


@pytest.mark.parametrize("name, file, key, keys", QUESTION_CASES)
def test_every_question_key_of_the_public_sets_is_checked(tmp_path, name, file, key, keys):
    root = tmp_path / name
    if name == "slake":
        (root / "imgs" / "xmlab1").mkdir(parents=True)
        (root / "imgs" / "xmlab1" / "source.jpg").write_bytes(jpeg_bytes((40, 30)))
        record = {"img_name": "xmlab1/source.jpg", "question": "Which organ?", "answer": "Liver", "q_lang": "en"}
    else:
        (root / "images").mkdir(parents=True)
        (root / "images" / "a.jpg").write_bytes(jpeg_bytes((40, 30)))
        record = {"image_name": "a.jpg", "question": "Is there a mass?", "answer": "yes"}
    assert set(keys) <= set(record)
    (root / file).write_text(json.dumps([record, {k: v for k, v in record.items() if k != key}]))
    (error,) = _errors(name, root)
    assert file in error and "record 1" in error and f"no {key!r}" in error and "its keys are" in error
    (root / file).write_text(json.dumps([record]))
    assert _errors(name, root) == []
