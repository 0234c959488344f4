"""Inference on a trained model: embed, zero-shot classify and ground, on your own images.

>>> from regionmed.inference import Predictor
>>> p = Predictor.from_pretrained("runs/demo/region/model")          # offline, safetensors
>>> emb = p.embed_images(["cxr.png"], boxes=[[[120, 80, 180, 140]]])  # global_, fused, roi per box
>>> p.classify(["cxr.png"], ["pneumonia", "normal"]).scores          # (1, 2) softmax probabilities
>>> g = p.ground("cxr.png", ["left pleural effusion"])[0]            # heatmap, peak, box, score

Inputs (everywhere an image is taken): a PIL image, a numpy array (H x W or
H x W x C, any dtype), a path (PNG, JPEG, any format Pillow opens, or DICOM:
``.dcm`` / ``.dicom`` or the ``DICM`` magic) or encoded bytes. Files and bytes go
through the library's one decoder (:func:`regionmed.data.decode.decode_image`:
EXIF orientation applied, 8-bit L/RGB by the documented mode rules) and DICOM
through its PHI-safe reader (:func:`regionmed.data.dicom.read_dicom`: single
frame, VOI LUT / window, MONOCHROME1 inverted; no identifier is read into a
result, a message or a log). Arrays and PIL images are taken as the pixel grid
they are (no EXIF rotation) and converted by the same mode rules
(:func:`regionmed.data.decode.to_8bit`; non-8-bit values by a per-image min–max).
Pixel coordinates (boxes, peaks) are those of that decoded image: x to the right,
y down, ``[x0, y0, x1, y1]``. A loaded image carries its pixels only: no EXIF, text
chunk, comment or ICC profile of the input (:mod:`regionmed.data.metadata`).

Texts (phrases, prompts, labels): a text whose tokens are mostly the tokenizer's
unknown token (``[UNK]``: e.g. CJK or emoji for an English vocabulary; more than
:data:`UNKNOWN_SHARE` of them) raises :class:`TextInputError` naming it, as do two labels
whose prompts give the same tokens; a text with some unknown tokens is logged as a warning
naming the words. A text longer than the model's text context
(``Predictor.context_length`` tokens, special tokens included) raises
:class:`TextInputError` unless ``truncate=True``, which cuts it the way the
tokenizer cuts training text (the first ``context_length - 1`` tokens and the
closing special token, :class:`regionmed.model.towers.TextTokenizer`) and logs a
warning naming how many texts were cut.

Errors: :class:`ImageInputError` (an image that cannot be used), :class:`BoxError`
(a box that cannot be used, from :mod:`regionmed.data.transforms`),
:class:`TextInputError` (an empty phrase list, an empty or too long text),
:class:`InferenceArgumentError` (``boxes`` / ``names`` not one per image, an unknown
``errors`` or ``read_out``). All are :class:`~regionmed.errors.RegionmedError` and
``ValueError`` (:class:`ImageTypeError`, an input of an unsupported type, is also a ``TypeError``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from regionmed.data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, to_8bit
from regionmed.data.dicom import DicomError, is_dicom, read_dicom
from regionmed.data.loader import ImageBatch
from regionmed.data.metadata import pixels_only, strip_info
from regionmed.data.transforms import BoxError, Preprocessor, check_boxes, to_rgb
from regionmed.errors import RegionmedError
from regionmed.finite import require_finite

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "BoxError",
    "ClassificationResult",
    "Grounding",
    "ImageEmbeddingResult",
    "ImageInputError",
    "ImageTypeError",
    "InferenceArgumentError",
    "Predictor",
    "Problem",
    "TextInputError",
    "load_image",
    "model_digest",
]

# DEFAULT_MAX_PIXELS (regionmed.data.decode): the most pixels an input image may have
# (width x height): 64 Mi pixels, e.g. 8192 x 8192. A full-field mammogram (about
# 4096 x 5120) fits; larger inputs are refused before their pixels are decoded (Pillow's
# decompression-bomb guard for files). `regionmed serve` and the commands share it.
READ_OUTS = ("auto", "windows", "patch")
# A text whose tokens are more than this share the tokenizer's unknown token cannot be read by the model.
UNKNOWN_SHARE = 0.5


class ImageInputError(RegionmedError, ValueError):
    """An image that cannot be used: undecodable, empty, truncated, a multi-frame DICOM,
    a DICOM without pixel data, more pixels than allowed, an unsupported type or shape.

    ``source``: the input's name (a path, the ``name`` given, or ``"<array>"``,
    ``"<bytes>"``, ``"<PIL image>"``); ``reason``: a short key (``unreadable_image``,
    ``truncated_image``, ``decompression_bomb``, ``too_many_pixels``,
    ``unsupported_dicom``, ``empty_image``, ``unsupported_input``, ``missing_file``,
    ``non_finite_pixels``);
    ``detail``: what was found. The message is ``"<source>: <reason>: <detail>"``
    and never holds a DICOM attribute value."""

    def __init__(self, source: str, reason: str, detail: str):
        super().__init__(f"{source}: {reason}: {detail}")
        self.source = source
        self.reason = reason
        self.detail = detail


class ImageTypeError(ImageInputError, TypeError):
    """An image input of a type :func:`load_image` does not take (reason ``unsupported_input``);
    a ``TypeError`` too."""


class TextInputError(RegionmedError, ValueError):
    """A text input that cannot be used: an empty phrase/label list, an empty text,
    a text longer than the model's context (without ``truncate=True``), a text the model
    cannot read (mostly unknown tokens), two labels the model cannot tell apart."""


class InferenceArgumentError(RegionmedError, ValueError):
    """A call argument that does not fit: ``boxes`` / ``names`` not one per image, an
    unknown ``errors`` mode or ``read_out``."""


@dataclass
class Problem:
    """One input that was left out (``errors="skip"``) or only partly used.

    ``index``: position of the image in the call's input; ``source``: its name;
    ``reason``: a short key (as :class:`ImageInputError` / ``"invalid_box"``,
    ``"outside"``, ``"zero_area"`` for a box); ``detail``: the message;
    ``box``: the box's position in that image's list, for a box problem."""

    index: int
    source: str
    reason: str
    detail: str
    box: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class ImageEmbeddingResult:
    """L2-normalised embeddings of the images that could be used, in input order.

    * ``global_``: (N, D) float32 — the whole image (the model's global path);
    * ``fused``: (N, D) float32 — after the ROI processor with the given boxes
      (``== global_`` for an image without boxes, or a model without an ROI path);
    * ``roi``: N tensors (K_i, D) float32, row j for box j of that image as given
      (a model without an ROI path: each box's crop embedded as a whole image); a box
      that could not be used (``errors="skip"``) is a row of NaN, listed in ``problems``;
    * ``boxes``: N lists of K_i boxes in the image's own pixels (xyxy), clipped to the
      image (None for a box that could not be used);
    * ``indices``: position in the input of each row; ``sources``: its name;
      ``sizes``: (width, height) of each decoded image;
    * ``problems``: the inputs left out or partly used, with their reasons.

    Tensors are on the CPU."""

    global_: torch.Tensor
    fused: torch.Tensor
    roi: list[torch.Tensor]
    boxes: list[list[list[float] | None]]
    indices: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.global_.shape[0])


@dataclass
class ClassificationResult:
    """Zero-shot scores of the images that could be used.

    ``labels``: the C class names; ``scores``: (N, C) float32 numpy — for
    ``multi_label=False`` softmax probabilities over the classes (rows sum to 1; the
    model's own logit scale, CLIP's zero-shot rule); for ``multi_label=True`` the
    cosine similarity in [-1, 1] of the image with each class's prompt ensemble
    (uncalibrated: no sigmoid, no threshold; rank images by it per class — the
    ``similarity`` mode of :mod:`regionmed.eval.zeroshot`). ``multi_label``: which of the
    two; ``prompts``: the prompts used per class; ``indices`` / ``sources`` /
    ``problems`` as in :class:`ImageEmbeddingResult`."""

    labels: list[str]
    scores: np.ndarray
    multi_label: bool
    prompts: dict[str, list[str]]
    indices: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def top(self, row: int) -> tuple[str, float]:
        """The best-scored (label, score) of result row ``row``."""
        j = int(np.argmax(self.scores[row]))
        return self.labels[j], float(self.scores[row, j])


@dataclass
class Grounding:
    """Where one phrase is in an image.

    ``map``: the read-out's similarity map on its own grid, covering the whole image
    (float32: the windows' 64 x 64 cells, or the patch map at the model's input size;
    raw cosine similarities); ``peak``: (x, y) pixels of the map's maximum; ``box``:
    [x0, y0, x1, y1] pixels; ``score``: the raw cosine similarity behind the box (the
    best window's for ``windows``, the map's maximum for ``patch``), in [-1, 1];
    ``read_out``: ``"windows"`` or ``"patch"``; ``size``: the image's (width, height).
    Pixels are the image's own. :meth:`heatmap_at` gives the map as a [0, 1] heatmap at a
    bounded size (what the overlays use); :attr:`heatmap` at the image's full size."""

    phrase: str
    map: np.ndarray
    peak: tuple[float, float]
    box: list[float]
    score: float
    read_out: str
    size: tuple[int, int]

    def heatmap_at(self, max_side: int | None = None) -> np.ndarray:
        """The map as (h, w) float32 in [0, 1] (resized bilinearly, then min–max normalised:
        :func:`regionmed.eval.grounding.heatmap_at`) at the image's size scaled so that its
        long side is at most ``max_side`` (None: the image's own size)."""
        from regionmed.eval.grounding import heatmap_at
        from regionmed.eval.overlay import display_scale

        w, h = self.size
        s = 1.0 if max_side is None else display_scale(w, h, int(max_side))
        return heatmap_at(self.map, max(1, round(w * s)), max(1, round(h * s)))

    @property
    def heatmap(self) -> np.ndarray:
        """(H, W) float32 in [0, 1] at the image's own size (``4 x W x H`` bytes: use
        :meth:`heatmap_at` with a ``max_side`` for large images)."""
        return self.heatmap_at(None)

    def to_dict(self) -> dict:
        """JSON-ready, without the heatmap."""
        return {"phrase": self.phrase, "peak": [float(v) for v in self.peak], "box": [float(v) for v in self.box],
                "score": float(self.score), "read_out": self.read_out, "size": list(self.size)}


def _source_name(source: Any, name: str | None) -> str:
    if name:
        return str(name)
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, Image.Image):
        return "<PIL image>"
    if isinstance(source, np.ndarray):
        return "<array>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return f"<{type(source).__name__}>"


def _array_to_image(arr: np.ndarray, where: str) -> Image.Image:
    """A numpy pixel array as an 8-bit L/RGB PIL image.

    uint8 as is; other dtypes by a per-image min–max to 0..255 (for colour, one min–max
    over the colour channels, which keeps the colour balance). An alpha channel (H x W x 4)
    is not part of that min–max: a float alpha must lie in [0, 1] (1 = opaque), an integer
    alpha is scaled by its dtype's maximum; the image is then composited as
    :func:`regionmed.data.decode.to_8bit` composites RGBA. Raises :class:`ImageInputError`
    for NaN / inf values (reason ``non_finite_pixels``: a silent replacement would be a
    wrong image) and a float alpha outside [0, 1]."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageInputError(where, "unsupported_input", f"array of shape {tuple(arr.shape)} (expected H x W or H x W x 1/3/4)")
    if arr.size == 0 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageInputError(where, "empty_image", f"array of shape {tuple(arr.shape)}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.number)) or np.iscomplexobj(arr):
        raise ImageInputError(where, "unsupported_input", f"array of dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise ImageInputError(where, "non_finite_pixels", f"array holds {bad} NaN/inf value(s) (of {arr.size})")
    if arr.ndim == 2:
        if arr.dtype == np.uint8:
            return Image.fromarray(np.ascontiguousarray(arr), "L")
        return to_8bit(Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), "F"))[0]
    alpha = None
    if arr.dtype != np.uint8:
        if arr.shape[-1] == 4:
            a = arr[..., 3].astype(np.float64)
            if np.issubdtype(arr.dtype, np.floating):
                if a.min() < 0.0 or a.max() > 1.0:
                    raise ImageInputError(where, "unsupported_input", f"float alpha channel in [{a.min():g}, {a.max():g}] "
                                                                      "(expected [0, 1], 1 = opaque)")
            else:
                a = np.clip(a, 0.0, None) / float(np.iinfo(arr.dtype).max)
            alpha = np.round(a * 255).astype(np.uint8)
            arr = arr[..., :3]
        values = arr.astype(np.float64)  # one min–max over all colour channels (keeps the colour balance)
        lo, hi = float(values.min()), float(values.max())
        arr = np.zeros(arr.shape, np.uint8) if hi <= lo else np.round((values - lo) / (hi - lo) * 255).astype(np.uint8)
        if alpha is not None:
            arr = np.concatenate([arr, alpha[..., None]], axis=-1)
    mode = "RGB" if arr.shape[-1] == 3 else "RGBA"
    return to_8bit(Image.fromarray(np.ascontiguousarray(arr), mode))[0]


def load_image(source: Any, *, name: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode ``source`` into an 8-bit ``"L"`` or ``"RGB"`` PIL image.

    ``source``: a PIL image, a numpy array (H x W or H x W x 1/3/4, any numeric dtype;
    uint8 as is, other dtypes by a per-image min–max to 0..255), a path (str / Path) to
    an image file or a DICOM file, or encoded bytes (DICOM recognised by its magic).
    ``name``: how messages name the input (default: the path, or ``<array>`` etc.).
    ``max_pixels``: the most pixels (width x height) accepted (default
    :data:`DEFAULT_MAX_PIXELS`); larger inputs are refused before decoding.

    Files and bytes: :func:`regionmed.data.decode.decode_image` (EXIF orientation
    applied). DICOM: :func:`regionmed.data.dicom.read_dicom` (single frame; window /
    VOI LUT; no identifier leaves it). PIL images and arrays: the pixel grid as given.

    Raises :class:`ImageInputError` naming the source and the reason;
    :class:`ImageTypeError` (also a ``TypeError``) for an input of another type.
    """
    where = _source_name(source, name)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    if isinstance(source, Image.Image):
        w, h = source.size
        if w * h == 0:
            raise ImageInputError(where, "empty_image", f"{w}x{h} image")
        if w * h > limit:
            raise ImageInputError(where, "too_many_pixels", f"{w}x{h} exceeds max_pixels={limit}")
        try:
            image = to_8bit(source)[0]
            # pixels only: the caller's metadata (EXIF, text chunks, ICC) is not carried into any output
            return pixels_only(image) if image is source else strip_info(image)
        except Exception as err:  # noqa: BLE001 - a lazily loaded PIL image can fail here
            raise ImageInputError(where, "unreadable_image", f"{type(err).__name__}: {err}") from err
    if isinstance(source, np.ndarray):
        if source.ndim >= 2 and source.shape[0] * source.shape[1] > limit:
            raise ImageInputError(where, "too_many_pixels", f"{source.shape[1]}x{source.shape[0]} exceeds max_pixels={limit}")
        return _array_to_image(source, where)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageInputError(where, "missing_file", "no such file" if not path.exists() else "not a file")
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise ImageInputError(where, "unreadable_image", f"cannot read file ({err.strerror or type(err).__name__})") from err
        return _decode_bytes(raw, where, limit, str(path))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), where, limit, None)
    raise ImageTypeError(where, "unsupported_input",
                         f"load_image takes a PIL image, a numpy array, a path or bytes, not {type(source).__name__}")


def _decode_bytes(raw: bytes, where: str, limit: int, path: str | None) -> Image.Image:
    if not raw:
        raise ImageInputError(where, "empty_image", "empty file")
    if is_dicom(raw, path):
        try:
            dcm = read_dicom(raw, max_pixels=limit)
        except DicomError as err:
            reason = "too_many_pixels" if err.reason == "decompression_bomb" else err.reason
            raise ImageInputError(where, reason, err.detail) from None  # no pydicom context: it may quote the file
        return Image.fromarray(dcm.array, "L" if dcm.array.ndim == 2 else "RGB")
    try:
        image, _ = decode_image(raw, max_pixels=limit, where=where)
    except ImageDecodeError as err:
        reason = "too_many_pixels" if err.reason == "decompression_bomb" else err.reason
        raise ImageInputError(where, reason, err.detail) from err
    return image


def model_digest(model) -> str:
    """A stable identifier of a model's weights and configuration: the first 20 hex
    digits of a SHA-256 over the model config (JSON, sorted keys), the preprocessing
    (``preprocess.json``) and every tensor of the state dict (name, dtype, shape and
    bytes, in name order). Equal for a model and its ``save_pretrained`` /
    ``from_pretrained`` round trip; different after any weight or config change."""
    from regionmed.config import to_dict

    h = hashlib.sha256()
    h.update(json.dumps(to_dict(model.cfg), sort_keys=True, default=str).encode("utf-8"))
    h.update(json.dumps(model.preprocessor.to_dict(), sort_keys=True).encode("utf-8"))
    state = model.state_dict()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode("utf-8"))
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


class Predictor:
    """A loaded model ready for inference (eval mode, no gradients), batched, on CPU or GPU.

    ``model``: a :class:`regionmed.model.clip.RegionMedCLIP`; ``device``: where to run
    (default: the model's device); ``batch_size``: images per forward pass;
    ``max_pixels``: the largest input accepted (:func:`load_image`).

    Attributes: ``model``; ``model_id`` (:func:`model_digest`, computed on first use);
    ``embed_dim`` (D); ``context_length`` (text tokens); ``preprocessor`` (the model's
    own :class:`~regionmed.data.transforms.Preprocessor`); ``has_region_path`` (the
    model has an ROI processor); ``device``.
    """

    def __init__(self, model, device: str | torch.device | None = None, batch_size: int = 32,
                 max_pixels: int | None = None):
        if batch_size < 1:
            raise InferenceArgumentError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else model.logit_scale.device
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
        self._model_id: str | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, batch_size: int = 32,
                        max_pixels: int | None = None) -> "Predictor":
        """Load a saved model folder (``regionmed.load``; raises
        :class:`~regionmed.model.towers.WeightsError` naming what is wrong with it)."""
        from regionmed.model.clip import load

        return cls(load(path, map_location=device or "cpu"), device=device, batch_size=batch_size, max_pixels=max_pixels)

    # -- properties -------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        if self._model_id is None:
            self._model_id = model_digest(self.model)
        return self._model_id

    @property
    def embed_dim(self) -> int:
        return int(self.model.cfg.embed_dim)

    @property
    def context_length(self) -> int:
        return int(self.model.cfg.text.context_length)

    @property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor.from_model(self.model)

    @property
    def has_region_path(self) -> bool:
        return self.model.roi_processor is not None

    # -- images -------------------------------------------------------------------------
    def load_image(self, source: Any, name: str | None = None) -> Image.Image:
        """:func:`load_image` with this predictor's ``max_pixels``."""
        return load_image(source, name=name, max_pixels=self.max_pixels)

    def embed_images(self, images: Sequence[Any] | Any, boxes: Sequence[Sequence[Sequence[float]]] | None = None, *,
                     names: Sequence[str] | None = None, errors: str = "raise",
                     progress: bool = False) -> ImageEmbeddingResult:
        """Embed ``images`` (a sequence of inputs, or one input) in batches of ``batch_size``.

        ``boxes``: None, or one list per image of pixel ``[x0, y0, x1, y1]`` boxes in that
        image's own coordinates (an empty list for none). Every given box gets its own ROI
        row, in the given order (none is dropped or capped at the model's ``max_rois``:
        a region's embedding does not depend on the other boxes; ``fused`` attends over
        all of them). Boxes reaching past the image are clipped.
        ``names``: how results and messages name the images. ``errors``: ``"raise"``
        (the first bad image or box raises :class:`ImageInputError` / :class:`BoxError`)
        or ``"skip"`` (bad images are left out and bad boxes give NaN rows, each listed
        in ``problems``). ``progress``: a tqdm bar.
        """
        if errors not in ("raise", "skip"):
            raise InferenceArgumentError(f"errors {errors!r} is not 'raise' or 'skip'")
        items = _as_list(images)
        if boxes is not None and len(boxes) != len(items):
            raise InferenceArgumentError(f"boxes has {len(boxes)} lists for {len(items)} images (give one list per image, [] for none)")
        if names is not None and len(names) != len(items):
            raise InferenceArgumentError(f"names has {len(names)} entries for {len(items)} images")
        from tqdm import tqdm

        d = self.embed_dim
        g, f, roi, used, idx, srcs, sizes, problems = [], [], [], [], [], [], [], []
        bar = tqdm(total=len(items), desc="embed", unit="img", disable=not progress, leave=False)
        for start in range(0, len(items), self.batch_size):
            batch = []
            for i in range(start, min(start + self.batch_size, len(items))):
                where = _source_name(items[i], names[i] if names is not None else None)
                try:
                    image = self.load_image(items[i], where)
                except ImageInputError as err:
                    if errors == "raise":
                        raise
                    problems.append(Problem(i, where, err.reason, str(err)))
                    continue
                given = list(boxes[i]) if boxes is not None and boxes[i] is not None else []
                checked = check_boxes(given, *image.size)
                for j, (b, status) in enumerate(checked):
                    if b is None:
                        err = BoxError(j, given[j], status, *image.size, where=where)
                        if errors == "raise":
                            raise err
                        problems.append(Problem(i, where, status, str(err), box=j))
                batch.append((i, where, image, checked))
            if batch:
                for (i, where, image, checked), (gi, fi, ri) in zip(batch, self._encode(batch)):
                    g.append(gi)
                    f.append(fi)
                    roi.append(ri)
                    used.append([list(b) if b is not None else None for b, _ in checked])
                    idx.append(i)
                    srcs.append(where)
                    sizes.append(image.size)
            bar.update(min(self.batch_size, len(items) - start))
        bar.close()
        stack = lambda xs: torch.stack(xs) if xs else torch.zeros(0, d)  # noqa: E731
        return ImageEmbeddingResult(stack(g), stack(f), roi, used, idx, srcs, sizes, problems)

    @torch.no_grad()
    def _encode(self, batch: list) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(global (D,), fused (D,), roi (K, D) with NaN rows for unusable boxes) per image of
        ``batch`` (index, name, image, checked boxes): one forward pass."""
        pre = self.preprocessor
        region = self.has_region_path and any(b is not None for *_, checked in batch for b, _ in checked)
        if not region:
            pre = dataclasses.replace(pre, roi_mode="none")  # no crops to prepare
        samples = [pre(image, [b for b, _ in checked if b is not None] if region else []) for _, _, image, checked in batch]
        emb = self.model.encode_batch(ImageBatch.from_samples(samples), use_rois=region)
        gl, fu = emb.global_.float().cpu(), emb.fused.float().cpu()
        rois = emb.roi.float().cpu() if region and emb.roi is not None else None
        out = []
        for n, (_, _, image, checked) in enumerate(batch):
            rows = torch.full((len(checked), self.embed_dim), float("nan"))
            good = [j for j, (b, _) in enumerate(checked) if b is not None]
            if good:
                if rois is not None:
                    rows[good] = rois[n, : len(good)]
                else:  # no region path: each box's crop embedded as a whole image
                    rows[good] = self._embed_crops(to_rgb(image), [checked[j][0] for j in good])
            out.append((gl[n], fu[n], rows))
        return out

    @torch.no_grad()
    def _embed_crops(self, image: Image.Image, boxes: list) -> torch.Tensor:
        pre = dataclasses.replace(self.preprocessor, roi_mode="none")
        xs = torch.stack([pre(image.crop(tuple(int(round(v)) for v in b)))["image"] for b in boxes]).to(self.device)
        return torch.cat([_finite(self.model.encode_image(xs[i: i + self.batch_size], use_rois=False).global_)
                          for i in range(0, len(xs), self.batch_size)]).float().cpu()

    def embed_texts(self, texts: Sequence[str], *, truncate: bool = False) -> torch.Tensor:
        """(N, D) float32 L2-normalised text embeddings on the CPU, one row per text.
        Raises :class:`TextInputError` for an empty text, or one longer than the
        context unless ``truncate`` (see the module docstring; each distinct text cut
        is logged once per predictor)."""
        return self._embed_texts(texts, truncate, "text")

    def _embed_texts(self, texts, truncate: bool, what: str, warn: bool = True) -> torch.Tensor:
        texts = self._check_texts(texts, what, truncate, warn)
        with torch.no_grad():
            return _finite(self.model.encode_text(texts), "text").float().cpu()

    def _check_texts(self, texts, what: str, truncate: bool, warn: bool = True) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TextInputError(f"{what} #{i} is a {type(t).__name__}, not a string")
            if not t.strip():
                raise TextInputError(f"{what} #{i} is empty")
        if not texts:
            return texts
        lengths = self.token_lengths(texts)
        long = [(i, n) for i, n in enumerate(lengths) if n > self.context_length]
        if long and not truncate:
            i, n = long[0]
            more = f" ({len(long) - 1} more)" if len(long) > 1 else ""
            raise TextInputError(f"{what} #{i} {_shorten(texts[i])!r} is {n} tokens, longer than the model's text context of "
                                 f"{self.context_length}{more}: shorten it, or pass truncate=True to cut it")
        if long and warn:
            self._warn_cut([(texts[i], n) for i, n in long], what)
        self._check_unknown(texts, what, warn)
        return texts

    def unknown_tokens(self, texts: Sequence[str]) -> list[tuple[int, int]]:
        """``(unknown, total)`` token counts of each text (special tokens left out): how
        many of its tokens are the tokenizer's unknown token (``[UNK]``), e.g. every CJK
        character or emoji for an English WordPiece vocabulary. ``(0, total)`` for a
        tokenizer without an unknown token (byte-level BPE reads any text)."""
        if not texts:
            return []
        hf = self.model.text_tower.tokenizer.hf
        ids = hf(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        unk = hf.unk_token_id
        return [(0 if unk is None else sum(1 for t in row if t == unk), len(row)) for row in ids]

    def _unknown_words(self, text: str) -> list[str]:
        hf = self.model.text_tower.tokenizer.hf
        unk = hf.unk_token_id
        return [w for w in text.split() if unk in hf(w, add_special_tokens=False, verbose=False)["input_ids"]]

    def _check_unknown(self, texts: Sequence[str], what: str, warn: bool = True, labels: Sequence[str] | None = None) -> None:
        """Text the model cannot read: a text whose tokens are mostly (more than
        :data:`UNKNOWN_SHARE`) the unknown token raises :class:`TextInputError` naming it
        (its embedding would not depend on those words, so two such texts score alike);
        one with some unknown tokens is logged once per predictor (``warn``), naming the
        words read as unknown. ``labels``: the label each text belongs to, for the message."""
        counts = self.unknown_tokens(texts)
        for i, (text, (unknown, total)) in enumerate(zip(texts, counts)):
            if not unknown:
                continue
            key = text if labels is None else labels[i]
            name = f"{what} {_shorten(text)!r}" if labels is None else f"label {_shorten(key)!r} (its {what} {_shorten(text)!r})"
            words = ", ".join(repr(w) for w in self._unknown_words(text)[:5])
            if unknown > UNKNOWN_SHARE * total:
                raise TextInputError(f"{name}: {unknown} of its {total} tokens are unknown to the model's text vocabulary "
                                     f"(read as {_unk_name(self)}: {words}): the model cannot read it, so it would get "
                                     "the score of any other unreadable text; write it in words the text tower knows")
            warned = self.__dict__.setdefault("_warned_unknown", set())
            if warn and key not in warned:
                warned.add(key)
                log.warning("%s: %d of its %d tokens are unknown to the model's text vocabulary (read as %s: %s)",
                            name, unknown, total, _unk_name(self), words)

    def _warn_cut(self, long: list[tuple[str, int]], what: str) -> None:
        """Log each distinct text cut to the context once per predictor."""
        warned = self.__dict__.setdefault("_warned_cut", set())
        for text, n in long:
            if text not in warned:
                warned.add(text)
                log.warning("%s %r is %d tokens, longer than the text context of %d: cut to it", what, _shorten(text), n,
                            self.context_length)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Token counts of ``texts`` (special tokens included), before any cut."""
        hf = self.model.text_tower.tokenizer.hf
        return [len(x) for x in hf(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]]

    def classify(self, images: Sequence[Any] | Any, labels: Sequence[str] | Mapping[str, Sequence[str]],
                 multi_label: bool = False, prompts: Any = None, *, boxes=None, names: Sequence[str] | None = None,
                 errors: str = "raise", truncate: bool = False, progress: bool = False) -> ClassificationResult:
        """Zero-shot classification of ``images`` against ``labels``.

        ``labels``: class names — each class's prompts come from the prompt set
        (``prompts``: a :class:`~regionmed.eval.prompts.PromptSet`, a path to a prompt
        YAML, or None for the packaged ``eval/prompts/default.yaml``; its ``class_text``
        words a known class, any other class name fills the templates as it is) — or a
        mapping ``class -> list of prompts`` (used as given). A class's prompts are
        embedded, averaged and re-normalised (a prompt ensemble, CLIP's practice).
        The image side is ``fused`` (== global without ``boxes``).
        ``multi_label``: see :class:`ClassificationResult` for what the scores are.
        Raises :class:`TextInputError` for no labels, a single label with
        ``multi_label=False``, or an empty class prompt list.
        """
        class_prompts = self.class_prompts(labels, prompts)
        if not class_prompts:
            raise TextInputError("the label list is empty: give at least two labels (one or more with multi_label)")
        if not multi_label and len(class_prompts) < 2:
            raise TextInputError(f"single-label classification needs at least two labels, got {list(class_prompts)} "
                                 "(use multi_label for a score per label)")
        from regionmed.eval.zeroshot import ensemble, ensemble_scores

        self._check_label_prompts(class_prompts, truncate)
        classes = ensemble(self.model, list(class_prompts.values()),
                           embed=lambda texts: self._embed_texts(texts, True, "prompt", warn=False))
        emb = self.embed_images(images, boxes, names=names, errors=errors, progress=progress)
        scores = ensemble_scores(self.model, emb.fused, classes, "similarity" if multi_label else "softmax")
        return ClassificationResult(list(class_prompts), scores.astype(np.float32), bool(multi_label), class_prompts,
                                    emb.indices, emb.sources, emb.problems)

    def _check_label_prompts(self, class_prompts: Mapping[str, list[str]], truncate: bool) -> None:
        """Name the label (as the user gave it) whose prompts exceed the text context:
        raise :class:`TextInputError` unless ``truncate``, else warn once per label.
        Prompts the model cannot read (mostly unknown tokens) and two labels whose prompts
        are the same token ids (e.g. words outside the vocabulary, all ``[UNK]``) raise
        :class:`TextInputError`: their scores would be equal whatever the image."""
        long = []
        for label, ps in class_prompts.items():
            for p in ps:
                if not isinstance(p, str) or not p.strip():
                    raise TextInputError(f"label {label!r} has an empty prompt")
            self._check_unknown(ps, "prompt", labels=[label] * len(ps))
        hf = self.model.text_tower.tokenizer.hf
        seen: dict[tuple, str] = {}
        for label, ps in class_prompts.items():
            key = tuple(tuple(ids) for ids in hf(list(ps), add_special_tokens=False, verbose=False)["input_ids"])
            if key in seen:
                raise TextInputError(f"labels {_shorten(seen[key])!r} and {_shorten(label)!r} are the same text to the model "
                                     f"(their prompts give the same tokens, words outside its vocabulary read as "
                                     f"{_unk_name(self)}): it cannot tell them apart; reword one of them")
            seen[key] = label
            lengths = self.token_lengths(ps)
            worst = max(range(len(ps)), key=lambda j: lengths[j])
            if lengths[worst] > self.context_length:
                long.append((label, ps[worst], lengths[worst]))
        if long and not truncate:
            label, prompt, n = long[0]
            more = f" ({len(long) - 1} more label{'s' if len(long) != 2 else ''})" if len(long) > 1 else ""
            said = "" if prompt == label else f" (its prompt {_shorten(prompt)!r})"
            raise TextInputError(f"label {_shorten(label)!r}{said} is {n} tokens, longer than the model's text context of "
                                 f"{self.context_length}{more}: shorten it, or pass truncate=True to cut it")
        if long:
            self._warn_cut([(label, n) for label, _, n in long], "label")

    def class_prompts(self, labels, prompts=None) -> dict[str, list[str]]:
        """``{class: prompts}`` for ``labels`` (see :meth:`classify`)."""
        if isinstance(labels, str):
            raise TextInputError(f"labels must be a list of class names or a mapping, not the string {labels!r}")
        if isinstance(labels, Mapping):
            out = {}
            for c, ps in labels.items():
                ps = [ps] if isinstance(ps, str) else list(ps or [])
                if not ps:
                    raise TextInputError(f"label {c!r} has no prompts")
                out[str(c)] = [str(p) for p in ps]
            return out
        names = [str(c) for c in labels]
        for i, c in enumerate(names):
            if not c.strip():
                raise TextInputError(f"label #{i} is empty")
        self._check_unknown(names, "label")  # a class name the vocabulary cannot read, before it fills the templates
        if len(set(names)) != len(names):
            dup = next(c for c in names if names.count(c) > 1)
            raise TextInputError(f"label {dup!r} is given twice")
        from regionmed.eval.prompts import PromptSet, load_prompts

        ps = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts)
        return {c: ps.class_prompts(c) for c in names}

    def ground(self, image: Any, phrases: Sequence[str] | str, read_out: str = "auto", *, threshold: float = 0.5,
               truncate: bool = False, name: str | None = None) -> list[Grounding]:
        """Ground each phrase in ``image``: one :class:`Grounding` per phrase, in order.

        ``read_out``: ``"windows"`` — square windows at three scales slide over the image
        and each is embedded through the model's region path and scored against the
        phrase (:mod:`regionmed.eval.grounding`; the heatmap is the mean score of the
        windows covering each pixel, the box the best window); ``"patch"`` — the
        patch–text cosine map (the box bounds the connected component around the
        maximum of the map thresholded at ``min + threshold * (max - min)``);
        ``"auto"``: ``patch`` for a model with a grid head (``model.dense``: the grid the
        ``grounding`` loss term trains), else ``windows`` for a model with a region path, else
        ``patch`` (:attr:`auto_read_out`).
        The read-out runs on the image scaled down to :attr:`ground_side` when it is
        larger (memory bounded whatever the image's pixel count); results are in the
        image's own pixels.
        Raises :class:`TextInputError` for an empty phrase list, an empty phrase or one
        longer than the context (unless ``truncate``); :class:`ImageInputError`.
        """
        from regionmed.eval.readout import ground_image

        if read_out not in READ_OUTS:
            raise InferenceArgumentError(f"read_out {read_out!r} is not one of {list(READ_OUTS)}")
        phrases = [phrases] if isinstance(phrases, str) else list(phrases)
        if not phrases:
            raise TextInputError("the phrase list is empty: give at least one phrase to ground")
        phrases = self._check_texts(phrases, "phrase", truncate)
        image = self.load_image(image, name)
        w, h = image.size
        work = self._working_image(image)  # memory bounded by the model's input size, not the image's
        sx, sy = w / work.width, h / work.height
        del image
        text = self._embed_texts(phrases, True, "phrase", warn=False)
        mode = self.auto_read_out if read_out == "auto" else read_out
        locs = ground_image(self.model, self.preprocessor, work, text, mode, threshold=threshold)
        out = []
        for phrase, loc in zip(phrases, locs):
            x0, y0, x1, y1 = (float(v) for v in loc["box"])
            box = [min(max(x0 * sx, 0.0), w), min(max(y0 * sy, 0.0), h), min(max(x1 * sx, 0.0), w), min(max(y1 * sy, 0.0), h)]
            peak = (float(loc["point"][0]) * sx, float(loc["point"][1]) * sy)
            out.append(Grounding(phrase, np.asarray(loc["map"], dtype=np.float32), peak, box, float(loc["peak"]), mode, (w, h)))
        return out

    @property
    def auto_read_out(self) -> str:
        """The read-out ``"auto"`` stands for: ``patch`` when the model has a grid head (trained by
        the ``grounding`` term: the patch map is what it trains), else ``windows`` when it has a
        region path, else ``patch``."""
        if getattr(self.model, "dense_head", None) is not None:
            return "patch"
        return "windows" if self.has_region_path else "patch"

    @property
    def ground_side(self) -> int:
        """The long side (pixels) at which :meth:`ground` reads an image out: the model's
        input size, or the side at which the smallest sliding window (a fraction
        ``min(WINDOW_SCALES)`` of the long side) still holds ``roi_size`` pixels for its
        crop, whichever is larger. Larger images are scaled down to it first (bilinear,
        antialiased), so that grounding's memory and time do not grow with the image's
        pixel count; boxes and peaks are mapped back to the image's own pixels."""
        from regionmed.eval.readout import WINDOW_SCALES

        pre = self.preprocessor
        return max(int(pre.image_size), int(np.ceil(pre.roi_size / min(WINDOW_SCALES))))

    def _working_image(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        side = self.ground_side
        if max(w, h) > side:
            s = side / max(w, h)
            image = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return to_rgb(image)


def _unk_name(predictor) -> str:
    return str(predictor.model.text_tower.tokenizer.hf.unk_token or "the unknown token")


def _finite(t, what: str = "image"):
    return require_finite(t, what)


def _shorten(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray)):
        return [images]
    return list(images)
