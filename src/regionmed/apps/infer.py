"""The inference commands: ``regionmed embed``, ``classify``, ``ground``, ``index``, ``search``.

Thin applications over the library (:mod:`regionmed.inference`, :mod:`regionmed.index`).
Inputs (``INPUT...``): image files (PNG, JPEG, any Pillow format, DICOM), folders
(searched recursively: :func:`regionmed.data.listing.list_folder`), text files listing
one image path per line (``.txt`` / ``.lst``; relative paths are relative to the list),
or a MedRegion dataset folder (``manifest.json``) with ``--split``. Every input, and
every entry of an input folder, ends in the output or in ``problems.jsonl`` / the
problems printed on stderr, with its reason: a bad image, a file that is not an image
(``not_an_image``, ``unsupported_format``), a symbolic-link loop is listed and the others
are processed.

Outputs (:mod:`regionmed.outputs`): a folder (``embed --out``, ``ground --out``, ``index
--index``) is written as a whole and replaces the previous one atomically; a file
(``classify --out``, ``search --json``) is replaced by one rename; one writer at a time
(a second waits; two ``index --add`` runs add one after the other). An output that is,
holds or lies inside an input (the model folder, an input folder or image, a list, boxes,
labels or prompts file) is refused, as is a folder output that names a file or a folder of
other files. File names that are not UTF-8 are kept (:mod:`regionmed.io`: ``\\udcNN`` in
JSON, ``\\xNN`` in CSV / Parquet / printed text).

Exit status: 0 all inputs used, 1 some inputs were problems, 2 the command could not
run (a one-line error), 70 an unexpected error (a bug; the traceback is printed).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from regionmed.data.decode import DEFAULT_MAX_PIXELS
from regionmed.data.metadata import save_png
from regionmed.errors import RegionmedError
from regionmed.io import json_dumps, printable
from regionmed.outputs import check_output, remove_file, replace_file, replace_folder, writer_lock

LIST_SUFFIXES = (".txt", ".lst")
CHUNK = 256  # images held decoded at once by the commands (the predictor batches inside a chunk)


class InferInputError(RegionmedError, ValueError):
    """A command-line input that cannot be used as a whole (a missing path, a bad list or box file)."""


@dataclass
class Item:
    """One image to process: ``id`` (stable: a path relative to its folder, the path as
    listed, or a MedRegion record id), ``source`` (a path, or ``shard:key``), ``load``
    (a path, or a callable returning a PIL image), ``boxes`` / ``labels`` (pixel xyxy)."""

    id: str
    source: str
    load: Any
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)


# -- inputs ---------------------------------------------------------------------------------
def collect_items(inputs: list[str], split: str | None = None, boxes_file: str | None = None,
                  problems: list[dict] | None = None) -> list[Item]:
    """The images that ``inputs`` name, in a stable order (folders sorted). A path that does
    not exist raises :class:`InferInputError`; a listed file that does not exist becomes a
    problem (``problems``) when a list is given, so the others still run."""
    items: list[Item] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise InferInputError(f"input {raw} does not exist")
        if path.is_dir() and (path / "manifest.json").is_file():
            items += _medregion_items(path, split or "test")
        elif path.is_dir():
            items += _folder_items(path, raw)
        elif path.suffix.lower() in LIST_SUFFIXES:
            items += _list_items(path)
        else:
            items.append(_file_item(path.name if len(inputs) == 1 else str(path), path))
    seen: dict[str, int] = {}
    for it in items:  # ids must be unique: a second "a.png" from another folder gets its source path
        if it.id in seen:
            it.id = it.source
        seen[it.id] = seen.get(it.id, 0) + 1
    dup = [k for k, n in seen.items() if n > 1]
    if dup:
        raise InferInputError(f"image {dup[0]} is given twice")
    if boxes_file:
        _attach_boxes(items, boxes_file)
    return items


def _folder_items(path: Path, raw: str) -> list[Item]:
    """Every entry of the folder ``path``: an image, or an item whose loading raises its
    problem (:func:`regionmed.data.listing.list_folder`), in the order of their ids."""
    from regionmed.data.listing import list_folder

    listing = list_folder(path)
    if not listing.images:
        if not listing.problems:
            raise InferInputError(f"folder {raw} is empty")
        first = listing.problems[0]
        raise InferInputError(f"folder {raw} holds no image file ({_n(len(listing.problems), 'other entry')}, e.g. "
                              f"{first.id}: {first.reason}: {first.detail})")
    items = [Item(rel, full, full) for rel, full in listing.images]
    items += [Item(p.id, p.path, _raiser(_listing_error(p.path, p.reason, p.detail))) for p in listing.problems]
    return sorted(items, key=lambda it: it.id.split("/"))


def _listing_error(source: str, reason: str, detail: str) -> Exception:
    from regionmed.inference import ImageInputError

    return ImageInputError(source, reason, detail)


def _file_item(item_id: str, path: Path) -> Item:
    """An input file: an image, or an item whose loading raises why it is not one."""
    from regionmed.data.listing import file_problem

    problem = file_problem(path)
    if problem:
        return Item(item_id, str(path), _raiser(_listing_error(str(path), *problem)))
    return Item(item_id, str(path), str(path))


def _list_items(path: Path) -> list[Item]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise InferInputError(f"{path}: not UTF-8 text (byte {err.start})") from err
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        full = p if p.is_absolute() else path.parent / p
        out.append(_file_item(line, full) if full.is_file() else Item(line, str(full), str(full)))
    if not out:
        raise InferInputError(f"file list {path} names no image")
    return out


def _medregion_items(root: Path, split: str) -> list[Item]:
    from regionmed.data.shards import MedRegionDataset

    ds = MedRegionDataset(root, split)
    out = []
    for i in range(len(ds)):
        where = ds.where(i)
        try:
            rec = ds.record(i)
        except RegionmedError as err:
            out.append(Item(where, where, _raiser(err)))
            continue
        regions = rec.get("regions") or []
        out.append(Item(str(rec["id"]), where, _Opener(ds, i), [list(r["box"]) for r in regions],
                        [r.get("label") or r.get("caption") for r in regions]))
    return out


class _Opener:
    def __init__(self, ds, i: int):
        self.ds, self.i = ds, i

    def __call__(self):
        return self.ds.image(self.i)


def _raiser(err: Exception):
    def load():
        raise err
    return load


def _attach_boxes(items: list[Item], boxes_file: str) -> None:
    """Boxes from a JSON file: ``{image id or path: [[x0, y0, x1, y1], ...] or [{"box": [...], "label": "..."}]}``."""
    path = Path(boxes_file)
    if not path.is_file():
        raise InferInputError(f"boxes file {boxes_file} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InferInputError(f"{boxes_file}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise InferInputError(f"{boxes_file}: expected a mapping image -> list of boxes")
    by_key = {it.id: it for it in items} | {it.source: it for it in items}
    unknown = [k for k in data if k not in by_key]
    if unknown:
        raise InferInputError(f"{boxes_file}: image {unknown[0]!r} is not among the inputs ({len(unknown)} such)")
    for key, entries in data.items():
        it = by_key[key]
        if not isinstance(entries, list):
            raise InferInputError(f"{boxes_file}: {key}: expected a list of boxes")
        it.boxes, it.labels = [], []
        for j, e in enumerate(entries):
            box, label = (e.get("box"), e.get("label")) if isinstance(e, dict) else (e, None)
            if not isinstance(box, list) or len(box) != 4:
                raise InferInputError(f"{boxes_file}: {key}: box #{j} is not [x0, y0, x1, y1]")
            if label is not None and not isinstance(label, str):
                raise InferInputError(f"{boxes_file}: {key}: box #{j}'s label {label!r} is not a string")
            it.boxes.append(box)
            it.labels.append(label)


def _load_or_problem(predictor, it: Item):
    """(image or None, problem or None): a callable loader's failure is a problem too."""
    from regionmed.inference import ImageInputError

    if callable(it.load):
        try:
            return predictor.load_image(it.load(), it.source), None
        except (ImageInputError, RegionmedError, OSError, ValueError) as err:
            return None, _error_row(it, err)
    return it.load, None


def _error_row(it: Item, err: Exception) -> dict:
    """A problems-list row for ``it`` that failed with ``err`` (its ``reason``, else ``unreadable_image``)."""
    from regionmed.inference import Problem

    return _problem_row(it, Problem(-1, it.source, getattr(err, "reason", None) or "unreadable_image", str(err)))


def _problem_row(it: Item, problem) -> dict:
    """A problems-list row for ``it``: its id plus the library's :class:`~regionmed.inference.Problem`
    (source, reason, detail, box when it is a box's problem)."""
    row = problem.to_dict()
    row.pop("index", None)
    return {"id": it.id, **row}


def _ready_chunks(predictor, items: list[Item]) -> Iterator[tuple[list[Item], list[tuple[Item, Any]], list[dict]]]:
    """``items`` in chunks of ``CHUNK``: yields (the chunk, its loaded (item, image) pairs,
    problems of the items that could not be loaded)."""
    for start in range(0, len(items), CHUNK):
        chunk = items[start: start + CHUNK]
        problems, ready = [], []
        for it in chunk:
            image, prob = _load_or_problem(predictor, it)
            if prob:
                problems.append(prob)
            else:
                ready.append((it, image))
        yield chunk, ready, problems


def embed_items(predictor, items: list[Item], use_boxes: bool = True, progress: bool = True) -> Iterator[tuple[list[Item], Any, list[dict]]]:
    """Embed ``items`` chunk by chunk: yields (items embedded, ImageEmbeddingResult, problems)."""
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc="embed", unit="img", disable=not (progress and sys.stderr.isatty()))
    for chunk, ready, problems in _ready_chunks(predictor, items):
        res = predictor.embed_images([im for _, im in ready], [it.boxes for it, _ in ready] if use_boxes else None,
                                     names=[it.source for it, _ in ready], errors="skip")
        problems += [_problem_row(ready[p.index][0], p) for p in res.problems]
        bar.update(len(chunk))
        yield [ready[i][0] for i in res.indices], res, problems
    bar.close()


def _predictor(args):
    from regionmed.inference import Predictor

    if args.batch_size < 1:
        raise InferInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise InferInputError(f"--max-pixels must be >= 1 (width x height), got {args.max_pixels}")

    return Predictor.from_pretrained(args.model, device=args.device, batch_size=args.batch_size, max_pixels=args.max_pixels)


def _jsonl(rows: list[dict]) -> str:
    """JSON Lines text (undecodable file-name bytes as ``\\udcNN`` escapes: :func:`regionmed.io.json_dumps`)."""
    return "".join(json_dumps(r) + "\n" for r in rows)


def _inputs_of(args, items: list[Item] = ()) -> list[tuple[str, str]]:
    """Everything a command reads, as ``(what, path)`` for :func:`regionmed.outputs.check_output`."""
    found = [("the model folder", args.model)] if getattr(args, "model", None) else []
    found += [("input", raw) for raw in getattr(args, "inputs", None) or []]
    for attr, what in (("boxes", "the --boxes file"), ("labels_file", "the --labels-file"), ("prompts", "the --prompts file"),
                       ("phrases_file", "the --phrases-file"), ("image", "the --image")):
        value = getattr(args, attr, None)
        if isinstance(value, str) and value:
            found.append((what, value))
    found += [("input image", it.load) for it in items if isinstance(it.load, str)]
    return found


def _owned_by(marker: str):
    """``owned`` for :func:`regionmed.outputs.replace_folder`: a folder holding ``marker``."""
    return lambda folder: (Path(folder) / marker).is_file()


def _report_problems(problems: list[dict], out: Path | None, command: str) -> None:
    """Print the first problems on stderr (``out``: where they were written, for the last line)."""
    for p in problems[:20]:
        print(f"regionmed {command}: problem: {p['detail']}", file=sys.stderr)
    if len(problems) > 20:
        print(f"regionmed {command}: ... {len(problems) - 20} more problems{f' in {out}' if out else ''}", file=sys.stderr)


# -- embed -----------------------------------------------------------------------------------
def cmd_embed(args: argparse.Namespace) -> int:
    if args.format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as err:
            raise InferInputError("--format parquet needs pyarrow (pip install pyarrow); the default npz needs nothing") from err
    items = collect_items(args.inputs, args.split, args.boxes)
    out = check_output(args.out, inputs=_inputs_of(args, items), owned=_owned_by("embed.json"), what="embed output folder")
    predictor = _predictor(args)
    ids, sources, sizes, glob, fused, problems = [], [], [], [], [], []
    region_rows, region_vecs = [], []
    for done, res, probs in embed_items(predictor, items, not args.no_boxes, not args.no_progress):
        problems += probs
        for n, it in enumerate(done):
            ids.append(it.id)
            sources.append(it.source)
            sizes.append(res.sizes[n])
            for j, box in enumerate(res.boxes[n]):
                if box is None:
                    continue
                region_rows.append({"id": f"{it.id}#{j}", "image_id": it.id, "box": box,
                                    **({"label": it.labels[j]} if j < len(it.labels) and it.labels[j] else {})})
                region_vecs.append(res.roi[n][j].numpy())
        glob.append(res.global_.numpy())
        fused.append(res.fused.numpy())
    d = predictor.embed_dim
    arrays = {
        "image_global": np.concatenate(glob) if glob else np.zeros((0, d), np.float32),
        "image_fused": np.concatenate(fused) if fused else np.zeros((0, d), np.float32),
        "region": np.stack(region_vecs).astype(np.float32) if region_vecs else np.zeros((0, d), np.float32),
    }
    image_rows = [{"row": i, "id": ids[i], "source": sources[i], "width": sizes[i][0], "height": sizes[i][1]} for i in range(len(ids))]
    for i, r in enumerate(region_rows):
        r["row"] = i
    fmt = args.format
    with replace_folder(out, owned=_owned_by("embed.json"), what="embed output folder", flag="--out") as tmp:
        if fmt == "parquet":
            _write_parquet(tmp, arrays, image_rows, region_rows)
        else:
            np.savez(tmp / "embeddings.npz", **arrays, image_id=np.array(ids, dtype=object).astype(str),
                     region_id=np.array([r["id"] for r in region_rows], dtype=object).astype(str))
        (tmp / "images.jsonl").write_text(_jsonl(image_rows), encoding="utf-8")
        (tmp / "regions.jsonl").write_text(_jsonl(region_rows), encoding="utf-8")
        (tmp / "problems.jsonl").write_text(_jsonl(problems), encoding="utf-8")
        (tmp / "embed.json").write_text(json_dumps({"model": str(args.model), "model_id": predictor.model_id, "dim": d,
                                                    "images": len(ids), "regions": len(region_rows), "problems": len(problems),
                                                    "format": fmt, "normalised": "L2 (cosine = dot product)"}, indent=2),
                                        encoding="utf-8")
    _report_problems(problems, out / "problems.jsonl", "embed")
    note = f"; {len(problems)} problems in {out / 'problems.jsonl'}" if problems else ""
    print(f"embedded {_n(len(ids), 'image')} and {_n(len(region_rows), 'region')} (dim {d}) into {out}{note}")
    return 1 if problems else 0


def _write_parquet(out: Path, arrays: dict, image_rows: list[dict], region_rows: list[dict]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise InferInputError("--format parquet needs pyarrow (pip install pyarrow); the default npz needs nothing") from err
    img = {"id": [printable(r["id"]) for r in image_rows], "source": [printable(r["source"]) for r in image_rows],
           "global": list(arrays["image_global"]), "fused": list(arrays["image_fused"])}
    pq.write_table(pa.table(img), out / "images.parquet")
    reg = {"id": [printable(r["id"]) for r in region_rows], "image_id": [printable(r["image_id"]) for r in region_rows],
           "box": [r["box"] for r in region_rows], "embedding": list(arrays["region"])}
    pq.write_table(pa.table(reg), out / "regions.parquet")


# -- classify --------------------------------------------------------------------------------
def _read_labels(args) -> tuple[Any, bool]:
    multi = bool(args.multi_label)
    if args.labels and args.labels_file:
        raise InferInputError("give --labels or --labels-file, not both")
    if args.labels:
        names = [x.strip() for x in args.labels.split(",")]
        if any(not x for x in names):
            raise InferInputError(f"--labels {args.labels!r} has an empty label")
        return names, multi
    if not args.labels_file:
        raise InferInputError("no labels: give --labels a,b,c or --labels-file labels.yaml")
    import yaml

    path = Path(args.labels_file)
    if not path.is_file():
        raise InferInputError(f"labels file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise InferInputError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if isinstance(data, dict) and "labels" in data:
        multi = multi or bool(data.get("multi_label", False))
        data = data["labels"]
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return data, multi
    if isinstance(data, dict) and all(isinstance(v, (str, list)) for v in data.values()):
        return {str(k): v for k, v in data.items()}, multi
    raise InferInputError(f"{path}: expected a list of labels, a mapping label -> prompts, or {{labels: ..., multi_label: ...}}")


def cmd_classify(args: argparse.Namespace) -> int:
    labels, multi = _read_labels(args)
    items = collect_items(args.inputs, args.split, None)
    out = check_output(args.out, kind="file", inputs=_inputs_of(args, items))
    probs_path = out.with_suffix(".problems.jsonl")
    check_output(probs_path, kind="file", inputs=_inputs_of(args, items), flag="--out's problems file")
    predictor = _predictor(args)
    class_prompts = predictor.class_prompts(labels, args.prompts)
    predictor._check_label_prompts(class_prompts, args.truncate)  # before any image work: a clear error at once
    problems, rows = [], []
    for _, ready, probs in _ready_chunks(predictor, items):
        problems += probs
        res = predictor.classify([im for _, im in ready], class_prompts, multi_label=multi, truncate=args.truncate,
                                 names=[it.source for it, _ in ready], errors="skip", progress=not args.no_progress and sys.stderr.isatty())
        problems += [_problem_row(ready[p.index][0], p) for p in res.problems]
        for n, i in enumerate(res.indices):
            top, score = res.top(n)
            rows.append([ready[i][0].id, *[f"{v:.6f}" for v in res.scores[n]], top])
    with writer_lock(out):  # the CSV and its problems file: one writer at a time
        if problems:
            with replace_file(probs_path) as tmp:
                tmp.write_text(_jsonl(problems), encoding="utf-8")
        else:  # a previous run's problems are not this run's
            remove_file(probs_path)
        with replace_file(out, flag="--out") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow([printable(c) for c in ["id", *class_prompts, "top_label"]])
            w.writerows([[printable(str(c)) for c in row] for row in rows])
    _report_problems(problems, probs_path if problems else None, "classify")
    kind = "cosine similarity per label (multi-label)" if multi else "softmax probabilities"
    print(f"classified {_n(len(rows), 'image')} into {_n(len(class_prompts), 'label')} ({kind}): {out}"
          f"{f'; {len(problems)} problems in {probs_path}' if problems else ''}")
    return 1 if problems else 0


# -- ground ----------------------------------------------------------------------------------
OVERLAY_MAX_SIDE = 2048  # `regionmed ground` draws its overlays at most this large (--max-side)


def overlay(image, heatmap: np.ndarray, box: list[float], peak, opacity: float = 0.45, max_side: int = OVERLAY_MAX_SIDE):
    """An RGB PIL image at ``image``'s size scaled to at most ``max_side`` pixels on the long
    side: ``image`` in gray, ``heatmap`` ([0, 1], at the image's or the overlay's size) in the
    jet colour map blended at ``opacity`` everywhere, the box in red and the peak as a white
    cross (the library's :func:`regionmed.eval.overlay.render_overlay`)."""
    from regionmed.eval.overlay import render_overlay

    return render_overlay(image, heatmap, box=box, peak=peak, threshold=0.0, opacity=opacity, cmap="jet", gray=True,
                          color=(255, 0, 0), peak_color=(255, 255, 255), max_side=max_side)


def _slug(text: str, n: int = 40) -> str:
    s = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    while "--" in s:
        s = s.replace("--", "-")
    return s[:n] or "phrase"


def cmd_ground(args: argparse.Namespace) -> int:
    phrases = list(args.phrase or [])
    if args.phrases_file:
        try:
            text = Path(args.phrases_file).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            raise InferInputError(f"phrases file {args.phrases_file}: cannot be read as UTF-8 text ({err})") from err
        phrases += [ln.strip() for ln in text.splitlines() if ln.strip()]
    from regionmed.inference import TextInputError

    for flag, value in (("--threshold", args.threshold), ("--opacity", args.opacity)):
        if not 0.0 <= value <= 1.0:  # NaN too
            raise InferInputError(f"{flag} must be a number in [0, 1], got {value}")
    if args.max_side < 16:
        raise InferInputError(f"--max-side must be >= 16 pixels, got {args.max_side}")
    if not phrases:
        raise TextInputError("the phrase list is empty: give --phrase TEXT (repeatable) or --phrases-file")
    items = collect_items(args.inputs, args.split, None)
    out = check_output(args.out, inputs=_inputs_of(args, items), owned=_owned_by("groundings.json"),
                       what="ground output folder")
    predictor = _predictor(args)
    predictor._check_texts(phrases, "phrase", args.truncate)  # before any image work: a clear error at once
    results, problems = [], []
    from tqdm import tqdm

    from regionmed.inference import ImageInputError

    with replace_folder(out, owned=_owned_by("groundings.json"), what="ground output folder", flag="--out") as tmp:
        for k, it in enumerate(tqdm(items, desc="ground", unit="img", disable=args.no_progress or not sys.stderr.isatty())):
            image, prob = _load_or_problem(predictor, it)
            if prob:
                problems.append(prob)
                continue
            try:
                image = predictor.load_image(image, it.source)
                found = predictor.ground(image, phrases, args.read_out, threshold=args.threshold, truncate=args.truncate)
            except ImageInputError as err:
                problems.append(_error_row(it, err))
                continue
            stem = f"{k:04d}-{_slug(Path(it.id).stem)}" if len(items) > 1 else _slug(Path(it.id).stem)
            entry = {"id": it.id, "size": list(image.size), "phrases": []}
            for t, g in enumerate(found):
                png = tmp / f"{stem}_{t:02d}_{_slug(g.phrase)}.png"
                save_png(overlay(image, g.heatmap_at(args.max_side), g.box, g.peak, args.opacity, args.max_side), png)
                entry["phrases"].append({**g.to_dict(), "overlay": png.name})
            results.append(entry)
        (tmp / "groundings.json").write_text(json_dumps({"model_id": predictor.model_id, "images": results,
                                                         "problems": problems}, indent=2), encoding="utf-8")
    _report_problems(problems, None, "ground")
    print(f"grounded {len(phrases)} phrase(s) in {len(results)} image(s): overlays and groundings.json in {out}"
          f"{f'; {len(problems)} problems' if problems else ''}")
    return 1 if problems else 0


# -- index / search --------------------------------------------------------------------------
def _n(count: int, word: str) -> str:
    """``1 image``, ``2 images``: the plural only when the count is not 1."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def _absolute_source(source: str) -> str:
    """An index's ``source``: an absolute file path, or ``<absolute shard path>:<key>``, so
    that the index works from any directory (a path relative to the working directory
    would only resolve where the index was built)."""
    if os.path.exists(source):
        return str(Path(source).resolve())
    shard, sep, key = source.rpartition(":")
    if sep and shard and os.path.exists(shard):
        return f"{Path(shard).resolve()}:{key}"
    return source


def _content_hash(it: Item) -> str | None:
    """SHA-256 of a file input's bytes (None for a shard sample or an unreadable file)."""
    if not isinstance(it.load, str):
        return None
    h = hashlib.sha256()
    try:
        with open(it.load, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def cmd_index(args: argparse.Namespace) -> int:
    from regionmed.index import INDEX_FILE

    folder = Path(args.index)
    items = collect_items(args.inputs, args.split, args.boxes)
    check_output(folder, inputs=_inputs_of(args, items), owned=_owned_by(INDEX_FILE), what="retrieval index folder",
                 flag="--index")
    # One writer of the index at a time, from the check of what it holds to the save: two
    # `--add` runs at once add one after the other (the second waits), and both keep their images.
    with writer_lock(folder):
        return _index_locked(args, folder, items)


def _index_locked(args: argparse.Namespace, folder: Path, items: list[Item]) -> int:
    from regionmed.index import INDEX_FILE, EmbeddingIndex

    exists = (folder / INDEX_FILE).is_file()
    if exists and not args.add:
        raise InferInputError(f"{folder} already holds an index: pass --add to add to it, or choose another folder")
    if args.add and not exists:
        raise InferInputError(f"--add: {folder} holds no index ({INDEX_FILE} is missing): build one first without --add")
    for it in items:
        it.source = _absolute_source(it.source)
    predictor = _predictor(args)
    if args.add:
        index = EmbeddingIndex.load(folder)
        index.check_model(predictor.model_id, predictor.embed_dim, f"model {args.model}'s embeddings")
        index.search_mode = args.search or index.search_mode
    else:
        index = EmbeddingIndex.create(predictor, search=args.search or "auto")
    index.extra.setdefault("model_path", str(Path(args.model).resolve()))
    have = {m["id"]: m for m in index.metadata("image")}
    hashes = {it.id: _content_hash(it) for it in items}
    skipped = []
    for it in items:  # an id already indexed: the same image (same source or same bytes) is skipped, another one refused
        m = have.get(it.id)
        if m is None:
            continue
        same_source = m.get("source") == it.source or _absolute_source(str(m.get("source", ""))) == it.source
        same_bytes = hashes[it.id] is not None and m.get("sha256") == hashes[it.id]
        if not (same_source or same_bytes):
            raise InferInputError(f"image id {it.id!r} is already in {folder} for another image ({m.get('source')}; "
                                  f"this one is {it.source}): ids are paths relative to the input folder, so two "
                                  "folders with the same file names clash; index this folder into another index, or "
                                  "rename its files")
        skipped.append(it)
    items = [it for it in items if it.id not in have]
    problems, added = [], {"image": 0, "region": 0}
    for done, res, probs in embed_items(predictor, items, not args.no_boxes, not args.no_progress):
        problems += probs
        n = index.add_embeddings(res, ids=[it.id for it in done], sources=[it.source for it in done],
                                 labels=[it.labels for it in done], model_id=predictor.model_id,
                                 hashes=[hashes[it.id] for it in done])
        added["image"] += n["image"]
        added["region"] += n["region"]
    index.save(folder, extra_files={"problems.jsonl": _jsonl(problems)} if problems else None)
    _report_problems(problems, folder / "problems.jsonl" if problems else None, "index")
    print(f"{'added' if args.add else 'indexed'} {_n(added['image'], 'image')} and {_n(added['region'], 'region')} "
          f"({index.count('image')} / {index.count('region')} in {folder})"
          f"{f'; {len(skipped)} already indexed, left as they were' if skipped else ''}"
          f"{'; ' + _n(len(problems), 'problem') if problems else ''}")
    if index.search_mode == "ivf" and not index.approximate:
        print("exact search: ivf needs at least 1,000 vectors of a kind (k-means cells); it is built once a kind has them")
    for kd, a in index.approximate.items():
        print(f"{kd}: approximate search (IndexIVFFlat, {a['nlist']} cells, nprobe {a['nprobe']}): recall@10 "
              f"{a['recall_at_10']:.3f} against exact search on {a['queries']} held-out vectors")
    return 1 if problems else 0


def _parse_box(text: str) -> list[float]:
    """``--box x0,y0,x1,y1`` as four finite numbers (pixels); :class:`InferInputError` otherwise."""
    parts = [v.strip() for v in text.split(",")]
    try:
        box = [float(v) for v in parts]
    except ValueError:
        bad = next(v for v in parts if not _is_number(v))
        raise InferInputError(f"--box {text!r}: {bad!r} is not a number (expected x0,y0,x1,y1 in pixels)") from None
    if len(box) != 4:
        raise InferInputError(f"--box {text!r} has {len(box)} values, not 4 (x0,y0,x1,y1 in pixels)")
    if not all(math.isfinite(v) for v in box):
        raise InferInputError(f"--box {text!r}: every value must be a finite number (x0,y0,x1,y1 in pixels)")
    return box


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def cmd_search(args: argparse.Namespace) -> int:
    from regionmed.index import EmbeddingIndex

    if bool(args.text) == bool(args.image):
        raise InferInputError("give one query: --text TEXT or --image PATH")
    if args.k < 1:
        raise InferInputError(f"-k must be >= 1, got {args.k}")
    box = _parse_box(args.box) if args.box else None
    if box is not None and not args.image:
        raise InferInputError("--box goes with --image (a region of the query image)")
    index = EmbeddingIndex.load(args.index)
    model = args.model or index.extra.get("model_path")
    if not model:
        raise InferInputError(f"no --model given and {args.index} does not record the model that built it")
    args.model = model
    if args.json:
        check_output(args.json, kind="file", inputs=[("the index folder", args.index), *_inputs_of(args)], flag="--json")
    predictor = _predictor(args)
    if args.text:
        hits = index.search_text(predictor, args.text, args.k, args.kind, truncate=args.truncate)[0]
        query = {"text": args.text}
    else:
        hits = index.search_image(predictor, args.image, args.k, args.kind, box=box)[0]
        query = {"image": args.image, **({"box": box} if box else {})}
    payload = {"query": query, "kind": args.kind, "k": args.k, "hits": [h.to_dict() for h in hits]}
    if args.json:
        with replace_file(args.json, flag="--json") as tmp:
            tmp.write_text(json_dumps(payload, indent=2), encoding="utf-8")
    if args.format == "json":
        print(json.dumps(payload, indent=2))
    else:
        print(f"{'rank':>4}  {'score':>7}  {'kind':6}  {'id':40}  box")
        for r, h in enumerate(hits, 1):
            box = "" if h.box is None else "[" + ", ".join(f"{v:.0f}" for v in h.box) + "]"
            label = f"  ({h.label})" if h.label else ""
            print(f"{r:>4}  {h.score:7.4f}  {h.kind:6}  {printable(h.id)[:40]:40}  {box}{label}")
        if not hits:
            print("(the index is empty)")
    return 0


# -- parsers ---------------------------------------------------------------------------------
def _cli_words(func):
    """Run a command, wording the library's text errors for the command line (its
    ``truncate=True`` is the commands' ``--truncate``)."""
    import functools

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from regionmed.inference import TextInputError

        try:
            return func(args)
        except TextInputError as err:
            text = str(err).replace("pass truncate=True to cut it", "pass --truncate to cut it")
            if text == str(err):
                raise
            raise TextInputError(text) from err
    return run



_INPUTS_HELP = ("images, folders (searched recursively), .txt lists (one path a line) or a MedRegion dataset "
                "folder (with --split); PNG, JPEG, other Pillow formats and single-frame DICOM")


def _common(p: argparse.ArgumentParser, inputs: bool = True) -> None:
    if inputs:
        p.add_argument("model", help="a saved model folder (regionmed.load)")
        p.add_argument("inputs", nargs="+", metavar="INPUT", help=_INPUTS_HELP)
        p.add_argument("--split", default=None, help="the split of a MedRegion dataset input (default test)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help=f"largest image accepted, width x height (default {DEFAULT_MAX_PIXELS:,}, the library's and "
                        "`regionmed serve`'s default); larger ones are problems")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none is shown when stderr is not a terminal)")


def add_infer_parsers(sub) -> None:
    """Register ``embed``, ``classify``, ``ground``, ``index`` and ``search``."""
    p = sub.add_parser("embed", help="embed images and their boxes with a trained model (npz + JSONL ids)",
                       description="Embed images (whole image: global and fused; each given box: its ROI embedding) and write "
                                   "OUT/embeddings.npz (image_global, image_fused (N, D), region (R, D), image_id, region_id; "
                                   "L2-normalised float32), OUT/images.jsonl and OUT/regions.jsonl (ids, sources, sizes, boxes), "
                                   "OUT/problems.jsonl (inputs not used, with reasons) and OUT/embed.json. "
                                   "--format parquet writes images.parquet / regions.parquet instead of the npz (needs pyarrow).")
    _common(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--boxes", help="JSON {image id or path: [[x0,y0,x1,y1], ...] or [{box, label}]} (pixel boxes); "
                                   "a MedRegion input brings its own")
    p.add_argument("--no-boxes", action="store_true", help="image level only (ignore boxes)")
    p.add_argument("--format", choices=("npz", "parquet"), default="npz", help="array file format (default npz)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("classify", help="zero-shot classify images against labels (CSV of scores)",
                       description="Zero-shot classification with prompt ensembles (eval/prompts/default.yaml, or --prompts). "
                                   "Single-label: softmax probabilities over the labels. --multi-label: each label's cosine "
                                   "similarity with the image (uncalibrated scores for ranking). Writes a CSV: id, one column per "
                                   "label, top_label; problems in <out>.problems.jsonl.")
    _common(p)
    p.add_argument("--labels", help="comma-separated labels, e.g. pneumonia,normal")
    p.add_argument("--labels-file", help="YAML: a list of labels, a mapping label -> list of prompts, or {labels: ..., multi_label: true}")
    p.add_argument("--multi-label", action="store_true", help="score each label on its own (cosine similarity)")
    p.add_argument("--prompts", help="a prompt YAML with the layout of eval/prompts/default.yaml")
    p.add_argument("--truncate", action="store_true", help="cut prompts longer than the text context instead of stopping")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.set_defaults(func=_cli_words(cmd_classify))

    p = sub.add_parser("ground", help="ground phrases in images (heatmap overlay PNGs + JSON boxes)",
                       description="For each image and phrase: a similarity heatmap, its peak, a box and a "
                                   "score (windows through the model's region path, or the patch map; an image larger than "
                                   "the model needs is read out scaled down, so memory does not grow with its pixels). Writes "
                                   "OUT/<image>_<n>_<phrase>.png overlays (heatmap, red box, white cross at the peak; at most "
                                   "--max-side pixels) and OUT/groundings.json (boxes and peaks in the image's own pixels).")
    _common(p)
    p.add_argument("--phrase", action="append", help="a phrase to ground (repeatable)")
    p.add_argument("--phrases-file", help="a text file with one phrase a line")
    p.add_argument("--read-out", choices=("auto", "windows", "patch"), default="auto",
                   help="windows (region path), patch (patch-text map), auto: patch when the model has a grid head "
                        "(model.dense, trained by the grounding term), else windows when it has a region path")
    p.add_argument("--threshold", type=float, default=0.5, help="patch read-out: box threshold between the map's min and max (default 0.5)")
    p.add_argument("--opacity", type=float, default=0.45, help="heatmap opacity in the overlays (default 0.45)")
    p.add_argument("--max-side", type=int, default=OVERLAY_MAX_SIDE,
                   help=f"overlays are drawn at most this many pixels on the long side (default {OVERLAY_MAX_SIDE}; "
                        "boxes and peaks in groundings.json stay in the image's own pixels)")
    p.add_argument("--truncate", action="store_true", help="cut phrases longer than the text context instead of stopping")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cli_words(cmd_ground))

    p = sub.add_parser("index", help="build (or --add to) a FAISS index of images and regions",
                       description="Embed images and their boxes and store them in a FAISS index folder (inner product "
                                   "over L2-normalised vectors = cosine; exact, or approximate at scale: --search) with a metadata sidecar (ids, sources, boxes, labels). "
                                   "--add adds to an existing index built by the same model (which must exist): an image whose id "
                                   "(its path relative to the input folder) is already indexed is left as it is when it is the "
                                   "same image (same absolute path or same bytes), and refused (exit 2, naming both files) when "
                                   "it is another one, e.g. a second folder with the same file names: index that into another "
                                   "index. Sources are stored as absolute paths, so the index works from any directory. The "
                                   "folder is replaced as a whole when the run is done; two runs on one index take turns (the "
                                   "second waits), so both keep their images. Needs faiss: pip install 'regionmed[index]'.")
    _common(p)
    p.add_argument("--index", required=True, help="index folder")
    p.add_argument("--add", action="store_true", help="add to the index in --index (else it must not exist)")
    p.add_argument("--search", choices=("auto", "exact", "ivf"), default=None,
                   help="FAISS index per kind: exact (IndexFlatIP), ivf (IndexIVFFlat, nprobe tuned to recall@10 >= 0.95 "
                        "against exact search on held-out vectors, recorded in index.json) or auto: exact below 100,000 "
                        "vectors of a kind, ivf from there; a kind under 1,000 vectors is always exact (default: auto for a new "
                        "index, the index's own with --add)")
    p.add_argument("--boxes", help="JSON {image id or path: [[x0,y0,x1,y1], ...] or [{box, label}]}")
    p.add_argument("--no-boxes", action="store_true", help="image level only")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="search an index by text or image (top-k images and regions)",
                       description="Query an index folder with a text or an image (optionally one --box of it); prints the "
                                   "top-k images and regions with their boxes as a table (or JSON).")
    p.add_argument("index", help="index folder (regionmed index)")
    p.add_argument("--model", help="model folder (default: the one that built the index, as recorded in it)")
    p.add_argument("--text", help="text query")
    p.add_argument("--image", help="image query (a file)")
    p.add_argument("--box", help="with --image: x0,y0,x1,y1 of a region to search by")
    p.add_argument("-k", "--k", type=int, default=10, help="results (default 10)")
    p.add_argument("--kind", choices=("both", "image", "region"), default="both", help="what to return (default both)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="stdout format (default table)")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--truncate", action="store_true", help="cut a text longer than the context instead of stopping")
    _common(p, inputs=False)
    p.set_defaults(func=_cli_words(cmd_search))

