"""Traditional anonymizers, the baselines of DeepPrivacy's WIDER FACE table.

Each one rewrites the pixels inside the given face boxes and nothing else. Two choices differ from
the 2019 evaluation code on purpose (docs/reference.md, "Flaws of the 2019 evaluation"): black-out
is true black (the original filled the box with noise) and pixelation is blocky, area-downsampled
then nearest-upsampled (the original upsampled bilinearly, which is a blur). The parameters of every
method are recorded in :data:`BASELINES` so a result table can print exactly what was run.

Boxes are `(N, 4)` `x0, y0, x1, y1` in pixels; the box covers pixel columns `floor(x0) ..
ceil(x1) - 1` (clipped to the image), so a WIDER box `x, y, w, h` is `x, y, x + w, y + h`.
Boxes are processed in order: where boxes overlap, a later box works on the earlier result.

Beside the table's baselines, :data:`SMALL_FACE_METHODS` holds `soft_blur`, the anonymizer's method
for faces too small to paint: a Gaussian blur whose strength and edges follow the box to a fraction
of a pixel, so that a tracked face's blur does not step from frame to frame in a video.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np


@dataclass(frozen=True)
class Baseline:
    """An anonymizer of one face region and the parameters it was built with."""

    name: str
    description: str
    fn: Callable[..., None] = field(repr=False, compare=False)  # fn(image, (x0, y0, x1, y1), **params)
    params: dict = field(default_factory=dict)  # exactly the keyword arguments of `fn`
    paper_ap: tuple[float, float, float] | None = None  # DSFD AP easy/medium/hard, DeepPrivacy table
    subpixel: bool = False  # fn takes the box as given (floats), not the pixels it touches


def _pixel_box(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int] | None:
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def blackout(image: np.ndarray, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = 0


def pixelate(image: np.ndarray, box: tuple[int, int, int, int], cells: int) -> None:
    """Average the face over a `cells × cells` grid (area interpolation), then repeat each cell.

    A face narrower than `cells` px keeps one cell per pixel on that axis (it cannot get coarser).
    """
    x0, y0, x1, y1 = box
    face = image[y0:y1, x0:x1]
    h, w = face.shape[:2]
    gh, gw = min(cells, h), min(cells, w)
    small = cv2.resize(face, (gw, gh), interpolation=cv2.INTER_AREA)
    rows = np.arange(h) * gh // h  # exact integer nearest-neighbour index: blocks are constant
    cols = np.arange(w) * gw // w
    image[y0:y1, x0:x1] = small[rows][:, cols]


def _filter_in_context(image: np.ndarray, box: tuple[int, int, int, int], radius: int,
                       filt: Callable[[np.ndarray], np.ndarray]) -> None:
    """Filter the box with the surrounding pixels as context, write back the box only."""
    x0, y0, x1, y1 = box
    h, w = image.shape[:2]
    cx0, cy0, cx1, cy1 = max(0, x0 - radius), max(0, y0 - radius), min(w, x1 + radius), min(h, y1 + radius)
    out = filt(np.ascontiguousarray(image[cy0:cy1, cx0:cx1]))
    image[y0:y1, x0:x1] = out[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0]


def gaussian_blur(image: np.ndarray, box: tuple[int, int, int, int], kernel: int, sigma: float) -> None:
    def blur(a: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(a, (kernel, kernel), sigma, borderType=cv2.BORDER_REFLECT_101)
    _filter_in_context(image, box, kernel // 2 + 1, blur)


def box_blur(image: np.ndarray, box: tuple[int, int, int, int], width_fraction: float) -> None:
    """Mean filter with a square kernel of `width_fraction` × the face width (at least 1 px)."""
    k = max(1, round(width_fraction * (box[2] - box[0])))
    _filter_in_context(image, box, k // 2 + 1,
                       lambda a: cv2.blur(a, (k, k), borderType=cv2.BORDER_REFLECT_101))


def soft_blur(image: np.ndarray, box: np.ndarray, sigma_fraction: float) -> None:
    """Blend a Gaussian blur of sigma = `sigma_fraction` × the box's longer side into the box, each
    pixel by the share of it the box covers.

    Why not heavy_blur for a video's small faces: its kernel is a whole number of pixels (it steps
    from 3 to 4 px as a 12 px face grows past 11.7 px) and its region is the pixels the box touches
    (it jumps a column as the box slides by a tenth of a pixel), so a blurred face that moves or
    grows slowly shimmers. Here the blur's strength and the blend are continuous in the box: a box
    moved by a tenth of a pixel changes the output by about a tenth of what it changes at the edge.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    h, w = image.shape[:2]
    sigma = max(0.5, sigma_fraction * max(x1 - x0, y1 - y0))
    radius = math.ceil(3 * sigma) + 1
    cx0, cy0 = max(0, math.floor(x0) - radius), max(0, math.floor(y0) - radius)
    cx1, cy1 = min(w, math.ceil(x1) + radius), min(h, math.ceil(y1) + radius)
    if cx1 <= cx0 or cy1 <= cy0:
        return
    region = image[cy0:cy1, cx0:cx1].astype(np.float32)
    blurred = cv2.GaussianBlur(region, (2 * radius + 1, 2 * radius + 1), sigma, borderType=cv2.BORDER_REFLECT_101)
    cols = np.arange(cx0, cx1, dtype=np.float64)
    rows = np.arange(cy0, cy1, dtype=np.float64)
    cover_x = np.clip(np.minimum(cols + 1, x1) - np.maximum(cols, x0), 0, 1)  # pixel c spans [c, c + 1)
    cover_y = np.clip(np.minimum(rows + 1, y1) - np.maximum(rows, y0), 0, 1)
    weight = (cover_y[:, None] * cover_x[None, :]).astype(np.float32)[..., None]
    mixed = region + weight * (blurred - region)
    image[cy0:cy1, cx0:cx1] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


BASELINES: dict[str, Baseline] = {b.name: b for b in [
    Baseline("blackout", "box filled with true black (0, 0, 0), not noise", blackout,
             {}, (24.9, 36.3, 54.8)),
    Baseline("pixelation_16x16", "area-average to a 16x16 grid, nearest upsample (blocky)", pixelate,
             {"cells": 16}, (95.3, 94.9, 90.2)),
    Baseline("pixelation_8x8", "area-average to an 8x8 grid, nearest upsample (blocky)", pixelate,
             {"cells": 8}, (91.4, 92.3, 88.9)),
    Baseline("gaussian_9x9", "Gaussian blur, 9x9 kernel, sigma 3", gaussian_blur,
             {"kernel": 9, "sigma": 3.0}, (95.3, 92.8, 84.7)),
    Baseline("heavy_blur", "box filter, kernel = 30% of the face width", box_blur,
             {"width_fraction": 0.3}, (83.4, 86.3, 86.1)),
]}

# The methods the anonymizer may give faces too small to paint: the baselines and soft_blur.
SMALL_FACE_METHODS: dict[str, Baseline] = {**BASELINES, "soft_blur": Baseline(
    "soft_blur", "Gaussian blur, sigma = 12% of the face's longer side, blended by pixel coverage of the box",
    soft_blur, {"sigma_fraction": 0.12}, subpixel=True)}

# The two reference rows of the same table (DSFD AP easy/medium/hard).
PAPER_AP = {"original": (96.6, 95.7, 90.4), "deepprivacy": (95.9, 95.0, 89.8),
            **{name: b.paper_ap for name, b in BASELINES.items()}}

def anonymize_boxes(image: np.ndarray, boxes: np.ndarray, method: str) -> np.ndarray:
    """Return a copy of the `H×W×3` uint8 image with every box anonymized by `method` (a baseline or
    another of :data:`SMALL_FACE_METHODS`)."""
    if method not in SMALL_FACE_METHODS:
        raise ValueError(f"unknown anonymizer {method!r}; choose from {sorted(SMALL_FACE_METHODS)}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 uint8 RGB image, got {image.dtype} {image.shape}")
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4))
    if not np.isfinite(boxes).all():
        raise ValueError("face boxes contain non-finite values")
    baseline = SMALL_FACE_METHODS[method]
    out = image.copy()
    for box in boxes:
        if baseline.subpixel:
            baseline.fn(out, box, **baseline.params)
            continue
        region = _pixel_box(box, *image.shape[:2])
        if region is not None:
            baseline.fn(out, region, **baseline.params)
    return out
