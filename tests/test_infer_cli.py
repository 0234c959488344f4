"""The inference commands (embed, classify, ground, index, search) on real images."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infer_helpers import assert_no_phi, covid_images, make_dicom, ramp, save_tiny_model, slake_image
from regionmed.apps.cli import main
from regionmed.index import EmbeddingIndex


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return str(save_tiny_model(root / "a", seed=0)), str(save_tiny_model(root / "b", seed=1))


@pytest.fixture()
def folder(tmp_path):
    """Real images, one broken file and three DICOM files (one usable) with made-up identifiers."""
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    for i in range(3):
        shutil.copy(slake_image(i), d / f"slake{i}.jpg")
    shutil.copy(covid_images(1)[0], d / "sub" / "cxr.jpg")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (d / "scan.dcm").write_bytes(make_dicom(ramp()))
    (d / "cine.dcm").write_bytes(make_dicom(ramp(), frames=4))
    (d / "report-only.dcm").write_bytes(make_dicom(None))
    return d


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, command: str, match: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"regionmed {command}: error: ") and match in lines[0], err
    assert "Traceback" not in err


def test_embed_a_folder_lists_bad_files_and_processes_the_rest(models, folder, tmp_path, capsys):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"slake0.jpg": [[10, 10, 120, 120], {"box": [60, 40, 200, 180], "label": "liver"}],
                                 str(folder / "sub" / "cxr.jpg"): [[900, 900, 950, 950]]}))
    out = tmp_path / "emb"
    rc, stdout, err = run(capsys, "embed", models[0], folder, "--out", out, "--boxes", boxes)
    assert rc == 1  # some inputs were problems
    problems = [json.loads(x) for x in (out / "problems.jsonl").read_text().splitlines()]
    assert {(p["id"], p["reason"]) for p in problems} == {
        ("broken.png", "unreadable_image"), ("cine.dcm", "unsupported_dicom"), ("report-only.dcm", "unsupported_dicom"),
        ("sub/cxr.jpg", "outside")}  # the box beyond the radiograph (its image is still embedded)
    images = [json.loads(x) for x in (out / "images.jsonl").read_text().splitlines()]
    assert [r["id"] for r in images] == ["scan.dcm", "slake0.jpg", "slake1.jpg", "slake2.jpg", "sub/cxr.jpg"]
    assert images[0]["width"] == 80 and images[0]["height"] == 48
    arrays = np.load(out / "embeddings.npz")
    assert arrays["image_global"].shape == arrays["image_fused"].shape == (5, 64)
    assert list(arrays["image_id"]) == [r["id"] for r in images]
    regions = [json.loads(x) for x in (out / "regions.jsonl").read_text().splitlines()]
    assert [(r["id"], r.get("label")) for r in regions] == [("slake0.jpg#0", None), ("slake0.jpg#1", "liver")]
    assert arrays["region"].shape == (2, 64) and np.allclose(np.linalg.norm(arrays["region"], axis=1), 1, atol=1e-5)
    assert json.loads((out / "embed.json").read_text())["images"] == 5
    assert_no_phi(out)
    assert_no_phi(stdout + err)


def test_embed_a_medregion_split_with_its_boxes(models, phantom_data, tmp_path, capsys):
    from regionmed.data.shards import MedRegionDataset

    ds = MedRegionDataset(phantom_data, "test")
    n_regions = sum(len(ds.record(i).get("regions") or []) for i in range(len(ds)))
    out = tmp_path / "emb"
    rc, stdout, _ = run(capsys, "embed", models[0], phantom_data, "--split", "test", "--out", out)
    assert rc == 0 and f"embedded {len(ds)} images and {n_regions} regions" in stdout
    ids = [json.loads(x)["id"] for x in (out / "images.jsonl").read_text().splitlines()]
    assert ids == [ds.record(i)["id"] for i in range(len(ds))]


def test_classify_with_labels_in_yaml_and_on_the_command_line(models, folder, tmp_path, capsys):
    labels = tmp_path / "labels.yaml"
    labels.write_text("labels:\n  effusion: [pleural effusion, fluid in the pleural space]\n  normal: [normal chest radiograph]\n")
    out = tmp_path / "scores.csv"
    rc, stdout, _ = run(capsys, "classify", models[0], folder, "--labels-file", labels, "--out", out)
    assert rc == 1 and "3 problems" in stdout
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == ["scan.dcm", "slake0.jpg", "slake1.jpg", "slake2.jpg", "sub/cxr.jpg"]
    for r in rows:
        assert float(r["effusion"]) + float(r["normal"]) == pytest.approx(1.0, abs=1e-5)
        assert r["top_label"] == max(("effusion", "normal"), key=lambda c: float(r[c]))
    out2 = tmp_path / "multi.csv"
    rc, _, _ = run(capsys, "classify", models[0], slake_image(0), "--labels", "liver,lung,brain", "--multi-label", "--out", out2)
    row = next(csv.DictReader(out2.open()))
    assert rc == 0 and all(-1 <= float(row[c]) <= 1 for c in ("liver", "lung", "brain"))


def test_ground_writes_overlays_and_boxes(models, tmp_path, capsys):
    image = covid_images(1)[0]
    out = tmp_path / "g"
    rc, _, _ = run(capsys, "ground", models[0], image, "--phrase", "left lung", "--phrase", "heart", "--out", out)
    assert rc == 0
    data = json.loads((out / "groundings.json").read_text())
    (entry,) = data["images"]
    w, h = Image.open(image).size
    assert entry["size"] == [w, h] and [p["phrase"] for p in entry["phrases"]] == ["left lung", "heart"]
    for p in entry["phrases"]:
        x0, y0, x1, y1 = p["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and p["read_out"] == "windows"
        png = Image.open(out / p["overlay"])
        assert png.size == (w, h) and png.mode == "RGB"
        px = np.asarray(png)
        assert (px[..., 0].astype(int) - px[..., 2]).std() > 0  # coloured by the heatmap, not the gray film


def test_index_add_and_search(models, folder, tmp_path, capsys):
    index = tmp_path / "idx"
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"slake1.jpg": [{"box": [30, 30, 150, 150], "label": "liver"}]}))
    rc, stdout, _ = run(capsys, "index", models[0], folder, "--index", index, "--boxes", boxes)
    assert rc == 1 and "indexed 5 images and 1 region " in stdout
    rc, _, err = run(capsys, "index", models[0], folder, "--index", index)
    one_line_error(rc, err, "index", "already holds an index: pass --add")
    more = tmp_path / "more"
    more.mkdir()
    for i in (7, 8):
        shutil.copy(slake_image(i), more / f"extra{i}.jpg")
    shutil.copy(folder / "slake0.jpg", more / "slake0.jpg")  # already indexed: left as it is
    rc, stdout, _ = run(capsys, "index", models[0], more, "--index", index, "--add")
    assert rc == 0 and "added 2 images" in stdout and "(7 / 1 in" in stdout and "1 already indexed" in stdout

    rc, stdout, _ = run(capsys, "search", index, "--text", "liver", "-k", "8", "--format", "json")
    hits = json.loads(stdout)["hits"]
    assert rc == 0 and len(hits) == 8 and {h["kind"] for h in hits} == {"image", "region"}
    region = next(h for h in hits if h["kind"] == "region")
    assert region["box"] == [30.0, 30.0, 150.0, 150.0] and region["label"] == "liver" and region["image_id"] == "slake1.jpg"
    out_json = tmp_path / "hits.json"
    rc, stdout, _ = run(capsys, "search", index, "--image", more / "extra8.jpg", "--kind", "image", "-k", "2",
                        "--json", out_json)
    assert rc == 0 and stdout.splitlines()[1].split()[3] == "extra8.jpg"  # the table: the image finds itself first
    assert json.loads(out_json.read_text())["hits"][0]["id"] == "extra8.jpg"
    assert_no_phi(index)

    rc, _, err = run(capsys, "search", index, "--text", "liver", "--model", models[1])
    one_line_error(rc, err, "search", "built by model")
    rc, _, err = run(capsys, "index", models[1], more, "--index", index, "--add")
    one_line_error(rc, err, "index", "built by model")
    rc, _, err = run(capsys, "search", tmp_path / "no-such-index", "--text", "liver", "--model", models[0])
    one_line_error(rc, err, "search", "does not exist")


def test_index_add_refuses_a_clashing_id_and_a_missing_index_and_works_from_any_directory(models, tmp_path, capsys,
                                                                                        monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    shutil.copy(slake_image(0), a / "x.jpg")
    shutil.copy(slake_image(1), b / "x.jpg")  # the same id (x.jpg), another image
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, "index", models[0], "a", "--index", "nosuch", "--add")
    one_line_error(rc, err, "index", "nosuch holds no index")
    assert not (tmp_path / "nosuch").exists()
    rc, stdout, _ = run(capsys, "index", models[0], "a", "--index", "idx")
    assert rc == 0 and "indexed 1 image and 0 regions" in stdout
    rows = [json.loads(ln) for ln in (tmp_path / "idx" / "image.jsonl").read_text().splitlines()]
    assert rows[0]["source"] == str((a / "x.jpg").resolve())  # absolute: not tied to the working directory
    rc, _, err = run(capsys, "index", models[0], "b", "--index", "idx", "--add")
    one_line_error(rc, err, "index", "'x.jpg' is already in idx for another image")
    assert str(a / "x.jpg") in err and str(b / "x.jpg") in err
    assert EmbeddingIndex.load(tmp_path / "idx").count("image") == 1  # nothing added
    rc, stdout, _ = run(capsys, "index", models[0], "a", "--index", "idx", "--add")  # the same image again: skipped
    assert rc == 0 and "1 already indexed" in stdout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    hit = EmbeddingIndex.load(tmp_path / "idx").metadata("image")[0]
    assert Path(hit["source"]).is_file()


def test_text_length_errors_name_the_cli_flag_and_the_label(models, tmp_path, capsys):
    long = "small nodule in the right upper zone " * 20
    rc, _, err = run(capsys, "classify", models[0], slake_image(0), "--labels", f"liver,{long},lung", "--out", tmp_path / "c.csv")
    one_line_error(rc, err, "classify", "label 'small nodule in the right upper zone")
    assert "pass --truncate to cut it" in err and "truncate=True" not in err and "text #" not in err
    rc, _, err = run(capsys, "ground", models[0], slake_image(0), "--phrase", long, "--out", tmp_path / "g")
    one_line_error(rc, err, "ground", "pass --truncate to cut it")


def test_bad_command_line_inputs_are_one_line_errors(models, folder, tmp_path, capsys):
    image = slake_image(0)
    rc, _, err = run(capsys, "ground", models[0], image, "--out", tmp_path / "g")
    one_line_error(rc, err, "ground", "phrase list is empty")
    rc, _, err = run(capsys, "ground", models[0], image, "--phrase", "an opacity " * 30, "--out", tmp_path / "g")
    one_line_error(rc, err, "ground", "longer than the model's text context of 32")
    rc, _, err = run(capsys, "classify", models[0], image, "--out", tmp_path / "c.csv")
    one_line_error(rc, err, "classify", "no labels")
    rc, _, err = run(capsys, "classify", models[0], image, "--labels", "liver", "--out", tmp_path / "c.csv")
    one_line_error(rc, err, "classify", "at least two labels")
    rc, _, err = run(capsys, "embed", models[0], tmp_path / "missing", "--out", tmp_path / "e")
    one_line_error(rc, err, "embed", "does not exist")
    rc, _, err = run(capsys, "embed", tmp_path / "no-model", image, "--out", tmp_path / "e")
    one_line_error(rc, err, "embed", "does not exist")
    rc, stdout, err = run(capsys, "embed", models[0], image, "--out", tmp_path / "e", "--max-pixels", 100 * 100)
    assert rc == 1 and "too_many_pixels" in err and "embedded 0 images" in stdout  # an oversized image
    rc, stdout, err = run(capsys, "ground", models[0], folder / "cine.dcm", "--phrase", "liver", "--out", tmp_path / "g")
    assert rc == 1 and "multi-frame" in err and "grounded 1 phrase(s) in 0 image(s)" in stdout
    assert_no_phi(stdout + err)


@pytest.mark.parametrize("command", ["embed", "classify", "ground", "index", "search"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and "usage: regionmed " + command in capsys.readouterr().out
