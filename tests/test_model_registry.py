"""Named model architectures (regionmed.model.registry): every registered model builds, runs
forward and backward, and survives save_pretrained / from_pretrained; run configs name them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import regionmed
from regionmed.apps.cli import main
from regionmed.apps.train.config import load_run_config
from regionmed.config import ConfigError, to_dict
from regionmed.data.loader import ImageBatch
from regionmed.model import registry
from regionmed.model.clip import RegionMedCLIP, create_model, preprocessor_from_config
from regionmed.model.registry import get_model, list_models, model_config, register, resolve_model_mapping

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Built as registered, except where a part cannot be built offline in a few CPU seconds: the
# BiomedCLIP-shaped model's text tower is BiomedBERT, a Hugging Face name this machine's cache
# lacks, so it is built with a 2-layer MiniLM from random init; its ViT-B/16 keeps width, patch,
# input size, projection and ROI path, with 2 of its 12 blocks. Its full config is tested below
# (test_packaged_run_configs_use_named_models).
SHRINK = {
    "vit-b16-biomedbert": {"image": {"kwargs": {"depth": 2}},
                           "text": {"name": "minilm", "pretrained": False, "config_overrides": {"num_hidden_layers": 2}}},
}


def test_the_packaged_models_are_registered():
    assert {"efficientnet-lite0-minilm", "resnet18-minilm", "vit-b16-biomedbert", "tiny-vit-minilm"} <= set(list_models())
    for name in list_models():
        named = get_model(name)
        assert named.description and named.config["image"]["name"] and named.config["text"]["name"]
        assert to_dict(named.model_config()) == named.config  # complete: every field


def _batch(model: RegionMedCLIP, n: int = 2) -> ImageBatch:
    pre = model.preprocessor
    samples = []
    for i in range(n):
        image = Image.new("RGB", (90 + 10 * i, 120), (40 * i, 80, 120))
        samples.append(pre(image, [[10.0, 20.0, 60.0, 90.0], [0.0, 0.0, 45.0, 50.0]][: i + 1]))
    return ImageBatch.from_samples(samples)


@pytest.mark.parametrize("name", list_models())
def test_every_named_model_runs_forward_backward_and_round_trips(name, tmp_path):
    cfg = model_config(name, SHRINK.get(name))
    torch.manual_seed(0)
    model = create_model(cfg)
    # the model carries the named model's preprocessing
    assert model.preprocessor == preprocessor_from_config(cfg)
    assert model.preprocessor.image_size == get_model(name).config["image"]["image_size"]
    assert list(model.preprocessor.mean) == get_model(name).config["image"]["mean"]
    assert model.preprocessor.context_length == get_model(name).config["text"]["context_length"]
    batch = _batch(model)
    texts = ["a chest radiograph", "an opacity in the left lower zone"]
    # forward: embeddings of the configured size, unit length, ROI embeddings where the boxes are
    model.train()
    emb = model.encode_batch(batch, use_rois=True)
    txt = model.encode_text(texts)
    d = cfg.embed_dim
    assert emb.global_.shape == emb.fused.shape == (2, d) and txt.shape == (2, d)
    assert torch.allclose(emb.global_.norm(dim=-1), torch.ones(2), atol=1e-4)
    if cfg.roi.mode != "none":
        assert emb.roi.shape == (2, 2, d) and emb.roi_mask.tolist() == [[True, False], [True, True]]
    # backward: a contrastive loss reaches both towers and the projections, with finite gradients
    logits = model.scale() * emb.fused @ txt.T
    loss = (F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.T, torch.arange(2))) / 2
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    for prefix in ("image_tower.", "text_tower.", "projections.image", "projections.text", "logit_scale"):
        assert any(k.startswith(prefix) and g.abs().sum() > 0 for k, g in grads.items()), prefix
    # save / load: the same config, preprocessing and embeddings
    model.eval()
    with torch.no_grad():
        want_image, want_text = model.encode_batch(batch).fused, model.encode_text(texts)
    model.save_pretrained(tmp_path / "m")
    loaded = regionmed.load(tmp_path / "m")
    saved = to_dict(dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, pretrained=None)))  # the weights are in the folder
    assert to_dict(loaded.cfg) == saved and loaded.preprocessor == model.preprocessor
    with torch.no_grad():
        assert torch.allclose(loaded.encode_batch(batch).fused, want_image, atol=1e-5)
        assert torch.allclose(loaded.encode_text(texts), want_text, atol=1e-5)


def test_packaged_run_configs_use_named_models():
    """Every packaged run config names its model (no model section of its own) and resolves to it."""
    run_configs = [p for p in sorted(CONFIGS.glob("*.yaml")) if "model" in yaml.safe_load(p.read_text())]
    assert {p.name for p in run_configs} == {"cpu_grounding.yaml", "cpu_pretrained.yaml", "demo.yaml", "demo_global.yaml",
                                              "full_scale.yaml"}
    for path in run_configs:
        section = yaml.safe_load(path.read_text())["model"]
        assert section["name"] in list_models(), path
        assert set(section) <= {"name", "image", "text", "roi"}, path  # a name, and a few fields over it
        cfg = load_run_config(path)
        assert to_dict(cfg.model) == resolve_model_mapping(section, str(path))
    full = load_run_config(CONFIGS / "full_scale.yaml").model
    named = model_config("vit-b16-biomedbert")
    assert full.image.grad_checkpointing and full.text.grad_checkpointing and not named.image.grad_checkpointing
    assert (full.image.name, full.image.image_size, full.text.context_length, full.embed_dim, full.roi.max_rois) == \
        (named.image.name, 224, 256, 512, 8)
    glob = load_run_config(CONFIGS / "demo_global.yaml").model
    assert glob.roi.mode == "none" and glob.image == load_run_config(CONFIGS / "demo.yaml").model.image


def test_model_name_in_a_run_config_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: resnet18-minilm\n  roi: {mode: none, grid_context: false}\n  text: {context_length: 48}\n"
                    "train:\n  stages: [{name: a, steps: 1}]\n")
    cfg = load_run_config(path)
    assert cfg.model.image.name == "resnet18" and cfg.model.roi.mode == "none" and cfg.model.text.context_length == 48
    assert cfg.model.text.name == "minilm" and cfg.model.roi.max_rois == 4  # the rest: the named model's
    cfg = load_run_config(path, {"model.name": "tiny-vit-minilm", "model.roi.max_rois": 2})  # --set works the same
    assert cfg.model.image.name == "vit_tiny_patch16_224" and cfg.model.roi.max_rois == 2 and cfg.model.text.context_length == 48
    path.write_text("model:\n  name: resnet-18\ntrain:\n  stages: [{name: a, steps: 1}]\n")
    with pytest.raises(ConfigError, match=rf"{path}: model.name 'resnet-18' is not a registered model \(known: .*resnet18-minilm"):
        load_run_config(path)
    path.write_text("model:\n  name: resnet18-minilm\n  roi: {max_rois: -1}\ntrain:\n  stages: [{name: a, steps: 1}]\n")
    with pytest.raises(ConfigError, match=r"model\.roi\.max_rois must be >= 0"):
        load_run_config(path)


def test_register_a_users_model(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the registry as it was after the test
    register("my-tiny", {**resolve_model_mapping({"name": "tiny-vit-minilm"}), "embed_dim": 32}, "the tiny model, D = 32")
    assert "my-tiny" in list_models() and get_model("my-tiny").config["embed_dim"] == 32
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: my-tiny, roi: {mode: align}}\ntrain:\n  stages: [{name: a, steps: 1}]\n")
    cfg = load_run_config(path)
    assert cfg.model.embed_dim == 32 and cfg.model.roi.mode == "align"
    with pytest.raises(ConfigError, match="exists already"):
        register("my-tiny", model_config("tiny-vit-minilm"))
    register("my-tiny", model_config("tiny-vit-minilm"), overwrite=True)
    assert get_model("my-tiny").config["embed_dim"] == 64
    with pytest.raises(ConfigError, match=r"register\('bad'\): .*model\.roi\.num_heads must be >= 1"):
        register("bad", {"roi": {"num_heads": 0}})
    with pytest.raises(ConfigError, match="unknown key model.colour"):
        register("bad", {"colour": "blue"})


def test_models_command_lists_and_shows(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_models())
    assert main(["models", "efficientnet-lite0-minilm"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"] == get_model("efficientnet-lite0-minilm").config
    assert shown["preprocess"]["mean"] == [0.485, 0.456, 0.406] and shown["preprocess"]["image_size"] == 128
    assert main(["models", "nope"]) == 2
    assert "not a registered model" in capsys.readouterr().err
