"""How a face moved between two frames, measured on its pixels (sparse optical flow).

A detector box is a noisy measurement of where a face is: RetinaFace's corners jitter by a pixel
or two from frame to frame, and a line fitted to a few detections (the tracker's smoothing without
this) lags where the face accelerates. A face painted into such a box slides against the head it
replaces; the video benchmark's flicker test sees that as change (with the ground-truth boxes the
painted faces change no more than the source does: flicker ratio 0.97 on the quick pan clip, against
2.1 with the line fit). The pixels themselves say how the face moved, to a fraction of a pixel:
corners inside the box are tracked from one frame to the next (pyramidal Lucas-Kanade, checked
backwards), and a similarity (scale, rotation, shift) is fitted to them with RANSAC. The tracker
(eval.video.FaceTracker) maps every detection of a window into one frame with these steps and
averages them: the detector's noise averages out and the box moves exactly as the face does.

A step is (s, dx, dy): a point p of frame t - 1 is at s * p + (dx, dy) in frame t (rotation is
left out: a box stays upright; the box centre is placed exactly). None where the flow cannot be
trusted (too few corners, as on a tiny or motion-blurred face; the track then falls back to the
line fit).

Where a face's own flow fails, as on a face smeared by a whip pan, the camera's move is the next
best guess of the face's: `camera_step` measures it between two frames on a 320-px gray copy, by
phase correlation (which holds between smeared frames) refined by a similarity fitted to the
frame's corners (so a zoom scales). On the benchmark's pan, zoom and whip clips it moves the next
frame's ground-truth boxes to a median 0.05-0.08 px, where a smeared face's corners fail. It is
only given where the camera moves (the frame's corners by at least CAMERA_MIN_SHIFT px): under a
still camera a face that moves moves on its own, and its velocity says more than the camera's zero.
"""
from __future__ import annotations

import cv2
import numpy as np

MIN_SIDE = 10  # px: the smallest face followed (the video benchmark counts faces from 10 px)
FOLLOW_SIDE = 40  # px: a smaller face is followed by the corners in this square around it
MIN_POINTS = 8  # corners that must agree on a step
MAX_POINTS = 48
FB_ERROR = 0.5  # px: a corner tracked forward and back must land this close to where it started
MAX_SCALE_STEP = 0.2  # a face does not grow or shrink by more than this between two frames
IDENTITY = np.array([1.0, 0.0, 0.0])
CAMERA_SIDE = 320  # px: the long side of the gray copy whose shift is the camera's move
CAMERA_MIN_SHIFT = 3.0  # px per frame (full size): a smaller shift is a still camera
CAMERA_MIN_RESPONSE = 0.3  # phase correlation's peak: below it the frame does not move as one
CAMERA_POINTS = 120  # corners followed over the camera view
LK_LEVELS = 3  # pyramid levels above the frame that a face's flow starts from


def apply(step: np.ndarray, box: np.ndarray) -> np.ndarray:
    """`box` (x0, y0, x1, y1) of frame t - 1 moved by `step` into frame t."""
    s, dx, dy = step
    return s * np.asarray(box, np.float64) + np.array([dx, dy, dx, dy])


def centre_shift(step: np.ndarray, box: np.ndarray) -> tuple[float, float]:
    """How far `step` moves the centre of `box` (the `guess` for the next frame's flow)."""
    moved = apply(step, box) - np.asarray(box, np.float64)
    return float(moved[0] + moved[2]) / 2, float(moved[1] + moved[3]) / 2


def compose(first: np.ndarray, then: np.ndarray) -> np.ndarray:
    """The step that does `first`, then `then`."""
    s1, x1, y1 = first
    s2, x2, y2 = then
    return np.array([s2 * s1, s2 * x1 + x2, s2 * y1 + y2])


def invert(step: np.ndarray) -> np.ndarray:
    s, dx, dy = step
    return np.array([1.0 / s, -dx / s, -dy / s])


def _gray(rgb: np.ndarray) -> np.ndarray:
    return rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def camera_view(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """The small gray float copy of a frame that `camera_step` compares, and its scale to full size."""
    gray = _gray(rgb)
    scale = max(gray.shape) / CAMERA_SIDE
    if scale <= 1:
        return gray.astype(np.float32), 1.0
    size = (max(int(round(gray.shape[1] / scale)), 1), max(int(round(gray.shape[0] / scale)), 1))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA).astype(np.float32), scale


def camera_step(previous: tuple[np.ndarray, float], current: tuple[np.ndarray, float]) -> np.ndarray | None:
    """The camera's move from one frame to the next as a step (s, dx, dy) (a zoom scales), from
    their `camera_view`s; None where the camera holds still or the frame does not move as one
    (module docstring). Phase correlation gives the shift even between smeared frames; where the
    frame has corners, they are followed from there (LK, checked backwards) and a similarity is
    fitted to them (RANSAC), which also measures a zoom."""
    (a, scale), (b, _) = previous, current
    if a.shape != b.shape or min(a.shape) < 16:
        return None
    (sx, sy), response = cv2.phaseCorrelate(a, b, cv2.createHanningWindow(a.shape[::-1], cv2.CV_32F))
    step = np.array([1.0, sx, sy]) if response >= CAMERA_MIN_RESPONSE else None
    a8, b8 = a.astype(np.uint8), b.astype(np.uint8)
    p0 = cv2.goodFeaturesToTrack(a8, CAMERA_POINTS, 0.01, 6, blockSize=5)
    if p0 is not None and len(p0) >= CAMERA_POINTS // 4:  # enough corners to fit a similarity to
        lk = dict(winSize=(15, 15), maxLevel=3, flags=cv2.OPTFLOW_USE_INITIAL_FLOW,
                  criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))
        guess = p0 + np.float32([sx, sy]) if step is not None else p0.copy()
        p1, ok1, _ = cv2.calcOpticalFlowPyrLK(a8, b8, p0, guess, **lk)
        back, ok2, _ = cv2.calcOpticalFlowPyrLK(b8, a8, p1, p0.copy(), **lk)
        good = (ok1.ravel() == 1) & (ok2.ravel() == 1) & (np.linalg.norm((back - p0).reshape(-1, 2), axis=1) < FB_ERROR)
        if good.sum() >= CAMERA_POINTS // 4:
            m, inliers = cv2.estimateAffinePartial2D(p0[good], p1[good], method=cv2.RANSAC, ransacReprojThreshold=0.5)
            if m is not None and inliers is not None and inliers.sum() >= 0.6 * good.sum():
                step = np.array([float(np.hypot(m[0, 0], m[1, 0])), m[0, 2], m[1, 2]])
    if step is None or not abs(step[0] - 1.0) <= MAX_SCALE_STEP:
        return None
    h, w = a.shape
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], np.float64)
    moved = np.abs(step[0] * corners + step[1:] - corners).max(axis=1).mean() * scale
    if moved < CAMERA_MIN_SHIFT:  # the frame's corners hold still: the camera does
        return None
    return np.array([step[0], step[1] * scale, step[2] * scale])


def measure_step(previous: np.ndarray, current: np.ndarray, box: np.ndarray,
                 guess: tuple[float, float] = (0.0, 0.0)) -> np.ndarray | None:
    """The step (s, dx, dy) of the face in `box` of frame `previous` into frame `current` (RGB or
    gray images of one size), or None where it cannot be trusted. `guess`: the box's expected shift
    in pixels (the track's velocity), so that a fast pan starts the flow near its answer."""
    return measure_steps(previous, current, [box], [guess])[0]


def _region(box: np.ndarray, guess: tuple[float, float], h: int, w: int) -> dict | None:
    """Where one face's flow is measured in an h x w frame: the region around it (rx0, ry0, rx1,
    ry1), the rectangle its corners are taken in, the LK window and the box centre; None where the
    face is too small."""
    bx0, by0, bx1, by1 = (float(v) for v in box)
    if max(bx1 - bx0, by1 - by0) < MIN_SIDE:
        return None
    # corners are taken in the box, or for a small face in the square of FOLLOW_SIDE around it (a
    # small face has too few corners of its own; what is around it moves with it under a camera move)
    cx, cy, half = (bx0 + bx1) / 2, (by0 + by1) / 2, FOLLOW_SIDE / 2
    x0, y0, x1, y1 = min(bx0, cx - half), min(by0, cy - half), max(bx1, cx + half), max(by1, cy + half)
    side = max(x1 - x0, y1 - y0)
    pad = 0.25 * side + abs(guess[0]) + abs(guess[1]) + 4
    rx0, ry0 = max(int(np.floor(x0 - pad)), 0), max(int(np.floor(y0 - pad)), 0)
    rx1, ry1 = min(int(np.ceil(x1 + pad)), w), min(int(np.ceil(y1 + pad)), h)
    if rx1 - rx0 < 8 or ry1 - ry0 < 8:
        return None
    inset = 0.1 * side  # corners on the face: the box shrunk by a tenth
    return {"region": (rx0, ry0, rx1, ry1), "corners_in": (x0 + inset, y0 + inset, x1 - inset, y1 - inset),
            "spacing": max(2.0, side / 16), "win": int(np.clip(side / 4, 7, 21)) | 1,
            "guess": np.float32(guess), "centre": (cx, cy)}


def _corners(gray: np.ndarray, plan: dict, origin: tuple[int, int]) -> np.ndarray | None:
    """The corners of a face to follow, in the coordinates of `gray` (a part of the frame starting
    at `origin`), found in the face's region only; None where there are too few."""
    ox, oy = origin
    rx0, ry0, rx1, ry1 = plan["region"]
    a = gray[ry0 - oy:ry1 - oy, rx0 - ox:rx1 - ox]
    x0, y0, x1, y1 = plan["corners_in"]
    mask = np.zeros(a.shape, np.uint8)
    mask[max(int(y0) - ry0, 0):max(int(y1) - ry0, 0), max(int(x0) - rx0, 0):max(int(x1) - rx0, 0)] = 255
    p0 = cv2.goodFeaturesToTrack(a, MAX_POINTS, 0.01, plan["spacing"], mask=mask, blockSize=3)
    if p0 is None or len(p0) < MIN_POINTS:
        return None
    return p0.reshape(-1, 2).astype(np.float32) + np.float32([rx0 - ox, ry0 - oy])


def measure_steps(previous: np.ndarray, current: np.ndarray, boxes: list[np.ndarray],
                  guesses: list[tuple[float, float]]) -> list[np.ndarray | None]:
    """`measure_step` for many faces of one frame pair: the part of the two frames the faces need
    (one face: its own region) is made gray once, and the corners of all faces with the same LK
    window go through one LK call each way over it. A call per face built its image pyramids again
    for each: on the crowd clip (about 1,000 faces a frame) the flow took a quarter of the clip's
    time."""
    h, w = previous.shape[:2]
    plans = [_region(box, guess, h, w) for box, guess in zip(boxes, guesses)]
    out: list[np.ndarray | None] = [None] * len(plans)
    if not any(plan is not None for plan in plans):
        return out
    regions = np.array([plan["region"] for plan in plans if plan is not None])
    ux0, uy0 = (int(v) for v in regions[:, :2].min(axis=0))
    ux1, uy1 = (int(v) for v in regions[:, 2:].max(axis=0))
    a, b = _gray(previous[uy0:uy1, ux0:ux1]), _gray(current[uy0:uy1, ux0:ux1])
    points = {i: _corners(a, plan, (ux0, uy0)) for i, plan in enumerate(plans) if plan is not None}
    found = [i for i, p in points.items() if p is not None]
    origin = np.float32([ux0, uy0])
    for win in sorted({plans[i]["win"] for i in found}):  # (OpenCV's Python binding takes no ready pyramids)
        group = [i for i in found if plans[i]["win"] == win]
        p0 = np.concatenate([points[i] for i in group])
        guess = np.concatenate([np.broadcast_to(plans[i]["guess"], points[i].shape) for i in group])
        lk = dict(winSize=(win, win), maxLevel=LK_LEVELS, flags=cv2.OPTFLOW_USE_INITIAL_FLOW,
                  criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))
        p1, ok1, _ = cv2.calcOpticalFlowPyrLK(a, b, p0, p0 + guess, **lk)
        back, ok2, _ = cv2.calcOpticalFlowPyrLK(b, a, p1, p0.copy(), **lk)
        good = (ok1.ravel() == 1) & (ok2.ravel() == 1) & (np.linalg.norm(back - p0, axis=1) < FB_ERROR)
        start = 0
        for i in group:
            part = slice(start, start + len(points[i]))
            start += len(points[i])
            out[i] = _fitted_step(p0[part][good[part]] + origin, p1[part][good[part]] + origin, plans[i]["centre"])
    return out


def _fitted_step(p0: np.ndarray, p1: np.ndarray, centre: tuple[float, float]) -> np.ndarray | None:
    """The similarity RANSAC fits to corners followed from p0 to p1 (frame coordinates), as a step
    that puts the box centre exactly where it moves it; None where too few corners agree."""
    if len(p0) < MIN_POINTS:
        return None
    m, inliers = cv2.estimateAffinePartial2D(p0, p1, method=cv2.RANSAC, ransacReprojThreshold=1.0)
    if m is None or inliers is None or int(inliers.sum()) < MIN_POINTS:
        return None
    s = float(np.hypot(m[0, 0], m[1, 0]))
    if not abs(s - 1.0) <= MAX_SCALE_STEP:
        return None
    cx, cy = centre
    moved = m @ np.array([cx, cy, 1.0])  # the box centre lands exactly where the motion puts it
    return np.array([s, moved[0] - s * cx, moved[1] - s * cy])
