"""The retrieval index (regionmed.index) with a real FAISS index over real images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from infer_helpers import save_tiny_model, slake_image
from regionmed.index import EmbeddingIndex, IndexInputError, IndexMismatchError, IndexNotFoundError
from regionmed.inference import Predictor


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return (Predictor.from_pretrained(save_tiny_model(root / "a", seed=0)),
            Predictor.from_pretrained(save_tiny_model(root / "b", seed=1)))


def test_add_save_load_search_and_add_more(predictors, tmp_path):
    p, _ = predictors
    first = [slake_image(i) for i in range(4)]
    boxes = [[[10, 10, 100, 100], [50, 60, 200, 220]], [], [[0, 0, 128, 128]], []]
    index = EmbeddingIndex.create(p)
    res = p.embed_images(first, boxes)
    counts = index.add_embeddings(res, ids=[f"img{i}" for i in range(4)], labels=[["liver", "lung"], [], ["brain"], []])
    assert counts == {"image": 4, "region": 3, "skipped_regions": 0}
    index.save(tmp_path / "idx")

    loaded = EmbeddingIndex.load(tmp_path / "idx")
    assert (loaded.model_id, loaded.dim, loaded.count("image"), loaded.count("region")) == (p.model_id, p.embed_dim, 4, 3)
    hits = loaded.search_image(p, first[2], k=3, kind="image")[0]
    assert hits[0].id == "img2" and hits[0].score == pytest.approx(1.0, abs=1e-4)  # the image finds itself
    region = loaded.search_image(p, first[0], k=1, kind="region", box=[50, 60, 200, 220])[0][0]
    assert (region.id, region.image_id, region.label) == ("img0#1", "img0", "lung")
    assert region.box == [50.0, 60.0, 200.0, 220.0] and region.score == pytest.approx(1.0, abs=1e-4)
    both = loaded.search_text(p, "liver", k=7, kind="both")[0]
    assert len(both) == 7 and {h.kind for h in both} == {"image", "region"}
    assert [h.score for h in both] == sorted((h.score for h in both), reverse=True)
    text = p.embed_texts(["liver"])[0]
    exact = sorted([float(res.global_[i] @ text) for i in range(4)], reverse=True)
    assert [h.score for h in loaded.search_text(p, "liver", k=4, kind="image")[0]] == pytest.approx(exact, abs=1e-5)

    more = [slake_image(i) for i in range(4, 7)]
    loaded.add_embeddings(p.embed_images(more), ids=["img4", "img5", "img6"])
    loaded.save(tmp_path / "idx")
    again = EmbeddingIndex.load(tmp_path / "idx")
    assert again.count("image") == 7 and again.count("region") == 3
    assert again.search_image(p, more[1], k=1, kind="image")[0][0].id == "img5"
    assert [m["id"] for m in again.metadata("image")] == [f"img{i}" for i in range(7)]


def test_another_model_or_size_is_refused(predictors, tmp_path):
    p, other = predictors
    index = EmbeddingIndex.create(p)
    index.add_embeddings(p.embed_images([slake_image(0)]), ids=["a"])
    index.save(tmp_path / "idx")
    index = EmbeddingIndex.load(tmp_path / "idx")
    assert other.model_id != p.model_id
    with pytest.raises(IndexMismatchError, match="built by model"):
        index.search_text(other, "liver")
    with pytest.raises(IndexMismatchError, match="built by model"):
        index.add(other.embed_images([slake_image(1)]).fused, [{"id": "b"}], model_id=other.model_id)
    with pytest.raises(IndexMismatchError, match="embedding size 32"):
        index.add(np.ones((1, 32), np.float32), [{"id": "c"}])
    with pytest.raises(IndexMismatchError, match="embedding size 32"):
        index.search(np.ones((1, 32), np.float32))
    with pytest.raises(IndexMismatchError, match="NaN"):
        index.add(torch.full((1, p.embed_dim), float("nan")), [{"id": "d"}])
    assert index.count("image") == 1  # nothing half added


def test_metadata_without_id_is_refused_naming_the_row(predictors):
    p, _ = predictors
    index = EmbeddingIndex.create(p)
    vectors = p.embed_images([slake_image(0), slake_image(1), slake_image(2)]).global_
    for bad, pattern in [({"source": "s.png"}, r"metadata #1 has no 'id' \(keys: \['source'\]\)"),
                         ({"id": ""}, r"metadata #1 has no 'id'"), ("b", r"metadata #1 is a str")]:
        with pytest.raises(IndexInputError, match=pattern):
            index.add(vectors, [{"id": "a"}, bad, {"id": "c"}])
    assert index.count("image") == 0  # no row of a refused call is added
    index.add(vectors, [{"id": "a"}, {"id": 2}, {"id": "c"}])
    assert [m["id"] for m in index.metadata("image")] == ["a", "2", "c"]


def test_missing_and_damaged_folders(predictors, tmp_path):
    p, _ = predictors
    with pytest.raises(IndexNotFoundError, match="does not exist"):
        EmbeddingIndex.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexNotFoundError, match="index.json is missing"):
        EmbeddingIndex.load(tmp_path / "empty")
    index = EmbeddingIndex.create(p)
    index.add_embeddings(p.embed_images([slake_image(0), slake_image(1)]), ids=["a", "b"])
    folder = index.save(tmp_path / "idx")
    lines = (folder / "image.jsonl").read_text().splitlines()
    (folder / "image.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(IndexMismatchError, match="damaged"):
        EmbeddingIndex.load(folder)
    (folder / "image.faiss").unlink()
    with pytest.raises(IndexNotFoundError, match="image.faiss is missing"):
        EmbeddingIndex.load(folder)
    info = json.loads((folder / "index.json").read_text())
    assert info["faiss_type"] == {"image": "IndexFlatIP", "region": "IndexFlatIP"} and info["model_id"] == p.model_id
    (folder / "index.json").write_text('{"model_id": ', encoding="utf-8")
    with pytest.raises(IndexMismatchError, match=r"index\.json: not valid JSON \(the index description\)"):
        EmbeddingIndex.load(folder)


# -- approximate search (ivf) --------------------------------------------------------------------
def _clustered(n: int, d: int = 32, centres: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``centres`` random directions (embeddings have such structure; uniform
    random vectors have none, and no index can find their neighbours cheaply)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"v{i}"} for i in range(start, start + n)]


def test_ivf_meets_its_recorded_recall_and_survives_save_load_and_add(tmp_path):
    x = _clustered(6000)
    index = EmbeddingIndex.create("m", dim=32, search="ivf")
    index.add(x[:5000], _rows(5000), "region")
    index.add(x[:10], _rows(10), "image")  # too few vectors for cells: stays exact
    folder = index.save(tmp_path / "idx")
    info = json.loads((folder / "index.json").read_text())
    assert info["faiss_type"] == {"image": "IndexFlatIP", "region": "IndexIVFFlat"} and info["search"] == "ivf"
    approx = info["approximate"]["region"]
    assert approx["recall_at_10"] >= 0.95 and approx["queries"] == 250 and approx["nprobe"] < approx["nlist"]
    # the recorded recall holds for queries it never saw: new vectors against an exact index of the same data
    exact = EmbeddingIndex.create("m", dim=32, search="exact")
    exact.add(x[:5000], _rows(5000), "region")
    loaded = EmbeddingIndex.load(folder)
    assert loaded.faiss_type("region") == "IndexIVFFlat" and loaded._indexes["region"].nprobe == approx["nprobe"]
    queries = x[5000:5200]
    got = [[h.id for h in hits] for hits in loaded.search(queries, 10, "region")]
    want = [[h.id for h in hits] for hits in exact.search(queries, 10, "region")]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)]) >= 0.9
    # --add: new vectors go to their cells, are found, and the recall is measured again
    loaded.add(x[5000:6000], _rows(1000, 5000), "region")
    assert loaded.search(x[5500], 1, "region")[0][0].id == "v5500"
    loaded.save(folder)
    again = json.loads((folder / "index.json").read_text())["approximate"]["region"]
    assert again["measured_at"] == 6000 and again["trained_on"] == 5000 and again["recall_at_10"] >= 0.95
    assert EmbeddingIndex.load(folder).count("region") == 6000


def test_auto_is_exact_below_its_threshold_and_modes_convert_both_ways(tmp_path, monkeypatch):
    import regionmed.index as index_module

    monkeypatch.setattr(index_module, "EXACT_BELOW", 3000)
    x = _clustered(4000, seed=1)
    index = EmbeddingIndex.create("m", dim=32)  # auto
    index.add(x[:2000], _rows(2000), "region")
    index.save(tmp_path / "idx")
    assert index.faiss_type("region") == "IndexFlatIP" and "region" not in index.approximate
    before = [h.id for h in index.search(x[0], 5, "region")[0]]
    index.add(x[2000:3500], _rows(1500, 2000), "region")
    index.save(tmp_path / "idx")
    assert index.faiss_type("region") == "IndexIVFFlat" and index.approximate["region"]["recall_at_10"] >= 0.95
    assert index.search(x[0], 1, "region")[0][0].id == "v0"
    index.search_mode = "exact"  # back to exact: the same vectors, in the same rows
    index.save(tmp_path / "idx")
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    assert loaded.faiss_type("region") == "IndexFlatIP" and loaded.approximate == {}
    np.testing.assert_array_equal(loaded._indexes["region"].reconstruct_n(0, 3500), x[:3500])
    assert [h.id for h in loaded.search(x[0], 5, "region")[0]][:1] == before[:1]


def test_ivf_cells_are_trained_again_after_the_kind_grows(tmp_path):
    x = _clustered(5000, seed=2)
    index = EmbeddingIndex.create("m", dim=32, search="ivf")
    index.add(x[:1000], _rows(1000), "region")
    index.save(tmp_path / "idx")
    first = dict(index.approximate["region"])
    index.add(x[1000:5000], _rows(4000, 1000), "region")
    index.save(tmp_path / "idx")
    assert first["trained_on"] == 1000 and index.approximate["region"]["trained_on"] == 5000
    assert index.approximate["region"]["nlist"] > first["nlist"]


def test_a_bad_search_mode_is_refused(tmp_path):
    with pytest.raises(IndexInputError, match="search 'hnsw' is not one of"):
        EmbeddingIndex.create("m", dim=8, search="hnsw")
    index = EmbeddingIndex.create("m", dim=8)
    folder = index.save(tmp_path / "idx")
    info = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**info, "search": "fast"}))
    with pytest.raises(IndexMismatchError, match="search 'fast'"):
        EmbeddingIndex.load(folder)


def test_a_folder_from_before_the_modes_stays_exact(tmp_path, monkeypatch):
    """index.json without 'search' (written when every index was exact): loaded as exact, and an
    --add past the auto threshold keeps it exact."""
    import regionmed.index as index_module

    monkeypatch.setattr(index_module, "EXACT_BELOW", 1500)
    x = _clustered(3000, seed=3)
    index = EmbeddingIndex.create("m", dim=32, search="exact")
    index.add(x[:1000], _rows(1000), "region")
    folder = index.save(tmp_path / "idx")
    info = json.loads((folder / "index.json").read_text())
    old = {k: v for k, v in info.items() if k not in ("search", "approximate")} | {"faiss_type": "IndexFlatIP"}
    (folder / "index.json").write_text(json.dumps(old))
    loaded = EmbeddingIndex.load(folder)
    assert loaded.search_mode == "exact"
    loaded.add(x[1000:3000], _rows(2000, 1000), "region")
    loaded.save(folder)
    assert EmbeddingIndex.load(folder).faiss_type("region") == "IndexFlatIP"
