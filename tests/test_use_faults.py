"""The use surface under faults (issue 19, part A): embed, classify, ground, index, search, serve and
the interop commands with bad, odd and concurrent inputs, one table of cases per kind.

Kinds: writers that lose user data; text the model cannot read; folder entries skipped
without a word; names that are not UTF-8; memory bounded by pixels; tracebacks at the
edges; identifiers in image metadata."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import regionmed
from infer_helpers import make_dicom, ramp, save_tiny_model, slake_image
from regionmed.apps.cli import EXIT_INTERNAL, main
from regionmed.index import EmbeddingIndex
from regionmed.inference import Predictor, TextInputError

SRC = str(Path(regionmed.__file__).resolve().parents[1])
ID_NAME, ID_NUMBER = "Marchbanks^Ottoline", "MRN-55120931"  # made-up identifiers planted in image metadata


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("model") / "m", seed=0))


@pytest.fixture()
def images(tmp_path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    for i in range(2):
        shutil.copy(slake_image(i), d / f"s{i}.jpg")
    return d


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, command: str, *fragments: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"regionmed {command}: error: "), err
    for f in fragments:
        assert f in lines[0], err


def tree_digest(*roots: Path) -> str:
    h = hashlib.sha256()
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


# ============================================================== writers that lose user data
_ADD = [sys.executable, "-m", "regionmed", "index"]


def test_two_index_add_runs_at_once_both_keep_their_images(model, tmp_path):
    """Real processes: three trials, each two `--add` runs started together on one index (the
    trials run side by side): every image of both runs ends in the index."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    sets = {}
    for name, first in (("base", 0), ("a", 2), ("b", 4)):
        (tmp_path / name).mkdir()
        for i in range(first, first + 2):
            shutil.copy(slake_image(i), tmp_path / name / f"{name}{i}.jpg")
        sets[name] = {f"{name}{i}.jpg" for i in range(first, first + 2)}
    procs = {}
    for trial in range(3):
        index = tmp_path / f"idx{trial}"
        assert main(["index", model, str(tmp_path / "base"), "--index", str(index), "--no-progress"]) == 0
        procs[index] = [subprocess.Popen([*_ADD, model, tmp_path / s, "--index", index, "--add", "--no-progress"], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in ("a", "b")]
    for trial, (index, pair) in enumerate(procs.items()):
        done = [p.communicate(timeout=600) for p in pair]
        assert [p.returncode for p in pair] == [0, 0], done
        assert all("added 2 images" in out for out, _ in done), done
        ids = {m["id"] for m in EmbeddingIndex.load(index).metadata("image")}
        assert ids == sets["base"] | sets["a"] | sets["b"], f"trial {trial}: {sorted(ids)}"


class _Stop(OSError):
    """The process stopping in the middle of a write (a full disk, a kill)."""

    def __init__(self):
        super().__init__(28, "No space left on device")


def _fail_on_call(n: int, real):
    calls = []

    def wrapper(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise _Stop()
        return real(*a, **kw)
    return wrapper


def _index_case(model, tmp_path, monkeypatch, capsys):
    import regionmed.index as index_module

    folder = tmp_path / "idx"
    for i in range(2):
        shutil.copy(slake_image(i), tmp_path / f"s{i}.jpg")
    assert main(["index", model, str(tmp_path / "s0.jpg"), "--index", str(folder)]) == 0
    monkeypatch.setattr(index_module, "write_jsonl_atomic", _fail_on_call(2, index_module.write_jsonl_atomic))
    rc, _, err = run(capsys, "index", model, tmp_path / "s1.jpg", "--index", folder, "--add")
    assert rc == 2 and "No space left" in err
    return folder, lambda: EmbeddingIndex.load(folder).count("image") == 1


def _model_case(model, tmp_path, monkeypatch, capsys):
    import regionmed.model.clip as clip

    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    monkeypatch.setattr(clip, "save_model", _fail_on_call(1, clip.save_model))
    m = clip.load(folder)
    with pytest.raises(_Stop):
        m.save_pretrained(folder)
    return folder, lambda: tree_digest(folder) == tree_digest(Path(model)) and clip.load(folder) is not None


def _embed_case(model, tmp_path, monkeypatch, capsys):
    import regionmed.apps.infer as infer

    out = tmp_path / "emb"
    assert main(["embed", model, str(slake_image(0)), "--out", str(out)]) == 0
    before = tree_digest(out)
    monkeypatch.setattr(infer.np, "savez", _fail_on_call(1, np.savez))
    rc, _, err = run(capsys, "embed", model, slake_image(1), "--out", out)
    assert rc == 2 and "No space left" in err
    return out, lambda: tree_digest(out) == before


def _ground_case(model, tmp_path, monkeypatch, capsys):
    import regionmed.apps.infer as infer

    out = tmp_path / "g"
    argv = ["ground", model, str(slake_image(0)), "--phrase", "liver", "--phrase", "lung", "--out", str(out)]
    assert main(argv) == 0
    before = tree_digest(out)
    monkeypatch.setattr(infer, "save_png", _fail_on_call(2, infer.save_png))  # after the first overlay
    rc, _, err = run(capsys, *argv[:-1], out)
    assert rc == 2 and "No space left" in err
    return out, lambda: tree_digest(out) == before


@pytest.mark.parametrize("case", [_index_case, _model_case, _embed_case, _ground_case],
                         ids=["index --add", "save_pretrained", "embed --out", "ground --out"])
def test_a_write_stopped_between_two_files_leaves_the_previous_folder(case, model, tmp_path, monkeypatch, capsys):
    folder, still_whole = case(model, tmp_path, monkeypatch, capsys)
    assert still_whole()
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


@pytest.fixture()
def built_index(model, images, tmp_path) -> Path:
    folder = tmp_path / "idx"
    assert main(["index", model, str(images), "--index", str(folder)]) == 0
    return folder


def _oc_files(tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "ckpt"
    d.mkdir()
    import torch
    from safetensors.torch import save_file

    save_file({"logit_scale": torch.tensor(2.0)}, str(d / "open_clip_model.safetensors"))
    (d / "open_clip_config.json").write_text("{}")
    return d / "open_clip_model.safetensors", d / "open_clip_config.json"


# (case, argv, command, fragments): {M} model, {I} images folder, {X} the index, {T} tmp_path, {C}/{F} checkpoint/config
OVERLAP = [
    ("embed into its input", ["embed", "{M}", "{I}", "--out", "{I}"], "embed", ["--out", "is input"]),
    ("embed inside its input", ["embed", "{M}", "{I}", "--out", "{I}/emb"], "embed", ["lies inside input"]),
    ("embed around its input", ["embed", "{M}", "{I}", "--out", "{T}"], "embed", ["holds", "replaced as a whole"]),
    ("embed into the model", ["embed", "{M}", "{I}", "--out", "{M}"], "embed", ["is the model folder"]),
    ("ground inside the model", ["ground", "{M}", "{I}", "--phrase", "liver", "--out", "{M}/g"], "ground",
     ["lies inside the model folder"]),
    ("classify over an input image", ["classify", "{M}", "{I}/s0.jpg", "--labels", "liver,lung", "--out", "{I}/s0.jpg"],
     "classify", ["is input"]),
    ("index into the model", ["index", "{M}", "{I}", "--index", "{M}"], "index", ["--index", "is the model folder"]),
    ("index into its input", ["index", "{M}", "{I}", "--index", "{I}"], "index", ["is input"]),
    ("search --json into the index", ["search", "{X}", "--text", "liver", "--json", "{X}/index.json"], "search",
     ["--json", "lies inside the index folder"]),
    ("export into the model", ["export-open-clip", "{M}", "--out", "{M}"], "export-open-clip", ["is the model folder"]),
    ("import around its checkpoint", ["import-open-clip", "{C}", "--config", "{F}", "--out", "{T}/ckpt"],
     "import-open-clip", ["holds the checkpoint"]),
]


@pytest.mark.parametrize("case, argv, command, fragments", OVERLAP, ids=[c[0] for c in OVERLAP])
def test_writing_into_an_input_is_refused(case, argv, command, fragments, model, images, built_index, tmp_path, capsys):
    ckpt, cfg = _oc_files(tmp_path)
    m = tmp_path / "model"
    shutil.copytree(model, m)
    values = {"M": m, "I": images, "X": built_index, "T": tmp_path, "C": ckpt, "F": cfg}
    before = tree_digest(m, images, built_index, ckpt.parent)
    rc, _, err = run(capsys, *[a.format(**values) for a in argv])
    one_line_error(rc, err, command, *fragments)
    assert tree_digest(m, images, built_index, ckpt.parent) == before


# (case, argv, command, fragment): an output that names something of the wrong kind, or a folder of other files
WRONG_OUTPUT = [
    ("embed --out a file", ["embed", "{M}", "{I}", "--out", "{T}/file.txt"], "embed", "is an existing file"),
    ("ground --out a file", ["ground", "{M}", "{I}", "--phrase", "liver", "--out", "{T}/file.txt"], "ground",
     "is an existing file"),
    ("index --index a file", ["index", "{M}", "{I}", "--index", "{T}/file.txt"], "index", "is an existing file"),
    ("export --out a file", ["export-open-clip", "{M}", "--out", "{T}/file.txt"], "export-open-clip", "is an existing file"),
    ("import --out a file", ["import-open-clip", "{C}", "--config", "{F}", "--out", "{T}/file.txt"], "import-open-clip",
     "is an existing file"),
    ("classify --out a folder", ["classify", "{M}", "{I}", "--labels", "a,b", "--out", "{T}/mine"], "classify",
     "is an existing folder"),
    ("search --json a folder", ["search", "{X}", "--text", "liver", "--json", "{T}/mine"], "search", "is an existing folder"),
    ("embed --out a folder of other files", ["embed", "{M}", "{I}", "--out", "{T}/mine"], "embed", "not an embed output"),
    ("index --index a folder of other files", ["index", "{M}", "{I}", "--index", "{T}/mine"], "index",
     "not a retrieval index folder"),
]


@pytest.mark.parametrize("case, argv, command, fragment", WRONG_OUTPUT, ids=[c[0] for c in WRONG_OUTPUT])
def test_an_output_of_the_wrong_kind_is_a_one_line_error(case, argv, command, fragment, model, images, built_index,
                                                          tmp_path, capsys):
    ckpt, cfg = _oc_files(tmp_path)
    (tmp_path / "file.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine too")
    values = {"M": model, "I": images, "X": built_index, "T": tmp_path, "C": ckpt, "F": cfg}
    rc, _, err = run(capsys, *[a.format(**values) for a in argv])
    one_line_error(rc, err, command, fragment)
    assert (tmp_path / "file.txt").read_text() == "mine" and (tmp_path / "mine" / "notes.txt").read_text() == "mine too"


# ============================================================== text the model cannot read
# (case, argv, command, fragment): the tiny model's MiniLM vocabulary reads neither these CJK words nor emoji
UNREADABLE = [
    ("classify labels", ["classify", "{M}", "{I}", "--labels", "liver,结节,积液", "--out", "{T}/c.csv"], "classify",
     "label '结节': 2 of its 2 tokens are unknown"),
    ("classify prompts", ["classify", "{M}", "{I}", "--labels-file", "{T}/labels.yaml", "--out", "{T}/c.csv"], "classify",
     "label 'nodule' (its prompt '结节 😀')"),
    ("classify labels read alike", ["classify", "{M}", "{I}", "--labels", "left lower lobe 结节,left lower lobe 积液", "--out",
                                     "{T}/c.csv"],
     "classify", "labels 'left lower lobe 结节' and 'left lower lobe 积液' are the same text to the model"),
    ("ground phrase", ["ground", "{M}", "{I}", "--phrase", "😀 🫁", "--out", "{T}/g"], "ground", "phrase '😀 🫁'"),
    ("search text", ["search", "{X}", "--text", "积液", "--model", "{M}"], "search", "text '积液'"),
]


@pytest.mark.parametrize("case, argv, command, fragment", UNREADABLE, ids=[c[0] for c in UNREADABLE])
def test_text_of_unknown_tokens_is_an_error_not_a_score(case, argv, command, fragment, model, images, built_index,
                                                        tmp_path, capsys):
    (tmp_path / "labels.yaml").write_text("labels:\n  nodule: ['结节 😀']\n  normal: [normal chest radiograph]\n",
                                          encoding="utf-8")
    values = {"M": model, "I": images, "X": built_index, "T": tmp_path}
    rc, _, err = run(capsys, *[a.format(**values) for a in argv])
    one_line_error(rc, err, command, fragment)
    assert not (tmp_path / "c.csv").exists() and not (tmp_path / "g").exists()


def test_text_with_some_unknown_words_is_a_named_warning(model, caplog):
    p = Predictor.from_pretrained(model)
    with caplog.at_level(logging.WARNING, logger="regionmed.inference"):
        p.embed_texts(["small nodule 😀 in the left lung"])
    assert "'small nodule 😀 in the left lung'" in caplog.text and "'😀'" in caplog.text
    with pytest.raises(TextInputError, match="unknown"):
        p.classify([np.zeros((32, 32), np.uint8)], ["结节", "积液"])
    from regionmed.apps.serve import DemoBackend

    overlays, rows, state, message = DemoBackend(p).ground(Image.new("L", (64, 64)), "结节", 0.5, 0.5)
    assert overlays == [] and "unknown to the model's text vocabulary" in message


def test_import_without_tokenizer_files_is_refused(tmp_path, capsys):
    from transformers import BertConfig

    text = tmp_path / "text"
    BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128).save_pretrained(text)  # config.json only: no vocab.txt / tokenizer.json
    ckpt, cfg = _oc_files(tmp_path)
    cfg.write_text(json.dumps({"model_cfg": {"embed_dim": 32, "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224",
                                                                            "image_size": 64},
                                             "text_cfg": {"hf_model_name": str(text), "context_length": 32}}}))
    rc, _, err = run(capsys, "import-open-clip", ckpt, "--config", cfg, "--text-dir", text, "--out", tmp_path / "out")
    one_line_error(rc, err, "import-open-clip", "only 5 tokens", "vocabulary files are missing")
    assert not (tmp_path / "out").exists()


# ============================================================== every entry of a folder
def _png(path: Path) -> None:
    shutil.copy(slake_image(2), path.with_suffix(".jpg"))
    Image.open(path.with_suffix(".jpg")).save(path, format="PNG")
    path.with_suffix(".jpg").unlink()


def _linked_folder(d: Path) -> None:
    (d.parent / "elsewhere").mkdir()
    shutil.copy(slake_image(4), d.parent / "elsewhere" / "x.jpg")
    (d / "linked").symlink_to(d.parent / "elsewhere")


# (entry, how to make it in folder d, expected: "image" or the problem's reason)
ENTRIES = [
    ("export/IM0001", lambda d: (d / "export").mkdir() or (d / "export/IM0001").write_bytes(make_dicom(ramp())), "image"),
    ("photo.jpe", lambda d: shutil.copy(slake_image(0), d / "photo.jpe"), "image"),
    ("photo.jfif", lambda d: shutil.copy(slake_image(1), d / "photo.jfif"), "image"),
    ("scan.bin", lambda d: _png(d / "scan.bin"), "image"),
    ("film.tga", lambda d: Image.open(slake_image(3)).convert("RGB").save(d / "film.tga"), "image"),
    ("brain.nii", lambda d: (d / "brain.nii").write_bytes(b"\x5c\x01" + bytes(346)), "unsupported_format"),
    ("brain.nii.gz", lambda d: (d / "brain.nii.gz").write_bytes(b"\x1f\x8b" + bytes(20)), "unsupported_format"),
    ("notes.txt", lambda d: (d / "notes.txt").write_text("report"), "not_an_image"),
    ("empty.png", lambda d: (d / "empty.png").write_bytes(b""), "empty_image"),
    ("linked/x.jpg", lambda d: _linked_folder(d), "image"),
    ("linked-again", lambda d: (d / "linked-again").symlink_to(d.parent / "elsewhere"), "duplicate_folder"),
    ("sub/up", lambda d: (d / "sub").mkdir() or (d / "sub/up").symlink_to(d), "symlink_loop"),
    ("self", lambda d: (d / "self").symlink_to(d / "self"), "symlink_loop"),
    ("dangling.png", lambda d: (d / "dangling.png").symlink_to(d / "gone.png"), "missing_file"),
    ("fifo", lambda d: os.mkfifo(d / "fifo"), "not_an_image"),
]


def test_every_entry_of_a_folder_ends_in_the_output_or_the_problems(model, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    for _, make, _ in ENTRIES:
        make(d)
    if os.geteuid() != 0:  # root reads any file: an unreadable one only exists for other users
        (d / "locked.jpg").write_bytes(slake_image(5).read_bytes())
        (d / "locked.jpg").chmod(0)
    rc, _, _ = run(capsys, "embed", model, d, "--out", tmp_path / "emb")
    assert rc == 1
    embedded = {json.loads(x)["id"] for x in (tmp_path / "emb" / "images.jsonl").read_text().splitlines()}
    problems = {json.loads(x)["id"]: json.loads(x)["reason"]
                for x in (tmp_path / "emb" / "problems.jsonl").read_text().splitlines()}
    for entry, _, expected in ENTRIES:
        got = "image" if entry in embedded else problems.get(entry, "<missing>")
        assert got == expected, f"{entry}: {got}"
    if os.geteuid() != 0:
        assert problems["locked.jpg"] == "unreadable_image"
    assert len(embedded) + len(problems) == len(ENTRIES) + (os.geteuid() != 0)  # nothing else, nothing twice


# ============================================================== names that are not UTF-8
_NAME = os.fsdecode(b"caf\xe9 \xff.jpg")  # latin-1 bytes, as from an old zip: 'caf\udce9 \udcff.jpg'


@pytest.fixture()
def latin1_folder(tmp_path) -> Path:
    d = tmp_path / "zip"
    d.mkdir()
    shutil.copy(slake_image(0), os.path.join(os.fsencode(d), os.fsencode(_NAME)))
    shutil.copy(slake_image(1), d / "plain.jpg")
    return d


def test_a_name_that_is_not_utf8_round_trips_through_every_output(model, latin1_folder, tmp_path, capsys):
    raw = os.fsencode(_NAME)
    rc, _, _ = run(capsys, "embed", model, latin1_folder, "--out", tmp_path / "e")
    ids = [json.loads(x)["id"] for x in (tmp_path / "e" / "images.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rc == 0 and raw in [os.fsencode(i) for i in ids]  # the JSON escape gives the file's bytes back
    assert _NAME in set(np.load(tmp_path / "e" / "embeddings.npz")["image_id"])

    rc, _, _ = run(capsys, "classify", model, latin1_folder, "--labels", "liver,lung", "--out", tmp_path / "c.csv")
    rows = list(csv.DictReader((tmp_path / "c.csv").open(encoding="utf-8")))
    assert rc == 0 and {r["id"] for r in rows} == {"caf\\xe9 \\xff.jpg", "plain.jpg"}  # the documented \xNN form

    rc, _, _ = run(capsys, "ground", model, latin1_folder, "--phrase", "liver", "--out", tmp_path / "g")
    data = json.loads((tmp_path / "g" / "groundings.json").read_text(encoding="utf-8"))
    assert rc == 0 and raw in [os.fsencode(e["id"]) for e in data["images"]]

    rc, _, _ = run(capsys, "index", model, latin1_folder, "--index", tmp_path / "i")
    assert rc == 0
    hits = EmbeddingIndex.load(tmp_path / "i").metadata("image")
    assert any(Path(h["source"]).is_file() and os.fsencode(h["id"]) == raw for h in hits)  # the source opens again
    rc, out, _ = run(capsys, "search", tmp_path / "i", "--text", "liver", "--json", tmp_path / "hits.json")
    assert rc == 0 and "caf\\xe9" in out
    assert raw in [os.fsencode(h["id"]) for h in json.loads((tmp_path / "hits.json").read_text(encoding="utf-8"))["hits"]]


# ============================================================== memory bounded by pixels
def test_grounding_reads_a_large_image_out_at_a_bounded_size(model, monkeypatch):
    import regionmed.eval.readout as readout

    p = Predictor.from_pretrained(model)
    seen = []
    real = readout.ground_image
    monkeypatch.setattr(readout, "ground_image", lambda m, pre, image, *a, **kw: seen.append(image.size) or real(m, pre, image, *a, **kw))
    film = np.asarray(Image.open(slake_image(0)).convert("L").resize((1200, 800)))
    big = np.kron(film, np.ones((5, 5), np.uint8))  # 6000 x 4000: the same picture at 5 x the pixels
    (g_big,), (g_small,) = p.ground(big, ["liver"]), p.ground(film, ["liver"])
    assert seen and max(max(s) for s in seen) <= p.ground_side
    assert g_big.size == (6000, 4000) and g_big.map.size <= p.ground_side ** 2
    assert max(g_big.heatmap_at(512).shape) == 512
    # the same read-out in the image's own pixels: the big image's box is the small one's x 5
    assert np.allclose(g_big.box, [v * 5 for v in g_small.box], atol=5 * 0.02 * 1200)


def test_ground_overlays_are_drawn_at_a_bounded_size(model, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.open(slake_image(0)).convert("L").resize((3000, 2000)).save(big)
    rc, _, _ = run(capsys, "ground", model, big, "--phrase", "liver", "--max-side", "400", "--out", tmp_path / "g")
    data = json.loads((tmp_path / "g" / "groundings.json").read_text())
    (phrase,) = data["images"][0]["phrases"]
    assert rc == 0 and Image.open(tmp_path / "g" / phrase["overlay"]).size == (400, 267)
    x0, y0, x1, y1 = phrase["box"]
    assert 0 <= x0 < x1 <= 3000 and 0 <= y0 < y1 <= 2000 and phrase["size"] == [3000, 2000]


# ============================================================== tracebacks at the edges
def _row_edit(kind: str, line: int, value):
    def edit(folder: Path) -> None:
        path = folder / f"{kind}.jsonl"
        rows = path.read_text().splitlines()
        rows[line] = json.dumps(value)
        path.write_text("\n".join(rows) + "\n")
    return edit


# (case, edit of the built index folder, fragment of the one-line error)
SIDECAR = [
    ("a list", _row_edit("image", 0, [1, 2]), "image.jsonl, line 1: a list, not a metadata object"),
    ("a string", _row_edit("image", 1, "s1.jpg"), "image.jsonl, line 2: a str, not a metadata object"),
    ("a number", _row_edit("image", 0, 7), "line 1: a int, not a metadata object"),
    ("null", _row_edit("image", 0, None), "line 1: a NoneType, not a metadata object"),
    ("no id", _row_edit("image", 0, {"source": "x"}), "line 1: no 'id' string"),
    ("an id that is a number", _row_edit("image", 0, {"id": 5}), "line 1: no 'id' string"),
    ("a source that is a list", _row_edit("image", 0, {"id": "a", "source": ["x"]}), "'source' is a list"),
    ("a box of 3 numbers", _row_edit("image", 0, {"id": "a", "box": [1, 2, 3]}), "'box' is not a list of 4 numbers"),
]


@pytest.mark.parametrize("case, edit, fragment", SIDECAR, ids=[c[0] for c in SIDECAR])
def test_index_sidecar_rows_that_are_not_objects(case, edit, fragment, model, built_index, capsys):
    edit(built_index)
    rc, _, err = run(capsys, "search", built_index, "--text", "liver", "--model", model)
    one_line_error(rc, err, "search", fragment)


# (case, argv, command, fragment)
ARGUMENTS = [
    ("--box of words", ["search", "{X}", "--image", "{I}/s0.jpg", "--box", "a,b,c,d"], "search", "'a' is not a number"),
    ("--box of three", ["search", "{X}", "--image", "{I}/s0.jpg", "--box", "1,2,3"], "search", "has 3 values, not 4"),
    ("--box with nan", ["search", "{X}", "--image", "{I}/s0.jpg", "--box", "1,2,3,nan"], "search", "finite"),
    ("--box without --image", ["search", "{X}", "--text", "liver", "--box", "1,2,3,4"], "search", "--box goes with --image"),
    ("--threshold nan", ["ground", "{M}", "{I}", "--phrase", "liver", "--threshold", "nan", "--out", "{T}/g"], "ground",
     "--threshold must be a number in [0, 1]"),
    ("--opacity 7", ["ground", "{M}", "{I}", "--phrase", "liver", "--opacity", "7", "--out", "{T}/g"], "ground",
     "--opacity must be a number in [0, 1]"),
    ("--max-side 0", ["ground", "{M}", "{I}", "--phrase", "liver", "--max-side", "0", "--out", "{T}/g"], "ground",
     "--max-side must be >= 16"),
    ("--max-pixels 0", ["embed", "{M}", "{I}", "--max-pixels", "0", "--out", "{T}/e"], "embed", "--max-pixels must be >= 1"),
    ("a box label that is a number", ["index", "{M}", "{I}", "--boxes", "{T}/boxes.json", "--index", "{T}/i2"], "index",
     "box #0's label 5 is not a string"),
    ("an empty folder", ["embed", "{M}", "{T}/empty", "--out", "{T}/e"], "embed", "is empty"),
    ("a folder without images", ["embed", "{M}", "{T}/texts", "--out", "{T}/e"], "embed",
     "holds no image file (1 other entry, e.g. a.txt: not_an_image"),
]


@pytest.mark.parametrize("case, argv, command, fragment", ARGUMENTS, ids=[c[0] for c in ARGUMENTS])
def test_bad_arguments_are_one_line_errors(case, argv, command, fragment, model, images, built_index, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    (tmp_path / "boxes.json").write_text(json.dumps({"s0.jpg": [{"box": [1, 2, 30, 40], "label": 5}]}))
    values = {"M": model, "I": images, "X": built_index, "T": tmp_path}
    rc, _, err = run(capsys, *[a.format(**values) for a in argv])
    one_line_error(rc, err, command, fragment)


def _oc_config(**changes):
    mc = {"embed_dim": 32, "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "image_size": 64},
          "text_cfg": {"hf_model_name": "bert", "context_length": 32}}
    pre = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        target = {"": mc, "vision_cfg": mc["vision_cfg"], "text_cfg": mc["text_cfg"], "preprocess_cfg": pre}[section]
        target[name] = value
    return {"model_cfg": mc, "preprocess_cfg": pre}


# (field, value, fragment): open_clip config values of another type
OC_FIELDS = [
    ("vision_cfg.image_size", "big", "vision_cfg.image_size is 'big': expected a positive integer"),
    ("vision_cfg.image_size", [224, "x"], "vision_cfg.image_size[1] is 'x'"),
    ("vision_cfg.image_size", 22.5, "vision_cfg.image_size is 22.5"),
    ("vision_cfg.image_size", True, "vision_cfg.image_size is True"),
    ("embed_dim", "512", "embed_dim is '512'"),
    ("text_cfg.context_length", "77", "text_cfg.context_length is '77'"),
    ("vision_cfg.timm_proj_bias", "no", "vision_cfg.timm_proj_bias is 'no': expected true or false"),
    ("vision_cfg.timm_model_name", 5, "vision_cfg.timm_model_name is 5"),
    ("text_cfg.hf_pooler_type", ["cls"], "text_cfg.hf_pooler_type is ['cls']"),
    ("preprocess_cfg.mean", ["a", 0, 0], "preprocess_cfg.mean is ['a', 0, 0]"),
    ("preprocess_cfg.std", [0, 1, 1], "expected a list of 3 positive numbers"),
    ("vision_cfg", [1, 2], "model_cfg.vision_cfg is [1, 2]: expected a mapping"),
    ("text_cfg", "bert", "model_cfg.text_cfg is 'bert': expected a mapping"),
    ("init_logit_bias", "x", "init_logit_bias is 'x'"),
]


@pytest.mark.parametrize("field, value, fragment", OC_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in OC_FIELDS])
def test_open_clip_config_values_of_another_type(field, value, fragment, tmp_path, capsys):
    ckpt, cfg = _oc_files(tmp_path)
    cfg.write_text(json.dumps(_oc_config(**{field: value})))
    rc, _, err = run(capsys, "import-open-clip", ckpt, "--config", cfg, "--out", tmp_path / "out")
    one_line_error(rc, err, "import-open-clip", str(cfg), fragment)


def test_an_unexpected_exception_never_exits_1(model, images, tmp_path, monkeypatch, capsys):
    import regionmed.apps.infer as infer

    def bug(*a, **kw):
        raise TypeError("a bug")

    monkeypatch.setattr(infer, "embed_items", bug)
    rc, _, err = run(capsys, "embed", model, images, "--out", tmp_path / "e")
    assert rc == EXIT_INTERNAL != 1 and "Traceback" in err and "internal error (TypeError)" in err.splitlines()[-1]


# ============================================================== identifiers in image metadata
_FILM = [0]


def _film() -> Image.Image:
    """A real film, another one at each call (a build keeps one of identical images)."""
    _FILM[0] += 1
    return Image.open(slake_image(_FILM[0] % 40)).convert("L").resize((96, 80))


def _exif() -> bytes:
    exif = Image.Exif()
    exif[0x010E], exif[0x013B], exif[0x8298] = ID_NAME, ID_NUMBER, ID_NAME  # ImageDescription, Artist, Copyright
    return exif.tobytes()


def _png_with(**chunks) -> bytes:
    info = PngImagePlugin.PngInfo()
    if "text" in chunks:
        info.add_text("PatientName", ID_NAME)
    if "itxt" in chunks:
        info.add_itxt("PatientID", ID_NUMBER, lang="en", tkey="Patient")
    if "ztxt" in chunks:
        info.add_text("Comment", f"{ID_NAME} {ID_NUMBER}", zip=True)
    buf = io.BytesIO()
    _film().save(buf, format="PNG", pnginfo=info, exif=_exif() if "exif" in chunks else None,
                 icc_profile=(b"\0" * 128 + ID_NAME.encode()) if "icc" in chunks else None)
    return buf.getvalue()


def _jpeg_with(**segments) -> bytes:
    buf = io.BytesIO()
    kw = {}
    if "exif" in segments:
        kw["exif"] = _exif()
    if "comment" in segments:
        kw["comment"] = f"{ID_NAME} {ID_NUMBER}"
    if "icc" in segments:
        kw["icc_profile"] = b"\0" * 128 + ID_NAME.encode()
    if "xmp" in segments:
        kw["xmp"] = f"<x:xmpmeta><dc:creator>{ID_NAME}</dc:creator></x:xmpmeta>".encode()
    _film().save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _tiff_with_tags() -> bytes:
    buf = io.BytesIO()
    _film().save(buf, format="TIFF", tiffinfo={270: ID_NAME, 315: ID_NUMBER, 305: ID_NAME})
    return buf.getvalue()


# (kind, file name, bytes with identifiers planted)
PLANTED = [
    ("PNG tEXt", "a.png", lambda: _png_with(text=1)),
    ("PNG iTXt", "b.png", lambda: _png_with(itxt=1)),
    ("PNG zTXt", "c.png", lambda: _png_with(ztxt=1)),
    ("PNG eXIf", "d.png", lambda: _png_with(exif=1)),
    ("PNG iCCP", "e.png", lambda: _png_with(icc=1)),
    ("JPEG EXIF", "f.jpg", lambda: _jpeg_with(exif=1)),
    ("JPEG COM", "g.jpg", lambda: _jpeg_with(comment=1)),
    ("JPEG ICC", "h.jpg", lambda: _jpeg_with(icc=1)),
    ("JPEG XMP", "i.jpg", lambda: _jpeg_with(xmp=1)),
    ("TIFF tags", "j.tif", _tiff_with_tags),
]
_HARMLESS_INFO = {"dpi", "jfif", "jfif_version", "jfif_unit", "jfif_density", "progressive", "progression", "gamma",
                  "srgb", "chromaticity", "adobe", "adobe_transform", "compression", "resolution"}


def assert_pixels_only(data: bytes, where: str) -> None:
    """No identifier in the bytes (plain or compressed) nor in what Pillow reads from them."""
    for s in (ID_NAME, ID_NUMBER, "Marchbanks"):
        assert s.encode() not in data, f"{s!r} in {where}"
    img = Image.open(io.BytesIO(data))
    assert set(img.info) <= _HARMLESS_INFO, f"{where}: metadata {sorted(set(img.info) - _HARMLESS_INFO)}"
    assert len(img.getexif()) == 0, f"{where}: EXIF"


@pytest.mark.parametrize("kind, name, make", PLANTED, ids=[p[0] for p in PLANTED])
def test_decoded_and_stored_images_carry_pixels_only(kind, name, make):
    from regionmed.data.decode import decode_image
    from regionmed.data.metadata import has_metadata, png_bytes, strip_metadata
    from regionmed.inference import load_image

    raw = make()
    assert ID_NAME.encode() in raw or ID_NUMBER.encode() in raw or kind in ("PNG zTXt", "PNG iCCP")  # planted
    img, info = decode_image(raw)
    assert img.info == {} and not info["as_is"]  # never stored as it is
    assert load_image(raw).info == {}
    assert_pixels_only(png_bytes(img), f"{kind}: PNG from the decoded pixels")
    if name.endswith((".png", ".jpg")):
        assert has_metadata(raw)
        clean = strip_metadata(raw)
        assert_pixels_only(clean, f"{kind}: stripped")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(clean))), np.asarray(Image.open(io.BytesIO(raw))))
        assert info["as_is_stripped"] and not has_metadata(clean) and decode_image(clean)[1]["as_is"]


def test_shards_overlays_and_the_web_page_carry_pixels_only(model, tmp_path, capsys):
    from regionmed.apps.curation.builder import build
    from regionmed.apps.curation.config import BuildConfig, SourceSpec

    src = tmp_path / "src"
    src.mkdir()
    rows = []
    for kind, name, make in PLANTED:
        (src / name).write_bytes(make())
        rows.append({"image": name, "report": "Clear lungs.", "patient_id": f"p{len(rows)}"})
    (src / "table.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ds"
    build(BuildConfig(out=str(out), workers=0, progress=False, sources=[SourceSpec("generic", str(src))]), log=lambda s: None)
    import tarfile

    members = 0
    for tar in out.glob("**/*.tar"):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith((".png", ".jpg")):
                    assert_pixels_only(tf.extractfile(m).read(), f"shard member {m.name}")
                    members += 1
    assert members == len(PLANTED)

    only = tmp_path / "only-images"
    shutil.copytree(src, only, ignore=shutil.ignore_patterns("*.jsonl"))
    rc, _, _ = run(capsys, "ground", model, only, "--phrase", "liver", "--out", tmp_path / "g")
    overlays = sorted((tmp_path / "g").glob("*.png"))
    assert rc == 0 and len(overlays) == len(PLANTED)
    for png in overlays:
        assert_pixels_only(png.read_bytes(), f"overlay {png.name}")

    gr = pytest.importorskip("gradio")
    from regionmed.apps.serve import DemoBackend

    backend = DemoBackend(Predictor.from_pretrained(model))
    page_image = gr.Image(format="png")
    control = Image.open(io.BytesIO(_png_with(text=1)))
    control.load()
    assert ID_NAME.encode() in Path(page_image.postprocess(control).path).read_bytes()  # Gradio copies PNG text
    for kind, name, _ in PLANTED:
        upload = tmp_path / f"upload-{name}"
        shutil.copy(src / name, upload)
        image, message = backend.load_upload(str(upload))
        assert image is not None and image.info == {}, message
        assert_pixels_only(Path(page_image.postprocess(image).path).read_bytes(), f"page image of {kind}")
        overlays, *_ = backend.ground(image, "liver", 0.5, 0.5)
        assert overlays and all(o.info == {} for o, _ in overlays)
