"""A FAISS retrieval index over images and their regions, with a metadata sidecar.

>>> from regionmed.index import EmbeddingIndex
>>> idx = EmbeddingIndex.create(predictor)                  # model id + embedding size from the predictor
>>> idx.add_embeddings(predictor.embed_images(paths, boxes), ids=paths)
>>> idx.save("runs/index")
>>> idx = EmbeddingIndex.load("runs/index")
>>> hits = idx.search_text(predictor, "left pleural effusion", k=5)[0]   # images and regions, best first

Vectors are the model's L2-normalised embeddings, so the inner product FAISS
computes is the cosine similarity (the score of every :class:`Hit`). Two FAISS
indexes are kept, one per ``kind``: ``image`` (one vector per image: its ``global_``
embedding, the whole image, so that an image query — embedded without boxes — and the
indexed images are compared on the same footing whatever boxes were indexed) and
``region`` (one vector per box: its ROI embedding, which carries the region-aware
part); ``kind="both"`` searches both and merges by score.

**FAISS index type** (``search``, per kind): ``exact`` is ``IndexFlatIP`` (exact inner
product): no training, adding is exact and order-independent, the results are the true
top-k, and its cost is linear (one pass over every vector per query batch: about 0.5 s per
query at 1M vectors of D = 512 on a 2-core CPU). ``ivf`` is ``IndexIVFFlat`` (inverted file
over k-means cells, Jégou et al. 2011, as FAISS implements it): a query scans only the
``nprobe`` cells nearest to it. ``auto`` (the default) is ``exact`` below
:data:`EXACT_BELOW` vectors of a kind and ``ivf`` from there on. An ``ivf`` kind is built at
save time from the vectors (``nlist`` ≈ 2·√N cells, k-means on the vectors less a held-out
sample), and its ``nprobe`` is the smallest power of two whose **recall@10 against exact
search** reaches :data:`TARGET_RECALL` on those held-out vectors used as queries (each
query's own row left out of both result lists); nprobe, recall and the number of queries are
recorded in ``index.json`` (``approximate``) and measured again at every save (``--add``
included: new vectors go to the cells they fall in and join the queries, which were never in
the k-means sample; the cells are trained again once a kind has grown 4x since they were).
A kind under 1,000 vectors is exact whatever the mode. Index folders written before the modes
existed load as ``exact``. ``benchmarks/bench_index.py`` measures recall and latency at 1M
vectors.

Folder layout (``save`` / ``load``): ``index.json`` (format version, model id,
embedding size, counts, FAISS type), ``image.faiss`` / ``region.faiss`` (FAISS's own
binary format, ``faiss.write_index``; no pickle) and ``image.jsonl`` /
``region.jsonl`` (one metadata object per vector, in FAISS row order: ``id``,
``source``, ``kind``, ``box`` (regions: pixel xyxy), ``label`` / ``caption`` when
known, ``image_id`` (regions: their image's id)). Metadata must be JSON-serialisable;
never put patient identifiers in it. ``save`` writes the folder as a whole under its
writer lock (:mod:`regionmed.outputs`: a stopped save leaves the previous index, two
writers take turns); ``load`` checks every metadata row (an object with a string ``id``).

FAISS is an optional dependency (``pip install regionmed[index]``), imported on first use.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from regionmed.errors import RegionmedError
from regionmed.io import read_json, write_json_atomic, write_jsonl_atomic

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
KINDS = ("image", "region")
SEARCH_KINDS = ("both", "image", "region")
SEARCH_MODES = ("auto", "exact", "ivf")
EXACT_BELOW = 100_000  # `auto`: exact search below this many vectors of a kind (~13 ms a query at D = 256 on a 2-core CPU)
TARGET_RECALL = 0.95  # recall@10 against exact search that an ivf kind's nprobe must reach
RECALL_QUERIES = 500  # held-out vectors used as queries to measure it
RETRAIN_GROWTH = 4.0  # an ivf kind is trained again once it holds this many times the vectors it was trained on


class IndexNotFoundError(RegionmedError, FileNotFoundError):
    """An index folder that does not exist, or lacks ``index.json`` or one of its files."""


class IndexMismatchError(RegionmedError, ValueError):
    """Vectors or a model that do not belong to an index: another model id, another
    embedding size, metadata that do not match the vectors, a damaged index folder."""


class IndexInputError(RegionmedError, ValueError):
    """An item given to an index that it cannot hold, e.g. a metadata entry without an ``id``."""


class IndexDependencyError(RegionmedError, ImportError):
    """FAISS is not installed."""


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise IndexDependencyError("the retrieval index needs FAISS: pip install 'regionmed[index]' (or pip install faiss-cpu)") from err
    return faiss


@dataclass
class Hit:
    """One search result: ``score`` (cosine similarity), ``kind`` (``image`` / ``region``),
    ``id``, ``source``, ``box`` (pixel xyxy for a region, None for an image), ``label``,
    ``image_id`` (a region's image), ``row`` (its row in the kind's FAISS index) and
    ``meta`` (the whole metadata object)."""

    score: float
    kind: str
    id: str
    source: str | None = None
    box: list[float] | None = None
    label: str | None = None
    image_id: str | None = None
    row: int = -1
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"score": self.score, "kind": self.kind, "id": self.id, "source": self.source, "box": self.box,
                "label": self.label, "image_id": self.image_id}


class EmbeddingIndex:
    """Image- and region-level vectors of one model, searchable by cosine similarity.

    Create with :meth:`create` (empty) or :meth:`load` (a saved folder). ``model_id``
    and ``dim`` identify the model whose embeddings it holds; adding or querying with
    another model's vectors raises :class:`IndexMismatchError`.
    """

    def __init__(self, model_id: str, dim: int, _indexes: dict | None = None, _meta: dict | None = None,
                 folder: str | Path | None = None, extra: dict | None = None, search: str = "auto",
                 _approximate: dict | None = None):
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if search not in SEARCH_MODES:
            raise IndexInputError(f"search {search!r} is not one of {list(SEARCH_MODES)}")
        self.search_mode = search
        # per ivf kind: nlist, nprobe, recall_at_10, queries, trained_on, measured_at (index.json "approximate")
        self.approximate: dict[str, dict] = dict(_approximate or {})
        self.model_id = str(model_id)
        self.dim = int(dim)
        faiss = _faiss()
        self._indexes = _indexes or {k: faiss.IndexFlatIP(self.dim) for k in KINDS}
        self._meta: dict[str, list[dict]] = _meta or {k: [] for k in KINDS}
        self.folder = Path(folder) if folder is not None else None
        # Free JSON-serialisable notes saved in index.json (e.g. ``model_path``, which
        # ``regionmed search`` uses when no --model is given).
        self.extra: dict = dict(extra or {})

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, predictor_or_model_id, dim: int | None = None, search: str = "auto") -> "EmbeddingIndex":
        """An empty index for a :class:`~regionmed.inference.Predictor` (its ``model_id``
        and ``embed_dim``), or for a model id string and ``dim``. ``search``: ``auto``,
        ``exact`` or ``ivf`` (module docstring)."""
        if isinstance(predictor_or_model_id, str):
            if dim is None:
                raise ValueError("EmbeddingIndex.create(model_id, dim): dim is required with a model id")
            return cls(predictor_or_model_id, dim, search=search)
        p = predictor_or_model_id
        if dim is not None and int(dim) != p.embed_dim:
            raise IndexMismatchError(f"dim {dim} differs from the model's embedding size {p.embed_dim}")
        return cls(p.model_id, p.embed_dim, search=search)

    def faiss_type(self, kind: str) -> str:
        """The FAISS index class of ``kind`` now (``IndexFlatIP`` or ``IndexIVFFlat``)."""
        _check_kind(kind, KINDS)
        return type(self._indexes[kind]).__name__

    def settle(self) -> None:
        """Bring each kind to the index type its ``search`` mode asks for at its size (building
        or training the ivf cells again where due) and measure each ivf kind's recall@10 and
        nprobe; :meth:`save` calls it. See the module docstring."""
        for kd in KINDS:
            n = self.count(kd)
            want_ivf = self.search_mode == "ivf" or (self.search_mode == "auto" and n >= EXACT_BELOW)
            want_ivf = want_ivf and n >= _MIN_IVF
            index = self._indexes[kd]
            is_ivf = self.faiss_type(kd) == "IndexIVFFlat"
            info = self.approximate.get(kd, {})
            if not want_ivf:
                if is_ivf:
                    self._indexes[kd] = _flat(self.dim, _vectors(index))
                self.approximate.pop(kd, None)
                continue
            stale = not is_ivf or n >= RETRAIN_GROWTH * max(1, int(info.get("trained_on", n)))
            if not stale and info.get("measured_at") == n:
                continue
            vectors = _vectors(index)
            trained_on = n if stale else int(info["trained_on"])
            held = _held_out(trained_on)  # never in the k-means sample: drawn again from the same seed
            if stale:
                train_rows = np.setdiff1d(np.arange(n), held)
                index, nlist = _build_ivf(vectors, train_rows, np.random.default_rng(1))
                self._indexes[kd] = index
                info = {"nlist": nlist, "trained_on": n}
            elif n > trained_on:  # rows added since (--add) were never trained on either: they join the queries
                added = np.random.default_rng(2).permutation(np.arange(trained_on, n))
                held = np.concatenate([held, added])[: max(RECALL_QUERIES, len(held))]
            nprobe, recall = _tune_nprobe(self._indexes[kd], vectors, held)
            self._indexes[kd].nprobe = nprobe
            self.approximate[kd] = {**info, "nprobe": nprobe, "recall_at_10": round(recall, 4), "queries": int(len(held)),
                                    "target_recall": TARGET_RECALL, "measured_at": n}

    def __len__(self) -> int:
        return sum(self.count(k) for k in KINDS)

    def count(self, kind: str) -> int:
        """Vectors of ``kind`` (``image`` or ``region``)."""
        _check_kind(kind, KINDS)
        return int(self._indexes[kind].ntotal)

    def metadata(self, kind: str) -> list[dict]:
        """The metadata objects of ``kind``, in row order (a copy)."""
        _check_kind(kind, KINDS)
        return [dict(m) for m in self._meta[kind]]

    # -- adding ---------------------------------------------------------------------------
    def check_model(self, model_id: str | None = None, dim: int | None = None, what: str = "vectors") -> None:
        """Raise :class:`IndexMismatchError` when ``model_id`` or ``dim`` differ from the index's."""
        if dim is not None and int(dim) != self.dim:
            raise IndexMismatchError(f"{what} have embedding size {dim}, the index{self._where()} holds size {self.dim} "
                                     f"(model {self.model_id}): it was built by another model")
        if model_id is not None and str(model_id) != self.model_id:
            raise IndexMismatchError(f"{what} come from model {model_id}, the index{self._where()} was built by model "
                                     f"{self.model_id}: build a new index for this model (or use the model that built it)")

    def _where(self) -> str:
        return f" at {self.folder}" if self.folder else ""

    def add(self, vectors, metadata: Sequence[Mapping[str, Any]], kind: str = "image", model_id: str | None = None) -> None:
        """Append ``vectors`` (N, D) (numpy or torch; L2-normalised by the model; cast to
        float32) with one metadata mapping each (``id`` required; ``source``, ``box``,
        ``label``, ``caption``, ``image_id`` optional, any other JSON value kept) to the
        ``kind`` index. ``model_id``: checked against the index's when given.
        Raises :class:`IndexMismatchError` (size, model, count mismatch, non-finite
        values) and ``ValueError`` (a metadata object without ``id``)."""
        _check_kind(kind, KINDS)
        arr = _as_matrix(vectors)
        self.check_model(model_id, arr.shape[1] if arr.ndim == 2 else None)
        if arr.ndim != 2:
            raise IndexMismatchError(f"vectors must be a (N, D) matrix, got shape {arr.shape}")
        if len(metadata) != arr.shape[0]:
            raise IndexMismatchError(f"{arr.shape[0]} vectors but {len(metadata)} metadata objects")
        if not np.isfinite(arr).all():
            raise IndexMismatchError("vectors hold NaN or inf values: leave such rows out (they are listed as problems)")
        rows = []
        for i, m in enumerate(metadata):
            if not isinstance(m, Mapping):
                raise IndexInputError(f"metadata #{i} is a {type(m).__name__}, not a mapping with an 'id'")
            if m.get("id") in (None, ""):
                raise IndexInputError(f"metadata #{i} has no 'id' (keys: {sorted(map(str, m))[:6]}): every indexed "
                                      "item needs an id to be found again")
            row = {k: _jsonable(v) for k, v in m.items()}
            row["id"] = str(m["id"])
            row["kind"] = kind
            problem = _row_problem(row)  # what load() would refuse is refused now, not after the save
            if problem:
                raise IndexInputError(f"metadata #{i} ({row['id']!r}): {problem}")
            rows.append(row)
        if arr.shape[0]:
            self._indexes[kind].add(np.ascontiguousarray(arr))
        self._meta[kind].extend(rows)

    def add_embeddings(self, result, ids: Sequence[str] | None = None, sources: Sequence[str] | None = None,
                       labels: Sequence[Sequence[str | None]] | None = None, model_id: str | None = None,
                       hashes: Sequence[str | None] | None = None) -> dict:
        """Add an :class:`~regionmed.inference.ImageEmbeddingResult`: each image's ``global_``
        vector (kind ``image``) and each usable box's ROI vector (kind ``region``, id
        ``"<image id>#<box position>"``, ``box`` in pixels, ``label`` from ``labels``).
        ``ids`` / ``sources``: one per result row (default: the result's sources).
        ``hashes``: one content hash (SHA-256 hex of the file's bytes, or None) per row, kept as
        the image's ``sha256`` (how ``regionmed index --add`` tells the same image from another
        one with the same id). Returns ``{"image": n, "region": m, "skipped_regions": r}``
        (NaN rows: unusable boxes)."""
        n = len(result)
        sources = list(sources) if sources is not None else list(result.sources)
        ids = list(ids) if ids is not None else sources
        if len(ids) != n or len(sources) != n:
            raise IndexMismatchError(f"{n} embedded images but {len(ids)} ids and {len(sources)} sources")
        if hashes is not None and len(hashes) != n:
            raise IndexMismatchError(f"{n} embedded images but {len(hashes)} hashes")
        rows = []
        for i in range(n):
            row = {"id": ids[i], "source": sources[i]}
            if result.sizes:
                row["size"] = list(result.sizes[i])
            if hashes is not None and hashes[i]:
                row["sha256"] = hashes[i]
            rows.append(row)
        self.add(result.global_.float().numpy(), rows, "image", model_id)
        vecs, meta, skipped = [], [], 0
        for i in range(n):
            roi = result.roi[i].float().numpy() if i < len(result.roi) else np.zeros((0, self.dim), np.float32)
            for j in range(roi.shape[0]):
                box = result.boxes[i][j] if i < len(result.boxes) and j < len(result.boxes[i]) else None
                if box is None or not np.isfinite(roi[j]).all():
                    skipped += 1
                    continue
                label = labels[i][j] if labels is not None and j < len(labels[i]) else None
                vecs.append(roi[j])
                meta.append({"id": f"{ids[i]}#{j}", "image_id": ids[i], "source": sources[i],
                             "box": [float(v) for v in box], **({"label": label} if label else {})})
        if vecs:
            self.add(np.stack(vecs), meta, "region", model_id)
        return {"image": n, "region": len(vecs), "skipped_regions": skipped}

    # -- searching ------------------------------------------------------------------------
    def search(self, vectors, k: int = 10, kind: str = "both") -> list[list[Hit]]:
        """For each query row of ``vectors`` (Q, D) (or one (D,) vector), its ``k`` best
        hits (fewer when the index holds fewer), best first. ``kind``: ``image``,
        ``region`` or ``both`` (the ``k`` best of the two together).
        Raises :class:`IndexMismatchError` for another embedding size."""
        _check_kind(kind, SEARCH_KINDS)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = _as_matrix(vectors)
        if q.ndim == 1:
            q = q[None]
        self.check_model(None, q.shape[1], "queries")
        kinds = KINDS if kind == "both" else (kind,)
        out: list[list[Hit]] = [[] for _ in range(q.shape[0])]
        for kd in kinds:
            index = self._indexes[kd]
            kk = min(k, int(index.ntotal))
            if kk == 0:
                continue
            scores, rows = index.search(np.ascontiguousarray(q), kk)
            for qi in range(q.shape[0]):
                for s, r in zip(scores[qi], rows[qi]):
                    if r < 0:
                        continue
                    m = self._meta[kd][int(r)]
                    out[qi].append(Hit(float(s), kd, m["id"], m.get("source"), m.get("box"), m.get("label") or m.get("caption"),
                                       m.get("image_id"), int(r), dict(m)))
        for hits in out:
            hits.sort(key=lambda h: -h.score)
            del hits[k:]
        return out

    def search_text(self, predictor, text: str | Sequence[str], k: int = 10, kind: str = "both",
                    truncate: bool = False) -> list[list[Hit]]:
        """Search by text (one string or a list: one hit list per text) embedded by
        ``predictor``, whose model id must be the index's (:class:`IndexMismatchError`)."""
        self.check_model(predictor.model_id, predictor.embed_dim, "the predictor's embeddings")
        texts = [text] if isinstance(text, str) else list(text)
        return self.search(predictor.embed_texts(texts, truncate=truncate).numpy(), k, kind)

    def search_image(self, predictor, image, k: int = 10, kind: str = "both", box: Sequence[float] | None = None) -> list[list[Hit]]:
        """Search by an image (any input :func:`regionmed.inference.load_image` takes),
        embedded whole (its global embedding), or by one region of it
        (``box``: its ROI embedding). One hit list."""
        self.check_model(predictor.model_id, predictor.embed_dim, "the predictor's embeddings")
        emb = predictor.embed_images([image], [[list(box)]] if box is not None else None)
        vec = emb.roi[0] if box is not None else emb.global_
        return self.search(vec.float().numpy(), k, kind)

    # -- folder ---------------------------------------------------------------------------
    def save(self, folder: str | Path, extra_files: Mapping[str, str | bytes] | None = None) -> Path:
        """Write the index into ``folder`` as a whole (:func:`regionmed.outputs.replace_folder`:
        written beside it, then swapped in atomically, under the folder's writer lock; a
        process stopped at any point leaves the previous index or the new one, never a mix).

        ``folder``: new, empty, or an index folder (``index.json``); another non-empty folder
        is refused (:class:`~regionmed.outputs.OutputError`). ``extra_files``: further files
        of the folder (name -> text or bytes), written in the same step."""
        from regionmed.outputs import replace_folder

        folder = Path(folder)
        with replace_folder(folder, owned=lambda d: (d / INDEX_FILE).is_file(), what="retrieval index folder") as tmp:
            self.write_files(tmp)
            for name, data in (extra_files or {}).items():
                target = tmp / name
                target.write_bytes(data) if isinstance(data, bytes) else target.write_text(data, encoding="utf-8")
        self.folder = folder
        return folder

    def write_files(self, folder: str | Path) -> None:
        """Write the index's files into the existing folder ``folder`` as they are (no lock,
        no atomic swap: :meth:`save` writes a user's folder)."""
        faiss = _faiss()
        folder = Path(folder)
        self.settle()
        for kd in KINDS:
            faiss.write_index(self._indexes[kd], str(folder / f"{kd}.faiss"))
            write_jsonl_atomic(folder / f"{kd}.jsonl", self._meta[kd])
        info = {"format_version": FORMAT_VERSION, "model_id": self.model_id, "dim": self.dim,
                "faiss_type": {kd: self.faiss_type(kd) for kd in KINDS}, "search": self.search_mode,
                "approximate": self.approximate,
                "metric": "inner product of L2-normalised vectors (cosine)",
                "vectors": {"image": "global embedding", "region": "ROI embedding of the box"},
                "counts": {kd: self.count(kd) for kd in KINDS}, "extra": self.extra}
        write_json_atomic(folder / INDEX_FILE, info, sort_keys=False)

    @classmethod
    def load(cls, folder: str | Path) -> "EmbeddingIndex":
        """Read a folder written by :meth:`save` (read again when a writer swapped it in
        meanwhile: :func:`regionmed.outputs.read_folder`). Raises :class:`IndexNotFoundError`
        for a missing folder or file, :class:`IndexMismatchError` for a damaged one
        (unreadable JSON or FAISS file, counts or sizes that disagree, a metadata row that is
        not an object with an ``id``)."""
        from regionmed.outputs import read_folder

        return read_folder(folder, lambda: cls._load(Path(folder)))

    @classmethod
    def _load(cls, folder: Path) -> "EmbeddingIndex":
        faiss = _faiss()
        if not folder.is_dir():
            raise IndexNotFoundError(f"index folder {folder} does not exist: build one with `regionmed index`")
        info_path = folder / INDEX_FILE
        info = read_json(info_path, IndexMismatchError, "the index description",
                         missing_cls=IndexNotFoundError)
        try:
            model_id, dim = str(info["model_id"]), int(info["dim"])
            counts = {kd: int(info["counts"][kd]) for kd in KINDS}
        except (KeyError, TypeError, ValueError) as err:
            raise IndexMismatchError(f"{info_path}: not a valid index description ({type(err).__name__}: {err})") from err
        if info.get("format_version") != FORMAT_VERSION:
            raise IndexMismatchError(f"{info_path}: format_version {info.get('format_version')!r}, this regionmed reads {FORMAT_VERSION}")
        indexes, meta = {}, {}
        for kd in KINDS:
            fpath, mpath = folder / f"{kd}.faiss", folder / f"{kd}.jsonl"
            for p in (fpath, mpath):
                if not p.is_file():
                    raise IndexNotFoundError(f"{p} is missing: the index folder {folder} is incomplete")
            try:
                index = faiss.read_index(str(fpath))
            except RuntimeError as err:
                raise IndexMismatchError(f"{fpath}: not a readable FAISS index ({str(err).splitlines()[0][:200]})") from err
            if index.d != dim:
                raise IndexMismatchError(f"{fpath}: vectors of size {index.d}, {info_path} says {dim}")
            rows = []
            with open(mpath, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as err:
                            raise IndexMismatchError(f"{mpath}, line {n}: not valid JSON ({err})") from err
                        problem = _row_problem(row)
                        if problem:
                            raise IndexMismatchError(f"{mpath}, line {n}: {problem}: the index folder is damaged")
                        rows.append(row)
            if not (index.ntotal == len(rows) == counts[kd]):
                raise IndexMismatchError(f"{folder}: {kd} index holds {index.ntotal} vectors, {mpath.name} {len(rows)} rows, "
                                         f"{INDEX_FILE} says {counts[kd]}: the folder is damaged or half written")
            indexes[kd], meta[kd] = index, rows
        extra = info.get("extra") if isinstance(info.get("extra"), dict) else {}
        search = info.get("search", "exact")  # folders written before the choice existed were exact, and stay so
        approximate = info.get("approximate") if isinstance(info.get("approximate"), dict) else {}
        if search not in SEARCH_MODES:
            raise IndexMismatchError(f"{info_path}: search {search!r} is not one of {list(SEARCH_MODES)}")
        for kd, index in indexes.items():
            if type(index).__name__ not in ("IndexFlatIP", "IndexIVFFlat"):
                raise IndexMismatchError(f"{folder / (kd + '.faiss')}: a FAISS {type(index).__name__}, not one regionmed writes")
            if type(index).__name__ == "IndexIVFFlat":
                try:
                    index.nprobe = int(approximate[kd]["nprobe"])
                except (KeyError, TypeError, ValueError) as err:
                    raise IndexMismatchError(f"{info_path}: the ivf {kd} index has no nprobe in 'approximate'") from err
        return cls(model_id, dim, indexes, meta, folder, extra, search, approximate)


_MIN_IVF = 1_000  # fewer vectors than this: exact whatever the mode (k-means needs points per cell)
_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _held_out(trained_on: int) -> np.ndarray:
    """The rows held out of an ivf kind's k-means sample (its recall queries): a seeded draw of
    ``min(RECALL_QUERIES, N / 20)`` of the ``trained_on`` rows the cells were trained with."""
    return np.random.default_rng(0).choice(trained_on, size=min(RECALL_QUERIES, max(1, trained_on // 20)), replace=False)


def _flat(dim: int, vectors: np.ndarray):
    index = _faiss().IndexFlatIP(dim)
    if len(vectors):
        index.add(np.ascontiguousarray(vectors))
    return index


def _vectors(index) -> np.ndarray:
    """Every vector of a flat or ivf (direct-mapped) index, in row order: (N, D) float32."""
    n = int(index.ntotal)
    return index.reconstruct_n(0, n) if n else np.zeros((0, index.d), np.float32)


def _build_ivf(vectors: np.ndarray, train_rows: np.ndarray, rng: np.random.Generator):
    """An IndexIVFFlat over ``vectors`` (inner product), its cells trained by k-means on at most
    64 points per cell drawn from ``train_rows``; returns (index, nlist). nlist: the power of
    two nearest 2·√N (2,048 at 1M vectors), lowered where needed to keep at least 39 training
    points per cell (FAISS's own minimum; then not a power of two)."""
    faiss = _faiss()
    n, d = vectors.shape
    nlist = int(2 ** round(np.log2(2 * np.sqrt(n))))
    nlist = max(1, min(nlist, len(train_rows) // 39, 65536))
    sample = rng.choice(train_rows, size=min(len(train_rows), 64 * nlist), replace=False)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(vectors[np.sort(sample)]))
    index.make_direct_map()  # row -> vector, for reconstruct (rebuilds, recall)
    index.add(np.ascontiguousarray(vectors))
    return index, nlist


def _without_self(rows: np.ndarray, own: np.ndarray, k: int) -> list[np.ndarray]:
    return [r[(r != o) & (r >= 0)][:k] for r, o in zip(rows, own)]


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray, k: int = 10) -> float:
    """Mean over queries of ``|approx top-k ∩ exact top-k| / k`` (each a row of result ids)."""
    hits = [len(set(a[:k].tolist()) & set(e[:k].tolist())) / k for a, e in zip(approx_rows, exact_rows)]
    return float(np.mean(hits)) if hits else 1.0


def _tune_nprobe(index, vectors: np.ndarray, held: np.ndarray, k: int = 10) -> tuple[int, float]:
    """The smallest nprobe in 1, 2, 4, ... whose recall@k against exact search on the held-out
    rows (each query's own row left out) reaches TARGET_RECALL; (nlist, its recall) if none does."""
    faiss = _faiss()
    queries = np.ascontiguousarray(vectors[held])
    _, exact = faiss.knn(queries, vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    exact = _without_self(exact, held, k)
    nlist = int(index.nlist)
    recall = 0.0
    for nprobe in [p for p in _NPROBES if p < nlist] + [nlist]:
        index.nprobe = nprobe
        _, rows = index.search(queries, k + 1)
        recall = recall_at_k(_without_self(rows, held, k), exact, k)
        if recall >= TARGET_RECALL:
            return nprobe, recall
    return nlist, recall


# metadata fields that search results and `regionmed index --add` read, with the types they need
_ROW_FIELDS = {"id": (str,), "source": (str, type(None)), "label": (str, type(None)), "caption": (str, type(None)),
               "image_id": (str, type(None)), "sha256": (str, type(None))}


def _row_problem(row) -> str | None:
    """Why a metadata row read from an index folder cannot be used (None when it can)."""
    if not isinstance(row, dict):
        return f"a {type(row).__name__}, not a metadata object"
    if not isinstance(row.get("id"), str) or not row["id"]:
        return "no 'id' string"
    for key, types in _ROW_FIELDS.items():
        if key in row and not isinstance(row[key], types):
            return f"'{key}' is a {type(row[key]).__name__}, not a string"
    box = row.get("box")
    if box is not None and not (isinstance(box, list) and len(box) == 4
                                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        return "'box' is not a list of 4 numbers"
    return None


def _check_kind(kind: str, allowed: tuple[str, ...]) -> None:
    if kind not in allowed:
        raise ValueError(f"kind {kind!r} is not one of {list(allowed)}")


def _as_matrix(vectors) -> np.ndarray:
    if hasattr(vectors, "detach"):
        vectors = vectors.detach().cpu().float().numpy()
    return np.asarray(vectors, dtype=np.float32)


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
