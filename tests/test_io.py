"""regionmed.io: JSON read with an error naming the file, atomic JSON / JSON Lines writes."""

from __future__ import annotations

import json
import os

import pytest

from regionmed.errors import RegionmedError
from regionmed.io import read_json, write_json_atomic, write_jsonl_atomic


class _Bad(RegionmedError, ValueError):
    pass


class _Gone(RegionmedError, FileNotFoundError):
    pass


def test_read_json_names_the_file_and_what_it_is(tmp_path):
    path = tmp_path / "conf.json"
    with pytest.raises(_Bad, match=r"the settings .*conf\.json is missing"):
        read_json(path, _Bad, "the settings")
    with pytest.raises(_Gone, match=r"conf\.json is missing"):
        read_json(path, _Bad, "the settings", missing_cls=_Gone)
    path.write_text('{"a": ', encoding="utf-8")
    with pytest.raises(_Bad, match=r"conf\.json: not valid JSON \(the settings\)"):
        read_json(path, _Bad, "the settings", missing_cls=_Gone)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(_Bad, match=r"conf\.json: the settings is not UTF-8 text: byte 0xff at offset 7 \(line 1\)"):
        read_json(path, _Bad, "the settings")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(_Bad, match="is missing"):
        read_json(tmp_path / "dir.json", _Bad, "the settings")
    path.write_text('{"b": [1, 2], "a": "é"}', encoding="utf-8")
    assert read_json(path, _Bad, "the settings") == {"b": [1, 2], "a": "é"}


def test_atomic_writes_round_trip_and_leave_no_temporary_file(tmp_path):
    data = {"b": 1, "a": ["é", None, 2.5]}
    write_json_atomic(tmp_path / "x.json", data)
    text = (tmp_path / "x.json").read_text(encoding="utf-8")
    assert json.loads(text) == data and text.index('"a"') < text.index('"b"') and "é" in text
    write_json_atomic(tmp_path / "x.json", {"b": 2, "a": 1}, sort_keys=False)  # replaces the file
    text = (tmp_path / "x.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"b": 2, "a": 1} and text.index('"b"') < text.index('"a"')
    rows = [{"id": "1", "caption": "left lung"}, {"id": "2", "box": [0, 1, 2, 3]}]
    write_jsonl_atomic(tmp_path / "r.jsonl", iter(rows))
    lines = (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(ln) for ln in lines] == rows
    assert sorted(os.listdir(tmp_path)) == ["r.jsonl", "x.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"old": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"new": object()})  # not JSON-serialisable, fails midway
    with pytest.raises(TypeError):
        write_jsonl_atomic(tmp_path / "r.jsonl", [{"ok": 1}, {"bad": object()}])
    assert json.loads(path.read_text(encoding="utf-8")) == {"old": True}
    assert sorted(os.listdir(tmp_path)) == ["x.json"]
