"""Image preprocessing shared by training, evaluation and inference.

The settings travel with a saved model (``preprocess.json``), so a loaded model
is always fed the way it was trained.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from regionmed.data.schema import sanitize_box


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; 16-bit/float images are min-max scaled first."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(image, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.astype(np.uint8))
    return image.convert("RGB")


@dataclass
class Preprocessor:
    """Turn a PIL image and pixel boxes into model inputs.

    * the image is letterboxed: resized so its long side is ``image_size``, centred
      on a square canvas (aspect ratio kept);
    * boxes are mapped into that square and normalised to [0, 1];
    * in ``crop`` mode, each box grown by ``context_margin`` (per side, as a fraction
      of its size), made square around its centre, clipped to the image, is cropped
      from the FULL-resolution image and resized to ``roi_size``.
    """

    image_size: int = 128
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    roi_mode: str = "crop"
    roi_size: int = 64
    context_margin: float = 0.15
    max_rois: int = 4
    context_length: int = 64

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessor":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def from_model(cls, model) -> "Preprocessor":
        return cls.from_dict(model.preprocess_config())

    @classmethod
    def from_folder(cls, directory: str | Path) -> "Preprocessor":
        return cls.from_dict(json.loads((Path(directory) / "preprocess.json").read_text(encoding="utf-8")))

    def to_dict(self) -> dict:
        return asdict(self)

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

        Returns ``{"image": (3, S, S), "boxes": (n, 4) in [0, 1], "crops": (n, 3, r, r) or None}``."""
        image = to_rgb(image)
        boxes = list(boxes or [])
        square, scale, ox, oy = self.letterbox(image)
        norm = torch.tensor(
            [[(b[0] * scale + ox), (b[1] * scale + oy), (b[2] * scale + ox), (b[3] * scale + oy)] for b in boxes],
            dtype=torch.float32,
        ).reshape(-1, 4) / self.image_size
        crops = None
        if self.roi_mode == "crop":
            w, h = image.size
            crops = torch.stack(
                [self._normalise(image.crop(self.crop_box(b, w, h)).resize((self.roi_size, self.roi_size), Image.BILINEAR)) for b in boxes]
            ) if boxes else torch.zeros(0, 3, self.roi_size, self.roi_size)
        return {"image": self._normalise(square), "boxes": norm.clamp(0, 1), "crops": crops}

    def prepare(self, image: Image.Image, boxes: list | None = None) -> dict:
        """Model-ready batch of one: sanitises ``boxes`` (pixel xyxy), keeps at most
        ``max_rois``, and returns the keyword arguments of ``model.encode_image``."""
        w, h = image.size
        kept = [b for b in (sanitize_box(list(b), w, h)[0] for b in (boxes or [])) if b is not None][: self.max_rois]
        out = self(image, kept)
        n = len(kept)
        return {
            "images": out["image"].unsqueeze(0),
            "boxes": out["boxes"].unsqueeze(0),
            "roi_mask": torch.ones(1, n, dtype=torch.bool),
            "roi_crops": out["crops"],
        }
