import dataclasses
import json
import math
import random

import pytest
import torch

from conftest import tiny_model_config
from regionmed import load
from regionmed.config import from_dict
from regionmed.data.transforms import Preprocessor
from regionmed.errors import RegionmedError
from regionmed.model.clip import RegionMedCLIP, plan_text_chunks
from regionmed.model.roi import align_roi_features
from regionmed.model.towers import WeightsError


def _inputs(model, b=3, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = model.cfg.image.image_size
    r = model.cfg.roi.roi_size
    images = torch.randn(b, 3, s, s, generator=g)
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.4, 0.9, 0.9]]).expand(b, k, 4).clone()
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[0] = False  # image 0 has no ROI
    mask[1, 1] = False  # image 1 has one
    crops = torch.randn(int(mask.sum()), 3, r, r, generator=g)
    return images, boxes, mask, crops


def _open_gates(model, value=1.0):
    with torch.no_grad():
        model.roi_processor.global_gate.fill_(value)
        model.roi_processor.region_gate.fill_(value)


@pytest.mark.parametrize("mode", ["crop", "align"])
def test_no_roi_gives_exactly_the_global_embedding(mode):
    torch.manual_seed(0)
    model = RegionMedCLIP(tiny_model_config(mode=mode)).eval()
    _open_gates(model)  # with gates open, ROIs do change the fused embedding...
    images, boxes, mask, crops = _inputs(model)
    out = model.encode_image(images, boxes, mask, crops if mode == "crop" else None)
    assert torch.equal(out.fused[0], out.global_[0])  # ...but an image without ROIs is untouched
    assert not torch.allclose(out.fused[1], out.global_[1])
    assert out.roi.shape == (3, 2, model.cfg.embed_dim)
    assert torch.all(out.roi[~mask] == 0)
    assert torch.allclose(out.roi[mask].norm(dim=-1), torch.ones(int(mask.sum())))


def test_gates_start_closed_so_training_starts_as_plain_clip():
    torch.manual_seed(0)
    model = RegionMedCLIP(tiny_model_config()).eval()
    images, boxes, mask, crops = _inputs(model)
    out = model.encode_image(images, boxes, mask, crops)
    assert torch.equal(out.fused, out.global_)


def test_padding_slots_do_not_change_results():
    torch.manual_seed(0)
    model = RegionMedCLIP(tiny_model_config(mode="align")).eval()
    _open_gates(model, 0.7)
    images, boxes, mask, _ = _inputs(model)
    out = model.encode_image(images, boxes, mask)
    padded_boxes = torch.cat([boxes, torch.rand(3, 2, 4)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], dim=1)
    out2 = model.encode_image(images, padded_boxes, padded_mask)
    assert torch.allclose(out.fused, out2.fused, atol=1e-6)
    assert torch.allclose(out.roi[mask], out2.roi[padded_mask], atol=1e-6)


def test_crop_mode_checks_crop_count():
    model = RegionMedCLIP(tiny_model_config(mode="crop")).eval()
    images, boxes, mask, crops = _inputs(model)
    with pytest.raises(ValueError, match="roi_crops has"):
        model.encode_image(images, boxes, mask, crops[:1])
    with pytest.raises(ValueError, match="needs roi_crops"):
        model.encode_image(images, boxes, mask, None)


def test_roi_align_reads_the_boxed_cells():
    # a grid whose value is the column index: a box over columns 2..4 averages to ~3
    grid = torch.arange(8.0).repeat(1, 1, 8, 1)  # (1, 1, 8, 8), value = x
    boxes = torch.tensor([[[2 / 8, 0.0, 5 / 8, 1.0]]])
    feats = align_roi_features(grid, boxes, torch.ones(1, 1, dtype=torch.bool), output=2)
    assert feats.shape == (1, 1)
    assert abs(feats.item() - 3.0) < 0.3


def test_identical_texts_encode_identically_and_once():
    model = RegionMedCLIP(tiny_model_config()).eval()
    with torch.no_grad():
        emb = model.encode_text(["left lower zone effusion", "small nodule", "left lower zone effusion"])
    assert torch.equal(emb[0], emb[2]) and not torch.allclose(emb[0], emb[1])


def test_long_captions_are_truncated_and_counted():
    model = RegionMedCLIP(tiny_model_config()).eval()
    tok = model.text_tower.tokenizer
    long = " ".join(["opacity"] * 100)
    ids, mask = tok([long, "short"])
    assert ids.shape[1] == model.cfg.text.context_length
    assert tok.truncated == 1
    tok([long])  # the same text again is not counted twice
    assert tok.truncated == 1
    assert ids[0, -1].item() == model.text_tower.hf_tokenizer.sep_token_id  # still closed by [SEP]


def test_save_and_load_give_the_same_embeddings(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_model_config(mode="crop")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, pretrained=True, config_overrides={}))
    model = RegionMedCLIP(cfg).eval()  # pretrained MiniLM, offline
    _open_gates(model, 0.5)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file() and not list(tmp_path.glob("**/*.bin"))
    loaded = load(tmp_path / "m")
    images, boxes, mask, crops = _inputs(model)
    with torch.no_grad():
        a, b = model.encode_image(images, boxes, mask, crops), loaded.encode_image(images, boxes, mask, crops)
        ta, tb = model.encode_text(["right upper zone nodule"]), loaded.encode_text(["right upper zone nodule"])
    assert torch.equal(a.fused, b.fused) and torch.equal(a.roi, b.roi) and torch.equal(ta, tb)
    assert loaded.preprocess_config() == model.preprocess_config()
    assert loaded.preprocessor == model.preprocessor == Preprocessor.from_folder(tmp_path / "m")


def test_a_loaded_model_carries_the_preprocessor_read_from_its_folder(tmp_path, monkeypatch):
    model = RegionMedCLIP(tiny_model_config(mode="crop", context_margin=0.3))
    pre = Preprocessor.from_model(model)
    assert pre is model.preprocessor is Preprocessor.from_model(model)  # derived from the config once
    assert (pre.image_size, pre.context_margin, pre.max_rois, pre.context_length) == (64, 0.3, 3, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pre.image_size = 32  # callers cannot change the model's preprocessing in place
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "preprocess.json").read_text()) == pre.to_dict()
    read = []
    original = Preprocessor.from_folder.__func__

    def spy(cls, directory):
        read.append(original(cls, directory))
        return read[-1]

    monkeypatch.setattr(Preprocessor, "from_folder", classmethod(spy))
    loaded = load(tmp_path / "m")
    assert len(read) == 1 and loaded.preprocessor is read[0] and Preprocessor.from_model(loaded) is read[0]
    assert loaded.preprocessor == pre


@pytest.mark.parametrize(
    "field, value, why",
    [
        ("image_size", 96, "config.json implies 64"),  # disagrees with config.json
        ("roi_mode", "align", "config.json implies 'crop'"),
        ("context_margin", "0.15", "must be a number"),  # wrong type
        ("max_rois", None, "is missing"),  # None: the field is deleted
    ],
)
def test_a_tampered_preprocess_json_fails_loading_naming_file_and_field(tmp_path, field, value, why):
    RegionMedCLIP(tiny_model_config(mode="crop")).save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "preprocess.json"
    data = json.loads(path.read_text())
    if value is None:
        del data[field]
    else:
        data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(WeightsError) as err:
        load(tmp_path / "m")
    message = str(err.value)
    assert str(path) in message and repr(field) in message and why in message, message
    assert isinstance(err.value, RegionmedError)


def test_a_missing_preprocess_json_fails_loading(tmp_path):
    RegionMedCLIP(tiny_model_config(mode="none")).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "preprocess.json").unlink()
    with pytest.raises(WeightsError, match=r"preprocess\.json is missing"):
        load(tmp_path / "m")


# A mix of lengths: region captions, short summaries and reports cut to the context length.
_TEXTS = [
    "left effusion", "nodule", "right upper zone nodule", "no focal abnormality",
    "there is a dense opacity in the right lower zone. the heart size is normal.",
    "small left apical pneumothorax without mediastinal shift",
    " ".join(["opacity"] * 50), "the lungs are clear. no focal abnormality. the heart size is normal. no effusion.",
    "left lower zone opacity", "cardiomegaly", "right lower zone consolidation with air bronchograms",
    "there is a small nodule in the left upper zone and a moderate right effusion with basal atelectasis.",
]


@pytest.mark.parametrize("kwargs", [{}, {"pad_slack": 0.0}, {"batch_size": 3}, {"pad_slack": 100.0}, {"max_tokens": 40}])
def test_encode_text_does_not_depend_on_chunking(kwargs):
    torch.manual_seed(0)
    model = RegionMedCLIP(tiny_model_config()).eval()
    texts = _TEXTS + _TEXTS[::3]  # with repeats
    with torch.no_grad():
        together = model.encode_text(texts, **kwargs)
        alone = torch.cat([model.encode_text([t]) for t in texts])
    assert together.shape == (len(texts), model.cfg.embed_dim)
    assert torch.allclose(together, alone, atol=1e-5), (together - alone).abs().max()


def test_encode_text_padding_is_bounded(monkeypatch):
    model = RegionMedCLIP(tiny_model_config()).eval()
    seen = []
    forward = model.text_tower.forward

    def counting(input_ids, attention_mask):
        seen.append((attention_mask.numel(), int(attention_mask.sum())))
        return forward(input_ids, attention_mask)

    monkeypatch.setattr(model.text_tower, "forward", counting)
    with torch.no_grad():
        model.encode_text(_TEXTS)
    padded, real = sum(p for p, _ in seen), sum(r for _, r in seen)
    assert len(seen) > 1 and padded <= 1.25 * real
    for p, r in seen:  # the bound holds chunk by chunk
        assert p <= 1.25 * r
    lengths = [len(x) for x in model.text_tower.tokenizer.ids(_TEXTS)]
    assert len(_TEXTS) * max(lengths) > 1.5 * sum(lengths)  # one fixed chunk would have padded far more


def test_text_chunk_plan_bounds_padding_on_random_lengths():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(0, 300)
        lengths = [rng.choice([rng.randint(1, 12), rng.randint(2, 64), rng.randint(30, 512)]) for _ in range(n)]
        slack = rng.choice([0.0, 0.1, 0.25, 0.5, 1.0])
        max_rows = rng.choice([1, 7, 64, 1000])
        max_tokens = rng.choice([None, 256, 4096])
        plan = plan_text_chunks(lengths, slack, max_rows, max_tokens)
        assert sorted(i for chunk in plan for i in chunk) == list(range(n))  # each text exactly once
        padded = real = 0
        for chunk in plan:
            ls = [lengths[i] for i in chunk]
            assert ls == sorted(ls) and len(chunk) <= max_rows
            p, r = len(ls) * max(ls), sum(ls)
            assert p <= (1 + slack) * r + 1e-9, (trial, ls)
            assert max_tokens is None or p <= max_tokens or len(chunk) == 1
            padded, real = padded + p, real + r
        assert padded <= (1 + slack) * real + 1e-9
        if n and slack > 0 and max_rows == 1000 and max_tokens is None:  # the padding rule alone
            assert len(plan) <= 1 + math.log(max(lengths) / min(lengths)) / math.log(1 + slack) + 1e-9
    assert plan_text_chunks([5, 5, 5, 5], 0.0, 64) == [[0, 1, 2, 3]]  # equal lengths never split
    assert plan_text_chunks([10, 3, 10, 4], 0.25, 64) == [[1, 3], [0, 2]]
    with pytest.raises(ValueError):
        plan_text_chunks([1, 2], -0.1)


def test_pretrained_text_tower_is_really_pretrained():
    cfg = dataclasses.replace(tiny_model_config(), text=from_dict(type(tiny_model_config().text), {"name": "minilm"}))
    model = RegionMedCLIP(cfg).eval()
    tok = model.text_tower.tokenizer
    with torch.no_grad():
        feats = [model.text_tower(*tok([t])) for t in ("a nodule in the lung", "a lung nodule", "the stock market fell")]
    sim = lambda a, b: torch.nn.functional.cosine_similarity(a, b).item()  # noqa: E731
    assert sim(feats[0], feats[1]) > sim(feats[0], feats[2]) + 0.2


def test_image_tower_loads_a_local_timm_checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2)
    # as an open_clip / BiomedCLIP checkpoint would store it, at 224 px (resampled to 64 px on load)
    save_file({f"visual.trunk.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "ckpt.safetensors"))
    cfg = tiny_model_config()
    cfg.image.pretrained = str(tmp_path / "ckpt.safetensors")
    model = RegionMedCLIP(cfg)
    assert torch.equal(model.image_tower.model.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    assert model.image_tower.model.pos_embed.shape[1] == 1 + (64 // 16) ** 2


def test_cnn_backbone_works_in_align_mode():
    cfg = tiny_model_config(mode="align")
    cfg.image = from_dict(type(cfg.image), {"name": "resnet18", "image_size": 64})
    model = RegionMedCLIP(cfg).eval()
    images, boxes, mask, _ = _inputs(model)
    out = model.encode_image(images, boxes, mask)
    assert out.roi.shape == (3, 2, cfg.embed_dim)


def test_full_scale_recipe_builds_and_steps_on_cpu():
    """ViT-B/16 at 224 px + a BERT-base-sized text tower (random weights; BiomedBERT's
    architecture, MiniLM's tokenizer since no hub is reachable), one step, batch 2."""
    from pathlib import Path

    from regionmed.apps.train.config import load_run_config
    from regionmed.data.loader import Batch
    from regionmed.task import TrainingTask

    cfg = load_run_config(Path(__file__).resolve().parents[1] / "configs" / "full_scale.yaml")
    m = cfg.model
    assert (m.image.name, m.image.image_size) == ("vit_base_patch16_224", 224)
    m.text.name, m.text.pretrained = "minilm", False
    m.text.config_overrides = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
    torch.manual_seed(0)
    model = RegionMedCLIP(m)
    assert model.text_tower.width == 768 and model.image_tower.width == 768
    n = 2
    batch = Batch(
        images=torch.randn(n, 3, 224, 224), boxes=torch.tensor([[[0.1, 0.1, 0.5, 0.5]], [[0.3, 0.2, 0.9, 0.7]]]),
        roi_mask=torch.ones(n, 1, dtype=torch.bool), roi_crops=torch.randn(n, 3, m.roi.roi_size, m.roi.roi_size),
        reports=["report one", "report two"], summaries=["one", "two"], captions=["right upper zone nodule", "left effusion"],
        roi_negatives=[["left upper zone nodule"], ["right effusion"]], image_negatives=[[], []], ids=["a", "b"],
    )
    task = TrainingTask(model, cfg.data.max_negatives, cfg.data.max_image_negatives)
    task.set_stage(cfg.train.stages[-1].losses, use_rois=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = task(batch)["total"]
    total.backward()
    assert torch.isfinite(total)
    assert model.image_tower.model.blocks[0].attn.qkv.weight.grad is not None
    assert model.roi_processor.global_gate.grad is not None


def _mirrored(boxes):
    """Boxes mirrored left-right in the normalised frame."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([1.0 - x1, y0, 1.0 - x0, y1], dim=-1)


def test_without_box_geometry_roi_tokens_carry_no_box_coordinates():
    """box_geometry=false: no geometry MLP; moving a box without changing the pixels it selects
    (crop mode without grid_context: the crops are given) leaves its ROI embedding unchanged,
    while with geometry (the default) the same move changes it."""
    torch.manual_seed(0)
    plain = RegionMedCLIP(tiny_model_config(mode="crop", box_geometry=False)).eval()
    assert plain.roi_processor.geometry is None
    assert not any(k.startswith("roi_processor.geometry") for k in plain.state_dict())
    torch.manual_seed(0)
    with_geometry = RegionMedCLIP(tiny_model_config(mode="crop")).eval()
    assert with_geometry.roi_processor.geometry is not None
    for model in (plain, with_geometry):
        _open_gates(model, 0.5)
    images, boxes, mask, crops = _inputs(model)
    moved = _mirrored(boxes)  # another side, the same crops
    with torch.no_grad():
        a, b = plain.encode_image(images, boxes, mask, crops), plain.encode_image(images, moved, mask, crops)
        c, d = with_geometry.encode_image(images, boxes, mask, crops), with_geometry.encode_image(images, moved, mask, crops)
    assert torch.allclose(a.roi, b.roi, atol=1e-6)
    assert not torch.allclose(c.roi[mask], d.roi[mask], atol=1e-3)


def test_grid_context_adds_the_global_grid_at_the_box_to_each_crop_token():
    """grid_context: each ROI token = crop feature + RoIAlign of the whole image's grid over its box,
    so even without box geometry a token depends on where its box lies in the image."""
    torch.manual_seed(0)
    model = RegionMedCLIP(tiny_model_config(mode="crop", box_geometry=False, grid_context=True)).eval()
    images, boxes, mask, crops = _inputs(model)
    captured = {}

    def keep(module, args, output):
        captured.setdefault("roi_feats", args[2])

    model.roi_processor.register_forward_hook(keep)
    with torch.no_grad():
        out = model.encode_image(images, boxes, mask, crops)
        pooled, grid = model.image_tower(images)
        expected = model.image_tower.encode_crops(crops) + align_roi_features(grid, boxes, mask, model.cfg.roi.align_output)
    assert torch.allclose(captured["roi_feats"][mask], expected, atol=1e-5)
    moved = _mirrored(boxes)
    with torch.no_grad():
        out_moved = model.encode_image(images, moved, mask, crops)
    assert not torch.allclose(out.roi[mask], out_moved.roi[mask], atol=1e-4)  # same crops, other place: other token


def test_grid_context_needs_crop_mode():
    with pytest.raises(RegionmedError, match="grid_context"):
        RegionMedCLIP(tiny_model_config(mode="align", grid_context=True))


def test_a_model_folder_saved_before_box_geometry_existed_loads_with_geometry(tmp_path):
    torch.manual_seed(0)
    model = RegionMedCLIP(tiny_model_config(mode="crop")).eval()
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    data = json.loads(path.read_text())
    for key in ("box_geometry", "grid_context"):
        del data["model"]["roi"][key]  # as written before these fields existed
    path.write_text(json.dumps(data))
    loaded = load(tmp_path / "m")
    assert loaded.cfg.roi.box_geometry is True and loaded.cfg.roi.grid_context is False
    images, boxes, mask, crops = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images, boxes, mask, crops).roi, loaded.encode_image(images, boxes, mask, crops).roi)
