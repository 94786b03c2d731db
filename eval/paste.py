"""Pasting generated faces back into the photo without a visible seam.

The generator paints an FDF crop at its own resolution (32 or 64 px) and the crop is scaled up into
the photo, often 3-9x. Every pixel of a face box takes the generated value (weight 1), so nothing of
the original face stays; around the box a band of `feather` × the face side blends back to the photo
(weights falling linearly to 0). Where faces overlap, each pixel takes the face of highest weight, so
the band of one face never carries the original pixels of another face's box back into the result.

Two blends, `--blend`:
- "feather": the generated crop as it is, alpha-blended over the band. Where the generator's colours
  at the box edge differ from the photo's (an upscaled low-resolution edge cell, a colour cast) this
  shows as a hard rectangle edge with colour fringes.
- "poisson" (default): first every box is replaced as "feather" does, then each face's window (box
  plus band) is solved again in the gradient domain (Pérez et al. 2003, OpenCV's seamlessClone): the
  generated crop's gradients inside, the already-anonymized photo's values on the window's border.
  Colour offsets between the painted face and its surroundings spread smoothly over the window
  instead of stepping at the box edge. The border values come from the photo after every box was
  replaced, so no original face pixel enters a solution; the box pixels still take the solved
  generated values only.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from fdf_builder import crop as fdfcrop

BLENDS = ("poisson", "feather")
POISSON_MAX_SIDE = 64  # the Poisson correction is smooth: solved at most this size (see poisson_blend)


def pixel_extent(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Pixels a box touches, as the baselines count them (floor/ceil, clipped)."""
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def feather_width(box: np.ndarray, feather: float) -> int:
    """Blend band in pixels outside a box: `feather` × the longer face side."""
    return max(0, round(feather * max(box[2] - box[0], box[3] - box[1])))


def band_weights(extent: tuple[int, int, int, int], band: int,
                 window: tuple[int, int, int, int]) -> np.ndarray:
    """(h, w) weights over `window`: 1 on the box pixels, then 1 - d / (band + 1) at Chebyshev
    distance d (pixels) outside the box, 0 from band + 1 on."""
    x0, y0, x1, y1 = extent
    xs, ys = np.arange(window[0], window[2]), np.arange(window[1], window[3])
    dx = np.maximum(np.maximum(x0 - xs, xs - (x1 - 1)), 0)
    dy = np.maximum(np.maximum(y0 - ys, ys - (y1 - 1)), 0)
    d = np.maximum(dy[:, None], dx[None, :]).astype(np.float32)
    return np.clip(1 - d / (band + 1), 0, 1)


def _seamless_clone(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """OpenCV's Poisson solve over the whole array but its one-pixel border. OpenCV places the
    mask's bounding box centred on `center`; the interior mask starts at (1, 1), so the centre is
    that box's centre in the array's coordinates (tests: source == target gives target back)."""
    h, w = source.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    mask[1:-1, 1:-1] = 255
    return cv2.seamlessClone(source, target, mask, (1 + (w - 2) // 2, 1 + (h - 2) // 2), cv2.NORMAL_CLONE)


def poisson_blend(source: np.ndarray, target: np.ndarray, max_side: int = POISSON_MAX_SIDE) -> np.ndarray:
    """`source`'s gradients inside, `target`'s values on the one-pixel border (same-shape uint8 RGB).

    The solution is the source plus a harmonic correction (the solution of Laplace's equation with
    target - source on the border), which is smooth inside: for windows larger than `max_side` it is
    solved on a copy scaled down to `max_side` and scaled back up (a 300 px window: 100 ms at full
    size, a few ms this way). Its border then matches the target only up to that scale's detail, which
    the band's weights (falling to 0 at the border) hide.
    """
    h, w = source.shape[:2]
    if h < 5 or w < 5:
        return source
    scale = max_side / max(h, w)
    if scale >= 1:
        return _seamless_clone(source, target)
    size = (max(5, round(w * scale)), max(5, round(h * scale)))
    small_source = cv2.resize(source, size, interpolation=cv2.INTER_AREA)
    small_target = cv2.resize(target, size, interpolation=cv2.INTER_AREA)
    correction = _seamless_clone(small_source, small_target).astype(np.float32) - small_source
    correction = cv2.resize(correction, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.rint(source + correction), 0, 255).astype(np.uint8)


class Composite:
    """Pastes generated crops into one image (`add` per face, then `result`); pixels of weight 0
    keep their value."""

    def __init__(self, image: np.ndarray, blend: str = "poisson"):
        if blend not in BLENDS:
            raise ValueError(f"blend {blend!r}: choose from {', '.join(BLENDS)}")
        self.image, self.blend = image, blend
        self.faces: list[tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]] = []  # window, patch, weight

    def add(self, face: np.ndarray, extent: tuple[int, int, int, int], crop: fdfcrop.Crop, band: int) -> None:
        """A generated (r, r, 3) crop of the face whose box covers `extent`, cut as `crop`."""
        h, w = self.image.shape[:2]
        cx0, cy0, cx1, cy1 = crop.box
        window = (max(extent[0] - band, 0, cx0), max(extent[1] - band, 0, cy0),
                  min(extent[2] + band, w, cx1), min(extent[3] + band, h, cy1))
        side = crop.side
        interp = cv2.INTER_LINEAR if side >= face.shape[0] else cv2.INTER_AREA
        full = cv2.resize(face, (side, side), interpolation=interp)
        wx0, wy0, wx1, wy1 = window
        patch = np.ascontiguousarray(full[wy0 - cy0:wy1 - cy0, wx0 - cx0:wx1 - cx0])
        self.faces.append((window, patch, band_weights(extent, band, window)))

    def _composite(self, patches: list[np.ndarray]) -> np.ndarray:
        """The image with each face's patch where that face has the highest weight, blended by it."""
        h, w = self.image.shape[:2]
        best = np.zeros((h, w), np.float32)
        pasted = self.image.copy()
        for ((wx0, wy0, wx1, wy1), _, weight), patch in zip(self.faces, patches):
            region = best[wy0:wy1, wx0:wx1]
            take = (weight > 0) & (weight >= region)
            region[take] = weight[take]
            pasted[wy0:wy1, wx0:wx1][take] = patch[take]
        out = self.image.copy()
        where = best > 0
        a = best[where][:, None]
        out[where] = np.rint(self.image[where] * (1 - a) + pasted[where] * a).astype(np.uint8)
        return out

    def result(self) -> np.ndarray:
        if not self.faces:
            return self.image.copy()
        feathered = self._composite([patch for _, patch, _ in self.faces])
        if self.blend == "feather":
            return feathered
        solved = [poisson_blend(patch, feathered[wy0:wy1, wx0:wx1])
                  for (wx0, wy0, wx1, wy1), patch, _ in self.faces]
        return self._composite(solved)


def seam_figures(original: np.ndarray, result: np.ndarray, extent: tuple[int, int, int, int],
                 band: int) -> dict[str, float]:
    """How visible one pasted face's seam is, in 8-bit RGB levels (0 = invisible):

    - `edge_step`: the colour step across the box edge in the result, minus the photo's own step
      there (its hair line or jaw): the extra edge the paste drew along the box, the hard rectangle.
      Measured at the scale of an upscaled generator pixel: both images low-passed over s = 5% of the
      face side, then compared s pixels inside against s pixels outside each side of the box;
    - `band_colour_shift`: mean colour difference between the result and the photo over the band
      outside the box, both low-passed the same way: colour fringes and halos, not the sharpness lost
      to upscaling.
    """
    h, w = original.shape[:2]
    x0, y0, x1, y1 = extent
    s = max(1, round(0.05 * max(x1 - x0, y1 - y0)))
    k = 2 * s + 1
    lo_o, lo_r = (cv2.blur(img.astype(np.float32), (k, k)) for img in (original, result))

    def step(img: np.ndarray) -> float:
        pairs = []  # (just inside, just outside) along each side of the box that lies in the photo
        if y0 - s >= 0:
            pairs.append((img[y0 + s, x0:x1], img[y0 - s, x0:x1]))
        if y1 + s <= h:
            pairs.append((img[y1 - 1 - s, x0:x1], img[y1 - 1 + s, x0:x1]))
        if x0 - s >= 0:
            pairs.append((img[y0:y1, x0 + s], img[y0:y1, x0 - s]))
        if x1 + s <= w:
            pairs.append((img[y0:y1, x1 - 1 - s], img[y0:y1, x1 - 1 + s]))
        if not pairs or y1 - y0 <= 2 * s or x1 - x0 <= 2 * s:
            return 0.0
        inside, outside = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
        return float(np.linalg.norm(inside - outside, axis=-1).mean())

    wx0, wy0, wx1, wy1 = max(0, x0 - band), max(0, y0 - band), min(w, x1 + band), min(h, y1 + band)
    ring = np.ones((wy1 - wy0, wx1 - wx0), bool)
    ring[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0] = False
    diff = np.linalg.norm(lo_r[wy0:wy1, wx0:wx1] - lo_o[wy0:wy1, wx0:wx1], axis=-1)
    return {"edge_step": step(lo_r) - step(lo_o), "band_colour_shift": float(diff[ring].mean()) if ring.any() else 0.0}
