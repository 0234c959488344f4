"""The training task: fixed-shape loss inputs from real batches, and BatchNorm towers in crop mode."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model_mapping
from regionmed.config import from_dict
from regionmed.data.loader import RegionSampleDataset, collate
from regionmed.data.transforms import Preprocessor
from regionmed.losses import compute_losses
from regionmed.model.clip import RegionMedCLIP
from regionmed.model.config import ModelConfig
from regionmed.task import TrainingTask

ALL = {"global": 1.0, "summary": 0.5, "region": 1.0, "hard_negative": 1.0}


def model_config(**image) -> ModelConfig:
    return from_dict(ModelConfig, tiny_model_mapping(image=image))


def batch_of(data_dir, model, indices, max_negatives=3, max_image_negatives=2, max_rois=None):
    ds = RegionSampleDataset(str(data_dir), "train", Preprocessor.from_model(model), max_negatives,
                             max_image_negatives=max_image_negatives)
    return collate([ds[i] for i in indices], max_rois=ds.max_rois if max_rois is None else max_rois)


def test_fields_have_the_configured_shapes_whatever_the_batch_holds(phantom_data):
    torch.manual_seed(0)
    model = RegionMedCLIP(model_config())
    task = TrainingTask(model, max_negatives=5, max_image_negatives=4)
    task.set_stage(ALL, use_rois=True)
    batch = batch_of(phantom_data, model, range(6), max_negatives=5, max_image_negatives=4)
    inp = task.loss_inputs(batch)
    k = model.cfg.roi.max_rois
    assert inp.roi.shape[:2] == inp.caption.shape[:2] == inp.roi_mask.shape == (6, k)
    assert inp.roi_negatives.shape[:3] == inp.roi_negatives_mask.shape == (6, k, 5)
    assert inp.image_negatives.shape[:2] == inp.image_negatives_mask.shape == (6, 4)
    # Masks say exactly what the batch holds.
    assert int(inp.roi_mask.sum()) == len(batch.captions)
    assert int(inp.roi_negatives_mask.sum()) == sum(len(n) for n in batch.roi_negatives)
    assert inp.image_negatives_mask.sum(1).tolist() == [len(n) for n in batch.image_negatives]
    # Each real slot holds its own text's embedding.
    emb = model.encode_text(batch.captions)
    torch.testing.assert_close(inp.caption[inp.roi_mask], emb)
    first = batch.image_negatives[0]
    torch.testing.assert_close(inp.image_negatives[0, : len(first)], model.encode_text(first))


def test_padding_slots_do_not_change_the_losses(phantom_data):
    """More ROI and negative slots (all padding) give the same terms."""
    torch.manual_seed(0)
    model = RegionMedCLIP(model_config()).eval()
    small = TrainingTask(model, 3, 2)
    wide = TrainingTask(model, 6, 5)
    for task in (small, wide):
        task.set_stage(ALL, use_rois=True)
    with torch.no_grad():
        a = small(batch_of(phantom_data, model, range(6)))
        b = wide(batch_of(phantom_data, model, range(6), 6, 5, max_rois=model.cfg.roi.max_rois))
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_a_batch_beyond_the_configured_maxima_is_an_error(phantom_data):
    model = RegionMedCLIP(model_config())
    task = TrainingTask(model, max_negatives=1, max_image_negatives=1)
    task.set_stage(ALL, use_rois=True)
    with pytest.raises(ValueError, match="more than the 1 configured"):
        task.loss_inputs(batch_of(phantom_data, model, range(4)))
    with pytest.raises(ValueError, match="more than max_rois"):
        batch_of(phantom_data, model, range(4), max_rois=0)


def test_only_what_the_active_terms_need_is_encoded(phantom_data):
    model = RegionMedCLIP(model_config())
    task = TrainingTask(model, 3, 2)
    task.set_stage({"global": 1.0}, use_rois=False)
    batch = batch_of(phantom_data, model, range(4))
    seen = []
    real = model.encode_text

    def recording(texts):
        seen.append(list(texts))
        return real(texts)

    model.encode_text = recording
    inp = task.loss_inputs(batch)
    assert inp.summary is None and inp.roi is None and inp.image_negatives is None
    assert set(seen[0]) == set(batch.reports)


def resnet_config(**image):
    data = tiny_model_mapping()
    data["image"] = {"name": "resnet18", "image_size": 64, **image}
    data["roi"].update(roi_size=32)
    return from_dict(ModelConfig, data)


def _one_crop_batch(data_dir, model):
    """A training batch whose only valid ROI is a single crop (32 px: 1×1 at the last stage)."""
    ds = RegionSampleDataset(str(data_dir), "train", Preprocessor.from_model(model), 3, max_image_negatives=2)
    samples = [ds[i] for i in range(4)]
    with_roi = next(s for s in samples if s["boxes"].shape[0])
    keep = {key: with_roi[key] for key in ("boxes", "crops", "captions", "roi_negatives", "roi_negative_rules")}
    for s in samples:
        for key in keep:
            s[key] = keep[key][:0] if s is not with_roi else keep[key][:1]
    return collate(samples, max_rois=ds.max_rois)


def test_batchnorm_tower_trains_on_a_batch_with_a_single_crop(phantom_data):
    torch.manual_seed(0)
    model = RegionMedCLIP(resnet_config()).train()
    task = TrainingTask(model, 3, 2)
    task.set_stage(ALL, use_rois=True)
    batch = _one_crop_batch(phantom_data, model)
    assert batch.roi_crops.shape[0] == 1
    norms = model.image_tower.batchnorms
    assert norms, "resnet18 has BatchNorm"
    before = [m.running_mean.clone() for m in norms]
    model.image_tower.encode_crops(batch.roi_crops)  # alone: crops never move the running statistics
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))
    assert all(m.training for m in norms)  # and the layers are back in training mode
    terms = task(batch)
    assert {"region", "hard_negative"} <= set(terms) and torch.isfinite(terms["total"])
    terms["total"].backward()
    # The whole images did update them (through the same layers, in training mode).
    assert any(not torch.equal(m.running_mean, b) for m, b in zip(norms, before))


def test_batchnorm_crops_with_batch_statistics_is_the_documented_alternative(phantom_data):
    model = RegionMedCLIP(resnet_config(crop_batchnorm="batch")).train()
    batch = _one_crop_batch(phantom_data, model)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model.image_tower.encode_crops(batch.roi_crops)


def test_task_loss_equals_compute_losses_on_its_inputs(phantom_data):
    torch.manual_seed(0)
    model = RegionMedCLIP(model_config()).eval()
    task = TrainingTask(model, 3, 2)
    task.set_stage(ALL, use_rois=True)
    batch = batch_of(phantom_data, model, range(8))
    with torch.no_grad():
        direct = compute_losses(task.loss_inputs(batch), ALL)
        via = task(batch)
    assert set(direct) == set(via) == {*ALL, "total"}
    for k in direct:
        torch.testing.assert_close(direct[k], via[k])


def test_prepare_batchnorm_converts_on_gpu_notes_on_cpu_and_refuses_batch_crops():
    from regionmed.config import ConfigError
    from regionmed.distributed import prepare_batchnorm

    model = RegionMedCLIP(resnet_config())
    params = {id(p) for p in model.image_tower.parameters()}
    assert prepare_batchnorm(model, 1, "cuda") is None  # one process: untouched
    note = prepare_batchnorm(model, 2, "cpu")
    assert "no CPU SyncBatchNorm" in note and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    prepare_batchnorm(model, 2, "cuda")  # conversion only (no forward): works on CPU tensors
    norms = [m for m in model.image_tower.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert {id(p) for p in model.image_tower.parameters()} == params  # the optimizer's parameters stay valid
    vit = RegionMedCLIP(model_config())
    assert prepare_batchnorm(vit, 2, "cpu") is None  # no BatchNorm, nothing to say
    with pytest.raises(ConfigError, match="crop_batchnorm 'batch'"):
        prepare_batchnorm(RegionMedCLIP(resnet_config(crop_batchnorm="batch")), 2, "cpu")
