"""Video anonymization as a stream, with look-ahead face tracking so that no frame leaks a face.

Frames are decoded, detected `batch_size` at a time, tracked, anonymized and piped to ffmpeg. A
frame is written only once the `lookahead` frames after it have been detected (the tool writes
files, it need not be live), so a face the detector misses for a few frames (motion blur, a half
turned head, a face entering the frame) is filled in from both sides instead of leaking. Memory
stays at `lookahead + 2 * batch_size` frames whatever the length of the video (DeepPrivacy read
every frame into memory, a common out-of-memory report of its users). ffmpeg writes H.264 at the
source's frame rate (a variable-rate source becomes constant at its average rate) and takes the
audio streams from the source file in the same pass, so sound and timing are kept; container
metadata (which may hold a location) is not copied. The ffmpeg binary is the one bundled with the
`imageio-ffmpeg` package, else `ffmpeg` on PATH.

Tracking (:class:`FaceTracker`): detections are matched to tracks by IoU with the box the track's
measured motion (else its velocity) predicts (so a box follows a fast pan), or, failing that, by
centre distance; hard cuts (a jump of the colour histogram) end every track. Each track's face motion from frame to frame is
measured on the pixels (eval.face_motion: sparse optical flow, a similarity fitted with RANSAC), so
a box can be moved from one frame to another exactly as the face moved. The boxes of frame t are
decided when frame t + lookahead is known: a detected face gets the mean of its detections over
t ± `motion_radius`, each moved into frame t by the measured motion (the detector's jitter averages
out and the box follows acceleration; sides cut by the frame edge are left out); where the motion
cannot be measured (a tiny or blurred face), a line fitted to its detections over t ± `smooth_radius`,
grown to cover its detections of t ± 1 (steady, never lagging behind the face); a missed face
between two detections gets the interpolated box; before its first detection (up to `lookahead`
frames back) and after its last (up to `max_missing` frames on) it gets the box its velocity
predicts, or, where measured, the face's own motion (a new track's motion is measured backwards over
the look-ahead frames when it is found); backwards without it, that is the camera's motion when the
shot has other faces (the median motion of the other tracks up to the new one's first detection),
because the first detections of a face the detector only just found are its noisiest. Boxes that
were not detected are grown by `margin` (more the further they are from a detection), because a leak
costs more than a slightly larger mask; a miss between two detections, whose box is interpolated,
and a box carried by the face's measured motion much less (see `FaceTracker._grow`). A face cut by
the frame edge gets its whole box, reaching past the edge (`FaceTracker._whole`): the generator
paints the whole face and only its part inside the frame is pasted.

The generator sees each track consistently: z = 0 for every face (the paper's evaluation setting,
so the latent never changes along a track), boxes smoothed as above (so the condition, the
background around the box, moves smoothly), and keypoints smoothed per track in box coordinates.
Faces of all the frames of a batch go through the generator together. A track keeps one painted
face (eval.face_memory), placed to a fraction of a pixel (eval.paste: no whole-pixel jumps) and
fitted to its surroundings with a seam correction blended over frames (eval.paste.SeamMemory).

`detect_every` k > 1 runs the detector on every k-th frame of a shot only (and on the first frame
after a cut); a frame in between is not a miss: its boxes are interpolated from the detected frames
on either side (after a shot's last detected frame: carried by the track's motion), without the
miss margin. Detection is most of the time of a video, so k = 2 about halves it; a face visible
for less than k frames could go unseen, hence the default 1.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from eval import face_motion
from eval.anonymizer import Anonymizer, Faces
from eval.face_memory import TrackFaces
from eval.paste import pixel_extent, visible_fraction
from fdf_core.boxes import box_iou
from fdf_core.tario import replace_durably, temporary_path

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
SMALL_FACE, SMALL_GROW = 24, 0.1  # px, fraction of the side: boxes of smaller faces grow by this more
CUT_HISTOGRAM = 0.25  # colour-histogram distance (0..2) between consecutive frames that is a cut
AT_EDGE = 1.0  # px: a box side this close to the frame edge (or past it) is cut by the edge
FACE_ASPECT = 0.8  # width / height of a detected face box, until the video has shown whole ones


@dataclass
class VideoOptions:
    """Tracking and encoding of videos.

    Args:
        lookahead: frames detected ahead of the frame being written; a face found within this many
            frames after a miss is filled in backwards (memory grows by this many frames)
        max_missing: frames a track is extrapolated after its last detection
        track_iou: IoU with a track's predicted box for a detection to continue that track
        smooth_radius: a detected box is a line fitted to its track's detections over ±this many frames,
            grown to cover the detections of this frame and its neighbours (FaceTracker._smoothed)
        motion_radius: a detected box is the mean of its track's detections over ±this many frames, each
            moved into the frame by the face's measured motion (eval.face_motion); where that cannot be
            measured, the line fit of `smooth_radius` is used
        margin: growth of a box that was not detected in that frame, as a fraction of its side
            (doubled over `lookahead` frames from the nearest detection; for a miss between two
            detections, rising from 0 to `margin` over `lookahead` frames)
        keypoint_smoothing: weight of the previous keypoints of a track (box coordinates, generator only)
        grow: every box grows by this fraction of its side on each side (detector boxes are tight, and
            a box a few pixels off leaves part of a small face)
        video_detect_max_size: frames up to this long side are detected at full size (small faces
            are lost to downscaling); larger ones are downscaled to it
        crf: libx264 quality (lower = better)
        preset: libx264 speed preset
        audio_codec: None = the container's default encoder (always works); "copy" keeps the stream bit-exact
        paint_every: the generator paints a track's face on its first frame and every this many frames;
            in between the last painting is carried with the box (generator only, eval.face_memory)
        temporal_keep: weight of a track's previous painting when a new one is blended in (0 = none).
            0.9: each painting changes the face by a tenth, so a track stays one person (full-length
            clips, tracks whose painted faces stay within dlib's 0.6: pan 9 -> 18 of 18, zoom 15 -> 19
            of 19 against 0.75) with the flicker unchanged (pan 1.46 -> 1.48, zoom 0.99 -> 1.00)
        sharper: a face painted afresh (generator) is painted from the frame of its track, up to
            `lookahead` frames on, that shows it best (`best_views`): more of its box inside the
            frame, else this many times sharper (variance of the Laplacian of the face's 32x32
            thumbnail); 0 = always from the frame itself. Why: a track found during a whip pan was
            painted from a smeared crop, and that painting (a dark box with a bright bar, no face)
            was carried into the still shot after the pan for seconds; a face entering over the
            frame edge was painted from the part inside, and the painting changed as later ones
            were blended in. Paintings live in the track's own crop, so one made from a later frame
            fits this one as any carried painting does
        paint_score: the generator paints a track only once its detections so far (look-ahead
            included) scored at least this on average, and from then on for good; until then it
            takes the small-face method, which covers a face as safely. Why: the detector's
            low-scoring boxes during a whip pan were a smeared chest (0.39-0.57), and the generator
            painted a face 230 px wide on it, held for half a second after the last of them; on the
            whip and pan clips (every other frame) 183 of 188 detections under 0.6 match no face, 37
            of 2,621 from 0.6 up. The average, not the best score: the pan's two wall lamps are
            found in most frames at 0.33-0.96 (three tracks, means 0.47-0.57), and one detection over
            0.6 had them painted with a face for seconds; averaged, two never reach 0.6 and the third
            only for its last 34 frames, while the real faces' tracks of the full pan, zoom, whip and
            dinner clips average 0.70 and more and are painted from the same frame under either
            rule. 0 = paint every track
        max_covered: a detection with more than this share of its box inside higher-scoring
            detections of its frame is dropped before tracking (1 = keep all): its pixels are
            anonymized with theirs. Why: RetinaFace puts a box (0.67) between two faces side by side
            in the cut clip, over half of each; tracked and held, a third face was painted across the
            two, changing as its box grew (that face's flicker ratio 4.5)
        detect_every: the detector runs on every this many frames (and on the first frame after every
            cut); a frame in between takes its faces' boxes from the detected frames on either side
        seam_keep: weight of a track's previous seam correction (the Poisson blend's colour fit to
            the pixels around the box) in this frame's (generator only, eval.paste.SeamMemory). 0.95
            (about 20 frames): with the 64x64 model the seam was the largest flicker left, quick
            pan / zoom / whip clips 1.27 / 1.27 / 1.42 at 0.8, 1.17 / 1.20 / 1.30 at 0.9, 1.13 /
            1.14 / 1.13 at 0.95 (each painting reached gradually, eval.face_memory); the price is
            a seam that follows a change of the light around the face within about a second
    """

    lookahead: int = 12
    max_missing: int = 12
    track_iou: float = 0.2
    smooth_radius: int = 3
    motion_radius: int = 6
    margin: float = 0.15
    keypoint_smoothing: float = 0.6
    grow: float = 0.05
    video_detect_max_size: int = 1920
    crf: int = 18
    preset: str = "veryfast"
    audio_codec: str | None = None
    paint_every: int = 24
    temporal_keep: float = 0.9
    seam_keep: float = 0.95
    sharper: float = 1.5
    paint_score: float = 0.6
    max_covered: float = 0.85
    detect_every: int = 1


def ffmpeg_exe() -> str:
    """imageio-ffmpeg's bundled binary, else `ffmpeg` from PATH."""
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        exe = shutil.which("ffmpeg")
        if exe is None:
            raise FileNotFoundError("no ffmpeg: pip install imageio-ffmpeg (bundles one) or install ffmpeg") from None
        return exe


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def covered_share(boxes: np.ndarray, scores: np.ndarray, grid: int = 16) -> np.ndarray:
    """For each box, the share of its area inside the union of the boxes that score higher (sampled
    on a `grid` x `grid` lattice of its area). Only boxes that overlap it are tested (a crowd frame
    has hundreds of boxes, each touching a few)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    share = np.zeros(len(boxes))
    if len(boxes) < 2:
        return share
    rank = np.empty(len(boxes), int)
    rank[np.argsort(-np.asarray(scores, np.float64), kind="stable")] = np.arange(len(boxes))
    overlaps = (box_iou(boxes, boxes) > 0) & (rank[None, :] < rank[:, None])  # [i, j]: j scores higher and touches i
    u = (np.arange(grid) + 0.5) / grid
    for i in np.flatnonzero(overlaps.any(axis=1)):
        x0, y0, x1, y1 = boxes[i]
        xs, ys = np.meshgrid(x0 + u * (x1 - x0), y0 + u * (y1 - y0))
        inside = np.zeros(xs.shape, bool)
        for b in boxes[overlaps[i]]:
            inside |= (xs >= b[0]) & (xs <= b[2]) & (ys >= b[1]) & (ys <= b[3])
        share[i] = inside.mean()
    return share


def _affinity(predicted: np.ndarray, boxes: np.ndarray, iou: float) -> np.ndarray:
    """(T, D) match quality: IoU where it reaches `iou`, else a centre-distance score below it for
    boxes of similar size whose centres are within half a box side (a face that moved further
    than its predicted box); 0 = no match."""
    aff = box_iou(predicted, boxes)
    cp = (predicted[:, None, :2] + predicted[:, None, 2:]) / 2
    cd = (boxes[None, :, :2] + boxes[None, :, 2:]) / 2
    side_p = np.maximum(predicted[:, 2] - predicted[:, 0], predicted[:, 3] - predicted[:, 1])[:, None]
    side_d = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])[None, :]
    dist = np.linalg.norm(cp - cd, axis=2) / np.maximum(side_p, 1e-6)
    similar = (side_d < 2 * side_p) & (side_p < 2 * side_d)
    near = np.where(similar & (dist < 0.5), iou * (1 - 2 * dist) * 0.99, 0.0)
    return np.where(aff >= iou, aff, near)


def by_velocity(box: np.ndarray, velocity: np.ndarray, frames: float) -> np.ndarray:
    """`box` carried `frames` frames on (negative: back) by its corners' `velocity` (px per frame):
    its centre moves as the velocity moves it, and it keeps at least its own width and height. The
    corners carried apart could make a box smaller frame by frame, and inside out (the full crowd
    clip: a shrinking crowd face's box became [315.5, 186.4, 314.7, 185.0], which covers no pixel);
    a face the detector lost is covered at the size it was last seen, or larger."""
    box = np.asarray(box, np.float64)
    moved = box + np.asarray(velocity, np.float64) * frames
    half = np.maximum(moved[2:] - moved[:2], box[2:] - box[:2]) / 2
    centre = (moved[:2] + moved[2:]) / 2
    return np.concatenate([centre - half, centre + half])


@dataclass
class _Track:
    shot: int
    obs: dict[int, tuple[np.ndarray, float]] = field(default_factory=dict)  # frame → (detected box, score)
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))  # box corners, px per frame
    backfill_velocity: np.ndarray | None = None  # kept once no later frame can change it
    score_sum: float = 0.0  # of its detections so far (their scores, and how many)
    detections: int = 0
    sure: bool = False  # its detections once scored `paint_score` on average (FaceTracker.sure)
    steps: dict[int, np.ndarray] = field(default_factory=dict)  # frame t → the face's motion t-1 → t

    @property
    def first(self) -> int:
        return min(self.obs)

    @property
    def last(self) -> int:
        return max(self.obs)

    def motion(self, a: int, b: int) -> np.ndarray:
        """Box corners' motion per frame between observed frames a < b."""
        return (self.obs[b][0] - self.obs[a][0]) / (b - a)

    def start_velocity(self) -> np.ndarray:
        frames = sorted(self.obs)[:2]
        return self.motion(*frames) if len(frames) == 2 else np.zeros(4)


class FaceTracker:
    """Look-ahead tracking: `push` each frame's detections in order; `boxes(t)` is final once
    frame t + lookahead has been pushed (or the video ended). See the module docstring."""

    def __init__(self, lookahead: int = 12, max_missing: int = 12, iou: float = 0.2, smooth_radius: int = 3,
                 margin: float = 0.15, grow: float = 0.0, motion_radius: int = 6):
        if min(lookahead, max_missing, smooth_radius, margin, grow, motion_radius) < 0 or not 0 < iou <= 1:
            raise ValueError(f"need lookahead ({lookahead}), max_missing ({max_missing}), smooth_radius "
                             f"({smooth_radius}), motion_radius ({motion_radius}), margin ({margin}), grow ({grow}) "
                             f">= 0 and 0 < track_iou ({iou}) <= 1")
        self.lookahead, self.max_missing, self.iou = lookahead, max_missing, iou
        self.smooth_radius, self.margin, self.grow = smooth_radius, margin, grow
        self.motion_radius = motion_radius
        self._previous: np.ndarray | None = None  # the last frame pushed (motion is measured against it)
        self._camera_view: tuple[np.ndarray, float] | None = None  # its face_motion.camera_view
        self.camera: dict[int, np.ndarray] = {}  # frame t → the camera's move t-1 → t, where it moves
        self.size: tuple[int, int] | None = None  # (width, height) of the pushed frames
        self._recent: deque[tuple[int, np.ndarray]] = deque(maxlen=lookahead + 1)  # for a new track's past
        self._aspects: deque[float] = deque(maxlen=1000)  # width / height of recent detections inside the frame
        self.frames = 0  # frames pushed
        self.unseen: set[int] = set()  # frames pushed without detection (VideoOptions.detect_every)
        self.shot = 0
        self.shot_of: dict[int, int] = {}
        self.tracks: dict[int, _Track] = {}
        self._next_id = 0

    def push(self, boxes: np.ndarray | None, scores: np.ndarray | None, cut: bool = False,
             frame: np.ndarray | None = None) -> int:
        """Detections of the next frame (after a hard cut if `cut`); returns its index. `boxes`
        None: the frame was not run through the detector (its boxes come from the detected frames
        on either side, like a miss, but not grown: nothing was missed). `frame` (RGB): the image,
        to measure how each track's face moved since the previous frame (eval.face_motion); without
        frames a track's boxes are a line fitted to its detections."""
        t = self.frames
        self.frames += 1
        if cut and t > 0:
            self.shot += 1
        self.shot_of[t] = self.shot
        if frame is not None:
            self.size = (frame.shape[1], frame.shape[0])
            view = face_motion.camera_view(frame)
            if self._previous is not None and not (cut and t > 0):
                camera = face_motion.camera_step(self._camera_view, view)
                if camera is not None:
                    self.camera[t] = camera
                self._measure(t, frame)
            self._previous, self._camera_view = frame, view
            self._recent.append((t, frame))
        if boxes is None:
            self.unseen.add(t)
            return t
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).reshape(-1)
        reach = self.max_missing + self.lookahead  # a gap this long can still be bridged
        live = [k for k, tr in self.tracks.items() if tr.shot == self.shot and t - tr.last <= reach]
        track_of = np.full(len(boxes), -1)
        if live and len(boxes):
            predicted = np.stack([self._predicted(self.tracks[k], t) for k in live])
            aff = _affinity(predicted, boxes, self.iou)
            used = np.zeros(len(live), bool)
            for flat in np.argsort(-aff, axis=None, kind="stable"):
                i, d = np.unravel_index(flat, aff.shape)
                if aff[i, d] <= 0:
                    break
                if not used[i] and track_of[d] < 0:
                    used[i], track_of[d] = True, live[i]
        if self.size is not None:
            whole = boxes[self._uncut(boxes).all(axis=1) & (boxes[:, 3] > boxes[:, 1])]
            self._aspects.extend(((whole[:, 2] - whole[:, 0]) / (whole[:, 3] - whole[:, 1])).tolist())
        for d, k in enumerate(track_of):
            if k < 0:
                k = self._next_id
                self._next_id += 1
                self.tracks[k] = _Track(self.shot)
                self._measure_back(self.tracks[k], t, boxes[d])
            tr = self.tracks[k]
            if tr.obs:
                last = tr.last
                v = (boxes[d] - tr.obs[last][0]) / (t - last)
                tr.velocity = v if len(tr.obs) == 1 else 0.5 * tr.velocity + 0.5 * v
            tr.obs[t] = (boxes[d], float(scores[d]))
            tr.score_sum += float(scores[d])
            tr.detections += 1
        return t

    def _predicted(self, tr: _Track, t: int) -> np.ndarray:
        """Where the track's last detection is in frame t: moved by the measured motion, else by its velocity."""
        carried = self._carry(tr, tr.last, t)
        last = tr.obs[tr.last][0]
        return face_motion.apply(carried, last) if carried is not None else by_velocity(last, tr.velocity, t - tr.last)

    def _measure(self, t: int, frame: np.ndarray) -> None:
        """Each live track's motion from frame t - 1 to t, from the box where it was in t - 1."""
        reach = self.max_missing + self.lookahead
        tracks, boxes, guesses = [], [], []
        for tr in self.tracks.values():
            if tr.shot != self.shot or not tr.obs or t - 1 - tr.last > reach or tr.last > t - 1:
                continue
            box = self._predicted(tr, t - 1)
            previous = tr.steps.get(t - 1)
            if previous is not None:  # the last measured motion: where this frame's flow starts
                guess = face_motion.centre_shift(previous, box)
            else:
                guess = (float(tr.velocity[0] + tr.velocity[2]) / 2, float(tr.velocity[1] + tr.velocity[3]) / 2)
            tracks.append(tr)
            boxes.append(box)
            guesses.append(guess)
        for tr, step in zip(tracks, face_motion.measure_steps(self._previous, frame, boxes, guesses)):
            if step is None:  # the face's own flow failed (a smeared face): the camera's move, if any
                step = self.camera.get(t)
            if step is not None:
                tr.steps[t] = step

    def _measure_back(self, tr: _Track, t: int, box: np.ndarray) -> None:
        """A track found in frame t: its face's motion over the up to `lookahead` frames before, where
        it was not detected yet and is filled in backwards (as far as the flow holds, in this shot)."""
        frames = dict(self._recent)
        shift = (0.0, 0.0)
        f = t
        while t - f < self.lookahead and f - 1 in frames and self.shot_of.get(f - 1) == self.shot_of[t]:
            back = face_motion.measure_step(frames[f], frames[f - 1], box, shift)
            if back is None and f in self.camera:  # a smeared face: where the camera moved it
                back = face_motion.invert(self.camera[f])
            if back is None:
                break
            shift = face_motion.centre_shift(back, box)
            tr.steps[f], box, f = face_motion.invert(back), face_motion.apply(back, box), f - 1

    def _carry(self, tr: _Track, a: int, b: int) -> np.ndarray | None:
        """The measured motion of the track's face from frame a to frame b (None if a step is unknown)."""
        step = face_motion.IDENTITY
        for f in (range(a + 1, b + 1) if b >= a else range(a, b, -1)):
            s = tr.steps.get(f)
            if s is None:
                return None
            step = face_motion.compose(step, s if b >= a else face_motion.invert(s))
        return step

    def _fused(self, tr: _Track, t: int) -> np.ndarray | None:
        """The mean of the track's detections over t ± `motion_radius`, each moved into frame t by
        the measured motion; None where fewer than three can be moved (no frames pushed, or the flow
        failed), and the line fit takes over.

        A detection cut off by the frame edge says nothing about where that side of the face is
        (a face leaving the frame keeps a detected edge of 0), so each side is the mean of the
        detections that saw it; a side none of them saw is placed from the other side and the
        face's size, and never inside the frame edge it was cut at."""
        boxes, moves = [], []  # each detection in reach; its motion into frame t as (s, dx, dy, dx, dy)
        for direction in (-1, 1):  # outwards from t, the motion to t built up one step at a time
            s, dx, dy = 1.0, 0.0, 0.0  # plain floats: this runs per track and frame (a crowd: 1,000 per frame)
            for f in range(t if direction < 0 else t + 1, t + direction * (self.motion_radius + 1), direction):
                if f != t:
                    step = tr.steps.get(f + 1 if direction < 0 else f)
                    if step is None:
                        break
                    s1, x1, y1 = (float(v) for v in (step if direction < 0 else face_motion.invert(step)))
                    s, dx, dy = s * s1, s * x1 + dx, s * y1 + dy  # face_motion.compose(step, to_t)
                if f in tr.obs:
                    boxes.append(tr.obs[f][0])
                    moves.append((s, dx, dy, dx, dy))
        if len(boxes) < 3:
            return None
        boxes, moves = np.array(boxes, np.float64), np.array(moves)
        moved = moves[:, :1] * boxes + moves[:, 1:]  # face_motion.apply, all at once
        seen = self._uncut(boxes)
        count = seen.sum(axis=0)
        fused = (moved * seen).sum(axis=0) / np.maximum(count, 1)
        for i in np.flatnonzero(count == 0):
            j, sign = (i + 2) % 4, (-1.0 if i < 2 else 1.0)  # the opposite side; outward
            both = seen[:, i % 2] & seen[:, i % 2 + 2]
            if count[j] and both.any():
                fused[i] = fused[j] + sign * (moved[both, i % 2 + 2] - moved[both, i % 2]).mean()
            else:
                fused[i] = moved[:, i].min() if i < 2 else moved[:, i].max()
            edge = 0.0 if i < 2 else float(self.size[i % 2])
            fused[i] = min(fused[i], edge) if i < 2 else max(fused[i], edge)
        return fused

    def _uncut(self, box: np.ndarray) -> np.ndarray:
        """Which sides of a detection (4,) or of each of (N, 4) are not at the frame edge (all, when
        the frame size is unknown)."""
        box = np.asarray(box)
        if self.size is None:
            return np.ones(box.shape, bool)
        w, h = self.size
        return np.stack([box[..., 0] > 0.5, box[..., 1] > 0.5, box[..., 2] < w - 0.5, box[..., 3] < h - 0.5], axis=-1)

    def _grow(self, box: np.ndarray, distance: int, between: bool = False) -> np.ndarray:
        """The miss margin: `margin` × (1 + distance / lookahead) of the side for a box guessed from
        one side (before a track's first detection, after its last); `margin` × distance /
        lookahead for a miss between two detections, whose interpolated box is off by no more than
        the face's change of speed over the gap: growing it as much made the face painted into it
        jump in size for the missed frame (the video benchmark's flicker spikes)."""
        reach = min(distance, max(self.lookahead, 1)) / max(self.lookahead, 1)
        f = self.margin * (reach if between else 1 + reach)
        w, h = box[2] - box[0], box[3] - box[1]
        return box + f * np.array([-w, -h, w, h])

    def _box_at(self, tr: _Track, t: int) -> tuple[np.ndarray, float] | None:
        if t in tr.obs:
            return self._smoothed(tr, t), tr.obs[t][1]
        before = [f for f in tr.obs if f < t]
        after = [f for f in tr.obs if f > t]
        prev, nxt = (max(before) if before else None), (min(after) if after else None)
        if prev is not None and nxt is not None:
            u = (t - prev) / (nxt - prev)
            score = max(tr.obs[prev][1], tr.obs[nxt][1])
            if self._skipped(prev + 1, nxt - 1):  # not missed: as detected
                return (1 - u) * self._box_at(tr, prev)[0] + u * self._box_at(tr, nxt)[0], score
            box = self._fused(tr, t)
            if box is None:
                box = (1 - u) * tr.obs[prev][0] + u * tr.obs[nxt][0]
            return self._grow(box, min(t - prev, nxt - t), between=True), score
        if prev is not None and t - prev <= self.max_missing:
            carried = self._carry(tr, prev, t)  # the face's own motion since its last detection
            if carried is not None:
                box = face_motion.apply(carried, self._box_at(tr, prev)[0])
            elif self._skipped(prev + 1, t):
                box = by_velocity(self._box_at(tr, prev)[0], tr.velocity, t - prev)
            else:
                box = by_velocity(tr.obs[prev][0], tr.velocity, t - prev)
            if self._skipped(prev + 1, t):  # after a shot's last detection: not a miss
                return box, tr.obs[prev][1]
            # carried by the face's measured motion: grown as little as a box measured backwards is,
            # from nothing at the detection on (the full margin at once made a box that lost its
            # detection jump by a third of its side, a flicker spike on every crowd face it dropped)
            return self._grow(box, t - prev, between=carried is not None), tr.obs[prev][1]
        if nxt is not None and nxt - t <= self.lookahead:
            carried = self._carry(tr, nxt, t)
            if carried is not None:  # the face's own motion before it was found: measured, so grown less
                return self._grow(face_motion.apply(carried, self._box_at(tr, nxt)[0]), nxt - t, between=True), \
                    tr.obs[nxt][1]
            v = self._backfill_velocity(tr)
            return self._grow(by_velocity(tr.obs[nxt][0], v, t - nxt), nxt - t), tr.obs[nxt][1]
        return None

    def _smoothed(self, tr: _Track, t: int) -> np.ndarray:
        """The box of a detected frame: a straight line fitted to the track's detections over
        t ± `smooth_radius` (the mean where fewer than three), evaluated at t, then moved out by the
        largest amount the detections of t - 1, t and t + 1 stick out of their fitted boxes. It
        covers this frame's detection and changes less from frame to frame than the earlier rule
        (the mean grown to this frame's detection alone), which passed the detector's jitter of a
        pixel or two on to the painted face. Covering every detection of the window instead was
        steadier on slow pans (quick pan clip flicker 1.75 against 2.14) but inflated the box on a
        whip pan, whose acceleration a line does not follow (5.97 against 3.39).

        Where the frames were pushed, the mean of the window's detections moved into frame t by the
        face's measured motion (`_fused`) replaces both: it follows acceleration exactly and averages
        the detector's jitter out. A face under SMALL_FACE px grows by SMALL_GROW of its side on each
        side: a pixel off is much of it (covering its own detection instead, as the line fit does,
        brought the jitter back: crowd clip flicker 1.40 -> 1.92)."""
        fused = self._fused(tr, t)
        if fused is not None:
            w, h = fused[2] - fused[0], fused[3] - fused[1]
            if max(w, h) < SMALL_FACE:  # a pixel off is much of a small face: a steady extra margin
                fused = fused + SMALL_GROW * np.array([-w, -h, w, h])
            return fused
        r = self.smooth_radius
        frames = np.array([f for f in range(t - r, t + r + 1) if f in tr.obs], np.float64)
        boxes = np.array([tr.obs[int(f)][0] for f in frames], np.float64)
        if len(frames) >= 3:
            slope, intercept = np.polyfit(frames - t, boxes, 1)
            fitted = intercept + np.outer(frames - t, slope)
        else:
            intercept = boxes.mean(axis=0)
            fitted = np.broadcast_to(intercept, boxes.shape)
        out = (boxes - fitted)[np.abs(frames - t) <= 1]  # this frame's detection and its neighbours'
        return intercept + np.concatenate([np.minimum(out[:, :2].min(axis=0), 0), np.maximum(out[:, 2:].max(axis=0), 0)])

    def _skipped(self, first: int, last: int) -> bool:
        """Whether frames first..last were all left out by `detect_every` (not looked at, so not missed)."""
        return all(f in self.unseen for f in range(first, last + 1))

    def _backfill_velocity(self, tr: _Track) -> np.ndarray:
        """The velocity that carries `tr` back from its first detection, kept only once final.

        The pipeline writes frame first - lookahead as soon as `first` is pushed, possibly as the last
        frame of a detection batch: an estimate from frames after `first` does not exist yet then, and
        freezing that guess (zero) left every later back-filled frame uncovered (issue 15)."""
        if tr.backfill_velocity is not None:
            return tr.backfill_velocity
        v, final = self._camera_velocity(tr)
        if final:
            tr.backfill_velocity = v
        return v

    def _camera_velocity(self, tr: _Track, min_tracks: int = 3) -> tuple[np.ndarray, bool]:
        """(velocity, final): the median motion of the shot's other tracks at `tr`'s first detection,
        else `tr`'s own start velocity where fewer than `min_tracks` are seen.

        Per other track, its last two observations up to the first detection (known whenever a
        frame before it is written, and the motion of the very frames being back-filled: final once
        `min_tracks` have them); a track that starts with `tr` gives its first two from there on."""
        start, before, after = tr.first, [], []
        for other in self.tracks.values():
            if other is tr or other.shot != tr.shot:
                continue
            frames = sorted(other.obs)
            prior = [f for f in frames if f <= start][-2:]
            later = [f for f in frames if f >= start][:2]
            if len(prior) == 2 and prior[1] >= start - self.smooth_radius:
                before.append(other.motion(*prior))
            elif len(later) == 2 and later[0] <= start + self.smooth_radius:
                after.append(other.motion(*later))
        if len(before) >= min_tracks:
            return np.median(before, axis=0), True
        moves = before + after
        return (np.median(moves, axis=0) if len(moves) >= min_tracks else tr.start_velocity()), False

    def boxes(self, t: int, width: int | None = None, height: int | None = None
              ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Boxes, scores and track ids to anonymize in frame t (boxes entirely outside a
        `width` x `height` frame are left out)."""
        out_boxes, out_scores, ids = [], [], []
        for k in self.tracks:
            found = self.box(k, t, width, height)
            if found is not None:
                out_boxes.append(found[0])
                out_scores.append(found[1])
                ids.append(k)
        return np.asarray(out_boxes, np.float64).reshape(-1, 4), np.asarray(out_scores, np.float64), ids

    def box(self, k: int, t: int, width: int | None = None, height: int | None = None
            ) -> tuple[np.ndarray, float] | None:
        """Track k's box and score in frame t as `boxes` gives them, or None where it has none."""
        tr = self.tracks.get(k)
        if tr is None or tr.shot != self.shot_of[t]:
            return None
        found = self._box_at(tr, t)
        if found is None:
            return None
        box, score = self._whole(tr, t, found[0]), found[1]
        w, h = box[2] - box[0], box[3] - box[1]
        box = box + self.grow * np.array([-w, -h, w, h])
        if width is not None and (box[2] <= 0 or box[3] <= 0 or box[0] >= width or box[1] >= height):
            return None
        return box, score

    def _whole(self, tr: _Track, t: int, box: np.ndarray) -> np.ndarray:
        """`box` carried past the frame edge that cuts it, to the face's whole size: a detector
        boxes only the part of a face inside the frame, and a face painted into that part was
        squeezed into it, with the frame's repeated border as its surroundings (the whip clip's
        large face entering from the right was a striped magenta patch for 12 frames, and stayed one
        while that painting was carried). The whole size is the track's detection wholly inside the
        frame nearest in time; without one, the uncut side and the aspect of the video's whole
        faces (FACE_ASPECT before any). Only the pixels inside the frame are ever anonymized."""
        if self.size is None:
            return box
        w, h = self.size
        cut = np.array([box[0] <= AT_EDGE, box[1] <= AT_EDGE, box[2] >= w - AT_EDGE, box[3] >= h - AT_EDGE])
        across, down = cut[0] != cut[2], cut[1] != cut[3]  # cut on one side of an axis only
        if not (across or down):
            return box
        inside = [f for f, (b, _) in tr.obs.items() if self._uncut(b).all()]
        bw, bh = box[2] - box[0], box[3] - box[1]
        if inside:
            seen = tr.obs[min(inside, key=lambda f: abs(f - t))][0]
            full_w, full_h = seen[2] - seen[0], seen[3] - seen[1]
        else:
            aspect = float(np.median(self._aspects)) if self._aspects else FACE_ASPECT
            full_w = bh * aspect if across and not down else bw
            full_h = bw / aspect if down and not across else bh
        out = box.copy()
        if across:
            out[0], out[2] = (min(box[0], box[2] - full_w), box[2]) if cut[0] else (box[0], max(box[2], box[0] + full_w))
        if down:
            out[1], out[3] = (min(box[1], box[3] - full_h), box[3]) if cut[1] else (box[1], max(box[3], box[1] + full_h))
        return out

    def sure(self, k: int, threshold: float) -> bool:
        """Whether track k's detections so far (its look-ahead included) score `threshold` on
        average, or once did: a track is painted from then on (VideoOptions.paint_score)."""
        tr = self.tracks.get(k)
        if tr is None:
            return False
        if not tr.sure and tr.detections and tr.score_sum / tr.detections >= threshold:
            tr.sure = True
        return tr.sure

    def forget(self, t: int) -> None:
        """Frame t was written: drop what no later frame needs (bounded memory on long videos)."""
        keep_from = t + 1 - max(self.smooth_radius, self.motion_radius)
        for k in list(self.tracks):
            tr = self.tracks[k]
            old = sorted(f for f in tr.obs if f < keep_from)
            for f in old[:-1]:  # the latest one stays: the start of an interpolation or a hold
                del tr.obs[f]
            oldest = min(tr.obs, default=keep_from)
            for f in [f for f in tr.steps if f <= min(oldest, keep_from)]:
                del tr.steps[f]
            held = tr.last + self.max_missing > t  # still extrapolated into an unwritten frame
            matchable = tr.shot == self.shot and self.frames - 1 - tr.last <= self.max_missing + self.lookahead
            if not held and not matchable:
                del self.tracks[k]
        for f in [f for f in self.shot_of if f < keep_from - 1]:
            del self.shot_of[f]
        for f in [f for f in self.camera if f < keep_from - 1 - self.lookahead]:
            del self.camera[f]
        self.unseen = {f for f in self.unseen if f >= keep_from - 1 - self.max_missing - self.lookahead}


class _KeypointSmoother:
    """Per-track moving average of the 7 keypoints in box coordinates, so the pose the generator
    is conditioned on does not jitter with every MoveNet call."""

    def __init__(self, weight: float):
        self.weight = weight
        self.state: dict[int, np.ndarray] = {}

    def __call__(self, track: int, box: np.ndarray, keypoints: np.ndarray | None) -> np.ndarray | None:
        size = np.array([box[2] - box[0], box[3] - box[1]])
        prev = self.state.get(track)
        if keypoints is None:
            rel = prev
        else:
            rel = np.concatenate([(keypoints[:, :2] - box[:2]) / size, keypoints[:, 2:3]], axis=1)
            if prev is not None:
                rel = self.weight * prev + (1 - self.weight) * rel
        if rel is None:
            return None
        self.state[track] = rel
        return np.concatenate([rel[:, :2] * size + box[:2], rel[:, 2:3]], axis=1)

    def forget(self, live: set[int]) -> None:
        for k in [k for k in self.state if k not in live]:
            del self.state[k]


def _histogram(bgr_or_rgb: np.ndarray) -> np.ndarray:
    small = cv2.resize(bgr_or_rgb, (64, 36), interpolation=cv2.INTER_AREA)
    return np.concatenate([np.bincount((small[..., c] // 16).ravel(), minlength=16) / small[..., c].size
                           for c in range(3)])


def is_cut(previous: np.ndarray | None, current: np.ndarray) -> bool:
    """Hard cut between two colour histograms (`_histogram`): camera motion, even a whip pan with
    motion blur, moves them by < 0.1; a cut to another scene by far more."""
    return previous is not None and float(np.abs(current - previous).sum() / 3) > CUT_HISTOGRAM


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: Fraction
    frames: int  # as the container states it (may be approximate)


def open_video(path: str | Path) -> tuple[cv2.VideoCapture, VideoInfo]:
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"{path}: cannot be opened as a video")
    fps = cap.get(cv2.CAP_PROP_FPS)
    if not fps or fps <= 0 or not np.isfinite(fps):
        cap.release()
        raise ValueError(f"{path}: the video states no frame rate")
    # OpenCV gives the rate as a float: recover NTSC rates such as 30000/1001 exactly.
    info = VideoInfo(int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                     Fraction(fps).limit_denominator(1001), int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
    return cap, info


class FFmpegWriter:
    """RGB frames on stdin → H.264 `output`, audio streams of `audio_source` (if any) muxed in.

    Written under a temporary name beside `output` and renamed into place by `close`, so a killed
    run never leaves a truncated video under the final name.
    """

    def __init__(self, output: str | Path, info: VideoInfo, audio_source: str | Path | None,
                 opts: VideoOptions):
        self.output = Path(output)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.partial = temporary_path(self.output, keep_suffix=True)  # ffmpeg picks the container by it
        cmd = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{info.width}x{info.height}", "-framerate", str(info.fps), "-i", "pipe:0"]
        if audio_source is not None:
            cmd += ["-i", str(audio_source), "-map", "0:v:0", "-map", "1:a?"]
            if opts.audio_codec:
                cmd += ["-c:a", opts.audio_codec]
        # yuv420p needs even sizes: pad odd ones by one pixel instead of failing
        cmd += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-preset", opts.preset,
                "-crf", str(opts.crf), "-pix_fmt", "yuv420p", "-r", str(info.fps), "-map_metadata", "-1",
                str(self.partial)]
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr)
        self.shape = (info.height, info.width, 3)

    def _error(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:]

    def write(self, frame: np.ndarray) -> None:
        if frame.shape != self.shape or frame.dtype != np.uint8:
            raise ValueError(f"frame {frame.dtype} {frame.shape}, the video is {self.shape} uint8")
        try:
            self.proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError:
            self.proc.wait()
            raise RuntimeError(f"ffmpeg stopped while writing {self.output}: {self._error()}") from None

    def close(self) -> None:
        self.proc.stdin.close()
        if self.proc.wait() != 0:
            self.partial.unlink(missing_ok=True)
            raise RuntimeError(f"ffmpeg failed writing {self.output} (exit {self.proc.returncode}): {self._error()}")
        self._stderr.close()
        replace_durably(self.partial, self.output)

    def abort(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._stderr.close()
        self.partial.unlink(missing_ok=True)


THUMB = 32  # px: the side of the face thumbnail whose detail `sharpness` measures


def sharpness(image: np.ndarray, box: np.ndarray) -> float:
    """How much detail the face in `box` shows: the variance of the Laplacian of its gray THUMB x THUMB
    thumbnail (independent of the face's size; motion blur lowers it several times). 0 outside."""
    extent = pixel_extent(box, *image.shape[:2])
    if extent is None or extent[2] - extent[0] < 2 or extent[3] - extent[1] < 2:
        return 0.0
    x0, y0, x1, y1 = extent
    gray = cv2.cvtColor(image[y0:y1, x0:x1], cv2.COLOR_RGB2GRAY)
    thumb = cv2.resize(gray, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)
    return float(cv2.Laplacian(thumb, cv2.CV_32F).var())


def best_views(tracker: FaceTracker, frames: dict[int, np.ndarray], t: int, faces: Faces, horizon: int,
               sharper: float, small: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.float64] | None]:
    """For each face of frame t painted afresh by the generator (`faces.paint`, not `small`): the
    (image, box, score) of the frame among t + 1 .. t + `horizon` of its track and shot (in `frames`)
    that shows the face best, or None where frame t does (paint from t). Best: most of the box inside
    the frame (to the hundredth), then sharpest, where a later frame must be `sharper` times sharper
    than frame t. Only the painted tracks' boxes are asked for (a crowd has hundreds of tracks)."""
    views: list = [None] * len(faces)
    h, w = frames[t].shape[:2]
    for j, paint in enumerate(faces.paint or []):
        if not paint or small[j]:
            continue
        k = faces.tracks[j]
        best = (round(visible_fraction(faces.boxes[j], w, h), 2), sharper * sharpness(frames[t], faces.boxes[j]))
        for u in range(t + 1, t + horizon + 1):
            found = tracker.box(k, u, w, h) if u in frames else None  # None past the track's shot
            if found is None:
                break
            shown = (round(visible_fraction(found[0], w, h), 2), sharpness(frames[u], found[0]))
            if shown > best and shown[1] > 0:
                best, views[j] = shown, (frames[u], found[0], np.float64(found[1]))
    return views


def _pose(anonymizer: Anonymizer, image: np.ndarray, box: np.ndarray, score: float) -> np.ndarray | None:
    """The keypoints of the one face at `box` in `image` (a view from `best_views`), or None."""
    return anonymizer.add_keypoints(image, Faces(box[None], np.array([score]))).keypoints[0]


def ready_batches(pending: deque, pushed: int, lookahead: int, batch: int, ended: bool):
    """Take from `pending` ((frame index, frame) in order) the frames whose look-ahead is complete
    once `pushed` frames are tracked (all of them once the video has `ended`), in batches of up to
    `batch`. The one write order of `anonymize_video`: tests replay it to drive the tracker as the
    pipeline does (interleaved push and write, batch boundaries)."""
    while pending and (ended or pending[0][0] + lookahead < pushed):
        ready = []
        while pending and len(ready) < batch and (ended or pending[0][0] + lookahead < pushed):
            ready.append(pending.popleft())
        yield ready


def small_faces_of_frame(anonymizer: Anonymizer, memory: TrackFaces, tracks: list[int], boxes: np.ndarray,
                         unsure: list[bool], planned: list[bool], shape: tuple[int, ...]) -> list[bool]:
    """Which of a frame's tracked faces take the small-face method: a track keeps the choice made at
    its last painting by its whole box (TrackFaces.small; a face under the limit, or one the
    detector is unsure of), and in any frame where the frame edge cuts it to a part in view under
    the limit (Anonymizer.small) it takes the small-face method in that frame only: a painting
    squeezed into a sliver showed a face's features there (the full crowd clip's right edge), while a choice
    kept for the track's next 24 frames blurred faces coming into view long after they were whole
    (the full pan clip: flicker 1.27 → 1.33, tracks one identity 18 → 9 of 18)."""
    whole = anonymizer.small(boxes)
    cut = anonymizer.small(boxes, shape=shape) & ~whole
    return [memory.small(k, now or u, p) or bool(c)
            for k, now, u, p, c in zip(tracks, whole, unsure, planned, cut)]


def anonymize_video(anonymizer: Anonymizer, src: str | Path, dst: str | Path, opts: VideoOptions = VideoOptions(),
                    progress: bool = True) -> dict:
    """Anonymize every frame of `src` into `dst` (H.264, same frame rate, the source's audio).

    Frames are detected `batch_size` at a time and tracked; each is anonymized once `lookahead`
    later frames are known, the faces of `batch_size` frames per generator call. Returns counts
    and speed. The progress bar shows frames/s and the faces anonymized so far.
    """
    if opts.detect_every < 1:
        raise ValueError(f"detect_every must be >= 1, got {opts.detect_every}")
    cap, info = open_video(src)
    tracker = FaceTracker(opts.lookahead, opts.max_missing, opts.track_iou, opts.smooth_radius, opts.margin,
                          opts.grow, opts.motion_radius)
    smoother = _KeypointSmoother(opts.keypoint_smoothing)
    generator = anonymizer.cfg.method == "generator"
    memory = TrackFaces(opts.paint_every, opts.temporal_keep, opts.seam_keep) if generator else None
    batch = anonymizer.cfg.batch_size
    writer: FFmpegWriter | None = None
    pending: deque[tuple[int, np.ndarray]] = deque()
    frames = faces = 0
    histogram = size = None
    bar = tqdm(total=info.frames or None, unit="frame", desc=Path(src).name, disable=not progress)
    small_before = anonymizer.counts["small_faces"]
    start = time.perf_counter()

    def write(ready: list[tuple[int, np.ndarray]]) -> None:
        nonlocal frames, faces
        h, w = ready[0][1].shape[:2]
        found, ids = [], []
        for t, image in ready:
            boxes, scores, tracks = tracker.boxes(t, w, h)
            f = Faces(boxes, scores, tracks=list(tracks))
            if memory is not None:  # frame order: which faces are painted afresh in this frame
                f.paint = [memory.plan(k) for k in tracks]
                unsure = [not tracker.sure(k, opts.paint_score) for k in tracks]
                f.small = small_faces_of_frame(anonymizer, memory, tracks, boxes, unsure, f.paint, image.shape)
            found.append(f)
            ids.append(tracks)
        if generator and opts.sharper:
            later = dict(ready) | dict(pending)  # the frames of the look-ahead, by index
            for (t, image), f in zip(ready, found):
                f.views = best_views(tracker, later, t, f, opts.lookahead, opts.sharper, anonymizer.small_faces(f))
        if generator:
            for (t, image), f, tracks in zip(ready, found, ids):
                anonymizer.add_keypoints(image, f)  # only for the faces painted afresh (from this frame)
                if f.views is not None:  # (image, box, score) → (image, box, pose there)
                    f.views = [None if v is None else (v[0], v[1], smoother(k, v[1], _pose(anonymizer, *v)))
                               for k, v in zip(tracks, f.views)]
                f.keypoints = [smoother(k, b, kp) for k, b, kp in zip(tracks, f.boxes, f.keypoints)]
            live = {k for tracks in ids for k in tracks} | set(tracker.tracks)
            smoother.forget(live)
        for out in anonymizer.anonymize([image for _, image in ready], found, memory):
            writer.write(out)
        if memory is not None:
            memory.forget(live)
        for t, _ in ready:
            tracker.forget(t)
        frames += len(ready)
        faces += sum(len(f) for f in found)
        bar.set_postfix(faces=faces, refresh=False)
        bar.update(len(ready))

    since_detection = opts.detect_every  # the first frame is detected
    try:
        ended = False
        while not ended:
            chunk = []
            while len(chunk) < batch:
                ok, bgr = cap.read()
                if not ok:
                    ended = True
                    break
                current = _histogram(bgr)
                chunk.append((cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), is_cut(histogram, current)))
                histogram = current
            if chunk and writer is None:  # sized by the decoded frames (OpenCV may rotate them upright)
                h, w = chunk[0][0].shape[:2]
                writer = FFmpegWriter(dst, VideoInfo(w, h, info.fps, info.frames), src, opts)
                size = max(anonymizer.cfg.detect_max_size, min(max(h, w), opts.video_detect_max_size))
            looked = []
            for _, cut in chunk:  # every detect_every-th frame of a shot, counted from its first
                since_detection = 0 if cut or since_detection + 1 >= opts.detect_every else since_detection + 1
                looked.append(since_detection == 0)
            dets = iter(anonymizer.detect([image for (image, _), w in zip(chunk, looked) if w], size)
                        if any(looked) else [])
            for (image, cut), w in zip(chunk, looked):
                if w:
                    det = next(dets)
                    keep = covered_share(det.boxes, det.scores) <= opts.max_covered
                    pending.append((tracker.push(det.boxes[keep], det.scores[keep], cut, image), image))
                else:
                    pending.append((tracker.push(None, None, cut, image), image))
            for ready in ready_batches(pending, tracker.frames, opts.lookahead, batch, ended):
                write(ready)
        if writer is None:
            raise ValueError(f"{src}: no frame could be decoded")
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        cap.release()
        bar.close()
    elapsed = time.perf_counter() - start
    return {"frames": frames, "faces": faces, "small_faces": anonymizer.counts["small_faces"] - small_before,
            "fps": float(info.fps), "seconds": elapsed, "frames_per_s": frames / elapsed if elapsed else 0.0}
