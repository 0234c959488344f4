"""The inference API (regionmed.inference) on real images and a tiny saved model."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from infer_helpers import PHI_STRINGS, assert_no_phi, covid_images, make_dicom, ramp, save_tiny_model, slake_image
from regionmed.data.transforms import BoxError
from regionmed.errors import RegionmedError
from regionmed.inference import (
    ImageInputError,
    InferenceArgumentError,
    Predictor,
    TextInputError,
    load_image,
    model_digest,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def predictor(model_dir):
    return Predictor.from_pretrained(model_dir, batch_size=3)


# -- load_image ---------------------------------------------------------------------------------
def test_load_image_takes_paths_bytes_pil_and_arrays():
    path = slake_image(0)
    from_path = load_image(path)
    assert from_path.mode in ("L", "RGB") and from_path.size == Image.open(path).size
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), np.asarray(from_path))
    assert np.array_equal(np.asarray(load_image(Image.open(path))), np.asarray(from_path.convert(Image.open(path).mode)))
    gray16 = (np.arange(40 * 30).reshape(30, 40) * 37).astype(np.uint16)
    img = load_image(gray16)
    values = np.asarray(img)
    assert img.mode == "L" and img.size == (40, 30) and values.min() == 0 and values.max() == 255  # min-max
    rgbf = np.random.default_rng(0).random((20, 24, 3)).astype(np.float64) * 1000 - 7
    assert load_image(rgbf).mode == "RGB" and load_image(rgbf).size == (24, 20)
    assert np.asarray(load_image(np.eye(5, dtype=bool))).max() == 255
    assert load_image(np.zeros((9, 7, 1), np.uint8)).size == (7, 9)


def test_load_image_bad_inputs_name_the_source(tmp_path):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ImageInputError, match=r"scan.png: unreadable_image") as err:
        load_image(bad)
    assert isinstance(err.value, RegionmedError) and err.value.reason == "unreadable_image"
    with pytest.raises(ImageInputError, match="missing_file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageInputError, match="empty_image"):
        load_image(b"", name="upload.png")
    raw = slake_image(1).read_bytes()
    with pytest.raises(ImageInputError, match="truncated_image|unreadable_image"):
        load_image(raw[: len(raw) // 3], name="cut.jpg")
    with pytest.raises(ImageInputError, match="too_many_pixels"):  # an oversized upload: refused before decoding
        load_image(raw, max_pixels=100 * 100)
    with pytest.raises(ImageInputError, match="too_many_pixels"):
        load_image(np.zeros((200, 200), np.uint8), max_pixels=100 * 100)
    with pytest.raises(ImageInputError, match="too_many_pixels"):
        load_image(Image.new("L", (200, 200)), max_pixels=100 * 100)
    with pytest.raises(ImageInputError, match="shape"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageInputError, match="empty_image"):
        load_image(np.zeros((0, 4), np.uint8))
    with pytest.raises(TypeError):
        load_image(42)
    with pytest.raises(ImageInputError, match="unsupported_input"):  # one base class for the CLI and the server
        load_image(42)


def test_array_inputs_non_finite_values_and_alpha():
    values = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    for bad in (np.nan, np.inf):
        arr = values.copy()
        arr[1, 2] = bad
        with pytest.raises(ImageInputError, match="non_finite_pixels.*1 NaN/inf"):
            load_image(arr, name="scan.npy")
        with pytest.raises(ImageInputError, match="non_finite_pixels"):
            load_image(np.dstack([arr] * 3))
    rgb = np.random.default_rng(1).random((6, 5, 3)) * 500 + 100
    opaque = np.asarray(load_image(np.dstack([rgb, np.ones((6, 5))])))
    assert np.array_equal(opaque, np.asarray(load_image(rgb)))  # alpha 1: the colours' min–max alone
    half = np.asarray(load_image(np.dstack([rgb, np.full((6, 5), 0.5)])), dtype=np.int16)
    assert (half <= opaque).all() and (half < opaque).any()  # alpha blended, not min–max scaled with the colours
    rgb16 = (rgb * 10).astype(np.uint16)
    full16 = np.dstack([rgb16, np.full((6, 5), 65535, np.uint16)])
    assert np.array_equal(np.asarray(load_image(full16)), np.asarray(load_image(rgb16)))  # alpha by the dtype's maximum
    with pytest.raises(ImageInputError, match="alpha"):
        load_image(np.dstack([rgb, np.full((6, 5), 255.0)]))


def test_dicom_inputs_single_multi_frame_and_no_pixels(tmp_path):
    path = tmp_path / "a.dcm"
    path.write_bytes(make_dicom(ramp()))
    img = load_image(path)
    values = np.asarray(img)
    assert img.mode == "L" and img.size == (80, 48) and values[0, 0] < values[0, -1]  # windowed ramp, left to right
    no_suffix = make_dicom(ramp())  # recognised by the DICM magic
    assert np.array_equal(np.asarray(load_image(no_suffix)), values)
    messages = []
    for name, data, what in [("multi.dcm", make_dicom(ramp(), frames=3), "multi-frame"),
                             ("nopix.dcm", make_dicom(None), "no pixel data")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageInputError, match=what) as err:
            load_image(tmp_path / name)
        assert err.value.reason == "unsupported_dicom"
        messages.append(str(err.value))
    assert_no_phi(" ".join(messages))


def test_dicom_embeds_without_leaking_identifiers(predictor, tmp_path, caplog):
    path = tmp_path / "b.dcm"
    path.write_bytes(make_dicom(ramp()))
    with caplog.at_level(logging.DEBUG):
        res = predictor.embed_images([path], errors="skip")
    assert len(res) == 1 and res.sizes == [(80, 48)]
    assert_no_phi(repr(res) + caplog.text)
    assert not any(s in repr(vars(res)) for s in PHI_STRINGS)


# -- embeddings ----------------------------------------------------------------------------------
def test_embed_images_matches_plain_model_and_batching(predictor):
    paths = [slake_image(i) for i in range(4)]
    res = predictor.embed_images(paths)
    assert res.global_.shape == (4, predictor.embed_dim) and res.global_.dtype == torch.float32
    assert torch.equal(res.fused, res.global_)  # no boxes: fused is the global embedding
    assert res.indices == [0, 1, 2, 3] and res.problems == []
    model, pre = predictor.model, predictor.preprocessor
    with torch.no_grad():
        plain = model.encode_image(**pre.prepare(load_image(paths[2]).convert("RGB"))).global_
    assert torch.allclose(res.global_[2], plain[0], atol=1e-5)
    one_by_one = Predictor(model, batch_size=1).embed_images(paths)
    assert torch.allclose(one_by_one.global_, res.global_, atol=1e-5)
    assert torch.allclose(res.global_.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_roi_rows_follow_the_given_boxes(predictor):
    path = slake_image(3)
    w, h = load_image(path).size
    boxes = [[10, 10, 90, 90], [w - 60, h - 60, w + 40, h + 40], [30, 50, 120, 160], [0, 0, 40, 40], [5, 5, 60, 60]]
    res = predictor.embed_images([path], [boxes])  # five boxes: more than max_rois (3), none dropped
    assert res.roi[0].shape == (5, predictor.embed_dim)
    assert res.boxes[0][1] == [w - 60, h - 60, float(w), float(h)]  # clipped to the image
    assert not torch.allclose(res.fused[0], res.global_[0])
    for j, box in enumerate(boxes):  # a region's embedding does not depend on the other boxes
        alone = predictor.embed_images([path], [[box]]).roi[0][0]
        assert torch.allclose(alone, res.roi[0][j], atol=1e-5), j
    bad = [[10, 10, 90, 90], [w + 10, 0, w + 50, 40], [30, 50, 120, 160]]
    with pytest.raises(BoxError, match=r"box #1 .*outside the image"):
        predictor.embed_images([path], [bad])
    skipped = predictor.embed_images([path], [bad], errors="skip")
    assert torch.isnan(skipped.roi[0][1]).all() and skipped.boxes[0][1] is None
    assert torch.allclose(skipped.roi[0][2], res.roi[0][2], atol=1e-5)  # row 2 is still box 2
    assert [(p.index, p.box, p.reason) for p in skipped.problems] == [(0, 1, "outside")]


def test_bad_image_in_a_batch_is_a_problem(predictor, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(slake_image(0).read_bytes()[:300])
    paths = [slake_image(0), bad, slake_image(1)]
    with pytest.raises(ImageInputError, match="broken.jpg"):
        predictor.embed_images(paths)
    res = predictor.embed_images(paths, errors="skip")
    assert res.indices == [0, 2] and len(res) == 2
    assert [(p.index, p.source) for p in res.problems] == [(1, str(bad))]


def test_model_without_region_path_embeds_box_crops(tmp_path):
    p = Predictor.from_pretrained(save_tiny_model(tmp_path / "g", mode="none"))
    assert not p.has_region_path
    path = slake_image(5)
    res = p.embed_images([path], [[[20, 20, 120, 120]]])
    crop = load_image(path).crop((20, 20, 120, 120))
    assert torch.allclose(res.roi[0][0], p.embed_images([crop]).global_[0], atol=1e-5)
    assert torch.equal(res.fused, res.global_)
    assert p.ground(path, ["liver"])[0].read_out == "patch"


def test_texts_longer_than_the_context(predictor, caplog):
    long = "small nodule in the right upper zone " * 20
    with pytest.raises(TextInputError, match=r"text #1 .* tokens, longer than the model's text context of 32"):
        predictor.embed_texts(["liver", long])
    with caplog.at_level(logging.WARNING):
        emb = predictor.embed_texts(["liver", long], truncate=True)
    assert emb.shape == (2, predictor.embed_dim) and "cut" in caplog.text
    with pytest.raises(TextInputError, match="empty"):
        predictor.embed_texts(["liver", "  "])


def test_long_label_is_named_as_typed_and_a_cut_text_is_warned_once(predictor, caplog):
    long = "small nodule in the right upper zone " * 20
    with pytest.raises(TextInputError, match=r"pass truncate=True to cut it") as info:
        predictor.classify([slake_image(0)], ["liver", long, "lung"])
    text = str(info.value)
    assert text.startswith("label 'small nodule in the right upper zone") and "text #" not in text and "more" not in text
    assert "--truncate" not in text
    path = slake_image(0)
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        predictor.ground(path, ["a mass " * 40, "liver"], truncate=True)
        predictor.ground(path, ["a mass " * 40], truncate=True)
        warned = [r for r in caplog.records if "cut to it" in r.getMessage()]
        assert len(warned) == 1 and "a mass a mass" in warned[0].getMessage()
        caplog.clear()
        result = predictor.classify([path], ["liver", "large mass in the left lower zone " * 20], truncate=True)
        warned = [r for r in caplog.records if "cut to it" in r.getMessage()]
        assert len(warned) == 1 and warned[0].getMessage().startswith("label ")
    assert result.scores.shape == (1, 2)


def _declared_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (the pixel data is never reached)."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("L", (2, 2)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def test_a_declared_size_over_the_limit_gives_the_numbers():
    from regionmed.apps.serve import ServeLimits
    from regionmed.data.decode import DEFAULT_MAX_PIXELS

    assert ServeLimits().max_pixels == DEFAULT_MAX_PIXELS  # one default for the commands, the API and the demo
    with pytest.raises(ImageInputError, match=r"400,000,000 pixels, more than the limit of 67,108,864"):
        load_image(_declared_png(20000, 20000))  # past Pillow's own bomb limit: refused when opened
    with pytest.raises(ImageInputError, match=r"9000x9000 = 81,000,000 pixels, more than the limit of 67,108,864"):
        load_image(_declared_png(9000, 9000))


def test_model_id_is_stable_and_tracks_weights(model_dir, predictor):
    again = Predictor.from_pretrained(model_dir)
    assert again.model_id == predictor.model_id and len(predictor.model_id) == 20
    with torch.no_grad():
        again.model.logit_scale.add_(0.5)
    assert model_digest(again.model) != predictor.model_id


# -- classification --------------------------------------------------------------------------------
def test_classify_single_and_multi_label(predictor):
    paths = [slake_image(i) for i in range(3)]
    res = predictor.classify(paths, ["liver", "lung", "brain"])
    assert res.scores.shape == (3, 3) and res.scores.dtype == np.float32
    assert np.allclose(res.scores.sum(1), 1.0, atol=1e-5) and res.labels == ["liver", "lung", "brain"]
    assert len(res.prompts["liver"]) > 1 and all("liver" in p for p in res.prompts["liver"])  # a prompt ensemble
    multi = predictor.classify(paths, {"effusion": ["pleural effusion"], "nodule": ["a nodule", "a small nodule"]},
                               multi_label=True)
    emb = predictor.embed_images(paths).fused
    text = predictor.embed_texts(["pleural effusion"])[0]
    assert np.allclose(multi.scores[:, 0], (emb @ text).numpy(), atol=1e-5)  # cosine with the one prompt
    assert np.all(np.abs(multi.scores) <= 1.0 + 1e-6)
    with pytest.raises(TextInputError, match="empty"):
        predictor.classify(paths, [])
    with pytest.raises(TextInputError, match="at least two"):
        predictor.classify(paths, ["liver"])
    with pytest.raises(TextInputError, match="longer than"):
        predictor.classify(paths, {"a": ["x " * 100], "b": ["y"]})


def test_classify_is_the_evaluation_ensemble(predictor):
    """The Predictor scores with regionmed.eval.zeroshot's ensemble (one home for the logic)."""
    from regionmed.eval.prompts import load_prompts
    from regionmed.eval.zeroshot import class_scores

    paths = [slake_image(i) for i in range(2)]
    emb = predictor.embed_images(paths).fused
    res = predictor.classify(paths, ["liver", "lung"])
    expected = class_scores(predictor.model, emb, ["liver", "lung"], load_prompts(None), "softmax")
    assert np.allclose(res.scores, expected, atol=1e-6)


def test_argument_mistakes_are_regionmed_errors(predictor):
    path = slake_image(0)
    for call in (lambda: predictor.embed_images([path, path], boxes=[[]]),
                 lambda: predictor.embed_images([path], names=["a", "b"]),
                 lambda: predictor.embed_images([path], errors="ignore"),
                 lambda: predictor.ground(path, ["liver"], read_out="pixels")):
        with pytest.raises(InferenceArgumentError) as err:
            call()
        assert isinstance(err.value, RegionmedError) and isinstance(err.value, ValueError)


# -- grounding ------------------------------------------------------------------------------------
def test_ground_gives_maps_at_the_image_size(predictor):
    path = covid_images(1)[0]  # a non-square radiograph
    w, h = load_image(path).size
    assert w != h
    for read_out in ("windows", "patch"):
        found = predictor.ground(path, ["left lung", "heart"], read_out=read_out)
        assert [g.phrase for g in found] == ["left lung", "heart"]
        for g in found:
            assert g.heatmap.shape == (h, w) and g.heatmap.dtype == np.float32 and g.read_out == read_out
            assert 0.0 <= g.heatmap.min() and g.heatmap.max() <= 1.0 and g.heatmap.max() == 1.0
            assert 0 <= g.peak[0] <= w and 0 <= g.peak[1] <= h
            assert 0 <= g.box[0] < g.box[2] <= w and 0 <= g.box[1] < g.box[3] <= h
            assert -1.0 <= g.score <= 1.0
    assert predictor.ground(path, "heart")[0].read_out == "windows"  # auto: the region path


def test_auto_read_out_is_the_patch_map_for_a_model_with_a_grid_head():
    """A grid head is what the grounding term trains: 'auto' reads its patch map, even with a region path."""
    from conftest import tiny_model_config
    from regionmed.model.clip import RegionMedCLIP
    from regionmed.model.config import DenseConfig

    torch.manual_seed(0)
    cfg = tiny_model_config()
    plain = Predictor(RegionMedCLIP(cfg).eval())
    cfg.dense = DenseConfig(head="conv", width=8, layers=1)
    headed = Predictor(RegionMedCLIP(cfg).eval())
    assert plain.has_region_path and plain.auto_read_out == "windows"
    assert headed.has_region_path and headed.auto_read_out == "patch"
    assert headed.ground(slake_image(0), "liver")[0].read_out == "patch"


def test_ground_bad_phrases(predictor):
    path = slake_image(0)
    with pytest.raises(TextInputError, match="phrase list is empty"):
        predictor.ground(path, [])
    with pytest.raises(TextInputError, match="phrase #0 .* longer than the model's text context"):
        predictor.ground(path, ["a mass " * 40])
    assert len(predictor.ground(path, ["a mass " * 40], truncate=True)) == 1
    with pytest.raises(ImageInputError):
        predictor.ground(b"junk", ["liver"])
