from pathlib import Path

import pytest

from regionmed.apps.train.config import RunConfig, load_run_config
from regionmed.config import ConfigError, from_dict, parse_override

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


RUN_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("ablation"))  # ablation*.yaml: ablation configs


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_packaged_run_configs_load(name):
    cfg = load_run_config(CONFIGS / name)
    assert isinstance(cfg, RunConfig) and cfg.train.stages


def test_packaged_ablation_config_loads():
    from regionmed.apps.ablation import load_ablation_config

    assert load_ablation_config(CONFIGS / "ablation.yaml") is not None


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


BASE = """
train:
  stages:
    - name: a
      steps: 3
"""


def test_unknown_key_names_field_and_file(tmp_path):
    path = _write(tmp_path, "model:\n  image:\n    nmae: vit\n" + BASE)
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert str(path) in str(err.value) and "model.image.nmae" in str(err.value)


def test_unknown_key_in_list_item(tmp_path):
    path = _write(tmp_path, "train:\n  stages:\n    - name: a\n      steps: 3\n      lr_max: 1\n")
    with pytest.raises(ConfigError, match=r"train\.stages\[0\]\.lr_max"):
        load_run_config(path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("model:\n  embed_dim: big\n" + BASE, r"model\.embed_dim must be an integer"),
        ("model:\n  roi:\n    mode: pyramid\n" + BASE, r"model\.roi\.mode is 'pyramid'"),
        ("model:\n  embed_dim: 0\n" + BASE, r"model\.embed_dim must be > 0"),
        ("train:\n  stages:\n    - name: a\n", r"exactly one of 'steps' or 'epochs'"),
        ("train:\n  stages:\n    - name: a\n      steps: 2\n      losses: {glob: 1}\n", r"unknown loss 'glob'"),
        ("train:\n  stages:\n    - name: a\n      steps: 2\n      trainable: [vision]\n", r"unknown module 'vision'"),
        ("train:\n  stages:\n    - name: a\n      steps: 2\n      losses: {region: 1}\n", r"use_rois is false"),
        ("model:\n  roi:\n    mode: none\ntrain:\n  stages:\n    - name: a\n      steps: 2\n      use_rois: true\n", r"mode is 'none'"),
        ("train:\n  batch_size: 0\n  stages:\n    - name: a\n      steps: 2\n", r"batch_size must be >= 1"),
        ("train:\n  stages: []\n", r"stages is empty"),
        ("seed: [1\n", r"not valid YAML"),
    ],
)
def test_bad_values_are_named(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config(_write(tmp_path, text))


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config("no/such/config.yaml")


def test_overrides_reach_nested_fields_and_list_items(tmp_path):
    path = _write(tmp_path, BASE)
    cfg = load_run_config(path, dict([parse_override("train.stages[0].lr=0.5"), parse_override("model.roi.mode=align")]))
    assert cfg.train.stages[0].lr == 0.5 and cfg.model.roi.mode == "align"
    with pytest.raises(ConfigError, match=r"index \[3\] does not exist"):
        load_run_config(path, {"train.stages[3].lr": 1.0})
    # a list item named like a field (train.stages.0.lr) is an error that shows the [i] form, not a traceback
    for wrong in ("train.stages.0.lr", "train.stages.lr"):
        with pytest.raises(ConfigError, match=r"a list item is reached with \[i\]"):
            load_run_config(path, {wrong: 1.0})


def test_ints_accepted_for_floats_but_not_bools():
    cfg = from_dict(RunConfig, {"train": {"stages": [{"name": "a", "steps": 1, "lr": 1}]}})
    assert cfg.train.stages[0].lr == 1.0 and isinstance(cfg.train.stages[0].lr, float)
    with pytest.raises(ConfigError, match="must be a number"):
        from_dict(RunConfig, {"train": {"stages": [{"name": "a", "steps": 1, "lr": True}]}})


def test_exponent_numbers_that_yaml_1_1_reads_as_strings_are_numbers(tmp_path):
    """PyYAML reads `1e-4` (no dot) as a string; a float field takes it as the number it means."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  stages:\n    - {name: a, steps: 1, lr: 1e-4}\n")
    assert load_run_config(path).train.stages[0].lr == 1e-4
    path.write_text("train:\n  stages:\n    - {name: a, steps: 1, lr: 1e-4x}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: train.stages\[0\].lr must be a number"):
        load_run_config(path)
