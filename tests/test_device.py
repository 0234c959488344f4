"""Device bugs caught on the CPU (issue 20): training, evaluation encoders and the Predictor run on
a device that is not the CPU (tests/devicecheck.py), where a tensor created without the right
device fails as it would on a GPU, and their results equal the CPU's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import tiny_model_config
from conftest_build import data_dir, public_build  # noqa: F401
from devicecheck import DeviceCheck, OnDevice, WrongDevice
from infer_helpers import covid_images, slake_image
from regionmed.data.loader import RegionSampleDataset, collate
from regionmed.data.transforms import Preprocessor
from regionmed.inference import Predictor, load_image
from regionmed.model.clip import RegionMedCLIP
from regionmed.model.config import DenseConfig
from regionmed.task import TrainingTask

EVERY_TERM = {"global": 1.0, "summary": 0.5, "region": 1.0, "hard_negative": 1.0, "grounding": 1.0}


def _values(t):
    return t.elem if isinstance(t, OnDevice) else t


# -- the check itself ------------------------------------------------------------------------------
def test_a_tensor_created_without_the_device_is_caught():
    def misplaced(x):
        return x + torch.arange(x.shape[-1], dtype=x.dtype)  # on a GPU: "Expected all tensors on the same device"

    def placed(x):
        return x + torch.arange(x.shape[-1], dtype=x.dtype, device=x.device) + x.new_tensor([1.0, 2.0, 3.0])

    x = torch.randn(2, 3)
    with DeviceCheck() as device:
        on = x.to(device)
        assert isinstance(on, OnDevice) and on.device == device
        with pytest.raises(WrongDevice, match=r"aten\.add\.Tensor: a CPU tensor of shape \(3,\)"):
            misplaced(on)
        out = placed(on)
        assert out.device == device
        # data-dependent code runs, as on a GPU (PyTorch's own meta tensors have no values)
        assert int((on > 0).sum()) == int((x > 0).sum()) and on[on > 0].shape == x[x > 0].shape
        assert (on * 2).cpu().device.type == "cpu"
        assert on.sum() + torch.tensor(1.0) is not None  # a 0-dim CPU tensor is allowed, as in PyTorch
    torch.testing.assert_close(_values(out), placed(x))


# -- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["align", "crop"])
def test_training_task_forward_and_backward_on_another_device(phantom_data, mode):
    """Every loss term (grounding included, with a grid head), both ROI modes: the same terms and
    gradients as on the CPU, and every gradient on the device."""
    cfg = tiny_model_config(mode=mode)
    cfg.dense = DenseConfig(head="conv", width=8, layers=1)
    torch.manual_seed(0)
    model = RegionMedCLIP(cfg).train()
    pre = Preprocessor.from_model(model)
    ds = RegionSampleDataset(str(phantom_data), "train", pre, 3, max_image_negatives=2)
    make = lambda: collate([ds[i] for i in range(6)], max_rois=ds.max_rois)  # noqa: E731
    task = TrainingTask(model, 3, 2)
    task.set_stage(EVERY_TERM, use_rois=True)

    ref = task(make())
    ref["total"].backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert set(ref) == set(EVERY_TERM) | {"total"}

    with DeviceCheck() as device:
        model.to(device)
        terms = task(make().to(device))
        assert all(v.device == device for v in terms.values())
        terms["total"].backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads)
    assert all(g.device == device for g in grads.values())
    for name in ref:
        torch.testing.assert_close(_values(terms[name]).detach(), ref[name].detach(), rtol=1e-4, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(_values(grads[name]), g, rtol=1e-3, atol=1e-5, msg=name)


def test_training_task_on_real_data_on_another_device(public_build):  # noqa: F811
    """The build of the public data (SLAKE boxes, covid lung boxes, VQA-RAD images without any
    box, ragged negatives): the whole train split's first batch, grounding included, on the device."""
    out, _, _ = public_build
    cfg = tiny_model_config(mode="align")
    cfg.dense = DenseConfig(head="conv", width=8, layers=1)
    torch.manual_seed(0)
    model = RegionMedCLIP(cfg).train()
    ds = RegionSampleDataset(str(out), "train", Preprocessor.from_model(model), 3, max_image_negatives=2)
    picks = list(range(0, len(ds), max(1, len(ds) // 24)))[:24]  # spread over the sources
    make = lambda: collate([ds[i] for i in picks], max_rois=ds.max_rois)  # noqa: E731
    batch = make()
    assert (~batch.roi_mask.any(1)).any() and batch.roi_mask.any(1).any()  # images with and without boxes
    ragged = {len(n) for n in batch.roi_negatives} | {-1 - len(n) for n in batch.image_negatives}
    assert len(ragged) > 2  # ragged negative counts
    task = TrainingTask(model, 3, 2)
    task.set_stage(EVERY_TERM, use_rois=True)
    ref = {k: v.detach() for k, v in task(batch).items()}
    with DeviceCheck() as device:
        model.to(device)
        terms = task(make().to(device))
        terms["total"].backward()
    for name in ref:
        torch.testing.assert_close(_values(terms[name]).detach(), ref[name], rtol=1e-4, atol=1e-5)


# -- evaluation encoders and the Predictor ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_grid_model():
    cfg = tiny_model_config(mode="align")
    cfg.dense = DenseConfig(head="conv", width=8, layers=1)
    torch.manual_seed(1)
    model = RegionMedCLIP(cfg).eval()
    with torch.no_grad():  # open the gates: the ROI path then changes the fused embedding
        model.roi_processor.region_gate.fill_(0.5)
        model.roi_processor.global_gate.fill_(0.5)
    return model


def test_evaluation_encoders_on_another_device(tiny_grid_model):
    """embed_images with whole images, given boxes and boxes the model proposes itself
    (``--rois self``), and the patch-text maps: the CPU's values, returned on the CPU."""
    from regionmed.eval.grounding import similarity_maps
    from regionmed.eval.images import ImageRef, embed_images

    refs = [ImageRef(key=f"s{i}", path=str(slake_image(i)), boxes=[[10.0, 10.0, 90.0, 120.0], [100.0, 40.0, 200.0, 200.0]])
            for i in range(3)]
    model = tiny_grid_model
    plans = {"none": None, "given": None, "self": ["liver", "left lung"]}
    text_ref = model.encode_text(["left lung", "nodule"])
    ref = {rois: embed_images(model, refs, rois=rois, batch_size=2, phrases=ph) for rois, ph in plans.items()}
    pre = Preprocessor.from_model(model)
    images = torch.stack([pre(load_image(r.path))["image"] for r in refs[:2]])
    with torch.no_grad():
        maps_ref = similarity_maps(model, images, text_ref)
    with DeviceCheck() as device:
        model.to(device)
        try:
            text = model.encode_text(["left lung", "nodule"])
            got = {rois: embed_images(model, refs, rois=rois, batch_size=2, phrases=ph) for rois, ph in plans.items()}
            with torch.no_grad():
                maps = similarity_maps(model, images.to(device), text)
        finally:
            model.to("cpu")
    assert text.device == device and maps.device == device
    torch.testing.assert_close(_values(text), text_ref)
    torch.testing.assert_close(_values(maps), maps_ref, rtol=1e-4, atol=1e-5)
    for rois in plans:
        for f in dataclasses.fields(ref[rois]):
            a, b = getattr(got[rois], f.name), getattr(ref[rois], f.name)
            if isinstance(b, torch.Tensor):
                assert type(a) is torch.Tensor and a.device.type == "cpu", f"{rois}/{f.name} is not on the CPU"
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{rois}/{f.name}")
            else:
                assert a == b, f"{rois}/{f.name}"


def test_predictor_on_another_device(tiny_grid_model):
    images = [slake_image(0), covid_images(1)[0]]
    boxes = [[[10, 10, 60, 60]], [[20, 30, 200, 220], [5, 5, 50, 50]]]
    cpu = Predictor(tiny_grid_model, device="cpu", batch_size=2)
    ref_emb = cpu.embed_images(images, boxes)
    ref_cls = cpu.classify(images, ["pneumonia", "normal"])
    ref_ground = {r: cpu.ground(images[1], ["left lung", "heart"], read_out=r) for r in ("patch", "windows")}
    check = DeviceCheck()
    with check as device:
        on = Predictor(tiny_grid_model, device=device, batch_size=2)
        assert on.device == device and tiny_grid_model.logit_scale.device == device
        try:
            emb = on.embed_images(images, boxes)
            cls = on.classify(images, ["pneumonia", "normal"])
            ground = {r: on.ground(images[1], ["left lung", "heart"], read_out=r) for r in ("patch", "windows")}
            texts = on.embed_texts(["left lung"])
        finally:
            tiny_grid_model.to("cpu")
    assert {"aten.convolution.default", "aten.mm.default"} & check.ops  # the towers ran on the device
    assert texts.device.type == "cpu" and type(texts) is torch.Tensor  # results come back on the CPU
    for f in dataclasses.fields(ref_emb):
        a, b = getattr(emb, f.name), getattr(ref_emb, f.name)
        if isinstance(b, torch.Tensor):
            assert type(a) is torch.Tensor and a.device.type == "cpu", f.name
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f.name)
        elif f.name == "roi":
            for x, y in zip(a, b):
                assert type(x) is torch.Tensor and x.device.type == "cpu"
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
        else:
            assert a == b, f.name
    np.testing.assert_allclose(cls.scores, ref_cls.scores, rtol=1e-4, atol=1e-5)
    for r, found in ground.items():
        assert len(found) == len(ref_ground[r]) == 2
        for g, want in zip(found, ref_ground[r]):
            assert g.peak == want.peak and g.box == want.box and g.read_out == r
            np.testing.assert_allclose(g.heatmap, want.heatmap, rtol=1e-4, atol=1e-5)
