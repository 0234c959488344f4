"""``regionmed serve``: a Gradio web demo of a trained model (grounding, zero-shot labels, index search).

The page (Gradio Blocks, built by :func:`build_app`) has three tabs over one uploaded image:

* **Ground**: phrases (one per line) → one overlay per phrase (the phrase's heatmap,
  :meth:`regionmed.inference.Predictor.ground`, coloured where it reaches the threshold,
  blended at the chosen opacity, with the predicted box and the peak drawn) and a table of
  the boxes in the image's own pixels. Threshold and opacity re-render without
  running the model again.
* **Classify**: labels (one per line, a default list given) → zero-shot scores
  (:meth:`~regionmed.inference.Predictor.classify`, single- or multi-label).
* **Search**: a text query against the index loaded with ``--index``
  (:meth:`regionmed.index.EmbeddingIndex.search_text`) → the top images and regions as
  a gallery with the boxes drawn, and a table.

Privacy: uploads go through the library's PHI-safe decoder
(:func:`regionmed.inference.load_image`; no DICOM attribute leaves it, and every image it
returns carries its pixels only: no PNG text, EXIF, comment or ICC profile reaches the
images the page shows, :mod:`regionmed.data.metadata`). The uploaded
file is read once and deleted from Gradio's upload folder; its name is never shown or
logged (the decoder sees its path only to recognise a ``.dcm`` suffix; messages call it
"the uploaded file"). Decoded images and overlays stay in Gradio's cache for at most an
hour (``delete_cache``). Uploads over the
size limit are refused in the browser before they are sent (Gradio's own message would
quote the file name), and by the server (Gradio's ``max_file_size``). Gradio's run
history, share links and analytics are off, the page loads no web fonts, and the server
listens on loopback (127.0.0.1) unless ``--host`` says otherwise.

Memory: grounding reads an image out at a bounded working size
(:attr:`regionmed.inference.Predictor.ground_side`) and draws overlays at
``display_max_side``, so a request holds one decoded copy of the image plus a bounded
amount (``benchmarks/bench_ground_memory.py --path serve``).

Every bad input (an undecodable image, a multi-frame DICOM or one without pixel data, too
many pixels, an oversized upload, no or too many phrases, a phrase longer than the
model's text context, no index loaded, an index built by another model) ends in a
message in the page's status line; the server keeps serving.

Through the HTTP API (``gradio_client`` or Gradio's ``/gradio_api`` routes) the same
functions are ``/load_image`` (file → decoded image, message), ``/ground`` (image,
phrases, threshold, opacity → overlays, boxes, message), ``/classify`` (image, labels,
multi-label → scores, table, message) and ``/search`` (query, k, kind → gallery, table,
message).
"""

from __future__ import annotations

import logging
import math
import os
import re
import tarfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from regionmed.data.decode import DEFAULT_MAX_PIXELS
from regionmed.errors import RegionmedError
from regionmed.eval.overlay import display_scale as _display_scale
from regionmed.eval.overlay import render_overlay

if TYPE_CHECKING:  # gradio is an optional dependency (pip install 'regionmed[serve]')
    import gradio as gr

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LABELS",
    "DemoBackend",
    "GroundState",
    "ServeLimits",
    "add_serve_parser",
    "build_app",
    "launch_app",
    "load_index_for",
    "parse_lines",
    "render_overlay",
]

DEFAULT_LABELS = ("no finding", "nodule", "mass", "opacity", "pleural effusion", "cardiomegaly", "pneumothorax")
DEFAULT_PHRASES = ("nodule", "pleural effusion")
UPLOAD_NAME = "the uploaded file"  # how messages name an upload (never its own file name)
# Box / caption colours per phrase (colour-blind-safe qualitative set, Okabe & Ito 2008).
PALETTE = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167))
SEARCH_KINDS = ("both", "image", "region")
THUMB_SIDE = 512  # search results are drawn at most this large


@dataclass(frozen=True)
class ServeLimits:
    """What the demo accepts (each a ``regionmed serve`` option).

    ``max_upload_mb``: the largest upload in MB (10^6 bytes), refused in the browser and
    by the server; ``max_pixels``: the most pixels (width x height) of a decoded image,
    refused before decoding; ``max_phrases`` / ``max_labels``: lines read from the
    phrase / label boxes; ``max_results``: the largest k of a search;
    ``display_max_side``: overlays and search thumbnails are drawn with at most this
    many pixels on the long side (boxes and peaks in the tables stay in the image's own
    pixels)."""

    max_upload_mb: float = 50.0
    max_pixels: int = DEFAULT_MAX_PIXELS  # the library's default (regionmed.inference), as the commands
    max_phrases: int = 8
    max_labels: int = 32
    max_results: int = 50
    display_max_side: int = 1024

    def __post_init__(self):
        for name in ("max_upload_mb", "max_pixels", "max_phrases", "max_labels", "max_results", "display_max_side"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServeLimits.{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)


class DemoInputError(RegionmedError, ValueError):
    """A page input the demo refuses (the message is shown in the page as it is)."""


class ServeError(RegionmedError, RuntimeError):
    """The demo cannot start: Gradio is missing, a limit is out of range, or the address cannot be listened on."""


# -- inputs -------------------------------------------------------------------------------

def parse_lines(text: str | None, what: str, limit: int) -> list[str]:
    """The non-blank lines of ``text`` (stripped, duplicates dropped, order kept).
    Raises :class:`DemoInputError` for none, or more than ``limit``."""
    seen: dict[str, None] = {}
    for raw in (text or "").splitlines():
        item = raw.strip()
        if item:
            seen.setdefault(item, None)
    items = list(seen)
    if not items:
        raise DemoInputError(f"Type at least one {what} (one per line).")
    if len(items) > limit:
        raise DemoInputError(f"{len(items)} {what}s given; this demo takes at most {limit} at once (--max-{what}s).")
    return items


def _image_message(err: RegionmedError, limits: ServeLimits) -> str:
    """A page message for an image that cannot be used (ImageInputError's reason)."""
    reason = getattr(err, "reason", None)
    detail = getattr(err, "detail", None) or str(err)
    if reason == "too_many_pixels":
        return (f"The image has too many pixels ({detail}); this demo accepts at most "
                f"{limits.max_pixels / 1e6:g} megapixels (--max-pixels).")
    if reason == "unsupported_dicom":
        return f"This DICOM file cannot be shown: {detail}. The demo takes single-frame DICOM images with pixel data."
    if reason == "truncated_image":
        return f"The image file is incomplete (cut short): {detail}."
    if reason == "empty_image":
        return f"The uploaded file holds no image: {detail}."
    if reason == "unreadable_image":
        return f"The uploaded file could not be read as an image (PNG, JPEG or DICOM): {detail}."
    return f"The image cannot be used: {detail}."


def _error_message(err: Exception | str) -> str:
    # The library's text errors name the Python/CLI way out (truncate=True, --truncate): not a page control.
    text = re.sub(r",? or pass truncate=True(?: \(--truncate\))? to cut it", "", str(err))
    return f"**Error:** {text}"


def _unexpected(what: str, err: Exception) -> str:
    # The message of an unexpected exception may quote an input: log its type and where it came from only.
    log.error("%s failed with %s\n%s", what, type(err).__name__, "".join(traceback.format_tb(err.__traceback__)))
    return f"**Error:** {what} failed unexpectedly ({type(err).__name__}); the server log has the traceback."


# -- index --------------------------------------------------------------------------------

def load_index_for(predictor, folder: str | os.PathLike | None) -> tuple[Any | None, str | None]:
    """Load the retrieval index at ``folder`` for ``predictor``'s model.

    Returns ``(index, None)``, or ``(None, message)`` when there is no folder, no index
    there, or it was built by another model (embedding size or model id differ): the
    demo then serves without search and shows the message when a search is tried."""
    if folder is None:
        return None, "No index is loaded: start the demo with --index FOLDER (built by `regionmed index`) to search."
    from regionmed.index import EmbeddingIndex

    try:
        index = EmbeddingIndex.load(folder)
        index.check_model(predictor.model_id, predictor.embed_dim, "the demo's model embeddings")
    except RegionmedError as err:
        log.warning("index not loaded: %s", err)
        return None, f"The index could not be used, search is off: {err}"
    return index, None


# -- the demo's functions (no Gradio here: the app wires them) -----------------------------

@dataclass
class GroundState:
    """What the overlays are re-drawn from when threshold or opacity change, at the
    overlays' size (a session keeps at most ``max_phrases`` maps of ``display_max_side``
    pixels, whatever the image's size): ``size`` the image's (w, h), ``display`` the
    overlays' (w, h); per phrase its heatmap (display size), box and peak (display pixels)."""

    size: tuple[int, int]
    display: tuple[int, int]
    phrases: list[str]
    scores: list[float]
    heatmaps: list[np.ndarray]
    boxes: list[list[float]]
    peaks: list[tuple[float, float]]

    @classmethod
    def from_groundings(cls, groundings: list[Any], size: tuple[int, int], max_side: int) -> "GroundState":
        w, h = size
        s = _display_scale(w, h, max_side)
        display = (max(1, round(w * s)), max(1, round(h * s)))
        return cls(size=(w, h), display=display, phrases=[g.phrase for g in groundings], scores=[float(g.score) for g in groundings],
                   heatmaps=[g.heatmap_at(max_side) for g in groundings], boxes=[[float(v) * s for v in g.box] for g in groundings],
                   peaks=[(float(g.peak[0]) * s, float(g.peak[1]) * s) for g in groundings])


class DemoBackend:
    """The demo's page functions over a :class:`~regionmed.inference.Predictor`, an
    optional index and :class:`ServeLimits`. Each returns its outputs followed by a
    Markdown status message; a bad input gives empty outputs and the message (never an
    exception), so that the page says what was wrong and the server keeps serving."""

    def __init__(self, predictor, index=None, *, limits: ServeLimits | None = None, index_problem: str | None = None):
        self.predictor = predictor
        self.index = index
        self.limits = limits or ServeLimits()
        self.index_problem = index_problem if index is None else None
        if index is None and self.index_problem is None:
            self.index_problem = "No index is loaded: start the demo with --index FOLDER (built by `regionmed index`) to search."
        self._thumbs: dict[str, tuple[Image.Image, float]] = {}
        self._shards: dict[str, dict[str, str]] = {}  # shard path -> sample key -> image member

    # upload ---------------------------------------------------------------------------
    def load_upload(self, path: str | None) -> tuple[Image.Image | None, str]:
        """The uploaded file (Gradio's temporary path) → (decoded 8-bit image, message).
        The file is deleted once read; its name appears nowhere (it is read by path only
        so that a ``.dcm`` file without the DICM preamble is still taken as DICOM)."""
        if not path:
            return None, "Upload an image (PNG, JPEG or DICOM)."
        try:
            size = os.path.getsize(path)
            if size > self.limits.max_upload_bytes:
                return None, _error_message(f"The uploaded file is {size / 1e6:.1f} MB; this demo accepts uploads up to "
                                            f"{self.limits.max_upload_mb:g} MB (--max-upload-mb).")
            with open(path, "rb") as f:
                head = f.read(132)
            return self._decode(path, head, path)
        except OSError as err:
            return None, _error_message(f"The upload could not be read ({err.strerror or type(err).__name__}).")
        finally:
            _remove_quietly(path)

    def load_bytes(self, raw: bytes) -> tuple[Image.Image | None, str]:
        """Encoded image bytes (PNG, JPEG, DICOM, ...) → (decoded 8-bit image, message)."""
        return self._decode(raw, raw[:132], None)

    def _decode(self, source: str | bytes, head: bytes, path: str | None) -> tuple[Image.Image | None, str]:
        from regionmed.data.dicom import is_dicom
        from regionmed.inference import ImageInputError, load_image

        try:
            image = load_image(source, name=UPLOAD_NAME, max_pixels=self.limits.max_pixels)
        except ImageInputError as err:
            return None, _error_message(_image_message(err, self.limits))
        except Exception as err:  # noqa: BLE001 - the page must say something and keep serving
            return None, _unexpected("Decoding the upload", err)
        kind = "DICOM" if is_dicom(head, path) else "image"
        return image, f"Loaded a {image.width} × {image.height} {kind} ({'grey scale' if image.mode == 'L' else 'colour'})."

    def _image(self, image) -> Image.Image:
        """The image input of /ground and /classify: the page's decoded image (a file the
        demo wrote), or a file sent straight to the HTTP API (:class:`_Upload`), which
        goes through :meth:`load_upload` (size limit, PHI-safe decoding, the name never
        shown or logged, the file deleted once read). Raises :class:`DemoInputError` with
        the page's message."""
        from regionmed.inference import load_image

        if image is None:
            raise DemoInputError("Upload an image first (PNG, JPEG or DICOM).")
        if isinstance(image, _Upload):
            img, message = self.load_upload(image.path)
            if img is None:
                raise DemoInputError(message.removeprefix("**Error:** "))
            return img
        return load_image(image, name="the image", max_pixels=self.limits.max_pixels)

    # ground ---------------------------------------------------------------------------
    def ground(self, image, phrases: str, threshold: float, opacity: float) -> tuple[list, list[list], GroundState | None, str]:
        """(image, phrases one per line, threshold, opacity) → (overlays as (image,
        caption) pairs, box rows, state for re-rendering, message)."""
        from regionmed.inference import ImageInputError

        try:
            img = self._image(image)
            items = parse_lines(phrases, "phrase", self.limits.max_phrases)
            groundings = self.predictor.ground(img, items)
        except ImageInputError as err:
            return [], [], None, _error_message(_image_message(err, self.limits))
        except RegionmedError as err:
            return [], [], None, _error_message(err)
        except Exception as err:  # noqa: BLE001
            return [], [], None, _unexpected("Grounding", err)
        state = GroundState.from_groundings(groundings, img.size, self.limits.display_max_side)
        rows = [[g.phrase, round(float(g.score), 4), *[round(float(v), 1) for v in g.box],
                 round(float(g.peak[0]), 1), round(float(g.peak[1]), 1)] for g in groundings]
        read_out = groundings[0].read_out if groundings else ""
        message = (f"Grounded {len(groundings)} phrase{'s' if len(groundings) != 1 else ''} in a {img.width} × {img.height} "
                   f"image ({read_out} read-out; score: cosine similarity behind the box).")
        return self.render(img, state, threshold, opacity), rows, state, message

    def rerender(self, image, state: GroundState | None, threshold: float, opacity: float) -> list:
        """The overlays again with a new threshold / opacity (no model call)."""
        if image is None or state is None or not state.phrases:
            return []
        try:
            img = self._image(image)
            if img.size != tuple(state.size):
                return []
            return self.render(img, state, threshold, opacity)
        except Exception as err:  # noqa: BLE001
            _unexpected("Re-drawing the overlays", err)
            return []

    def render(self, img: Image.Image, state: GroundState, threshold: float, opacity: float) -> list:
        """One (overlay, caption) per phrase of ``state`` over ``img`` (the grounded image)."""
        base = img
        if base.size != tuple(state.display):  # scaled first: memory follows the overlay's size
            base = base.resize(state.display, Image.Resampling.BILINEAR, reducing_gap=3.0)
        base = base.convert("RGB")
        out = []
        for i, phrase in enumerate(state.phrases):
            over = render_overlay(base, state.heatmaps[i], box=state.boxes[i], peak=state.peaks[i], label=phrase,
                                  threshold=float(threshold), opacity=float(opacity), color=PALETTE[i % len(PALETTE)],
                                  max_side=max(state.display))
            out.append((over, f"{phrase} (score {state.scores[i]:.3f})"))
        return out

    # classify -------------------------------------------------------------------------
    def classify(self, image, labels: str, multi_label: bool) -> tuple[dict | None, list[list], str]:
        """(image, labels one per line, multi-label?) → (label → probability for gr.Label,
        or None for multi-label; ranked rows [label, score]; message)."""
        from regionmed.inference import ImageInputError

        try:
            img = self._image(image)
            items = parse_lines(labels, "label", self.limits.max_labels)
            typed = [ln.strip() for ln in (labels or "").splitlines() if ln.strip()]
            if len(typed) != len(items):
                dup = next(t for i, t in enumerate(typed) if t in typed[:i])
                raise DemoInputError(f"The label {dup!r} is given twice: type each label once.")
            if len(items) < 2 and not multi_label:
                raise DemoInputError("Type at least two labels for single-label scores (or tick multi-label).")
            result = self.predictor.classify([img], items, multi_label=bool(multi_label))
        except ImageInputError as err:
            return None, [], _error_message(_image_message(err, self.limits))
        except RegionmedError as err:
            return None, [], _error_message(err)
        except Exception as err:  # noqa: BLE001
            return None, [], _unexpected("Classification", err)
        scores = np.asarray(result.scores)[0]
        order = np.argsort(-scores, kind="stable")
        rows = [[result.labels[j], round(float(scores[j]), 4)] for j in order]
        if result.multi_label:
            return None, rows, ("Multi-label scores: the cosine similarity of the image with each label's prompts "
                                "(uncalibrated; compare within a label across images, not across labels).")
        best = result.labels[int(order[0])]
        probs = {result.labels[j]: float(scores[j]) for j in order}
        return probs, rows, f"Most likely: **{best}** ({float(scores[order[0]]):.1%}; softmax over the {len(items)} labels)."

    # search ---------------------------------------------------------------------------
    def search(self, query: str, k: float, kind: str) -> tuple[list, list[list], str]:
        """(text query, k, kind) → (gallery of (image with box, caption), rows, message)."""
        if self.index is None:
            return [], [], _error_message(self.index_problem)
        query = (query or "").strip()
        if not query:
            return [], [], _error_message("Type a text query.")
        kind = kind if kind in SEARCH_KINDS else "both"
        try:
            k = int(k) if k is not None else 0
            if not 1 <= k <= self.limits.max_results:
                raise DemoInputError(f"k must be between 1 and {self.limits.max_results}, got {k}.")
            hits = self.index.search_text(self.predictor, query, k=k, kind=kind)[0]
        except RegionmedError as err:
            return [], [], _error_message(err)
        except Exception as err:  # noqa: BLE001
            return [], [], _unexpected("Search", err)
        gallery, rows, missing = [], [], 0
        for rank, hit in enumerate(hits, 1):
            box = _hit_box(hit)
            hit_kind = hit.kind
            score = float(hit.score)
            hit_id = str(hit.id)
            coords = [round(float(v), 1) for v in box] if box else [None] * 4
            rows.append([rank, hit_id, hit_kind, hit.label or "", round(score, 4), *coords])
            thumb = self._thumbnail(hit.source)
            if thumb is None:
                missing += 1
                continue
            caption = f"{rank}. {hit_id}{f' {hit.label}' if hit.label else ''} ({hit_kind}, {score:.3f})"
            gallery.append((self._draw_hit(*thumb, box), caption))
        message = f"{len(hits)} result{'s' if len(hits) != 1 else ''} for “{query}”."
        if missing:
            message += f" {missing} image{'s' if missing != 1 else ''} of the index could not be read (listed in the table only)."
        return gallery, rows, message

    def _thumbnail(self, path) -> tuple[Image.Image, float] | None:
        """An index image scaled to at most 512 pixels on the long side, and that scale
        (cached: the last 512 images)."""
        if path is None:
            return None
        key = str(path)
        if key not in self._thumbs:
            from regionmed.inference import load_image

            try:
                img = load_image(self._source(key), name="an index image", max_pixels=self.limits.max_pixels)
            except (RegionmedError, OSError, tarfile.TarError) as err:
                log.warning("index image not readable (%s)", getattr(err, "reason", type(err).__name__))
                return None
            if len(self._thumbs) >= 512:
                self._thumbs.pop(next(iter(self._thumbs)))
            s = _display_scale(img.width, img.height, THUMB_SIDE)
            if s < 1:
                img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BILINEAR)
            self._thumbs[key] = (img, s)
        return self._thumbs[key]

    def _source(self, source: str) -> str | bytes:
        """An index entry's image: a file path as it is, or ``SHARD.tar:KEY`` (a MedRegion
        sample, as ``regionmed index`` records a dataset split) read from its shard."""
        if os.path.isfile(source):
            return source
        shard, sep, key = source.rpartition(":")
        if not (sep and shard.endswith(".tar") and os.path.isfile(shard)):
            return source  # load_image names it missing
        if shard not in self._shards:
            from regionmed.data.schema import IMAGE_EXTENSIONS

            members = {}
            with tarfile.open(shard, "r:") as tar:
                for m in tar:
                    base = m.name.rsplit("/", 1)[-1]
                    stem, _, ext = base.partition(".")
                    if m.isfile() and ext.lower() in IMAGE_EXTENSIONS:
                        members[stem] = m.name
            self._shards[shard] = members
        name = self._shards[shard].get(key)
        if name is None:
            return source
        with tarfile.open(shard, "r:") as tar:
            return tar.extractfile(name).read()

    def _draw_hit(self, thumb: Image.Image, scale: float, box) -> Image.Image:
        return render_overlay(thumb, None, box=None if box is None else [v * scale for v in box], opacity=0.0,
                              color=PALETTE[0], max_side=THUMB_SIDE)


def _hit_box(hit) -> list[float] | None:
    box = hit.box
    if box is None:
        return None
    box = [float(v) for v in box]
    return box if len(box) == 4 and all(math.isfinite(v) for v in box) else None


@dataclass(frozen=True)
class _Upload:
    """A file sent to /ground or /classify through the HTTP API (not the page's own image):
    read only through :meth:`DemoBackend.load_upload`."""

    path: str


_OWN_OUTPUTS_KEPT = 4096  # the most recent page images remembered as the demo's own files


def _guarded_image(**kw) -> "gr.Image":
    """A ``gr.Image`` whose input is never decoded by Gradio: a file the demo wrote itself (the
    decoded image shown in the page) comes as its path; any other file (sent to the HTTP API
    directly: a DICOM, a renamed text file) as an :class:`_Upload`, decoded by the demo's
    guarded path. Gradio's own decoding would fail with a bare error and log a traceback that
    quotes the uploaded file's name, and leave the file in its upload folder."""
    import collections

    import gradio as gr

    # The instance's own pre/postprocess (a gr.Image subclass would make Gradio write a .pyi
    # stub beside this module).
    image = gr.Image(**kw)
    own: collections.OrderedDict[str, None] = collections.OrderedDict()
    postprocess_image = image.postprocess

    def postprocess(value):
        data = postprocess_image(value)
        path = getattr(data, "path", None)
        if path:
            own[str(Path(path).resolve())] = None
            while len(own) > _OWN_OUTPUTS_KEPT:
                own.popitem(last=False)
        return data

    def preprocess(payload):
        if payload is None:
            return None
        path = getattr(payload, "path", None)
        if not path:
            return _Upload("")
        if str(Path(path).resolve()) in own:
            return str(path)
        return _Upload(str(path))

    image.postprocess = postprocess
    image.preprocess = preprocess
    return image


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


# -- the Gradio app -----------------------------------------------------------------------

# Refuses an over-size file in the browser before it is uploaded, with a message that does not
# quote the file's name (Gradio's own message would). Runs once when the page loads.
_UPLOAD_GUARD_JS = """
() => {
  const limit = %(limit)d, limitMb = "%(limit_mb)s";
  const show = (text) => {
    const el = document.getElementById("upload-limit-message");
    if (el) { el.textContent = text; el.style.display = text ? "block" : "none"; }
  };
  document.addEventListener("change", (ev) => {
    const input = ev.target;
    if (!(input instanceof HTMLInputElement) || input.type !== "file" || !input.files) return;
    const big = Array.from(input.files).find((f) => f.size > limit);
    if (!big) { show(""); return; }
    ev.stopImmediatePropagation();
    ev.preventDefault();
    input.value = "";
    show("Error: the file is " + (big.size / 1e6).toFixed(1) + " MB; this demo accepts uploads up to " + limitMb +
         " MB (--max-upload-mb). Nothing was uploaded.");
  }, true);
}
"""

_CSS = """
#upload-limit-message { display: none; color: var(--error-text-color, #b91c1c); font-weight: 600; padding: 4px 0; }
"""


def build_app(predictor, index=None, *, limits: ServeLimits | None = None, index_problem: str | None = None,
              labels: tuple[str, ...] | list[str] = DEFAULT_LABELS, title: str = "regionmed demo") -> "gr.Blocks":
    """The demo's Gradio Blocks (not launched: :func:`launch_app` starts it with the limits).

    ``predictor``: a :class:`regionmed.inference.Predictor`; ``index``: an
    :class:`regionmed.index.EmbeddingIndex` or None (``index_problem``: the message
    shown when searching without one, e.g. from :func:`load_index_for`); ``labels``: the
    default zero-shot labels. The app keeps its :class:`DemoBackend` as ``app.backend``
    and ``limits`` as ``app.serve_limits``."""
    import gradio as gr

    limits = limits or ServeLimits()
    backend = DemoBackend(predictor, index, limits=limits, index_problem=index_problem)
    model_note = f"model `{predictor.model_id}`" + ("" if predictor.has_region_path else " (no region path: patch read-out)")
    index_note = "an index is loaded" if index is not None else "no index loaded"

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(f"## {title}\n{model_note}; {index_note}. Research demo: not for clinical use. "
                    f"Uploads up to {limits.max_upload_mb:g} MB and {limits.max_pixels / 1e6:g} megapixels; "
                    "PNG, JPEG or single-frame DICOM (no DICOM attribute is shown).")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.UploadButton("Upload an image (PNG, JPEG, DICOM)", type="filepath", file_count="single",
                                         variant="primary", elem_id="upload-button")
                gr.HTML('<div id="upload-limit-message" role="alert"></div>')
                image = _guarded_image(label="Image", type="filepath", image_mode=None, format="png", interactive=False,
                                       buttons=["fullscreen"], elem_id="input-image", height=360)
                status = gr.Markdown("Upload an image to start.", elem_id="status")
            with gr.Column(scale=2):
                with gr.Tab("Ground phrases"):
                    with gr.Row():
                        phrases = gr.Textbox(label="Phrases (one per line)", value="\n".join(DEFAULT_PHRASES), lines=3,
                                             max_lines=limits.max_phrases + 2, elem_id="phrases", scale=3)
                        with gr.Column(scale=2):
                            threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Heatmap threshold", elem_id="threshold")
                            opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Heatmap opacity", elem_id="opacity")
                    ground_btn = gr.Button("Ground", variant="primary", elem_id="ground-button")
                    overlays = gr.Gallery(label="Heatmaps and boxes", columns=2, height="auto", format="png",
                                          object_fit="contain", buttons=["download", "fullscreen"], elem_id="overlays")
                    boxes = gr.Dataframe(headers=["phrase", "score", "x0", "y0", "x1", "y1", "peak x", "peak y"],
                                         datatype=["str", "number", "number", "number", "number", "number", "number", "number"],
                                         label="Boxes (pixels of the image)", interactive=False, elem_id="boxes")
                    ground_state = gr.State(None)
                with gr.Tab("Zero-shot labels"):
                    label_box = gr.Textbox(label="Labels (one per line)", value="\n".join(labels), lines=6, elem_id="labels")
                    multi = gr.Checkbox(label="Multi-label (a similarity per label instead of one softmax)", value=False)
                    classify_btn = gr.Button("Classify", variant="primary", elem_id="classify-button")
                    label_out = gr.Label(label="Scores", num_top_classes=10, elem_id="label-scores")
                    label_table = gr.Dataframe(headers=["label", "score"], datatype=["str", "number"], label="All labels",
                                               interactive=False, elem_id="label-table")
                with gr.Tab("Search the index"):
                    with gr.Row():
                        query = gr.Textbox(label="Text query", value="left lower zone opacity", scale=3, elem_id="query")
                        k = gr.Number(label=f"k (1 to {limits.max_results})", value=8, precision=0, scale=1)
                        kind = gr.Radio(list(SEARCH_KINDS), value="both", label="Results", scale=2)
                    search_btn = gr.Button("Search", variant="primary", elem_id="search-button")
                    results = gr.Gallery(label="Images and regions", columns=4, height="auto", format="png",
                                         object_fit="contain", elem_id="search-results")
                    result_table = gr.Dataframe(headers=["rank", "id", "kind", "label", "score", "x0", "y0", "x1", "y1"],
                                                datatype=["number", "str", "str", "str", "number", "number", "number", "number",
                                                          "number"],
                                                label="Results", interactive=False, elem_id="search-table")

        upload.upload(backend.load_upload, inputs=upload, outputs=[image, status], api_name="load_image",
                      concurrency_limit=2)
        ground_btn.click(backend.ground, inputs=[image, phrases, threshold, opacity],
                         outputs=[overlays, boxes, ground_state, status], api_name="ground", concurrency_limit=1)
        for slider in (threshold, opacity):
            slider.change(backend.rerender, inputs=[image, ground_state, threshold, opacity], outputs=overlays,
                           api_visibility="private", trigger_mode="always_last", show_progress="hidden")
        classify_btn.click(backend.classify, inputs=[image, label_box, multi], outputs=[label_out, label_table, status],
                           api_name="classify", concurrency_limit=1)
        search_btn.click(backend.search, inputs=[query, k, kind], outputs=[results, result_table, status],
                         api_name="search", concurrency_limit=1)
    app.backend = backend
    app.serve_limits = limits
    return app


def launch_app(app: "gr.Blocks", *, host: str = "127.0.0.1", port: int | None = None, block: bool = True,
               quiet: bool = False) -> str:
    """Start ``app`` (from :func:`build_app`) on ``host:port`` with its upload limit; returns
    the local URL. ``block``: serve until interrupted (False: return at once, for tests;
    stop with ``app.close()``). ``port`` None: Gradio's default (7860, or the next free)."""
    import gradio as gr

    limits: ServeLimits = getattr(app, "serve_limits", ServeLimits())
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # no web fonts
    js = _UPLOAD_GUARD_JS % {"limit": limits.max_upload_bytes, "limit_mb": f"{limits.max_upload_mb:g}"}
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=quiet, share=False,
                           show_error=False, max_file_size=limits.max_upload_bytes, ssr_mode=False, run_history=False,
                           footer_links=["api"], theme=theme, css=_CSS, js=js, mcp_server=False)
    if block:
        try:
            app.block_thread()
        finally:
            app.close()
    return url


def serve(model: str | Path, index: str | Path | None = None, *, host: str = "127.0.0.1", port: int | None = 7860,
          device: str | None = None, limits: ServeLimits | None = None, labels: list[str] | None = None) -> None:
    """``regionmed serve``: load the model (and index), build the page, serve until interrupted."""
    from regionmed.inference import Predictor

    limits = limits or ServeLimits()
    predictor = Predictor.from_pretrained(model, device=device, max_pixels=limits.max_pixels)
    idx, problem = load_index_for(predictor, index) if index is not None else (None, None)
    if problem:
        print(f"regionmed serve: warning: {problem}")
    app = build_app(predictor, idx, limits=limits, index_problem=problem, labels=tuple(labels or DEFAULT_LABELS))
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"regionmed serve: warning: listening on {host}: anyone who can reach this machine can upload images "
              "to it (no authentication)")
    url = launch_app(app, host=host, port=port, block=False, quiet=True)
    print(f"regionmed serve: model {model} ({predictor.model_id}) at {url} (Ctrl+C stops)", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()


# -- command line -------------------------------------------------------------------------

def _cmd_serve(args) -> int:
    try:
        import gradio  # noqa: F401 - optional dependency, checked before the model loads
    except ImportError as err:
        raise ServeError(f"the web demo needs Gradio ({err}): pip install 'regionmed[serve]'") from err
    try:
        limits = ServeLimits(max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, max_phrases=args.max_phrases,
                             max_labels=args.max_labels, max_results=args.max_results)
    except ValueError as err:
        raise ServeError(str(err)) from err
    try:
        serve(args.model, args.index, host=args.host, port=args.port, device=args.device, limits=limits,
              labels=args.label or None)
    except OSError as err:  # the port is taken, the address is not this machine's
        raise ServeError(f"cannot listen on {args.host}:{args.port}: {err}") from err
    return 0


def add_serve_parser(sub) -> None:
    """Register ``regionmed serve`` on an argparse sub-parser set."""
    d = ServeLimits()
    p = sub.add_parser(
        "serve", help="a web demo (Gradio): grounding heatmaps, zero-shot labels, index search",
        description="Serve a web page over a trained model: upload a PNG, JPEG or DICOM image (decoded PHI-safe: no DICOM "
                    "attribute is shown or logged), ground phrases (heatmaps with threshold and opacity, boxes), score "
                    "zero-shot labels, and search an index built by `regionmed index` by text. Listens on 127.0.0.1 "
                    "(this machine only) unless --host says otherwise. Gradio's HTTP API serves /load_image, /ground, "
                    "/classify and /search.")
    p.add_argument("--model", required=True, help="model folder (e.g. runs/demo/region/model)")
    p.add_argument("--index", help="index folder from `regionmed index`, built by the same model (optional: search is off without it)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes the demo to "
                                                        "the network, without authentication)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--device", help="torch device (default: cpu)")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb, help=f"largest upload in MB (default {d.max_upload_mb:g})")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help=f"most pixels (width x height) of an image (default {d.max_pixels:,})")
    p.add_argument("--max-phrases", type=int, default=d.max_phrases, help=f"phrases per grounding (default {d.max_phrases})")
    p.add_argument("--max-labels", type=int, default=d.max_labels, help=f"labels per classification (default {d.max_labels})")
    p.add_argument("--max-results", type=int, default=d.max_results, help=f"largest k of a search (default {d.max_results})")
    p.add_argument("--label", action="append", default=[], metavar="TEXT",
                   help="a default zero-shot label shown in the page (repeatable; default: "
                        + ", ".join(DEFAULT_LABELS) + ")")
    p.set_defaults(func=_cmd_serve)
