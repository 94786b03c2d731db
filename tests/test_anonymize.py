"""The anonymizer on real photos and a real video: face regions only, folders, video with audio."""
from __future__ import annotations

import json
import math
import subprocess
import wave

import cv2
import numpy as np
import pytest

from fdf_core.assets import MissingAssetError, assets_dir
from eval.anonymize import anonymize_images
from eval.cli import anonymize_main
from eval.images import read_image, write_image
from eval.anonymizer import CHECKPOINT_ENV, METHODS, Anonymizer, AnonymizerConfig, Faces, load_generator_at
from eval.paste import SOFT_BAND, band_weights, feather_width
from eval.video import FaceTracker, covered_share, ffmpeg_exe, is_cut, _histogram

PHOTOS = assets_dir() / "corpus" / "photos"
CROWD = "dlib__examples_faces_2008_002079.jpg"  # seven faces, two of them overlapping
NO_FACE = "ternaus__tests_data_no_face.jpg"


def _rgb(name: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(PHOTOS / name)), cv2.COLOR_BGR2RGB)


def _region(shape, extents) -> np.ndarray:
    m = np.zeros(shape[:2], bool)
    for x0, y0, x1, y1 in extents:
        m[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return m


def _extent(box) -> tuple[int, int, int, int]:
    return int(np.floor(box[0])), int(np.floor(box[1])), int(np.ceil(box[2])), int(np.ceil(box[3]))


@pytest.fixture(scope="module")
def models(tiny_run):
    """Detector, keypoint model and tiny EMA generator, loaded once for the module."""
    base = Anonymizer(AnonymizerConfig(method="blackout"))
    return base.detector, base.keypoint_model, load_generator_at(tiny_run / "checkpoints" / "final.ckpt")


@pytest.fixture(scope="module")
def crowd(models):
    detector, keypoints, generator = models
    image = _rgb(CROWD)
    a = Anonymizer(AnonymizerConfig(), generator=generator, detector=detector, keypoint_model=keypoints)
    (faces,) = a.find_faces([image])
    assert len(faces) >= 6 and len(faces.keypoints) == len(faces)
    h, w = image.shape[:2]
    # plus a box partly outside the photo and an empty one
    boxes = np.concatenate([faces.boxes, [[w - 30.5, h - 20.2, w + 15, h + 9], [5, 5, 5, 40]]])
    return image, Faces(boxes, np.concatenate([faces.scores, [1, 1]]), faces.keypoints + [None, None])


@pytest.mark.parametrize("method, blend", [(m, "poisson") for m in METHODS] + [("generator", "feather")])
def test_every_method_changes_only_the_face_region(method, blend, models, crowd):
    detector, keypoints, generator = models
    image, faces = crowd
    before = image.copy()
    cfg = AnonymizerConfig(method=method, batch_size=3, feather=0.15, blend=blend)
    out = Anonymizer(cfg, generator=generator, detector=detector, keypoint_model=keypoints).anonymize([image], [faces])[0]
    assert (image == before).all() and out.shape == image.shape and out.dtype == np.uint8
    real = faces.boxes[:-1]  # the empty box covers no pixel
    feathered = method == "generator" and blend == "feather"
    softened = method == "generator" and blend == "poisson"  # the photo's detail fades in beside each box
    bands = [feather_width(b, cfg.feather) if feathered else
             math.ceil(SOFT_BAND * max(e[2] - e[0], e[3] - e[1])) + 1 if softened else 0  # baselines: the boxes only
             for b, e in zip(real, map(_extent, real))]
    grown = [(x0 - f, y0 - f, x1 + f, y1 + f) for (x0, y0, x1, y1), f in zip(map(_extent, real), bands)]
    changed = (out != image).any(axis=2)
    assert not changed[~_region(image.shape, grown)].any()
    for box in real:
        if method.startswith("pixelation_16x16") and box[2] - box[0] < 16:
            continue  # 16x16 cells on a box under 16 px wide are its own pixels (the rescan finds an 8 px face)
        assert changed[_region(image.shape, [_extent(box)])].mean() > 0.5, (method, box)
    if feathered:  # the feather band mixes: pixels there change, by less than inside
        band = _region(image.shape, grown) & ~_region(image.shape, map(_extent, real))
        assert changed[band].mean() > 0.2


def test_band_weights_fall_from_one_to_zero():
    w = band_weights((10, 10, 20, 20), 4, (0, 0, 30, 30))
    assert (w[10:20, 10:20] == 1).all()
    row = w[15, 20:26]  # distance 1..6 to the right of the box
    assert row == pytest.approx([0.8, 0.6, 0.4, 0.2, 0, 0])
    assert (w[:5] == 0).all() and (w[:, 25:] == 0).all()


def test_generator_defaults_to_the_shipped_model(monkeypatch, tmp_path):
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    shipped = Anonymizer(AnonymizerConfig(method="generator"))
    assert "shipped with fdf" in shipped.generator_name and shipped.generator.resolution == 64
    assert shipped.crop_rule == "pad"  # the rule of its training faces, recorded in the export
    with pytest.raises(MissingAssetError, match=f"--checkpoint.*{CHECKPOINT_ENV}"):
        Anonymizer(AnonymizerConfig(method="generator", checkpoint=str(tmp_path / "missing.ckpt")))
    with pytest.raises(ValueError, match="--method 'swirl': unknown"):
        Anonymizer(AnonymizerConfig(method="swirl"))


def test_pipeline_on_a_fresh_workdir_paints_the_demo_photo_with_the_shipped_model(monkeypatch, tmp_path):
    """What a fresh clone's `fdf-pipeline` ends with: the demo photo, anonymized by the shipped generator."""
    from data_prep.sample import sample_corpus_dir
    from fdf_pipeline.pipeline import PipelineConfig, run as pipeline
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    out = pipeline(PipelineConfig(workdir=str(tmp_path), stages=["anonymize"], progress=False))
    summary = out["anonymize"]
    assert "shipped with fdf" in summary["generator"] and "64x64 faces" in summary["generator"]
    assert summary["written"] == 1 and summary["faces"] == 2
    photo = sample_corpus_dir() / "photos" / "face_recognition__examples_two_people.jpg"
    painted = cv2.imread(str(tmp_path / "anonymized" / photo.name))
    original = cv2.imread(str(photo))
    changed = np.abs(painted.astype(int) - original.astype(int)).max(axis=2) > 30
    assert 0.005 < changed.mean() < 0.5  # the faces were repainted, the rest of the photo kept


def test_folder_mirrored_and_photo_without_face_copied(tiny_run, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for name, dst in [("dlib__examples_faces_2008_001009.jpg", "a.jpg"), (NO_FACE, "sub/empty.jpg"),
                      ("face_recognition__examples_obama-240p.jpg", "sub/obama.png")]:
        data = (PHOTOS / name).read_bytes()
        if dst.endswith(".png"):
            data = cv2.imencode(".png", cv2.imread(str(PHOTOS / name)))[1].tobytes()
        (src / dst).write_bytes(data)
    (src / "notes.txt").write_text("not a photo")
    out = tmp_path / "out"
    summary = anonymize_main([str(src), str(out), "--checkpoint", str(tiny_run / "checkpoints" / "final.ckpt"),
                              "--progress", "false", "--batch_size", "2"])
    assert summary["images"] == 3 and summary["copied_unchanged"] == 1 and summary["ignored_files"] == 1
    assert summary["images_with_faces"] == 2 and summary["faces"] >= 3
    assert (out / "sub" / "empty.jpg").read_bytes() == (src / "sub" / "empty.jpg").read_bytes()
    for name in ("a.jpg", "sub/obama.png"):
        a, b = cv2.imread(str(src / name)), cv2.imread(str(out / name))
        assert a.shape == b.shape and np.abs(a.astype(int) - b).mean() > 0.1, name
    assert not (out / "notes.txt").exists()
    assert json.loads((out / "anonymize_options.json").read_text())["batch_size"] == 2


def test_a_folder_read_and_written_beside_the_painting_equals_painting_in_turn(tiny_run, models, tmp_path):
    """Reading ahead and writing on threads changes nothing: every output has the bytes that painting
    each chunk in turn and writing it gives, an unreadable photo is skipped in its place, and the
    counts are the same."""
    detector, keypoints, generator = models
    names = sorted(p.name for p in PHOTOS.iterdir() if p.suffix == ".jpg")[:7]
    pairs = [(PHOTOS / n, tmp_path / "out" / n) for n in names]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    pairs.insert(3, (broken, tmp_path / "out" / "broken.jpg"))
    a = Anonymizer(AnonymizerConfig(batch_size=3), generator=generator, detector=detector, keypoint_model=keypoints)
    skipped: list[dict] = []
    stats = anonymize_images(a, pairs, progress=False, skipped=skipped)
    assert [s["file"] for s in skipped] == [str(broken)] and not (tmp_path / "out" / "broken.jpg").exists()
    assert stats["images"] == 7 and stats["faces"] > 7
    b = Anonymizer(AnonymizerConfig(batch_size=3), generator=generator, detector=detector, keypoint_model=keypoints)
    faces_total = 0
    for start in range(0, len(pairs), 3):  # the same chunks, in turn
        good = [(s, d) for s, d in pairs[start:start + 3] if s != broken]
        loaded = [read_image(s) for s, _ in good]
        faces = b.find_faces([rgb for rgb, _ in loaded])
        faces_total += sum(len(f) for f in faces)
        with_faces = [i for i, f in enumerate(faces) if len(f)]
        outs = b.anonymize([loaded[i][0] for i in with_faces], [faces[i] for i in with_faces])
        for i, out in zip(with_faces, outs):
            write_image(tmp_path / "ref" / good[i][0].name, out, loaded[i][1])
            assert (tmp_path / "out" / good[i][0].name).read_bytes() == (tmp_path / "ref" / good[i][0].name).read_bytes()
    assert stats["faces"] == faces_total


def test_a_failed_write_stops_the_folder_with_the_photos_before_it_on_disk(tmp_path):
    names = sorted(p.name for p in PHOTOS.iterdir() if p.suffix == ".jpg")[:5]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "blocked").write_text("a file where a folder is needed")
    pairs = [(PHOTOS / n, tmp_path / "out" / n) for n in names]
    pairs[3] = (PHOTOS / names[3], tmp_path / "out" / "blocked" / names[3])
    a = Anonymizer(AnonymizerConfig(method="pixelation_16x16", batch_size=2))
    with pytest.raises(OSError):
        anonymize_images(a, pairs, progress=False)
    assert all((tmp_path / "out" / n).is_file() for n in names[:3])
    assert not list((tmp_path / "out").glob("*.tmp-*"))


def test_single_photo_without_face_is_copied(tmp_path):
    out = tmp_path / "o.jpg"
    summary = anonymize_main([str(PHOTOS / NO_FACE), str(out), "--method", "pixelation_8x8", "--progress", "false"])
    assert summary["faces"] == 0 and out.read_bytes() == (PHOTOS / NO_FACE).read_bytes()
    assert (tmp_path / "o.jpg.options.json").is_file()
    with pytest.raises(ValueError, match="must be a photo file"):
        anonymize_main([str(PHOTOS / NO_FACE), str(tmp_path / "o.mp4")])


def _wav_seconds(video, tmp_path) -> float:
    wav = tmp_path / f"{video.stem}.wav"
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(video), "-vn", "-acodec", "pcm_s16le",
                    str(wav)], check=True)
    with wave.open(str(wav)) as w:
        return w.getnframes() / w.getframerate()


def _frames(path) -> tuple[list[np.ndarray], float]:
    cap = cv2.VideoCapture(str(path))
    fps, frames = cap.get(cv2.CAP_PROP_FPS), []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    return frames, fps


def test_video_keeps_frames_rate_and_audio(tiny_run, models, tmp_path):
    photo = cv2.imread(str(PHOTOS / "face_recognition__examples_obama-240p.jpg"))  # 427x240, one face
    silent, clip = tmp_path / "silent.mp4", tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(silent), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (384, 240))
    for i in range(20):  # a slow pan: the face moves 2 px per frame
        writer.write(np.ascontiguousarray(photo[:, 2 * i:2 * i + 384]))
    writer.release()
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(silent), "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=2", "-c:v", "copy", "-c:a", "aac", str(clip)], check=True)
    out = tmp_path / "anon.mp4"
    summary = anonymize_main([str(clip), str(out), "--checkpoint", str(tiny_run / "checkpoints" / "final.ckpt"),
                              "--batch_size", "8", "--progress", "false"])
    assert summary["videos"][0]["frames"] == 20 and summary["videos"][0]["faces"] >= 20
    src_frames, src_fps = _frames(clip)
    out_frames, out_fps = _frames(out)
    assert len(out_frames) == len(src_frames) == 20 and out_fps == pytest.approx(src_fps) == 10
    assert out_frames[0].shape == src_frames[0].shape
    assert _wav_seconds(out, tmp_path) == pytest.approx(_wav_seconds(clip, tmp_path), abs=0.05)
    detector = models[0]
    for k in (0, 19):  # the face changed, the rest only by re-encoding
        (det,) = detector.detect([cv2.cvtColor(src_frames[k], cv2.COLOR_BGR2RGB)])
        face = _region(src_frames[k].shape, [_extent(det.boxes[0])])
        far = ~_region(src_frames[k].shape, [_extent(b + [-40, -40, 40, 40]) for b in det.boxes])
        diff = np.abs(out_frames[k].astype(int) - src_frames[k]).mean(axis=2)
        assert diff[face].mean() > 15 and diff[far].mean() < 3, k


def test_tracker_smooths_jitter_and_covers_faces():
    rng = np.random.default_rng(0)
    tracker = FaceTracker(lookahead=3, max_missing=2, smooth_radius=3)
    raw = []
    for t in range(30):
        box = np.array([100 + t, 50, 160 + t, 120]) + rng.normal(0, 3, 4)
        tracker.push(box[None], np.array([0.9]))
        raw.append(box)
    smooth = []
    for t in range(30):
        boxes, _, ids = tracker.boxes(t)
        assert len(boxes) == 1 and ids == [0]
        b, box = boxes[0], raw[t]
        assert b[0] <= box[0] and b[1] <= box[1] and b[2] >= box[2] and b[3] >= box[3]  # covers the face
        smooth.append(b)
    jitter = lambda seq: np.std(np.diff(np.array(seq)[:, [0, 2]].mean(axis=1), 2))  # noqa: E731
    assert jitter(smooth) < 0.7 * jitter(raw)
    # the width (the painted face's scale) changes from frame to frame far less than the detector's
    width_change = lambda seq: np.abs(np.diff(np.array(seq)[:, 2] - np.array(seq)[:, 0])).mean()  # noqa: E731
    assert width_change(smooth) < 0.58 * width_change(raw)  # the earlier rule (mean grown to this frame's detection): 0.66


def _moving(t: int, speed: float = 40.0) -> np.ndarray:
    return np.array([100 + speed * t, 50, 160 + speed * t, 120], np.float64)


def test_tracker_fills_misses_from_both_sides_and_follows_fast_motion():
    """A face moving 40 px a frame (2/3 of its width) missed in frames 0-2 (entering), 6-9 (motion
    blur) and after 14: every frame up to 14 + max_missing gets a box covering it."""
    tracker = FaceTracker(lookahead=4, max_missing=3)
    seen = {3, 4, 5, 10, 11, 12, 13, 14}
    for t in range(25):
        tracker.push(_moving(t)[None] if t in seen else np.zeros((0, 4)), np.array([0.9] if t in seen else []))
    for t in range(18):
        boxes, _, ids = tracker.boxes(t)
        assert ids == [0], (t, ids)  # one track throughout: the gap was bridged
        face = _moving(t)
        b = boxes[0]
        assert b[0] <= face[0] + 1 and b[2] >= face[2] - 1 and b[1] <= face[1] and b[3] >= face[3], (t, b, face)
    assert len(tracker.boxes(18)[0]) == 0  # max_missing after the last detection: dropped


def test_a_lost_face_carried_by_its_velocity_never_shrinks_or_turns_inside_out():
    """A small face whose detections shrink 3 px a frame, then are lost: its velocity, carried on
    over the frames it is missing (and back over the frames before it was found), once made its box
    smaller frame by frame and finally inside out (the full crowd clip: [315.5, 186.4, 314.7, 185.0],
    which covers no pixel). Carried by velocity, a box moves with its centre and keeps at least the
    size of the box it was carried from: an unseen face is covered at the size it was last seen."""
    tracker = FaceTracker(lookahead=4, max_missing=5, smooth_radius=0)
    for t in range(4):
        tracker.push(np.array([[0, 0, 0, 0.0]])[:0], np.zeros(0))  # not yet found
    for t in range(4, 9):  # 20 px, shrinking 3 px a frame (1.5 on each side), moving right 2 px
        w = 20 - 3 * (t - 4)
        tracker.push(np.array([[100 + 2 * t - w / 2, 100 - w / 2, 100 + 2 * t + w / 2, 100 + w / 2]]), np.array([0.9]))
    for t in range(9, 15):
        tracker.push(np.zeros((0, 4)), np.zeros(0))
    last = tracker.boxes(8)[0][0]
    for t in range(9, 14):
        (box,), _, _ = tracker.boxes(t)
        assert box[2] - box[0] >= last[2] - last[0] - 1e-6 and box[3] - box[1] >= last[3] - last[1] - 1e-6, (t, box, last)
        assert box[0] <= 100 + 2 * t <= box[2], (t, box)  # still around the face's centre
    first = tracker.boxes(4)[0][0]
    for t in range(0, 4):  # back-filled before the first detection: not smaller than it either
        (box,), _, _ = tracker.boxes(t)
        assert box[2] - box[0] >= first[2] - first[0] - 1e-6, (t, box, first)


def test_frames_between_detections_take_the_detected_boxes_on_either_side_not_a_miss():
    """detect_every 2: a frame the detector did not look at is not a miss. Its box is the mean of
    the detected frames' boxes on either side (a face moving 7 px a frame is covered, without the
    miss margin that made the box, and the face painted into it, pulse every other frame)."""
    tracker = FaceTracker(lookahead=4, max_missing=3, smooth_radius=0)
    for t in range(12):
        if t % 2:
            tracker.push(None, None)
        else:
            tracker.push(_moving(t, 7.0)[None], np.array([0.9]))
    tracker.push(np.zeros((0, 4)), np.zeros(0))  # frame 12: looked at, nothing found: a miss
    tracker.push(_moving(13, 7.0)[None], np.array([0.9]))
    for t in range(1, 11):
        boxes, _, ids = tracker.boxes(t)
        assert ids == [0] and np.allclose(boxes[0], _moving(t, 7.0)), (t, boxes)  # exactly the face
    missed, face = tracker.boxes(12)[0][0], _moving(12, 7.0)
    # a miss between detections: grown, by the margin x distance / lookahead, not the one-sided margin
    assert np.allclose(missed, face + 0.15 * 1 / 4 * np.array([-60, -70, 60, 70]))
    tracker.push(None, None)  # frame 14, the video's last, not looked at: carried by the track's motion
    assert np.allclose(tracker.boxes(14)[0][0], _moving(14, 7.0), atol=1.0)


def test_a_face_cut_by_the_frame_edge_gets_its_whole_box_past_the_edge():
    """The detector boxes only the part of a face inside the frame; the tracker carries the cut side
    past the edge to the face's whole size, so that a whole face is painted (and its part inside the
    frame pasted): the size of the track's nearest detection wholly inside the frame, or, for a face
    never wholly inside, its uncut side and the aspect of the video's whole faces."""
    tracker = FaceTracker(lookahead=6, max_missing=3, smooth_radius=0)
    blank = np.zeros((240, 320, 3), np.uint8)
    inside = np.array([20, 20, 68, 80.0])  # 48 x 60: aspect 0.8, always wholly inside
    for t in range(12):
        x0 = 310 - 10 * t  # a 60 x 70 face coming in from the right, wholly inside from frame 6
        entering = np.array([x0, 100, min(x0 + 60, 320), 170.0])
        top = np.array([150, 0, 190, 30.0])  # 40 px wide, cut by the top edge throughout
        tracker.push(np.stack([inside, entering, top]), np.full(3, 0.9), frame=blank)
    boxes, _, ids = tracker.boxes(0, 320, 240)
    assert ids == [0, 1, 2]
    assert np.allclose(boxes[0], inside, atol=1)  # not at an edge: as detected
    assert boxes[1][0] <= 311 and boxes[1][2] >= 368 and 100 >= boxes[1][1] >= 98  # 60 wide, past the edge
    assert boxes[2][1] <= -18 and boxes[2][3] >= 30 and boxes[2][2] - boxes[2][0] <= 42  # 40 / 0.8 = 50 high
    assert np.allclose(tracker.boxes(8, 320, 240)[0][1], [230, 100, 290, 170], atol=1)  # wholly inside: as detected


def test_a_box_between_two_faces_is_dropped_but_a_half_hidden_face_is_kept():
    """RetinaFace's box between two faces side by side (the cut clip, frame 100: score 0.67, over
    half of each) lies 92 % inside theirs and is dropped (VideoOptions.max_covered 0.85); a face half
    behind another keeps its box, and a box is never dropped for lower-scoring ones around it."""
    two = np.array([[1140, 279, 1261, 450], [1059, 282, 1144, 395], [1095, 291, 1192, 423]], float)
    share = covered_share(two, np.array([1.0, 1.0, 0.67]))
    assert share[2] > 0.85 and (share[:2] < 0.1).all()
    assert covered_share(two, np.array([0.5, 0.5, 1.0]))[2] == 0  # the best box is never dropped
    behind = np.array([[100, 100, 200, 240], [150, 110, 250, 250]], float)
    assert 0.4 < covered_share(behind, np.array([1.0, 0.9]))[1] < 0.6


def test_tracker_does_not_carry_tracks_across_a_cut():
    tracker = FaceTracker(lookahead=4, max_missing=5)
    for t in range(6):
        tracker.push(_moving(t, 0)[None], np.array([0.9]))
    tracker.push(np.zeros((0, 4)), np.zeros(0), cut=True)
    tracker.push(np.zeros((0, 4)), np.zeros(0))
    tracker.push(np.array([[400, 300, 460, 370]]), np.array([0.9]))
    assert len(tracker.boxes(5)[0]) == 1
    boxes, _, ids = tracker.boxes(6)  # first frame of the new shot: the new face, backfilled
    assert ids == [1] and boxes[0][0] <= 400 and boxes[0][2] >= 460
    photo = cv2.imread(str(PHOTOS / CROWD))
    assert not is_cut(_histogram(photo), _histogram(np.ascontiguousarray(photo[:, 40:])))  # a pan
    assert is_cut(_histogram(photo), _histogram(cv2.imread(str(PHOTOS / NO_FACE))))
