"""FDF's face crop: square the detector box, grow it by 35% of its side on every side, resize.

The rule follows DeepPrivacy's data set (docs/reference.md, "Crop"): the square stays inside the photo
whenever it can (shifted, expansion capped), so most crops contain no padding; only when even the
squared face box does not fit does it fall back to a centred 1.7x square padded with zeros.

`rule="pad"` always takes that centred 1.7x square (zeros past the border): for photo sets of tight
face crops (UTKFace, aligned-face sets) FDF's rule caps the growth at the border, leaving a crop that
is almost all face box and no context; padding keeps every face at FDF's usual share of its crop.

Context: a generator trained on such crops has only ever seen a thin band of photo around the box
(UTKFace: about 0.09 of the box side left and right, under 0.01 above, 0.05 below) and zeros beyond.
Shown a whole real photo around a face it paints a featureless patch; shown the band it was trained
with, a face. `context_margins` measures the band of a set of training crops, `limit_context` cuts an
inference crop back to it (the anonymizer does, from the margins an exported model records).
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


def cut(image: np.ndarray, box: tuple[int, int, int, int], edge: bool = False) -> np.ndarray:
    """The pixels of `box` from an HxWxC image; where the box passes the border, zeros (FDF's
    padding), or with `edge` the nearest border pixel repeated (the anonymizer: see Anonymizer._sample)."""
    x0, y0, x1, y1 = box
    h, w = image.shape[:2]
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if edge and ix1 > ix0 and iy1 > iy0:
        pad = ((iy0 - y0, y1 - iy1), (ix0 - x0, x1 - ix1)) + ((0, 0),) * (image.ndim - 2)
        return np.pad(image[iy0:iy1, ix0:ix1], pad, mode="edge")
    out = np.zeros((y1 - y0, x1 - x0) + image.shape[2:], dtype=image.dtype)
    if ix1 > ix0 and iy1 > iy0:
        out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = image[iy0:iy1, ix0:ix1]
    return out


def visible_margins(crop: np.ndarray, bbox: np.ndarray, dark: int = 8) -> np.ndarray:
    """How far the photo reaches past each side of the face box in one stored crop (HxWx3 uint8 with
    zero padding, `bbox` normalized): (left, top, right, bottom) as fractions of the box side,
    0 where padding starts at the box. A row or column counts as photo when most of its pixels are
    brighter than `dark` (JPEG leaves a few grey levels in the padding)."""
    gray = crop.mean(axis=2) if crop.ndim == 3 else crop
    live = gray > dark
    rows, cols = np.flatnonzero(live.mean(axis=1) > 0.5), np.flatnonzero(live.mean(axis=0) > 0.5)
    size = gray.shape[0]
    x0, y0, x1, y1 = (float(v) * size for v in bbox)
    side = max(x1 - x0, y1 - y0, 1e-6)
    if not len(rows) or not len(cols):
        return np.zeros(4)
    reach = np.array([x0 - cols[0], y0 - rows[0], cols[-1] + 1 - x1, rows[-1] + 1 - y1]) / side
    return np.clip(reach, 0.0, None)


def context_margins(margins: np.ndarray, mirrored: bool = True) -> list[float]:
    """The band of photo a set of training crops shows around the box: the median of
    `visible_margins` over the crops (N x 4), left and right averaged when training mirrors faces."""
    m = np.median(np.asarray(margins, np.float64).reshape(-1, 4), axis=0)
    if mirrored:
        m[0] = m[2] = (m[0] + m[2]) / 2
    return [round(float(v), 4) for v in m]


def limit_context(crop: np.ndarray, box: tuple[float, float, float, float],
                  margins: list[float] | None) -> np.ndarray:
    """`crop` with every pixel farther than `margins` (left, top, right, bottom, fractions of the box
    side) from the face box set to zero, the padding of the training crops; `box` is in the crop's
    pixels. None: the whole crop (the generator was trained with full context)."""
    if margins is None:
        return crop
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    keep = (int(np.floor(x0 - margins[0] * side)), int(np.floor(y0 - margins[1] * side)),
            int(np.ceil(x1 + margins[2] * side)), int(np.ceil(y1 + margins[3] * side)))
    h, w = crop.shape[:2]
    kx0, ky0, kx1, ky1 = max(keep[0], 0), max(keep[1], 0), min(keep[2], w), min(keep[3], h)
    out = np.zeros_like(crop)
    if kx1 > kx0 and ky1 > ky0:
        out[ky0:ky1, kx0:kx1] = crop[ky0:ky1, kx0:kx1]
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
