"""Image decoding (issue 10, kinds 2 and 3): EXIF orientation applied once by one function;
every stored image 8-bit L or RGB with the mapping stated and recorded."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest_build import read_all_records, read_rejects
from regionmed.apps.curation.builder import build
from regionmed.apps.curation.config import BuildConfig, ImageConfig, SourceSpec
from regionmed.apps.curation.images import ItemReject, load_image
from regionmed.data.decode import ImageDecodeError, check_stored_image, decode_image, displayed_size, record_meta, to_8bit
from regionmed.data.schema import RecordError
from regionmed.data.shards import MedRegionDataset, MedRegionWriter, read_manifest, write_manifest
from regionmed.data.transforms import to_rgb
from regionmed.eval.images import ImageRef, open_image

ORIENTATION = 0x0112


def _encode(img: Image.Image, fmt: str, orientation: int | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        kw["exif"] = exif.tobytes()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _displayed_film() -> Image.Image:
    """A 40x80 (w x h) 'film' as displayed: dark, with a bright block at x 5..20, y 50..75."""
    arr = np.full((80, 40), 20, np.uint8)
    arr[50:75, 5:20] = 230
    return Image.fromarray(arr, "L")


def _rotated_jpeg() -> bytes:
    """The displayed film stored 80x40 with EXIF Orientation 6 (a viewer rotates it 90° clockwise)."""
    stored = _displayed_film().transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (80, 40)
    return _encode(stored, "JPEG", orientation=6, quality=95)


def _build_generic(tmp_path: Path, rows: list[dict], files: dict[str, bytes], **cfg_kw) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    (src / "table.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cfg = BuildConfig(out=str(out), workers=0, progress=False, sources=[SourceSpec("generic", str(src))], **cfg_kw)
    build(cfg, log=lambda s: None)
    return out


def _shard_members(out: Path) -> dict[str, bytes]:
    """Every image member of every shard, as plain tarfile reads it."""
    found = {}
    for tar in out.glob("*.tar"):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith((".png", ".jpg")):
                    found[m.name] = tf.extractfile(m).read()
    return found


# --------------------------------------------------------------------------- orientation (kind 2)


def test_decode_applies_exif_orientation_once():
    img, info = decode_image(_rotated_jpeg())
    assert img.size == (40, 80) and info["stored_size"] == (80, 40) and info["orientation"] == 6
    arr = np.asarray(img)
    assert arr[55:70, 8:17].mean() > 200 and arr[5:40, 25:38].mean() < 60  # the block is where it was drawn
    assert not info["as_is"] and record_meta(info) == {"decode_orientation": 6}
    # the result carries no orientation: decoding its encoding again changes nothing
    again, info2 = decode_image(_encode(img, "PNG"))
    assert again.size == (40, 80) and info2["orientation"] == 1 and np.array_equal(np.asarray(again), arr)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_value_gives_the_displayed_image(orientation):
    shown = np.asarray(_displayed_film())
    # the stored grid that a viewer shows as `shown` under this orientation (the inverse transform)
    inverse = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
               7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}[orientation]
    stored = Image.fromarray(shown) if inverse is None else Image.fromarray(shown).transpose(inverse)
    raw = _encode(stored, "PNG", orientation=orientation)
    img, info = decode_image(raw)
    assert np.array_equal(np.asarray(img), shown)
    assert displayed_size(raw) == (40, 80)
    assert info["as_is"] is False  # an EXIF block (whatever its orientation) is metadata: never stored as it is
    assert decode_image(_encode(Image.fromarray(shown), "PNG"))[1]["as_is"] is True  # the same pixels without it


def test_build_keeps_a_box_drawn_on_the_displayed_image_and_stores_it_upright(tmp_path):
    box = [5, 50, 20, 75]  # on the displayed 40x80 image; outside the stored 80x40 grid
    out = _build_generic(tmp_path, [{"image": "film.jpg", "report": "Opacity in the lower zone.", "patient_id": "p1",
                                     "boxes": [{"label": "Opacity", "box": box}]}], {"film.jpg": _rotated_jpeg()})
    (rec,) = read_all_records(out)
    assert not [r for r in read_rejects(out) if r["reason"] != "no_regions"]
    assert (rec["width"], rec["height"]) == (40, 80)
    (region,) = rec["regions"]
    assert region["box"] == box
    # location on the displayed geometry: image left (= patient's right under the radiological
    # convention), lower third
    assert region["location"]["vertical"] == "lower" and region["location"]["side"] == "right"
    assert rec["meta"]["decode_orientation"] == 6
    (data,) = _shard_members(out).values()
    plain = Image.open(io.BytesIO(data))  # a standard reader: no EXIF handling
    assert plain.size == (40, 80) and plain.getexif().get(ORIENTATION, 1) == 1
    x0, y0, x1, y1 = box
    assert np.asarray(plain.convert("L"))[y0:y1, x0:x1].mean() > 200  # the box lands on the block it was drawn on


def test_box_scaling_with_max_side_uses_the_displayed_size(tmp_path):
    out = _build_generic(tmp_path, [{"image": "film.jpg", "report": "Opacity.", "patient_id": "p1",
                                     "boxes": [{"label": "Opacity", "box": [4, 40, 20, 76]}]}], {"film.jpg": _rotated_jpeg()},
                         image=ImageConfig(max_side=40))
    (rec,) = read_all_records(out)
    assert (rec["width"], rec["height"]) == (20, 40)
    assert rec["regions"][0]["box"] == [2.0, 20.0, 10.0, 38.0]  # scaled by 40/80, not by 40/40 or 20/80


def test_eval_open_image_and_reader_agree_with_the_builder(tmp_path):
    path = tmp_path / "film.jpg"
    path.write_bytes(_rotated_jpeg())
    img = open_image(ImageRef("k", path=str(path)))
    assert img.mode == "RGB" and img.size == (40, 80)
    # an already-decoded image keeps its pixels (no second orientation)
    decoded, _ = decode_image(path)
    assert to_rgb(decoded).size == (40, 80)


def test_reader_decodes_the_stored_grid_of_a_shard(tmp_path):
    # a legacy shard member with an orientation tag: records of that time used the stored grid
    raw = _rotated_jpeg()
    img, info = decode_image(raw, exif_orientation=False)
    assert img.size == (80, 40) and not info["as_is"]  # its EXIF block is metadata: never stored as it is


# --------------------------------------------------------------------------- modes (kind 3)


def _sixteen_bit_png(lo=0, hi=4095) -> bytes:
    arr = np.tile(np.linspace(lo, hi, 64), (48, 1)).astype(np.uint16)  # a 12-bit film in a 16-bit container
    return _encode(Image.fromarray(arr), "PNG")


def test_sixteen_bit_png_is_stored_as_8_bit_with_the_mapping_recorded(tmp_path):
    raw = _sixteen_bit_png()
    assert raw[24] == 16  # IHDR bit depth
    out = _build_generic(tmp_path, [{"image": "film.png", "report": "Clear lungs.", "patient_id": "p1"}], {"film.png": raw})
    (rec,) = read_all_records(out)
    assert rec["meta"]["decode_mode"] == "I;16" and rec["meta"]["decode_mapping"] == "min-max 0..4095 -> 0..255"
    assert "min-max" in read_manifest(out)["provenance"]["image_decoding"]
    (data,) = _shard_members(out).values()
    assert data[24] == 8  # an 8-bit PNG
    plain = Image.open(io.BytesIO(data))
    assert plain.mode == "L"
    arr = np.asarray(plain)
    assert arr.min() == 0 and arr.max() == 255 and 100 < arr.mean() < 155  # a ramp, not a white image
    # a standard WebDataset reader sees the same
    (sample,) = list(wds.WebDataset([str(p) for p in out.glob("*.tar")], shardshuffle=False).decode("pil"))
    seen = np.asarray(sample["png"].convert("L"))
    assert (seen == 255).mean() < 0.05 and np.array_equal(seen, arr)


def test_high_bit_depth_and_float_mappings():
    img, info = decode_image(_sixteen_bit_png(300, 3900))
    arr = np.asarray(img)
    assert img.mode == "L" and arr[0, 0] == 0 and arr[0, -1] == 255 and info["mapping"] == "min-max 300..3900 -> 0..255"
    flat, info = decode_image(_encode(Image.fromarray(np.full((8, 8), 1000, np.uint16)), "PNG"))
    assert np.asarray(flat).max() == 0 and info["mapping"].startswith("min-max 1000..1000")
    f = np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    f[0, 0], f[0, 1], f[0, 2] = np.nan, np.inf, -np.inf
    img, info = decode_image(_encode(Image.fromarray(f, "F"), "TIFF"))
    arr = np.asarray(img)
    assert img.mode == "L" and (arr[0, 0], arr[0, 1], arr[0, 2]) == (0, 255, 0) and arr[-1, -1] == 255
    assert info["mapping"].startswith("min-max") and info["mode"] == "F"
    i32, info = decode_image(_encode(Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8) * 1000, "I"), "TIFF"))
    assert i32.mode == "L" and np.asarray(i32)[-1, -1] == 255


def test_palette_images():
    gray_pal = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L").convert("P")
    img, info = decode_image(_encode(gray_pal, "PNG"))
    assert img.mode == "L" and info["mapping"] == "palette expanded" and np.asarray(img)[-1, -1] == 252
    colour = Image.new("RGB", (8, 8), (200, 30, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    img, _ = decode_image(_encode(colour, "PNG"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (200, 30, 30)
    # palette with a transparent entry: composited over black
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    transparent = _encode(pal, "PNG", transparency=1)
    img, info = decode_image(transparent)
    assert img.mode == "L" and np.asarray(img).max() == 0 and "alpha composited over black" in info["mapping"]
    white, _ = decode_image(transparent, background="white")
    assert np.asarray(white)[1, 1] == 255


def test_alpha_is_composited_over_black():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (250, 240, 230)
    rgba[..., 3] = 0
    rgba[4:, :, 3] = 255  # lower half opaque
    rgba[0, :, 3] = 128
    img, info = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    arr = np.asarray(img)
    assert img.mode == "RGB" and info["mapping"] == "alpha composited over black"
    assert tuple(arr[6, 0]) == (250, 240, 230) and tuple(arr[2, 0]) == (0, 0, 0) and 120 <= arr[0, 0, 0] <= 130
    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 0] = 200
    la[:, 4:, 1] = 255
    img, info = decode_image(_encode(Image.fromarray(la, "LA"), "PNG"))
    assert img.mode == "L" and np.asarray(img)[0, 0] == 0 and np.asarray(img)[0, 7] == 200
    # a gray PNG with a tRNS colour key is transparent too
    key = _encode(Image.fromarray(np.array([[0, 100], [100, 7]], np.uint8), "L"), "PNG", transparency=100)
    img, info = decode_image(key)
    assert img.mode == "L" and np.asarray(img).tolist() == [[0, 0], [0, 7]] and not info["as_is"]


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    cmyk.paste((0, 0, 0, 0), (0, 0, 8, 16))  # white left half
    img, info = decode_image(_encode(cmyk, "JPEG", quality=95))
    arr = np.asarray(img).astype(int)
    assert img.mode == "RGB" and "CMYK -> RGB" in info["mapping"]
    assert (arr[:, :6] > 240).all() and arr[:, 10:, 0].min() > 230 and arr[:, 10:, 1:].max() < 25


def test_every_input_mode_is_stored_8_bit(tmp_path):
    """Through the builder: each odd mode ends as an 8-bit L/RGB member with its mapping recorded."""
    inputs = {
        "p16.png": _sixteen_bit_png(),
        "pal.png": _encode(Image.new("RGB", (16, 16), (10, 200, 10)).convert("P"), "PNG"),
        "rgba.png": _encode(Image.new("RGBA", (16, 16), (10, 20, 30, 0)), "PNG"),
        "cmyk.jpg": _encode(Image.new("CMYK", (16, 16), (0, 0, 0, 40)), "JPEG"),
        "bilevel.png": _encode(Image.new("1", (16, 16), 1), "PNG"),
        "plain.jpg": _encode(Image.new("L", (16, 16), 90), "JPEG"),
    }
    rows = [{"image": name, "report": f"Film {n}.", "patient_id": f"p{n}"} for n, name in enumerate(inputs)]
    out = _build_generic(tmp_path, rows, inputs)
    recs = read_all_records(out)
    assert len(recs) == len(inputs)
    assert sum("decode_mapping" in r["meta"] for r in recs) == 5  # all but the plain JPEG
    members = _shard_members(out)
    assert len(members) == len(inputs)
    for name, data in members.items():
        img = Image.open(io.BytesIO(data))
        assert img.mode in ("L", "RGB"), name
        if name.endswith(".png"):
            assert data[24] == 8 and data[25] in (0, 2), name
    assert inputs["plain.jpg"] in members.values()  # an 8-bit upright JPEG is stored as it was


def test_to_rgb_uses_the_same_conversion_for_decoded_images():
    arr = np.tile(np.linspace(100, 2000, 32), (4, 1)).astype(np.uint16)
    decoded, _ = decode_image(_encode(Image.fromarray(arr), "PNG"))
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(arr)))[..., 0], np.asarray(decoded))
    rgba = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (0, 0, 0)
    assert to_8bit(Image.new("RGB", (2, 2)))[1] == ""
    with pytest.raises(ValueError, match="background"):
        to_8bit(rgba, background="grey")


def test_undecodable_inputs_name_the_reason(tmp_path):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(b"not an image", where="x.png")
    assert err.value.reason == "unreadable_image" and str(err.value).startswith("x.png: ")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(_encode(Image.new("L", (300, 300)), "PNG"), max_pixels=1000)
    assert err.value.reason == "decompression_bomb"
    with pytest.raises(ImageDecodeError) as err:
        decode_image(tmp_path / "missing.png")
    assert err.value.reason == "unreadable_image" and "missing.png" in str(err.value)
    truncated = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8)), "JPEG")[:900]
    with pytest.raises(ItemReject) as rej:
        load_image(data=truncated)
    assert rej.value.reason == "truncated_image"


# --------------------------------------------------------------------------- the shard format's promise


def _record(i: int, w: int, h: int, split: str = "train") -> dict:
    return {"schema_version": 1, "id": f"s{i}", "split": split, "source": "t", "modality": "xray", "width": w,
            "height": h, "summary": "Clear.", "report": "Clear.", "negatives": [], "regions": []}


def test_writer_refuses_images_that_break_the_format(tmp_path):
    assert check_stored_image(_encode(Image.new("L", (8, 6)), "PNG"), "png", 8, 6) is None
    assert "16-bit" in check_stored_image(_sixteen_bit_png(), "png", 64, 48)
    assert "orientation 6" in check_stored_image(_rotated_jpeg(), "jpg", 80, 40)
    assert "record says" in check_stored_image(_encode(Image.new("L", (8, 6)), "PNG"), "png", 6, 8)
    assert "mode RGBA" in check_stored_image(_encode(Image.new("RGBA", (8, 6)), "PNG"), "png", 8, 6)
    assert "JPEG data" in check_stored_image(_encode(Image.new("L", (8, 6)), "JPEG"), "png", 8, 6)
    with MedRegionWriter(tmp_path, "train") as w:
        with pytest.raises(RecordError, match="s0.*16-bit"):
            w.write(_record(0, 64, 48), _sixteen_bit_png(), "png")
        w.write(_record(1, 8, 6), _encode(Image.new("L", (8, 6), 7), "PNG"), "png")


def test_reader_returns_8_bit_for_a_legacy_16_bit_member(tmp_path):
    """A shard written before the check (raw 16-bit PNG member) reads back as 8-bit L."""
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as tw:
        tw.write({"__key__": "s0", "png": _sixteen_bit_png(), "json": json.dumps(_record(0, 64, 48)).encode()})
    write_manifest(tmp_path, {"train": {"shards": [{"name": "train-000000.tar", "samples": 1}], "samples": 1}})
    img, rec = MedRegionDataset(tmp_path, "train")[0]
    assert img.mode == "L" and img.size == (64, 48) and np.asarray(img).max() == 255 and np.asarray(img).min() == 0
