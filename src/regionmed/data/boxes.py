"""Pixel-box helpers shared by the builder (proposers) and evaluation (grounding).

Boxes are ``[x0, y0, x1, y1]`` lists or tuples. Pure Python: the builder uses
them without importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes (0 when the union is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms(boxes: Sequence[Sequence[float]], scores: Sequence[float], iou: float = 0.5) -> list[int]:
    """Greedy non-maximum suppression: indices kept, best score first."""
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    keep: list[int] = []
    for i in order:
        if all(box_iou(boxes[i], boxes[j]) < iou for j in keep):
            keep.append(i)
    return keep
