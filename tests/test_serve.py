"""``regionmed serve``: the web demo, launched in-process on a free loopback port with a tiny model.

Real parts: real radiographs from ../shared/data (covid_cxr, with their lung boxes), a real
FAISS index built by ``regionmed.index``, Gradio's real HTTP API (gradio_client), and a real
headless Chromium (system package) driven by selenium, which uploads an image, types two
phrases and checks the overlays the page shows against the model's own heatmaps.

The browser harness also makes the README's screenshot:
``REGIONMED_SERVE_MODEL=runs/demo/region/model REGIONMED_SERVE_SCREENSHOT=docs/serve.png
pytest tests/test_serve.py -k browser_grounding`` (the model given instead of the tiny one).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model_config
from infer_helpers import PHI, PHI_STRINGS, free_port, make_dicom
from regionmed.apps import data_root
from regionmed.apps.serve import (
    DemoBackend,
    DemoInputError,
    ServeLimits,
    build_app,
    launch_app,
    load_index_for,
    parse_lines,
)
from regionmed.index import EmbeddingIndex
from regionmed.inference import Predictor, load_image
from regionmed.model.clip import create_model

gradio_client = pytest.importorskip("gradio_client")  # the "test" extra installs it; needed by every server test

LIMITS = ServeLimits(max_upload_mb=1.0, max_pixels=3_000_000, max_phrases=4, max_labels=8, max_results=10)
PHRASES = ["right lung", "left lung"]


# ------------------------------------------------------------------------------ fixtures

def _save_tiny(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return create_model(tiny_model_config()).save_pretrained(folder)


@pytest.fixture(scope="module")
def cxr() -> list[tuple[Path, list[list[float]], list[str]]]:
    """Three real chest radiographs with their COCO lung boxes (xyxy) and box labels."""
    root = data_root() / "covid_cxr"
    if not root.is_dir():
        pytest.fail(f"shared data not found: {root} (set REGIONMED_DATA; see ../shared/data/README.md)", pytrace=False)
    coco = json.loads((root / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    boxes: dict[int, list] = {}
    for a in coco["annotations"]:
        if a.get("category_id") not in names:  # the release has one box without a category
            continue
        x, y, w, h = a["bbox"]
        boxes.setdefault(a["image_id"], []).append(([x, y, x + w, y + h], names[a["category_id"]]))
    out = []
    for im in sorted(coco["images"], key=lambda r: r["file_name"]):
        if len(boxes.get(im["id"], [])) == 2 and im["width"] != im["height"] and min(im["width"], im["height"]) >= 700:
            out.append((root / "images" / im["file_name"], [b for b, _ in boxes[im["id"]]], [n for _, n in boxes[im["id"]]]))
        if len(out) == 3:
            break
    assert len(out) == 3
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model = os.environ.get("REGIONMED_SERVE_MODEL")
    return Path(model) if model else _save_tiny(tmp_path_factory.mktemp("serve_model"), seed=0)


@pytest.fixture(scope="module")
def predictor(model_dir) -> Predictor:
    return Predictor.from_pretrained(model_dir, max_pixels=LIMITS.max_pixels)


def _build_index(predictor: Predictor, cxr, folder: Path) -> Path:
    index = EmbeddingIndex.create(predictor)
    emb = predictor.embed_images([str(p) for p, _, _ in cxr], [b for _, b, _ in cxr])
    index.add_embeddings(emb, ids=[p.stem[:24] for p, _, _ in cxr], labels=[n for _, _, n in cxr], model_id=predictor.model_id)
    return index.save(folder)


@pytest.fixture(scope="module")
def index_dir(predictor, cxr, tmp_path_factory) -> Path:
    return _build_index(predictor, cxr, tmp_path_factory.mktemp("serve_index"))


@pytest.fixture(scope="module")
def server(predictor, index_dir):
    index, problem = load_index_for(predictor, index_dir)
    assert problem is None and index is not None
    app = build_app(predictor, index, limits=LIMITS)
    url = launch_app(app, host="127.0.0.1", port=free_port(), block=False, quiet=True)
    yield app, url
    app.close()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[1], verbose=False)


def _radiograph_dicom(path: Path, **kw) -> bytes:
    arr = np.asarray(Image.open(path).convert("L").resize((256, 232)), dtype=np.uint16) * 16
    return make_dicom(arr, window=None, **kw)


def _fetch(url_or_path: str) -> Image.Image:
    if url_or_path.startswith("http"):
        with urllib.request.urlopen(url_or_path, timeout=30) as r:
            return Image.open(io.BytesIO(r.read())).convert("RGB")
    return Image.open(url_or_path).convert("RGB")


def _display(image: Image.Image, max_side: int) -> np.ndarray:
    s = min(1.0, max_side / max(image.size))
    size = (max(1, round(image.width * s)), max(1, round(image.height * s)))
    return np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def _heat_mask(heatmap: np.ndarray, size: tuple[int, int], threshold: float) -> np.ndarray:
    return np.asarray(Image.fromarray(heatmap.astype(np.float32), "F").resize(size, Image.Resampling.BILINEAR)) >= threshold


def _check_overlay(overlay: Image.Image, image: Image.Image, grounding, threshold: float, opacity: float, max_side: int) -> None:
    """The overlay has the image's aspect, differs from the image where the heatmap reaches the
    threshold (by what the opacity implies) and equals it far from the heatmap, box and peak."""
    assert abs(overlay.width / overlay.height - image.width / image.height) < 0.01
    base = _display(image, max_side)
    assert overlay.size == (base.shape[1], base.shape[0])
    diff = np.abs(np.asarray(overlay, dtype=np.float32) - base).mean(axis=2)
    mask = _heat_mask(grounding.heatmap, overlay.size, threshold)
    s = overlay.width / image.width
    near = np.zeros_like(mask)  # box outline, caption and peak marker, with a margin
    x0, y0, x1, y1 = (int(v * s) for v in grounding.box)
    near[max(0, y0 - 40):y1 + 12, max(0, x0 - 12):x1 + 12] = True
    px, py = (int(v * s) for v in grounding.peak)
    near[max(0, py - 20):py + 20, max(0, px - 20):px + 20] = True
    heat_only, clear = mask & ~near, ~mask & ~near
    assert heat_only.sum() > 50, "no heatmap pixel to compare"
    if opacity > 0:
        assert diff[heat_only].mean() > 10 * opacity
    else:
        assert diff[heat_only].mean() < 1.5
    assert clear.sum() > 100 and diff[clear].mean() < 1.5


# ------------------------------------------------------------------------------ drawing, parsing

def test_parse_lines():
    assert parse_lines(" a \n\nb\na\n", "phrase", 4) == ["a", "b"]
    with pytest.raises(DemoInputError, match="at least one phrase"):
        parse_lines(" \n ", "phrase", 4)
    with pytest.raises(DemoInputError, match="at most 2"):
        parse_lines("a\nb\nc", "label", 2)


def test_rerender_follows_threshold_and_opacity(predictor, cxr):
    backend = DemoBackend(predictor, limits=LIMITS)
    image = load_image(cxr[0][0])
    overlays, rows, state, message = backend.ground(image, "\n".join(PHRASES), 0.5, 0.5)
    assert "Grounded 2 phrases" in message and len(overlays) == 2 and len(rows) == 2
    expected = predictor.ground(image, PHRASES)
    for (overlay, caption), g in zip(overlays, expected):
        assert caption.startswith(g.phrase)
        _check_overlay(overlay, image, g, 0.5, 0.5, LIMITS.display_max_side)
    # another threshold that still leaves heat away from the box and peak (the map's upper 15%)
    high = round(float(min(np.quantile(g.heatmap, 0.85) for g in expected)), 3)
    assert high != 0.5
    for (overlay, _), g in zip(backend.rerender(image, state, high, 0.9), expected):
        _check_overlay(overlay, image, g, high, 0.9, LIMITS.display_max_side)
    for (overlay, _), g in zip(backend.rerender(image, state, 0.5, 0.0), expected):
        _check_overlay(overlay, image, g, 0.5, 0.0, LIMITS.display_max_side)
    big = image.resize((image.width * 2, image.height * 2))  # a session keeps display-size maps only
    _, _, state, _ = backend.ground(big, PHRASES[0], 0.5, 0.5)
    assert max(state.heatmaps[0].shape) == LIMITS.display_max_side and state.size == big.size
    assert backend.rerender(image, state, 0.5, 0.5) == []  # another image than the grounded one: nothing re-drawn


# ------------------------------------------------------------------------------ the HTTP API

def test_api_ground_classify_search(client, predictor, cxr):
    path = cxr[0][0]
    loaded, message = client.predict(gradio_client.handle_file(str(path)), api_name="/load_image")
    decoded = load_image(path)
    assert message.startswith(f"Loaded a {decoded.width} × {decoded.height} image")
    assert np.array_equal(np.asarray(Image.open(loaded)), np.asarray(decoded))  # lossless (PNG), the decoder's pixels

    gallery, boxes, message = client.predict(gradio_client.handle_file(loaded), "\n".join(PHRASES), 0.5, 0.5, api_name="/ground")
    assert message.startswith("Grounded 2 phrases"), message
    expected = predictor.ground(decoded, PHRASES)
    assert [row[0] for row in boxes["data"]] == PHRASES
    for row, g, item in zip(boxes["data"], expected, gallery):
        assert row[2:6] == pytest.approx(g.box, abs=0.051) and row[1] == pytest.approx(g.score, abs=1e-4)
        assert item["caption"].startswith(g.phrase)
        _check_overlay(_fetch(item["image"]), decoded, g, 0.5, 0.5, LIMITS.display_max_side)

    labels = ["lung opacity", "pleural effusion", "no finding"]
    scores, table, message = client.predict(gradio_client.handle_file(loaded), "\n".join(labels), False, api_name="/classify")
    direct = predictor.classify([decoded], labels).scores[0]
    got = {c["label"]: c["confidence"] for c in scores["confidences"]}
    assert set(got) == set(labels) and sum(got.values()) == pytest.approx(1.0, abs=1e-4)
    assert [got[lb] for lb in labels] == pytest.approx(direct.tolist(), abs=1e-5)
    assert message.startswith("Most likely") and [r[0] for r in table["data"]][0] == labels[int(np.argmax(direct))]
    _, table, message = client.predict(gradio_client.handle_file(loaded), "lung opacity", True, api_name="/classify")
    assert message.startswith("Multi-label") and len(table["data"]) == 1 and -1 <= table["data"][0][1] <= 1

    gallery, table, message = client.predict("right lung", 4, "region", api_name="/search")
    assert message.startswith("4 results"), message
    assert [r[2] for r in table["data"]] == ["region"] * 4 and all(r[5] is not None for r in table["data"])
    assert {r[3] for r in table["data"]} <= {"Right Lung", "Left Lung"}  # the boxes' labels, as indexed
    assert [r[4] for r in table["data"]] == sorted((r[4] for r in table["data"]), reverse=True)
    assert len(gallery) == 4
    ids = {p.stem[:24]: p for p, _, _ in cxr}
    first = table["data"][0]
    source = Image.open(ids[first[1].split("#")[0]])
    assert abs(_fetch(gallery[0]["image"]).width / _fetch(gallery[0]["image"]).height - source.width / source.height) < 0.01
    _, table, message = client.predict("right lung", 10, "both", api_name="/search")
    assert {r[2] for r in table["data"]} == {"image", "region"} and len(table["data"]) == 9  # 3 images + 6 regions


def test_api_bad_inputs_give_messages_and_the_server_keeps_serving(client, cxr, tmp_path):
    def load(data: bytes, name: str) -> tuple:
        path = tmp_path / name
        path.write_bytes(data)
        return client.predict(gradio_client.handle_file(str(path)), api_name="/load_image")

    def ground(phrases: str, image: str = str(cxr[1][0])) -> str:
        return client.predict(gradio_client.handle_file(image), phrases, 0.5, 0.5, api_name="/ground")[2]

    image, message = load(b"this is not an image" * 20, "scan.png")
    assert image is None and "could not be read as an image" in message
    image, message = load(Path(cxr[0][0]).read_bytes()[:3000], "cut.jpg")
    assert image is None and message.startswith("**Error:**"), message
    image, message = load(_radiograph_dicom(cxr[0][0], frames=3), "multi.dcm")
    assert image is None and "DICOM file cannot be shown" in message and "frame" in message
    image, message = load(_radiograph_dicom(cxr[0][0], pixels=False), "nopixels.dcm")
    assert image is None and "DICOM file cannot be shown" in message and "pixel" in message.lower()
    buf = io.BytesIO()
    Image.new("L", (2000, 1600)).save(buf, "PNG")  # 3.2 megapixels, a few KB
    image, message = load(buf.getvalue(), "huge.png")
    assert image is None and "too many pixels" in message and "3 megapixels" in message
    for text in PHI_STRINGS:  # the DICOM messages quote no attribute value
        assert text not in message
    with pytest.raises(ValueError, match="maximum file size"):  # over --max-upload-mb: refused before the upload
        load(os.urandom(1_200_000), "big.png")
    req = urllib.request.Request(client.src.rstrip("/") + "/gradio_api/upload", method="POST",
                                 data=b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n\r\n"
                                      + b"0" * 1_200_000 + b"\r\n--b--\r\n",
                                 headers={"Content-Type": "multipart/form-data; boundary=b"})
    with pytest.raises(urllib.error.HTTPError) as err:  # and by the server itself
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 413

    assert "at least one phrase" in ground("\n  \n")
    assert "at most 4" in ground("a\nb\nc\nd\ne")
    message = ground("left lung " + "with a very long description of the finding " * 6)
    assert "longer than the model's text context" in message and "truncate" not in message
    assert "Upload an image first" in client.predict(None, "lung", 0.5, 0.5, api_name="/ground")[2]
    assert "too many pixels" in ground("lung", str(tmp_path / "huge.png"))
    message = client.predict(gradio_client.handle_file(str(cxr[1][0])), "only one", False, api_name="/classify")[2]
    assert "at least two labels" in message
    message = client.predict(gradio_client.handle_file(str(cxr[1][0])), "a\na", False, api_name="/classify")[2]
    assert "'a' is given twice" in message
    assert "Type a text query" in client.predict("  ", 5, "both", api_name="/search")[2]
    assert "k must be between 1 and 10" in client.predict("lung", 50, "both", api_name="/search")[2]

    assert ground("\n".join(PHRASES)).startswith("Grounded 2 phrases")  # still serving


def test_dicom_upload_shows_and_logs_no_identifier(client, server, cxr, tmp_path, capfd, caplog):
    import gradio.utils

    name = f"{PHI['PatientName'].replace('^', '_')}_{PHI['PatientID']}_{uuid.uuid4().hex[:8]}.dcm"
    path = tmp_path / name
    path.write_bytes(_radiograph_dicom(cxr[0][0]))
    image, message = client.predict(gradio_client.handle_file(str(path)), api_name="/load_image")
    assert message == "Loaded a 256 × 232 DICOM (grey scale)."
    assert Image.open(image).size == (256, 232)
    gallery, _, message = client.predict(gradio_client.handle_file(image), "\n".join(PHRASES), 0.5, 0.5, api_name="/ground")
    assert message.startswith("Grounded 2 phrases") and len(gallery) == 2
    out, errs = capfd.readouterr()
    seen = " ".join([message, out, errs, caplog.text, json.dumps(gallery)])
    for text in [*PHI_STRINGS, PHI["PatientID"], name]:
        assert text not in seen
    upload_dir = Path(gradio.utils.get_upload_folder())
    assert not list(upload_dir.rglob(name)), "the uploaded DICOM was left in Gradio's upload folder"


def test_api_files_sent_to_ground_and_classify_go_through_the_guarded_decoder(client, cxr, tmp_path, capfd, caplog):
    """A file sent straight to /ground or /classify (not the page's image) is decoded like an
    upload: the project's message, no traceback naming it, the file deleted once read."""
    import gradio.utils

    upload_dir = Path(gradio.utils.get_upload_folder())
    secret = f"SECRETNAME_PID-987654321_{uuid.uuid4().hex[:6]}"
    cine = tmp_path / f"{secret}.dcm"
    cine.write_bytes(_radiograph_dicom(cxr[0][0], frames=3))
    fake = tmp_path / f"{secret}-text.png"
    fake.write_text("not an image at all\n" * 20)
    good = tmp_path / f"{secret}-good.dcm"
    good.write_bytes(_radiograph_dicom(cxr[0][0]))
    caplog.clear()
    capfd.readouterr()
    gallery, _, message = client.predict(gradio_client.handle_file(str(cine)), "lung", 0.5, 0.5, api_name="/ground")
    assert gallery == []
    assert message.startswith("**Error:** This DICOM file cannot be shown"), message
    scores, table, message = client.predict(gradio_client.handle_file(str(fake)), "a\nb", False, api_name="/classify")
    assert not scores and message.startswith("**Error:** The uploaded file could not be read as an image"), message
    gallery, _, message = client.predict(gradio_client.handle_file(str(good)), "lung", 0.5, 0.5, api_name="/ground")
    assert message.startswith("Grounded 1 phrase") and len(gallery) == 1
    out, err = capfd.readouterr()
    seen = " ".join([out, err, caplog.text])
    assert "SECRETNAME" not in seen and "987654321" not in seen and "Traceback" not in seen
    assert not [f for f in upload_dir.rglob("*") if "SECRETNAME" in f.name], "an API upload was left in Gradio's upload folder"


def test_index_problems_are_messages(predictor, cxr, tmp_path):
    other = Predictor.from_pretrained(_save_tiny(tmp_path / "other_model", seed=1))
    assert other.model_id != predictor.model_id
    foreign = _build_index(other, cxr, tmp_path / "other_index")
    index, problem = load_index_for(predictor, foreign)
    assert index is None and "built by model" in problem and other.model_id in problem
    index, missing = load_index_for(predictor, tmp_path / "nowhere")
    assert index is None and "does not exist" in missing

    app = build_app(predictor, None, limits=LIMITS, index_problem=problem)
    url = launch_app(app, host="127.0.0.1", port=free_port(), block=False, quiet=True)
    try:
        c = gradio_client.Client(url, verbose=False)
        gallery, table, message = c.predict("right lung", 5, "both", api_name="/search")
        assert gallery == [] and table["data"] == [] and "built by model" in message and message.startswith("**Error:**")
        assert c.predict(gradio_client.handle_file(str(cxr[2][0])), "lung", 0.5, 0.5, api_name="/ground")[2].startswith("Grounded")
    finally:
        app.close()
    assert "No index is loaded" in DemoBackend(predictor).search("lung", 5, "both")[2]


def test_search_thumbnails_from_dataset_shards(predictor, phantom_data):
    from regionmed.data.shards import index_tar

    shard = sorted(Path(phantom_data).glob("test-*.tar"))[0]
    key = index_tar(shard)[1][0]
    backend = DemoBackend(predictor, limits=LIMITS)
    raw = backend._source(f"{shard}:{key}")  # how `regionmed index` records a MedRegion sample
    assert isinstance(raw, bytes) and load_image(raw).size == (128, 128)
    thumb, scale = backend._thumbnail(f"{shard}:{key}")
    assert thumb.size == (128, 128) and scale == 1.0
    assert backend._thumbnail(f"{shard}:no-such-key") is None and backend._thumbnail(str(shard) + "x:k") is None


def test_cli_serve_help_and_bad_limits(capsys):
    from regionmed.apps.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "127.0.0.1" in capsys.readouterr().out
    assert main(["serve", "--model", "x", "--max-pixels", "0"]) == 2
    assert "max_pixels must be > 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------ a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver; make test does, through scripts/system-deps.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def _status(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "status").text


def _upload(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#upload-button ~ input[type=file], input[type=file]").send_keys(str(path))


def _overlay_srcs(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.get_attribute("src") for e in driver.find_elements(By.CSS_SELECTOR, "#overlays img")]


def test_browser_grounding(browser, server, predictor, cxr, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app, url = server
    browser.get(url)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=file]"))
    path = cxr[0][0]
    _upload(browser, path)
    decoded = load_image(path)
    _wait(browser, lambda d: _status(d).startswith("Loaded a"))
    assert _status(browser) == f"Loaded a {decoded.width} × {decoded.height} image ({'grey scale' if decoded.mode == 'L' else 'colour'})."
    assert path.name not in browser.find_element(By.TAG_NAME, "body").text

    box = browser.find_element(By.CSS_SELECTOR, "#phrases textarea")
    box.clear()
    box.send_keys("\n".join(PHRASES))
    browser.find_element(By.ID, "ground-button").click()
    _wait(browser, lambda d: _status(d).startswith("Grounded") and len(_overlay_srcs(d)) == 2)
    assert _status(browser).startswith("Grounded 2 phrases")
    expected = predictor.ground(decoded, PHRASES)
    srcs = _overlay_srcs(browser)
    for src, g in zip(srcs, expected):
        _check_overlay(_fetch(src), decoded, g, 0.5, 0.5, LIMITS.display_max_side)
    table = browser.find_element(By.ID, "boxes").text
    for g in expected:
        assert g.phrase in table and f"{round(g.box[0], 1):g}" in table and f"{round(g.box[3], 1):g}" in table
    screenshot = os.environ.get("REGIONMED_SERVE_SCREENSHOT")
    if screenshot:
        _save_screenshot(browser, Path(screenshot))

    opacity = browser.find_element(By.CSS_SELECTOR, "#opacity input[type=number]")  # the slider's number box
    opacity.send_keys(Keys.CONTROL, "a")
    opacity.send_keys("0", Keys.TAB)
    _wait(browser, lambda d: (s := _overlay_srcs(d)) and len(s) == 2 and s[0] != srcs[0])
    for src, g in zip(_overlay_srcs(browser), expected):  # opacity 0: only boxes and peaks drawn
        _check_overlay(_fetch(src), decoded, g, 0.5, 0.0, LIMITS.display_max_side)


def test_browser_bad_uploads(browser, server, cxr, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server[1])
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=file]"))
    bad = tmp_path / "Henrietta_Quixbury_scan.png"
    bad.write_bytes(b"not an image" * 50)
    _upload(browser, bad)
    _wait(browser, lambda d: "could not be read as an image" in _status(d))

    big = tmp_path / f"Quixbury_Henrietta_{uuid.uuid4().hex[:6]}.dcm"
    big.write_bytes(os.urandom(1_300_000))
    _upload(browser, big)
    msg = _wait(browser, lambda d: d.find_element(By.ID, "upload-limit-message").text)
    assert "1.3 MB" in msg and "up to 1 MB" in msg and "--max-upload-mb" in msg
    dcm = tmp_path / f"MRN-83612047_{uuid.uuid4().hex[:6]}.dcm"
    dcm.write_bytes(_radiograph_dicom(cxr[1][0]))
    _upload(browser, dcm)
    _wait(browser, lambda d: _status(d) == "Loaded a 256 × 232 DICOM (grey scale).")
    assert not browser.find_element(By.ID, "upload-limit-message").is_displayed()
    time.sleep(0.5)
    page = browser.page_source + browser.find_element(By.TAG_NAME, "body").text
    for text in [*PHI_STRINGS, big.name, dcm.name, bad.name]:
        assert text not in page


def _save_screenshot(driver, path: Path) -> None:
    """The page after a grounding run, as a small PNG for the README (< 300 KB)."""
    from selenium.webdriver.common.by import By

    driver.set_window_size(1400, 1180)
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(1.5)  # the gallery's images finish loading at the new size
    shot = Image.open(io.BytesIO(driver.find_element(By.TAG_NAME, "body").screenshot_as_png)).convert("RGB")
    shot = shot.resize((shot.width * 2 // 3, shot.height * 2 // 3), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    shot.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    driver.set_window_size(1400, 1000)
