"""Video anonymization as a stream: frames are read, anonymized and piped to ffmpeg in small chunks.

Memory stays at `batch_size` frames whatever the length of the video (DeepPrivacy read every frame
into memory, a common out-of-memory report of its users). ffmpeg writes H.264 at the source's frame
rate (a variable-rate source becomes constant at its average rate) and takes the audio streams from
the source file in the same pass, so sound and timing are kept; container metadata (which may hold
a location) is not copied. The ffmpeg binary is the one
bundled with the `imageio-ffmpeg` package, else `ffmpeg` on PATH.

Faces are tracked from frame to frame (:class:`BoxTracker`) so that boxes move smoothly instead of
jittering with every detection, and a face that the detector misses for a few frames stays hidden.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from eval.anonymizer import Anonymizer, Faces

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")


@dataclass
class VideoOptions:
    """Tracking and encoding of videos.

    track_iou: IoU with a track's box for a detection to continue that track
    smoothing: weight of the previous box in the moving average of a track (0 = raw detections)
    max_missing: frames a track is kept at its last box when the detector loses the face
    crf / preset: libx264 quality (lower crf = better) and speed
    audio_codec: None = the container's default encoder (always works); "copy" keeps the stream bit-exact
    """

    track_iou: float = 0.3
    smoothing: float = 0.6
    max_missing: int = 3
    crf: int = 18
    preset: str = "medium"
    audio_codec: str | None = None


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


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of x0, y0, x1, y1 boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


class BoxTracker:
    """Greedy IoU tracking with smoothed boxes.

    Each frame's detections are matched to the live tracks by IoU (highest first, at least
    `iou`). A matched track's box becomes the moving average `smoothing · old + (1 - smoothing) ·
    detection`, grown to cover the detection: the box is steady, yet never leaves part of the
    current face uncovered while it lags behind a moving face. A detection without a track starts
    one; a track without a detection keeps its box (and its last score) for `max_missing` frames.
    """

    def __init__(self, iou: float = 0.3, smoothing: float = 0.6, max_missing: int = 3):
        if not 0 <= smoothing < 1 or not 0 < iou <= 1 or max_missing < 0:
            raise ValueError(f"need 0 <= smoothing < 1 ({smoothing}), 0 < iou <= 1 ({iou}), max_missing >= 0")
        self.iou, self.smoothing, self.max_missing = iou, smoothing, max_missing
        self.boxes = np.zeros((0, 4))
        self.scores = np.zeros(0)
        self.missing = np.zeros(0, np.int64)

    def update(self, boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This frame's detections → the boxes and scores to anonymize in this frame."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).reshape(-1)
        iou = _iou(self.boxes, boxes) if len(self.boxes) and len(boxes) else np.zeros((len(self.boxes), len(boxes)))
        track_of = np.full(len(boxes), -1)
        matched = np.zeros(len(self.boxes), bool)
        for flat in np.argsort(-iou, axis=None, kind="stable"):
            t, d = np.unravel_index(flat, iou.shape)
            if iou[t, d] < self.iou:
                break
            if not matched[t] and track_of[d] < 0:
                matched[t], track_of[d] = True, t
        new_boxes, new_scores, new_missing = [], [], []
        for d, t in enumerate(track_of):
            if t >= 0:
                s = self.smoothing * self.boxes[t] + (1 - self.smoothing) * boxes[d]
                box = np.concatenate([np.minimum(s[:2], boxes[d, :2]), np.maximum(s[2:], boxes[d, 2:])])
            else:
                box = boxes[d]
            new_boxes.append(box)
            new_scores.append(scores[d])
            new_missing.append(0)
        for t in np.flatnonzero(~matched):
            if self.missing[t] < self.max_missing:
                new_boxes.append(self.boxes[t])
                new_scores.append(self.scores[t])
                new_missing.append(self.missing[t] + 1)
        self.boxes = np.asarray(new_boxes, np.float64).reshape(-1, 4)
        self.scores = np.asarray(new_scores, np.float64)
        self.missing = np.asarray(new_missing, np.int64)
        return self.boxes.copy(), self.scores.copy()


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
    """RGB frames on stdin → H.264 `output`, audio streams of `audio_source` (if any) muxed in."""

    def __init__(self, output: str | Path, info: VideoInfo, audio_source: str | Path | None,
                 opts: VideoOptions):
        self.output = Path(output)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        cmd = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{info.width}x{info.height}", "-framerate", str(info.fps), "-i", "pipe:0"]
        if audio_source is not None:
            cmd += ["-i", str(audio_source), "-map", "0:v:0", "-map", "1:a?"]
            if opts.audio_codec:
                cmd += ["-c:a", opts.audio_codec]
        # yuv420p needs even sizes: pad odd ones by one pixel instead of failing
        cmd += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-preset", opts.preset,
                "-crf", str(opts.crf), "-pix_fmt", "yuv420p", "-r", str(info.fps), "-map_metadata", "-1",
                str(self.output)]
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
            raise RuntimeError(f"ffmpeg failed writing {self.output} (exit {self.proc.returncode}): {self._error()}")
        self._stderr.close()

    def abort(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._stderr.close()
        self.output.unlink(missing_ok=True)


def anonymize_video(anonymizer: Anonymizer, src: str | Path, dst: str | Path, opts: VideoOptions = VideoOptions(),
                    progress: bool = True) -> dict:
    """Anonymize every frame of `src` into `dst` (H.264, same frame rate, the source's audio).

    Frames are detected `batch_size` at a time, tracked, then anonymized; returns counts and speed.
    """
    cap, info = open_video(src)
    tracker = BoxTracker(opts.track_iou, opts.smoothing, opts.max_missing)
    writer: FFmpegWriter | None = None
    frames = faces = 0
    bar = tqdm(total=info.frames or None, unit="frame", desc=Path(src).name, disable=not progress)
    start = time.perf_counter()
    try:
        while True:
            chunk = []
            while len(chunk) < anonymizer.cfg.batch_size:
                ok, bgr = cap.read()
                if not ok:
                    break
                chunk.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            if not chunk:
                break
            if writer is None:  # sized by the decoded frames (OpenCV may rotate them upright)
                h, w = chunk[0].shape[:2]
                writer = FFmpegWriter(dst, VideoInfo(w, h, info.fps, info.frames), src, opts)
            tracked = [Faces(*tracker.update(f.boxes, f.scores)) for f in anonymizer.detect(chunk)]
            for frame in anonymizer.anonymize(chunk, tracked):
                writer.write(frame)
            frames += len(chunk)
            faces += sum(len(f) for f in tracked)
            bar.update(len(chunk))
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
    return {"frames": frames, "faces": faces, "fps": float(info.fps), "seconds": elapsed,
            "frames_per_s": frames / elapsed if elapsed else 0.0}
