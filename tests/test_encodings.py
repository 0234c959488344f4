"""Text encodings of the files regionmed reads, including those it writes itself and a user
may edit by hand (issue 19, item 3). Every such file is UTF-8: a byte-order mark (as
Notepad writes) is accepted; UTF-16 and bytes that are not UTF-8 (a cp1252 editor) are one
clear error naming the file and the byte offset, never a UnicodeDecodeError traceback.

READERS is the table of cases: each names how a file is made and how regionmed reads it.
The tables, JSON and text files of build sources have their own option `encoding` and
are tested in test_curation_inputs.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regionmed.errors import RegionmedError
from test_reader_index import write_dataset

ROOT = Path(__file__).resolve().parents[1]


def _manifest(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "d", 4, max_count=2) / "manifest.json"


def _open_indexed(path: Path):
    from regionmed.data.shards import MedRegionDataset

    return MedRegionDataset(path.parent, "train")


def _open_streamed(path: Path):
    from regionmed.data.stream import StreamSource

    return StreamSource.from_dataset("d", str(path.parent), "train")


def _open_streamed_url(path: Path):
    from regionmed.data.stream import StreamSource

    return StreamSource.from_dataset("d", f"pipe:cat {path.parent}", "train")


def _run_config(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text((ROOT / "src" / "regionmed" / "configs" / "demo.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    return path


def _load_run_config(path: Path):
    from regionmed.apps.train.config import load_run_config

    return load_run_config(path)


def _build_config(tmp_path: Path) -> Path:
    path = tmp_path / "build.yaml"
    path.write_text("out: o\nsources:\n  - {name: generic, root: .}\n", encoding="utf-8")
    return path


def _load_build_config(path: Path):
    from regionmed.apps.curation.config import load_config

    return load_config(path)


def _model_config(tmp_path: Path) -> Path:
    from conftest import tiny_model_mapping

    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "config.json"
    path.write_text(json.dumps({"model": tiny_model_mapping(), "note": "modèle"}), encoding="utf-8")
    return path


def _read_model_config(path: Path):
    from regionmed.model.clip import read_model_config

    return read_model_config(path.parent)


def _preprocess(tmp_path: Path) -> Path:
    from regionmed.data.transforms import Preprocessor

    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "preprocess.json"
    path.write_text(json.dumps(Preprocessor(image_size=32).to_dict()), encoding="utf-8")
    return path


def _read_preprocess(path: Path):
    from regionmed.data.transforms import Preprocessor

    return Preprocessor.from_folder(path.parent)


def _checkpoint_state(tmp_path: Path) -> Path:
    folder = tmp_path / "step_00000002"
    (folder / "model").mkdir(parents=True)
    for name in ("optimizer.safetensors", "model/model.safetensors", "model/config.json"):
        (folder / name).write_bytes(b"")
    path = folder / "trainer_state.json"
    path.write_text(json.dumps({"step": 2, "note": "étape"}), encoding="utf-8")
    return path


def _check_checkpoint(path: Path):
    from regionmed.apps.train.checkpoint import CheckpointError, checkpoint_problem

    problem = checkpoint_problem(path.parent)
    if problem and "trainer_state.json" in problem:
        raise CheckpointError(problem)
    return problem


def _prompts(tmp_path: Path) -> Path:
    from regionmed.eval.prompts import packaged_prompts

    path = tmp_path / "prompts.yaml"
    path.write_text(packaged_prompts().read_text(encoding="utf-8"), encoding="utf-8")
    return path


def _read_prompts(path: Path):
    from regionmed.eval.prompts import load_prompts

    return load_prompts(path)


# file -> (make it, read it)
READERS = {
    "manifest.json, indexed reader": (_manifest, _open_indexed),
    "manifest.json, streaming reader": (_manifest, _open_streamed),
    "manifest.json, streamed from a URL": (_manifest, _open_streamed_url),
    "run config": (_run_config, _load_run_config),
    "build config": (_build_config, _load_build_config),
    "model config.json": (_model_config, _read_model_config),
    "preprocess.json": (_preprocess, _read_preprocess),
    "checkpoint trainer_state.json": (_checkpoint_state, _check_checkpoint),
    "prompt file": (_prompts, _read_prompts),
}


def _utf8_bom(raw: bytes) -> bytes:
    return b"\xef\xbb\xbf" + raw


def _utf16(raw: bytes) -> bytes:
    return raw.decode("utf-8").encode("utf-16")


def _cp1252(raw: bytes) -> bytes:
    """The file as a Windows editor saves it after adding one accented word near the end."""
    text = raw.decode("utf-8")
    cut = text.rindex("}") if text.rstrip().endswith("}") else len(text.rstrip())
    extra = ', "edited": "caf\u00e9"' if text.rstrip().endswith("}") else "\n# caf\u00e9\n"
    return (text[:cut] + extra + text[cut:]).encode("cp1252")


@pytest.mark.parametrize("reader", READERS)
def test_a_byte_order_mark_is_accepted(tmp_path, reader):
    make, read = READERS[reader]
    path = make(tmp_path)
    path.write_bytes(_utf8_bom(path.read_bytes()))
    read(path)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("encode, words", [(_utf16, "is UTF-16 or UTF-32 text"), (_cp1252, "is not UTF-8 text: byte 0x")])
def test_other_encodings_are_one_error_naming_the_file_and_byte(tmp_path, reader, encode, words):
    make, read = READERS[reader]
    path = make(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(encode(raw))
    with pytest.raises(RegionmedError) as err:
        read(path)
    text = str(err.value)
    assert words in text and path.name in text and "\n" not in text, text
    if encode is _cp1252:  # the byte named is the first one that is not UTF-8, where it is
        byte, offset = text.split("byte 0x")[1].split(" at offset ")
        assert encode(raw)[int(offset.split()[0])] == int(byte, 16) >= 0x80
