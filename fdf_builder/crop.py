"""FDF's face crop: square the detector box, grow it by 35% of its side on every side, resize.

The rule follows DeepPrivacy's data set (docs/reference.md, "Crop"): the square stays inside the photo
whenever it can (shifted, expansion capped), so most crops contain no padding; only when even the
squared face box does not fit does it fall back to a centred 1.7x square padded with zeros.

`rule="pad"` always takes that centred 1.7x square (zeros past the border): for photo sets of tight
face crops (UTKFace, aligned-face sets) FDF's rule caps the growth at the border, leaving a crop that
is almost all face box and no context; padding keeps every face at FDF's usual share of its crop.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

EXPANSION = 0.35  # of the squared face side, added on every side
CROP_RULES = ("fdf", "pad")  # FDF's (shift and cap inside the photo), or always the padded 1.7x square


@dataclass(frozen=True)
class Crop:
    box: tuple[int, int, int, int]  # square crop x0, y0, x1, y1 in photo pixels (may pass the border)
    padded: bool  # True when the fallback rule was used

    @property
    def side(self) -> int:
        return self.box[2] - self.box[0]


def _fit(start: int, length: int, limit: int) -> int:
    """Shift a segment [start, start+length) to lie inside [0, limit) (length <= limit)."""
    return min(max(start, 0), limit - length)


def crop_box(face_box: np.ndarray, image_hw: tuple[int, int], expansion: float = EXPANSION,
             rule: str = "fdf") -> Crop:
    """Square crop for one face box (x0, y0, x1, y1 in photo pixels) by `rule` (see module doc)."""
    if rule not in CROP_RULES:
        raise ValueError(f"crop rule must be one of {CROP_RULES}, not {rule!r}")
    height, width = image_hw
    x0, y0, x1, y1 = (float(v) for v in face_box)
    side = int(round(max(x1 - x0, y1 - y0)))
    side = max(side, 1)
    if rule == "pad" or side > min(height, width):
        padded = _padded_crop(face_box, expansion)
        bx0, by0, bx1, by1 = padded.box
        return Crop(padded.box, padded=bx0 < 0 or by0 < 0 or bx1 > width or by1 > height)
    # Square by growing the shorter side around the box centre, then shift inside the photo.
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    sx = _fit(int(round(cx - side / 2)), side, width)
    sy = _fit(int(round(cy - side / 2)), side, height)
    grow = min(int(side * expansion), (width - side) // 2, (height - side) // 2)
    full = side + 2 * grow
    cx0 = _fit(sx - grow, full, width)
    cy0 = _fit(sy - grow, full, height)
    return Crop((cx0, cy0, cx0 + full, cy0 + full), padded=False)


def exact_square(face_box: np.ndarray, expansion: float = EXPANSION) -> tuple[float, float, float]:
    """The padded crop of `face_box` before its rounding to whole pixels: (x0, y0, side) in photo
    pixels (the crop of `rule="pad"`, and the fallback of FDF's rule).

    Video pastes a painted face there rather than on the rounded crop: a face that moves by a
    fraction of a pixel per frame would otherwise jump a whole pixel at a time, which reads as
    shimmer on a painted face (eval.paste)."""
    x0, y0, x1, y1 = (float(v) for v in face_box)
    side = max(x1 - x0, y1 - y0) * (1 + 2 * expansion)
    return (x0 + x1) / 2 - side / 2, (y0 + y1) / 2 - side / 2, side


def _padded_crop(face_box: np.ndarray, expansion: float) -> Crop:
    x0, y0, x1, y1 = (float(v) for v in face_box)
    full = int(round(max(x1 - x0, y1 - y0) * (1 + 2 * expansion)))
    cx0 = int(round((x0 + x1) / 2 - full / 2))
    cy0 = int(round((y0 + y1) / 2 - full / 2))
    return Crop((cx0, cy0, cx0 + full, cy0 + full), padded=True)


def cut(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The pixels of `box` from an HxWxC image, zeros where the box passes the border."""
    x0, y0, x1, y1 = box
    h, w = image.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0) + image.shape[2:], dtype=image.dtype)
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if ix1 > ix0 and iy1 > iy0:
        out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = image[iy0:iy1, ix0:ix1]
    return out


def resize(crop: np.ndarray, resolution: int) -> np.ndarray:
    """Area interpolation down (as FDF), cubic up (only for crops smaller than the target)."""
    interp = cv2.INTER_AREA if crop.shape[0] >= resolution else cv2.INTER_CUBIC
    return cv2.resize(crop, (resolution, resolution), interpolation=interp)


def to_crop_coords(points: np.ndarray, crop: Crop) -> np.ndarray:
    """Photo-pixel x, y (last axis, extra columns kept) → [0, 1] of the crop."""
    out = np.array(points, dtype=np.float64, copy=True)
    x0, y0 = crop.box[:2]
    out[..., 0] = (out[..., 0] - x0) / crop.side
    out[..., 1] = (out[..., 1] - y0) / crop.side
    return out
