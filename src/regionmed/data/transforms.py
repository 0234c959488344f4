"""Image preprocessing shared by training, evaluation and inference.

The settings travel with a saved model (``preprocess.json``), so a loaded model
is always fed the way it was trained: :meth:`RegionMedCLIP.from_pretrained
<regionmed.model.clip.RegionMedCLIP.from_pretrained>` reads that file back (and
checks it against ``config.json``), and :meth:`Preprocessor.from_model` returns
what the model carries. A :class:`Preprocessor` is immutable: a variant is a new
object (``dataclasses.replace(pre, roi_mode="none")``), never an edit of one that
a model, a dataset or another caller shares.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from regionmed.config import ConfigError
from regionmed.data.decode import to_8bit
from regionmed.data.schema import sanitize_box
from regionmed.errors import RegionmedError
from regionmed.io import read_json

PREPROCESS_FILE = "preprocess.json"
ROI_MODES = ("crop", "align", "none")
BOX_POLICIES = ("raise", "drop")


class BoxError(RegionmedError, ValueError):
    """A box that cannot be used: not 4 finite numbers, inverted (x1 < x0 or y1 < y0),
    outside the image, or under 1 pixel wide or high after clipping to the image.

    ``index``: its position in the list given; ``status``: ``"invalid"``,
    ``"outside"`` or ``"zero_area"`` (:func:`regionmed.data.schema.sanitize_box`);
    ``where``: the image's name when the caller gave one."""

    def __init__(self, index: int, box, status: str, width: int, height: int, where: str | None = None):
        what = {"invalid": "is not 4 finite numbers with x0 <= x1 and y0 <= y1", "outside": "lies outside the image",
                "zero_area": "is under 1 pixel wide or high inside the image"}.get(status, status)
        shown = list(box) if isinstance(box, (list, tuple)) else box
        super().__init__(f"{where + ': ' if where else ''}box #{index} {shown!r} {what} ({width}x{height} pixels, xyxy)")
        self.index, self.box, self.status, self.where = index, box, status, where


def check_boxes(boxes, width: int, height: int) -> list[tuple[tuple[float, float, float, float] | None, str]]:
    """Each pixel xyxy box of ``boxes`` clipped to a ``width`` x ``height`` image, with its
    status (``kept``, ``clipped``, ``invalid``, ``outside``, ``zero_area``; the box is None
    for the last three): one entry per box, in order, so positions never shift."""
    out = []
    for b in boxes or []:
        try:
            values = [float(v) for v in b]
        except (TypeError, ValueError):
            out.append((None, "invalid"))
            continue
        out.append(sanitize_box(values, width, height))
    return out


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from an already decoded PIL image of any mode, by the one mode conversion
    (:func:`regionmed.data.decode.to_8bit`: 16-bit/float min–max, palette expanded, alpha
    over black, CMYK by Pillow). Orientation is not touched: decode files and bytes with
    :func:`regionmed.data.decode.decode_image`, which applies the EXIF orientation."""
    return to_8bit(image)[0].convert("RGB")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_triple(value) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(map(_is_number, value))


@dataclass
class ImageFeatures:
    """What the image tower outputs, given to the model instead of pixels (a locked tower's
    cached outputs, :mod:`regionmed.features`; ``RegionMedCLIP.encode_image(features=...)``): ``pooled`` (B, C), ``grid`` (B, C, h, w) (before the grid
    head) and, in ``crop`` mode, ``crops`` (N_valid, C), the ROI crops' pooled features in
    ``roi_mask.nonzero()`` order."""

    pooled: torch.Tensor
    grid: torch.Tensor
    crops: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> "ImageFeatures":
        return ImageFeatures(self.pooled.to(device, non_blocking=non_blocking), self.grid.to(device, non_blocking=non_blocking),
                             None if self.crops is None else self.crops.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "ImageFeatures":
        return ImageFeatures(self.pooled.pin_memory(), self.grid.pin_memory(),
                             None if self.crops is None else self.crops.pin_memory())

    def __len__(self) -> int:
        return self.pooled.shape[0]


# How each field is stored in preprocess.json: (check, what the check expects).
_FIELD_TYPES = {
    "image_size": (_is_int, "an integer"),
    "mean": (_is_triple, "a list of 3 numbers"),
    "std": (_is_triple, "a list of 3 numbers"),
    "roi_mode": (lambda v: isinstance(v, str) and v in ROI_MODES, f"one of {list(ROI_MODES)}"),
    "roi_size": (_is_int, "an integer"),
    "context_margin": (_is_number, "a number"),
    "max_rois": (_is_int, "an integer"),
    "context_length": (_is_int, "an integer"),
}


@dataclass(frozen=True)
class Preprocessor:
    """Turn a PIL image and pixel boxes into model inputs.

    * the image is letterboxed: resized so its long side is ``image_size``, centred
      on a square canvas (aspect ratio kept);
    * boxes are mapped into that square and normalised to [0, 1];
    * in ``crop`` mode, each box grown by ``context_margin`` (per side, as a fraction
      of its size), made square around its centre, clipped to the image, is cropped
      from the FULL-resolution image and resized to ``roi_size``.

    Frozen: assigning a field raises ``dataclasses.FrozenInstanceError``; make a
    variant with ``dataclasses.replace``. ``mean``/``std`` are stored as tuples of
    floats whatever sequence they were given as.
    """

    image_size: int = 128
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    roi_mode: str = "crop"
    roi_size: int = 64
    context_margin: float = 0.15
    max_rois: int = 4
    context_length: int = 64

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__, once, at construction
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ConfigError(f"Preprocessor.{name} needs 3 values, got {len(value)}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "context_margin", float(self.context_margin))
        if self.roi_mode not in ROI_MODES:
            raise ConfigError(f"Preprocessor.roi_mode {self.roi_mode!r} is not one of {ROI_MODES}")

    @classmethod
    def from_dict(cls, data: dict, source: str = "<preprocess>") -> "Preprocessor":
        """Build from the mapping stored in ``preprocess.json``. Strict: every field must
        be present with its JSON type and no other key may appear; otherwise
        :class:`~regionmed.config.ConfigError` names ``source`` and the field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of preprocessing fields, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{source}: unknown field {unknown[0]!r} (known: {', '.join(names)})")
        for name in names:
            if name not in data:
                raise ConfigError(f"{source}: field {name!r} is missing")
            check, expected = _FIELD_TYPES[name]
            if not check(data[name]):
                raise ConfigError(f"{source}: field {name!r} must be {expected}, got {data[name]!r}")
        return cls(**{name: data[name] for name in names})

    @classmethod
    def from_model(cls, model) -> "Preprocessor":
        """The preprocessing a model carries (``model.preprocessor``): read from its
        folder's ``preprocess.json`` when it was loaded, derived from its config once
        when it was created. The same object every call; it cannot be changed."""
        return model.preprocessor

    @classmethod
    def from_folder(cls, directory: str | Path) -> "Preprocessor":
        """Read ``directory/preprocess.json`` (a saved model folder); a missing or
        malformed file raises :class:`~regionmed.config.ConfigError` naming it."""
        path = Path(directory) / PREPROCESS_FILE
        data = read_json(path, ConfigError, "the preprocessing settings of the model folder")
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict:
        """The JSON form (``preprocess.json``): tuples as lists; ``from_dict`` reads it back."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    def _normalise(self, image: Image.Image) -> torch.Tensor:
        arr = np.asarray(image, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    def letterbox(self, image: Image.Image) -> tuple[Image.Image, float, int, int]:
        """Return (square image, scale, x offset, y offset)."""
        w, h = image.size
        scale = self.image_size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (self.image_size, self.image_size))
        ox, oy = (self.image_size - nw) // 2, (self.image_size - nh) // 2
        canvas.paste(image.resize((nw, nh), Image.BILINEAR), (ox, oy))
        return canvas, scale, ox, oy

    def crop_box(self, box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
        """The pixel window cropped for a box: grown by the margin, squared, clipped."""
        x0, y0, x1, y1 = box
        bw, bh = x1 - x0, y1 - y0
        side = max(bw, bh) * (1 + 2 * self.context_margin)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left, top = max(0, int(np.floor(cx - side / 2))), max(0, int(np.floor(cy - side / 2)))
        right, bottom = min(width, int(np.ceil(cx + side / 2))), min(height, int(np.ceil(cy + side / 2)))
        return left, top, max(right, left + 1), max(bottom, top + 1)

    def __call__(self, image: Image.Image, boxes: list | None = None) -> dict:
        """image: PIL image; boxes: pixel xyxy boxes (already sanitised, at most max_rois).

        Returns ``{"image": (3, S, S), "boxes": (n, 4) in [0, 1], "crops": (n, 3, r, r) or None,
        "content": (4,)}``: ``content`` is where the image lies in the square (normalised xyxy; the
        rest is letterbox padding)."""
        image = to_rgb(image)
        boxes = list(boxes or [])
        square, _, _, _ = self.letterbox(image)
        norm, content = self.place(image.size[0], image.size[1], boxes)
        crops = None
        if self.roi_mode == "crop":
            w, h = image.size
            crops = torch.stack(
                [self._normalise(image.crop(self.crop_box(b, w, h)).resize((self.roi_size, self.roi_size), Image.BILINEAR)) for b in boxes]
            ) if boxes else torch.zeros(0, 3, self.roi_size, self.roi_size)
        return {"image": self._normalise(square), "boxes": norm, "crops": crops, "content": content}

    def place(self, width: int, height: int, boxes: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a ``width`` x ``height`` image and its pixel xyxy ``boxes`` land in the letterboxed
        square, without its pixels: ``(boxes (n, 4), content (4,))`` normalised to [0, 1], as
        :meth:`__call__` returns them (``content``: the image's own part of the square)."""
        scale = self.image_size / max(width, height)
        nw, nh = max(1, round(width * scale)), max(1, round(height * scale))
        ox, oy = (self.image_size - nw) // 2, (self.image_size - nh) // 2
        norm = torch.tensor(
            [[(b[0] * scale + ox), (b[1] * scale + oy), (b[2] * scale + ox), (b[3] * scale + oy)] for b in boxes or []],
            dtype=torch.float32,
        ).reshape(-1, 4) / self.image_size
        content = torch.tensor([ox, oy, ox + nw, oy + nh], dtype=torch.float32) / self.image_size
        return norm.clamp(0, 1), content

    def prepare(self, image: Image.Image, boxes: list | None = None, on_invalid: str = "raise") -> dict:
        """Model-ready batch of one: the keyword arguments of ``model.encode_image``.

        ``boxes``: pixel xyxy boxes, clipped to the image. ``on_invalid``: ``"raise"``
        (default) — a box that cannot be used raises :class:`BoxError` naming its
        position, and every box is kept (ROI row j is box j; more than ``max_rois`` is
        fine: a region's embedding does not depend on the others); ``"drop"`` — unusable
        boxes are left out and at most ``max_rois`` kept (the training-time rule; ROI rows
        then no longer match the given positions)."""
        if on_invalid not in BOX_POLICIES:
            raise ValueError(f"on_invalid {on_invalid!r} is not one of {BOX_POLICIES}")
        w, h = image.size
        checked = check_boxes(boxes, w, h)
        if on_invalid == "raise":
            bad = next((i for i, (b, _) in enumerate(checked) if b is None), None)
            if bad is not None:
                raise BoxError(bad, list(boxes)[bad], checked[bad][1], w, h)
            kept = [b for b, _ in checked]
        else:
            kept = [b for b, _ in checked if b is not None][: self.max_rois]
        out = self(image, kept)
        n = len(kept)
        return {
            "images": out["image"].unsqueeze(0),
            "boxes": out["boxes"].unsqueeze(0),
            "roi_mask": torch.ones(1, n, dtype=torch.bool),
            "roi_crops": out["crops"],
        }
