"""Config files and --set, as a kind (issue 19, item 3): every parse error is one line that
names the file, or the --set argument that gave the value, never the other.

FILE_CASES and SET_CASES are tables: a new sibling is one line. They run through the real
command line (`regionmed train --config ... --set ...`, in-process), and the file cases
through every reader of YAML configs (run, build and ablation configs).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from regionmed.apps.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "regionmed" / "configs" / "demo.yaml"

# YAML text -> what the one-line error says after the file name
FILE_CASES = {
    "unclosed bracket": ("seed: [1, 2\n", r"not valid YAML \(line 2, column 1: "),
    "tab indentation": ("train:\n\tbatch_size: 4\n", r"not valid YAML \(line 2, column 1: found character '\\t'"),
    "a key given twice": ("seed: 1\nseed: 2\n", r"not valid YAML \(line 2, column 1: key 'seed' appears twice \(first at line 1\)"),
    "a list at the top": ("- seed: 1\n", r"top level must be a mapping, got list"),
    "an unknown key": ("sed: 1\n", r"unknown key sed \(known: "),
    "a wrong type": ("seed: abc\n", r"seed must be an integer, got 'abc'"),
    "a nested unknown key": ("train: {batch_sise: 4}\n", r"unknown key train.batch_sise"),
    "a bad list item": ("train: {stages: [3]}\n", r"train.stages\[0\] must be a mapping, got int"),
    "not UTF-8": (b"seed: 1\n# caf\xe9\n", r"is not UTF-8 text: byte 0xe9 at offset 13 \(line 2\)"),
    "UTF-16": ("seed: 1\n".encode("utf-16"), r"is UTF-16 or UTF-32 text"),
}


def _write(tmp_path: Path, text) -> Path:
    path = tmp_path / "run.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _run(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err  # one line
    return err


@pytest.mark.parametrize("case", FILE_CASES)
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, capsys, case):
    text, match = FILE_CASES[case]
    path = _write(tmp_path, text)
    err = _run(["train", "--config", str(path)], capsys)
    assert err.startswith(f"regionmed train: error: {path}") and re.search(match, err), err


@pytest.mark.parametrize("case", [c for c in FILE_CASES if c not in ("an unknown key", "a wrong type", "a nested unknown key",
                                                                     "a bad list item")])
@pytest.mark.parametrize("command", ["build", "ablate"])
def test_every_config_reader_says_the_same(tmp_path, capsys, case, command):
    text, match = FILE_CASES[case]
    path = _write(tmp_path, text)
    err = _run([command, "--config", str(path)], capsys)
    assert str(path) in err and re.search(match, err), err


# --set argument -> what the one-line error says (it starts with the argument, never the file)
SET_CASES = {
    "train.batch_size=abc": "--set train.batch_size: train.batch_size must be an integer, got 'abc'",
    "train.batch_size=0": "--set train.batch_size: train.batch_size must be >= 1",
    "train.batch_sise=4": "--set train.batch_sise: unknown key train.batch_sise",
    "train.stages[9].lr=0.1": "--set train.stages[9].lr: index [9] does not exist in 'train.stages[9].lr': "
                              "train.stages is a list of",
    "train.stages[0]=5": "--set train.stages[0]: train.stages[0] must be a mapping, got int",
    "train.stages[0].lr=-1": "--set train.stages[0].lr: train.stages[0].lr must be > 0",
    "seed.x=1": "--set seed.x: 'x' cannot be set in 'seed.x': seed is the value",
    "train.stages.lr=1": "--set train.stages.lr: 'lr' cannot be set in 'train.stages.lr': train.stages is a list; "
                         "a list item is reached with [i]",
    "train.stages[x].lr=1": "--set 'train.stages[x].lr=1': 'train.stages[x].lr' is not a dotted field name",
    "train.batch_size": "--set 'train.batch_size': expected KEY=VALUE",
    "=4": "--set '=4': '' is not a dotted field name",
    "train.batch_size=[1,": "--set 'train.batch_size=[1,': the value is not valid YAML (line 1, column",
    "train.lr_scale=oops": "--set train.lr_scale: unknown key train.lr_scale",
}


@pytest.mark.parametrize("arg", SET_CASES)
def test_a_bad_set_argument_is_one_line_naming_it_not_the_file(tmp_path, capsys, arg):
    err = _run(["train", "--config", str(DEMO), "--output-dir", str(tmp_path / "run"), "--set", arg], capsys)
    assert err.startswith("regionmed train: error: " + SET_CASES[arg]), err
    assert str(DEMO) not in err.split(": error: ", 1)[1].split(":", 1)[0]


def test_an_option_that_sets_a_field_is_named_as_the_option(tmp_path, capsys):
    err = _run(["train", "--config", str(DEMO), "--output-dir", " ", "--data", str(tmp_path)], capsys)
    assert err.startswith("regionmed train: error: --output-dir: train.output_dir is empty"), err


def test_a_value_from_the_file_is_still_named_by_the_file(tmp_path, capsys):
    data = yaml.safe_load(DEMO.read_text())
    data["train"]["batch_size"] = 0
    path = _write(tmp_path, yaml.safe_dump(data))
    err = _run(["train", "--config", str(path), "--set", "seed=3"], capsys)
    assert err.startswith(f"regionmed train: error: {path}: train.batch_size must be >= 1"), err
