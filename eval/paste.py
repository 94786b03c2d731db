"""Pasting generated faces back into the photo without a visible seam.

The generator paints an FDF crop at its own resolution (32 or 64 px) and the crop is scaled up into
the photo, often 3-9x. Every pixel of a face box takes a generated value, so nothing of the original
face stays. With the feather blend a band of `feather` × the face side around the box blends back to
the photo (weights falling linearly to 0); where faces overlap, each pixel takes the face of highest
weight, so the band of one face never carries the original pixels of another face's box back.

Two blends, `--blend`:
- "feather": the generated crop as it is, alpha-blended over the band. The generator paints at 32 or
  64 px: upscaled, its edge cells and its copy of the background around the box are soft, and where
  its colours at the box edge differ from the photo's this shows as a hard rectangle edge with colour
  fringes and a blurred halo.
- "poisson" (default): each box is solved in the gradient domain (Pérez et al. 2003, OpenCV's
  a fast sine-transform solver): the generated face's gradients inside, the pixels just outside the box as boundary
  values. The painted face meets the photo without a step: the difference between its edge and the
  surroundings spreads smoothly into the box, and outside the boxes the photo is untouched (no band,
  no halo). Every box pixel still takes a generated value; the boundary values are read after every
  box was replaced, so no original face pixel enters a solution, even where faces touch.

A photo's Poisson paste first fades the photo's detail in over a band outside each box
(`soften_around`, `--soften`): the colours meet, but a soft upscaled face beside sharp hair still
reads as a rectangle.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import cv2
import numpy as np

from fdf_builder import crop as fdfcrop

BLENDS = ("poisson", "feather")
POISSON_GRID = 65  # largest frame the Poisson correction is solved on (2^6 + 1: fast sine transforms)
EDGE_BAND = 2  # px inside the frame where a painted face's own edge is softened before the solve
# Video: the share of the box side over which this frame's exact seam fades into the track's blended
# one (SeamMemory). The blended seam keeps the face steady but lags when the painting or the scene
# around it changes fast: the whip clip's large face showed its box as a lighter rectangle for half a
# second. Full clips (mean colour step across the box edge, the photo's own across the same pixels in
# brackets; flicker ratio): whip 13.1 (11.9), 1.193 -> 9.3, 1.208; pan 26.2 (22.4), 1.253 -> 21.1,
# 1.289; a band of 0.15 cost pan 1.42.
SEAM_EDGE = 0.08
# Photos: the share of the box side outside a box over which the photo's own detail fades in from the
# painted face's softness (`soften_around`), and that softness as a Gaussian sigma per photo pixel of
# one painted pixel. Measurements in `soften_around`'s docstring.
SOFT_BAND = 0.12
SOFT_SIGMA = 0.3


def pixel_extent(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Pixels a box touches, as the baselines count them (floor/ceil, clipped)."""
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def visible_fraction(box: np.ndarray, width: int, height: int) -> float:
    """The share of the box's area that lies inside a `width` x `height` image (0 for an empty box)."""
    x0, y0, x1, y1 = box
    area = max(x1 - x0, 0) * max(y1 - y0, 0)
    inside = max(min(x1, width) - max(x0, 0), 0) * max(min(y1, height) - max(y0, 0), 0)
    return inside / area if area > 0 else 0.0


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


def harmonic_fill(border: np.ndarray) -> np.ndarray:
    """The (h, w, c) array that equals `border` on its one-pixel frame and solves Laplace's equation
    inside: the smoothest way to carry the frame's values in. The discrete 5-point Laplacian with
    fixed frame values is diagonalised by the type-I sine transform (a fast Poisson solver): two
    transforms per channel, a few milliseconds for a 300 px face."""
    from scipy.fft import dstn
    h, w = border.shape[:2]
    out = border.astype(np.float64)
    if h < 3 or w < 3:
        return out
    rhs = np.zeros((h - 2, w - 2) + border.shape[2:], np.float64)  # the frame's pull on its neighbours
    rhs[0] += out[0, 1:-1]
    rhs[-1] += out[-1, 1:-1]
    rhs[:, 0] += out[1:-1, 0]
    rhs[:, -1] += out[1:-1, -1]
    ky = 2 - 2 * np.cos(np.pi * np.arange(1, h - 1) / (h - 1))
    kx = 2 - 2 * np.cos(np.pi * np.arange(1, w - 1) / (w - 1))
    eig = (ky[:, None] + kx[None, :]).reshape((h - 2, w - 2) + (1,) * (border.ndim - 2))
    out[1:-1, 1:-1] = dstn(dstn(rhs, type=1, axes=(0, 1), norm="ortho") / eig, type=1, axes=(0, 1), norm="ortho")
    return out


def _resize_line(line: np.ndarray, length: int) -> np.ndarray:
    """An (n,) or (n, c) line of values averaged (or stretched) to `length`."""
    interp = cv2.INTER_AREA if length < len(line) else cv2.INTER_LINEAR
    out = cv2.resize(line[None].astype(np.float32), (length, 1), interpolation=interp)[0]
    return out.reshape((length,) + line.shape[1:])  # OpenCV drops a single channel


def _sides(frame: np.ndarray) -> list[np.ndarray]:
    """Top, bottom, left and right lines of an (h, w, ...) array."""
    return [frame[0], frame[-1], frame[:, 0], frame[:, -1]]


def _frame(sides: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """An (h, w, c) array, 0 inside, whose one-pixel frame is `sides` resampled to `size`."""
    h, w = size
    out = np.zeros((h, w, sides[0].shape[-1]), np.float32)
    out[0], out[-1] = _resize_line(sides[0], w), _resize_line(sides[1], w)
    out[:, 0], out[:, -1] = _resize_line(sides[2], h), _resize_line(sides[3], h)
    return out


def _extend(sides: list[np.ndarray], seen: list[np.ndarray]) -> list[np.ndarray]:
    """`sides` (top, bottom, left, right; (n, c)) with their unseen points filled in from the seen.

    A box reaching past the photo's edge (a face coming into a video's view) has no surroundings
    there: the photo's edge is not a seam. Its correction is carried on as the seen sides have it:
    a side partly seen keeps its nearest seen value, a side wholly unseen goes linearly between the
    ends of the sides beside it (or takes the mean of all that is seen). Fixing the difference at 0
    there instead, as the photo's own edge pixels did, pinned the face's colour fit to its painting
    at the edge: a face cut by a photo's edge stayed up to 50 levels off its surroundings there
    (tests/test_paste.py). In a video the seam memory also weighs what it is shown (SeamMemory)."""
    out = [s.astype(np.float32) for s in sides]
    known = [m >= 0.5 for m in seen]
    if all(k.all() for k in known):
        return out
    if not any(k.any() for k in known):
        return [np.zeros_like(s) for s in out]
    mean = np.concatenate([s[k] for s, k in zip(out, known) if k.any()]).mean(axis=0)
    for s, k in zip(out, known):
        if k.any() and not k.all():
            idx = np.arange(len(s))
            for c in range(s.shape[1]):
                s[:, c] = np.interp(idx, idx[k], s[k, c])
    # a wholly unseen side runs between the ends of its neighbours: top/bottom between left and
    # right (their first / last points), left/right between top and bottom
    neighbours = {0: ((2, 0), (3, 0)), 1: ((2, -1), (3, -1)), 2: ((0, 0), (1, 0)), 3: ((0, -1), (1, -1))}
    for i, (s, k) in enumerate(zip(out, known)):
        if k.any():
            continue
        ends = [out[j][at] if known[j].any() else mean for j, at in neighbours[i]]
        t = np.linspace(0.0, 1.0, len(s), dtype=np.float32)[:, None]
        s[:] = (1 - t) * ends[0] + t * ends[1]
    return out


def _frame_difference(source: np.ndarray, target: np.ndarray, size: tuple[int, int],
                      inside: tuple[int, int, int, int] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """target - source along the frame's four sides, each resampled to the (sh, sw) frame, and the
    share of each resampled point that lies in `inside` (y0, y1, x0, x1 of the window that the photo
    covers; None: all of it): the sides and their seen weights."""
    h, w = source.shape[:2]
    lengths = (size[1], size[1], size[0], size[0])
    difference = [_resize_line(line, n) for line, n in zip(_sides(target.astype(np.float32) - source), lengths)]
    if inside is None or tuple(inside) == (0, h, 0, w):
        return difference, [np.ones(n, np.float32) for n in lengths]
    y0, y1, x0, x1 = inside
    across = np.zeros(w, np.float32)  # a row of the seen mask, then a column
    across[x0:x1] = 1.0
    down = np.zeros(h, np.float32)
    down[y0:y1] = 1.0
    lines = (across * (y0 <= 0 < y1), across * (y0 <= h - 1 < y1), down * (x0 <= 0 < x1), down * (x0 <= w - 1 < x1))
    return difference, [_resize_line(line, n) for line, n in zip(lines, lengths)]


class SeamMemory:
    """The seam of every live video track, blended over frames.

    The Poisson correction is the colour difference between a painted face's edge and the pixels
    just outside its box. In a video those pixels change every frame as the box slides over hair,
    collars and other faces, and a correction solved per frame makes the whole face brighten and
    darken from frame to frame: most of the flicker of a carried face. Per track the difference is
    kept, resampled along each side to `SEAM_POINTS` (independent of the box size), and each frame's
    is blended with it: seam = `keep`·previous + (1 - `keep`)·this frame's. That holds inside the
    box; towards its edge this frame's exact fit takes over (`SEAM_EDGE`), so a lagging seam never
    shows as a step around the face."""

    SEAM_POINTS = 33

    def __init__(self, keep: float = 0.0):
        if not 0.0 <= keep < 1.0:
            raise ValueError(f"need 0 <= seam keep < 1, got {keep}")
        self.keep = keep
        self.sides: dict[int, list[np.ndarray]] = {}
        self.trust: dict[int, list[np.ndarray]] = {}  # per point: the decayed sum of the trust it was seen with

    def __call__(self, track: int, sides: list[np.ndarray], trust: list[np.ndarray] | None = None
                 ) -> list[np.ndarray]:
        """This frame's frame difference of `track` (`sides`, see `_frame_difference`, with unseen
        points filled in by `_extend`) blended with the track's, resampled to their lengths.

        `trust` (per point, 0-1; None: 1) weighs this frame's value: a point of the box's frame
        outside the photo is not seen (0), and a box mostly outside gives a poor fit (its painting
        made from a sliver, the box itself a guess: eval.video.FaceTracker._whole), so the share of
        the box in view scales it. A point's value is the trust-weighted mean of what it was seen
        as, older frames decayed by `keep`; its first sighting counts as if it had been seen with
        that trust for ever. A track seen whole from its first frame therefore blends exactly as
        `keep`·previous + (1 - `keep`)·this frame's, while one that came in over the frame's edge
        soon takes its fit from the frames that show it. The pan clip's entering faces had a first
        fit 30-45 levels off carried for 40 frames; full pan clip flicker 1.289 -> 1.259 (counting
        every frame alike from the first, with no head start for the first sighting: 1.268)."""
        lengths = [len(line) for line in sides]
        new = [_resize_line(line, self.SEAM_POINTS) for line in sides]
        seen = ([np.ones(self.SEAM_POINTS, np.float32)] * 4 if trust is None else
                [np.clip(_resize_line(m, self.SEAM_POINTS), 0.0, 1.0) for m in trust])
        previous, held = self.sides.get(track), self.trust.get(track)
        if previous is None:
            held = [w / (1.0 - self.keep) for w in seen]
        else:
            held = [self.keep * h + w for h, w in zip(held, seen)]
            new = [np.where(h[:, None] > 0, p + (w / np.maximum(h, 1e-9))[:, None] * (n - p), n)
                   for p, n, w, h in zip(previous, new, seen, held)]
        self.sides[track], self.trust[track] = new, held
        return [_resize_line(line, n) for line, n in zip(new, lengths)]

    def forget(self, live: set[int]) -> None:
        for track in [t for t in self.sides if t not in live]:
            del self.sides[track], self.trust[track]


def _frame_distance(h: int, w: int, dtype: type = np.float64) -> np.ndarray:
    """(h, w): each pixel's distance in pixels from the array's one-pixel frame (0 on it)."""
    rows, cols = np.arange(h, dtype=dtype), np.arange(w, dtype=dtype)
    return np.minimum(np.minimum(rows, h - 1 - rows)[:, None], np.minimum(cols, w - 1 - cols)[None, :])


def _edge_weight(size: tuple[int, int], depth: float) -> np.ndarray:
    """(h, w): 1 on the frame, falling linearly to 0 at `depth` × the shorter side inside."""
    return np.clip(1.0 - _frame_distance(*size) / max(depth * min(size), 1.0), 0.0, 1.0)


def _soften_edge(source: np.ndarray, band: int = EDGE_BAND) -> np.ndarray:
    """`source` (float32) with its outer `band` pixels blended towards its own blur, fully at the edge.

    The Poisson solution matches the photo's values on the frame but keeps the painted face's
    gradient across it: where the generator paints a strong edge at the border of its box (hair, a
    dark blot) that step stays as a visible rectangle side. Softening only the painted pixels there
    keeps the guarantee that every box pixel is generated. With the 64x64 model on the 19 faces of
    tests/test_paste.py's photo, the mean step across the box edge falls from 19.1 to 10.7 levels
    (the photo's own step across the same pixels: 18.9; the 32x32 model painted softer edges)."""
    src = source.astype(np.float32)
    h, w = src.shape[:2]
    if band <= 0 or min(h, w) <= 2 * band + 2:
        return src
    weight = np.clip(_frame_distance(h, w, np.float32) / band, 0.0, 1.0)[..., None]  # 0 on the frame, 1 from `band` px in
    blurred = cv2.GaussianBlur(src, (0, 0), band / 2, borderType=cv2.BORDER_REFLECT_101)
    return blurred + weight * (src - blurred)


def poisson_blend(source: np.ndarray, target: np.ndarray, grid: int = POISSON_GRID,
                  seam: Callable[..., list[np.ndarray]] | None = None,
                  inside: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """`source`'s gradients inside, `target`'s values on the one-pixel frame (same-shape RGB; uint8 out).

    The solution of Poisson's equation with the source's Laplacian inside and the target on the frame
    (Pérez et al. 2003) is the source plus a harmonic correction that takes the value target - source
    on the frame (`harmonic_fill`). The correction is smooth, so a window larger than `grid` is solved
    on a `grid`-sized frame (the difference averaged along each side; sizes 2^k + 1 keep the sine
    transforms fast, where an odd prime length makes them 400x slower) and scaled back up: the colour
    of the seam matches, detail finer than a `grid`-th of the face along the edge is not corrected.
    (OpenCV's seamlessClone was tried first: it keeps the source's step at the edge of its mask, so a
    face kept its rectangle.) `inside` (y0, y1, x0, x1): the part of the window the photo covers,
    where `target` exists (a box reaching past the photo's edge); the frame outside it is filled in
    from the rest (`_extend`). `seam(sides, seen)`: a video track's seam memory (SeamMemory).
    """
    h, w = source.shape[:2]
    if h < 3 or w < 3:
        return source
    size = (min(h, grid), min(w, grid))
    sides, seen = _frame_difference(source, target, size, inside)
    exact = _extend(sides, seen)
    if seam is None:
        correction = harmonic_fill(_frame(exact, size))
    else:  # video: the track's seam blended over frames (SeamMemory) inside the box, this frame's
        in_view = 1.0 if inside is None else (inside[1] - inside[0]) * (inside[3] - inside[2]) / (h * w)
        kept = seam(exact, [m * in_view for m in seen])  # exact fit at its edge (SEAM_EDGE), where the photo shows it
        exact = [k + np.clip(m, 0, 1)[:, None] * (e - k) for e, k, m in zip(exact, kept, seen)]
        kept_fill = harmonic_fill(_frame(kept, size))
        correction = kept_fill + _edge_weight(size, SEAM_EDGE)[..., None] * (harmonic_fill(_frame(exact, size)) - kept_fill)
    correction = correction.astype(np.float32)
    if size != (h, w):
        correction = cv2.resize(correction, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.rint(source + correction), 0, 255).astype(np.uint8)


# The carried painting of a video face is resampled onto every frame at a new sub-pixel place. A
# warp straight onto the frame's pixels blurs by the place's fraction of a pixel (linear
# interpolation at 0.5 averages two pixels, at 0 none), so a moving face shimmers as that fraction
# cycles. Warped onto a grid with SUPERSAMPLE points per painted pixel and averaged down to the
# frame's pixels, every place is blurred alike, as a camera's pixels integrate a moving face: full
# pan clip flicker ratio 1.22 -> 1.19 / 1.18 / 1.17 with 2 / 3 / 4 points (a bicubic warp, sharper,
# 1.28-1.34); 3 costs about 0.1 ms a face. A photo does not move: it takes one point per painted
# pixel (no aliasing).
SUPERSAMPLE = 3


def _onto_crop(face: np.ndarray, crop: fdfcrop.Crop, place: tuple[float, float, float] | None,
               supersample: int = 1) -> np.ndarray:
    """The (r, r, 3) painted crop resampled onto the pixels of `crop`, lying at `place` (default:
    exactly on `crop`): warped onto a grid with at least `supersample` points per painted pixel and
    finer than the crop's, then averaged down to the crop's pixels."""
    side = crop.side
    if place is None:
        interp = cv2.INTER_LINEAR if side >= face.shape[0] else cv2.INTER_AREA
        return cv2.resize(face, (side, side), interpolation=interp)
    x0, y0, exact = place
    s = exact / face.shape[0]
    k = max(1, math.ceil(supersample / s))
    # pixel centres: face pixel u lies at x0 + (u + 0.5) s in the photo, point q of the crop's
    # k-times finer grid at crop x0 + (q + 0.5) / k
    matrix = k * np.array([[s, 0.0, x0 - crop.box[0] + 0.5 * s - 0.5 / k],
                           [0.0, s, y0 - crop.box[1] + 0.5 * s - 0.5 / k]])
    fine = cv2.warpAffine(face, matrix, (side * k, side * k), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return fine if k == 1 else cv2.resize(fine, (side, side), interpolation=cv2.INTER_AREA)


class Composite:
    """Pastes generated crops into one image (`add` per face, then `result`)."""

    def __init__(self, image: np.ndarray, blend: str = "poisson", seams: SeamMemory | None = None,
                 soften: float = SOFT_SIGMA):
        """`seams`: a video's (its faces move; `soften` is not applied); `soften`: `soften_around`'s
        sigma per painted pixel for a photo's Poisson paste (0: off)."""
        if blend not in BLENDS:
            raise ValueError(f"blend {blend!r}: choose from {', '.join(BLENDS)}")
        self.image, self.blend, self.seams, self.soften = image, blend, seams, soften
        self.faces: list[tuple[tuple[int, int, int, int], int, np.ndarray, tuple[int, int, int, int]]] = []
        self.tracks: list[int | None] = []
        self.scales: list[float] = []  # photo pixels per painted pixel, per face
        self.wholes: list[tuple[int, int, int, int]] = []  # each box's whole pixel extent, past the photo too

    def add(self, face: np.ndarray, extent: tuple[int, int, int, int], crop: fdfcrop.Crop, band: int,
            place: tuple[float, float, float] | None = None, track: int | None = None,
            whole: tuple[int, int, int, int] | None = None) -> None:
        """A generated (r, r, 3) crop of the face whose box covers `extent`, cut as `crop`; `band`:
        the feather band in pixels (the feather blend only). `place` (x0, y0, side), the crop
        before rounding (fdf_builder.crop.exact_square): the face is resampled there to a fraction
        of a pixel instead of onto the rounded crop (video: no whole-pixel jumps between frames).
        `track`: the face's video track, whose seam `seams` blends over frames. `whole`: the box's
        pixel extent where it reaches past the photo (the crop covers it): the Poisson fit is solved
        over the whole box, its frame outside the photo filled in (`poisson_blend`)."""
        fine = SUPERSAMPLE if self.seams is not None else 1  # a video's faces move
        self.faces.append((extent, band, _onto_crop(face, crop, place, fine), crop.box))
        self.scales.append(crop.side / face.shape[0])
        self.tracks.append(track)
        self.wholes.append(extent if whole is None else whole)

    def _window(self, extent: tuple[int, int, int, int], grow: int,
                crop_box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """`extent` grown by `grow` pixels, inside the photo and the crop (where generated pixels exist)."""
        h, w = self.image.shape[:2]
        cx0, cy0, cx1, cy1 = crop_box
        return (max(extent[0] - grow, 0, cx0), max(extent[1] - grow, 0, cy0),
                min(extent[2] + grow, w, cx1), min(extent[3] + grow, h, cy1))

    @staticmethod
    def _cut(full: np.ndarray, window: tuple[int, int, int, int], crop_box: tuple[int, int, int, int]) -> np.ndarray:
        wx0, wy0, wx1, wy1 = window
        return np.ascontiguousarray(full[wy0 - crop_box[1]:wy1 - crop_box[1], wx0 - crop_box[0]:wx1 - crop_box[0]])

    def _feathered(self) -> np.ndarray:
        """Each face's crop where that face has the highest band weight, alpha-blended by it."""
        h, w = self.image.shape[:2]
        best = np.zeros((h, w), np.float32)
        pasted = self.image.copy()
        for extent, band, full, crop_box in self.faces:
            wx0, wy0, wx1, wy1 = window = self._window(extent, band, crop_box)
            weight = band_weights(extent, band, window)
            region = best[wy0:wy1, wx0:wx1]
            take = (weight > 0) & (weight >= region)
            region[take] = weight[take]
            pasted[wy0:wy1, wx0:wx1][take] = self._cut(full, window, crop_box)[take]
        out = self.image.copy()
        where = best > 0
        a = best[where][:, None]
        out[where] = np.rint(self.image[where] * (1 - a) + pasted[where] * a).astype(np.uint8)
        return out

    def _poisson(self) -> np.ndarray:
        """Every box first takes its generated pixels (the later face where boxes overlap); then each
        box is solved again with the generated gradients inside and, as boundary values, the pixels
        just outside it in that image (the photo, or another face's generated pixels: never an
        original face pixel). Outside the boxes the photo is untouched."""
        h, w = self.image.shape[:2]
        base = self.image.copy()
        owner = np.full((h, w), -1, np.int32)
        for k, (extent, _, full, crop_box) in enumerate(self.faces):
            x0, y0, x1, y1 = box = self._window(extent, 0, crop_box)
            base[y0:y1, x0:x1] = self._cut(full, box, crop_box)
            owner[y0:y1, x0:x1] = k
        if self.seams is None and self.soften > 0:  # a photo: the solve meets the softened band
            base = soften_around(base, owner, [f[0] for f in self.faces], self.scales, sigma=self.soften)
        out = base.copy()
        for k, (extent, _, full, crop_box) in enumerate(self.faces):
            wx0, wy0, wx1, wy1 = window = self._window(extent, 1, crop_box)
            track = self.tracks[k]
            seam = None if self.seams is None or track is None else functools.partial(self.seams, track)
            # the whole box grown by one pixel (inside the crop, where generated pixels exist); the
            # photo covers `window` of it
            cx0, cy0, cx1, cy1 = crop_box
            bx0, by0, bx1, by1 = self.wholes[k]
            ox0, oy0 = max(bx0 - 1, cx0), max(by0 - 1, cy0)
            whole = (ox0, oy0, min(bx1 + 1, cx1), min(by1 + 1, cy1))
            inside = (wy0 - oy0, wy1 - oy0, wx0 - ox0, wx1 - ox0)
            target = base[wy0:wy1, wx0:wx1]
            if whole != window:  # the part past the photo has no target: `inside` says which part does
                target = np.zeros((whole[3] - oy0, whole[2] - ox0, 3), np.uint8)
                target[inside[0]:inside[1], inside[2]:inside[3]] = base[wy0:wy1, wx0:wx1]
            solved = poisson_blend(_soften_edge(self._cut(full, whole, crop_box)), target, seam=seam,
                                   inside=None if whole == window else inside)
            mine = owner[wy0:wy1, wx0:wx1] == k
            out[wy0:wy1, wx0:wx1][mine] = solved[inside[0]:inside[1], inside[2]:inside[3]][mine]
        return out

    def result(self) -> np.ndarray:
        if not self.faces:
            return self.image.copy()
        return self._poisson() if self.blend == "poisson" else self._feathered()


def soften_around(image: np.ndarray, owner: np.ndarray, extents: list[tuple[int, int, int, int]],
                  scales: list[float], band: float = SOFT_BAND, sigma: float = SOFT_SIGMA) -> np.ndarray:
    """`image` with a band of `band` × the box side around each box (`extents`) blended towards its
    own Gaussian blur of `sigma` × the face's `scales` (photo pixels per painted pixel): fully at
    the box edge, linearly less with distance, not at all from the band's end on. Pixels of any box
    (`owner` >= 0) are never written, so every box pixel stays generated; where bands overlap, the
    nearer box's weight wins.

    Why: the painted face is upscaled 2-9x and carries no detail finer than its own pixels, while
    the photo around it is sharp. The Poisson solve matches colours at the edge, but the step from
    sharp hair or background to a soft face stays, and along a straight box side the eye reads it
    as a rectangle. Fading the photo's detail in over a band turns that step into a slope, as a lens
    goes out of focus; the band's colours keep their local mean (no fringe). The 115 faces of 80 px
    and more of the corpus photos (benchmarks/seams.py, medians): detail just outside the box edge
    over just inside it (`seam_figures`) 3.00 -> 1.09 at sigma 0.3 (0.85 at 0.5, the photo's own
    0.99), colour step across the edge 8.7 -> 5.6, fringe 0.5 grey levels."""
    h, w = image.shape[:2]
    faces = [(e, sigma * scale) for e, scale in zip(extents, scales) if sigma * scale >= 0.5]
    if not faces:  # painted at (almost) photo size: nothing to fade
        return image
    out = image.copy()
    best = np.zeros((h, w), np.float32) if len(faces) > 1 else None  # the nearest box's weight so far
    for (x0, y0, x1, y1), s in faces:
        grow = max(2, round(band * max(x1 - x0, y1 - y0)))
        wx0, wy0, wx1, wy1 = max(x0 - grow, 0), max(y0 - grow, 0), min(x1 + grow, w), min(y1 + grow, h)
        photo = owner[wy0:wy1, wx0:wx1] < 0
        blurred = _photo_blur(image[wy0:wy1, wx0:wx1], photo, s)
        # the band alone, as four strips around the box (its inside is never written)
        cx0, cy0, cx1, cy1 = max(x0, wx0), max(y0, wy0), min(x1, wx1), min(y1, wy1)
        for sy0, sy1, sx0, sx1 in ((wy0, cy0, wx0, wx1), (cy1, wy1, wx0, wx1), (cy0, cy1, wx0, cx0), (cy0, cy1, cx1, wx1)):
            if sy1 <= sy0 or sx1 <= sx0:
                continue
            xs, ys = np.arange(sx0, sx1, dtype=np.float32), np.arange(sy0, sy1, dtype=np.float32)
            dx = np.maximum(np.maximum(x0 - xs, xs - (x1 - 1)), 0)
            dy = np.maximum(np.maximum(y0 - ys, ys - (y1 - 1)), 0)
            weight = np.clip(1.0 - np.sqrt(dy[:, None] ** 2 + dx[None, :] ** 2) / (grow + 1), 0.0, 1.0)
            inner = (slice(sy0 - wy0, sy1 - wy0), slice(sx0 - wx0, sx1 - wx0))
            take = (weight > 0) & photo[inner]
            if best is not None:
                region = best[sy0:sy1, sx0:sx1]
                take &= weight > region
                region[take] = weight[take]
            if not take.any():
                continue
            pixels = out[sy0:sy1, sx0:sx1]
            was = image[sy0:sy1, sx0:sx1][take].astype(np.float32)
            mixed = was + weight[take][:, None] * (blurred[inner][take] - was)
            pixels[take] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out


def _photo_blur(window: np.ndarray, photo: np.ndarray, sigma: float) -> np.ndarray:
    """(h, w, 3) float32: the uint8 `window`'s Gaussian blur over the pixels where `photo` (bool)
    is true alone (normalized convolution: a box's pixels add nothing). A blur wider than 2 px is
    taken on a grid `k` times coarser and scaled back (the result is smooth at that scale)."""
    h, w = photo.shape
    k = max(1, min(int(sigma / 2), h // 4, w // 4))
    masked = np.where(photo[..., None], window, 0).astype(np.float32 if k == 1 else np.uint8)
    weight = photo.astype(np.float32)
    if k > 1:
        size = (max(w // k, 1), max(h // k, 1))
        masked = cv2.resize(masked, size, interpolation=cv2.INTER_AREA).astype(np.float32)
        weight = cv2.resize(weight, size, interpolation=cv2.INTER_AREA)
    num = cv2.GaussianBlur(masked, (0, 0), sigma / k, borderType=cv2.BORDER_REFLECT_101)
    den = cv2.GaussianBlur(weight, (0, 0), sigma / k, borderType=cv2.BORDER_REFLECT_101)
    blurred = num / np.maximum(den, 1e-3)[..., None]
    return blurred if k == 1 else cv2.resize(blurred, (w, h), interpolation=cv2.INTER_LINEAR)


def seam_figures(original: np.ndarray, result: np.ndarray, extent: tuple[int, int, int, int],
                 ring: int) -> dict[str, float]:
    """How visible one pasted face's seam is, in 8-bit RGB levels:

    - `seam_step`: mean colour difference between the result's pixels on either side of the box
      edge (a hard rectangle edge shows as a large one);
    - `photo_step`: the same across the same pixels of the photo: the step of an invisible seam;
    - `outside_change`: mean colour change of the result over `ring` pixels outside the box (colour
      fringes and blurred halos; 0 where the photo is untouched);
    - `fringe`: the same for the local mean colour (both images blurred over the ring's own pixels at
      a sigma of a third of `ring`): a colour fringe or halo changes it, `soften_around` hardly;
    - `detail_ratio`: the result's detail (mean absolute Laplacian of its luma) over the `EDGE_RING`
      pixels just outside the box edge against the same just inside it: far above 1 where a soft
      painted face meets a sharp photo in a line; `photo_detail_ratio`: the photo's own (about 1).
    """
    h, w = original.shape[:2]
    x0, y0, x1, y1 = extent

    def step(img: np.ndarray) -> float:
        img = img.astype(np.float32)
        pairs = []  # (just inside, just outside) along each side of the box that lies in the photo
        if y0 > 0:
            pairs.append((img[y0, x0:x1], img[y0 - 1, x0:x1]))
        if y1 < h:
            pairs.append((img[y1 - 1, x0:x1], img[y1, x0:x1]))
        if x0 > 0:
            pairs.append((img[y0:y1, x0], img[y0:y1, x0 - 1]))
        if x1 < w:
            pairs.append((img[y0:y1, x1 - 1], img[y0:y1, x1]))
        if not pairs:
            return 0.0
        inside, outside = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
        return float(np.linalg.norm(inside - outside, axis=-1).mean())

    wx0, wy0, wx1, wy1 = max(0, x0 - ring), max(0, y0 - ring), min(w, x1 + ring), min(h, y1 + ring)
    outside = np.ones((wy1 - wy0, wx1 - wx0), bool)
    outside[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0] = False
    change = np.linalg.norm(result[wy0:wy1, wx0:wx1].astype(np.float32) - original[wy0:wy1, wx0:wx1], axis=-1)
    sigma = max(ring / 3, 1.0)
    mask = outside.astype(np.float32)
    norm = np.maximum(cv2.GaussianBlur(mask, (0, 0), sigma), 1e-3)[..., None]

    def local_mean(img: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(img[wy0:wy1, wx0:wx1].astype(np.float32) * mask[..., None], (0, 0), sigma) / norm

    fringe = np.linalg.norm(local_mean(result) - local_mean(original), axis=-1)
    return {"seam_step": step(result), "photo_step": step(original),
            "outside_change": float(change[outside].mean()) if outside.any() else 0.0,
            "fringe": float(fringe[outside].mean()) if outside.any() else 0.0,
            "detail_ratio": _detail_ratio(result, extent), "photo_detail_ratio": _detail_ratio(original, extent)}


EDGE_RING = 3  # px on either side of a box edge over which `seam_figures` compares detail


def _detail_ratio(image: np.ndarray, extent: tuple[int, int, int, int]) -> float:
    """Mean absolute Laplacian of the luma in the `EDGE_RING` px outside the box, over the same inside."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = extent
    r = EDGE_RING
    wx0, wy0, wx1, wy1 = max(0, x0 - r - 1), max(0, y0 - r - 1), min(w, x1 + r + 1), min(h, y1 + r + 1)
    luma = cv2.cvtColor(np.ascontiguousarray(image[wy0:wy1, wx0:wx1]), cv2.COLOR_RGB2GRAY).astype(np.float32)
    detail = np.abs(cv2.Laplacian(luma, cv2.CV_32F, ksize=1))
    xs, ys = np.arange(wx0, wx1), np.arange(wy0, wy1)
    # signed Chebyshev distance to the box edge: > 0 outside, <= 0 inside
    dx = np.maximum(x0 - xs, xs - (x1 - 1)).astype(np.float32)
    dy = np.maximum(y0 - ys, ys - (y1 - 1)).astype(np.float32)
    d = np.maximum(dy[:, None], dx[None, :])
    keep = np.zeros_like(d, bool)
    keep[1:-1, 1:-1] = True  # the Laplacian of the window's own frame is not the photo's
    outside, inside = keep & (d >= 1) & (d <= r), keep & (d <= 0) & (d > -r)
    if not outside.any() or not inside.any():
        return 1.0
    return float(detail[outside].mean() / max(detail[inside].mean(), 1e-6))
