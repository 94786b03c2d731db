"""Video without leaks: the leak criterion on real faces, and real clips through the real anonymizer.

The clips are rendered from the shared corpus photos by `eval.video_clips` (exact face boxes per
frame), anonymized by `anonymize` with the real RetinaFace weights and ffmpeg, and judged from
pixels alone by `eval.video_metrics`: a single ground-truth face-frame that keeps its detail fails.
"""
from __future__ import annotations

import json
import subprocess
from collections import deque

import cv2
import numpy as np
import pytest

from eval.cli import anonymize_main
from eval.anonymizer import Anonymizer, AnonymizerConfig, load_generator_at, resolve_checkpoint
from eval.baselines import anonymize_boxes
from eval.video import FaceTracker, VideoOptions, anonymize_video, ffmpeg_exe, ready_batches
from eval.video_clips import (CLIPS, FPS, TRUTH_FILE, UNTOUCHED, detect_truth, frame_at, photo_truth, write_clip,
                              write_on_truth)
from eval.video_metrics import (IDENTITY_MATCH, LEAK_DETAIL, FrameCountError, detail_kept, identity_threshold,
                                 is_leaked, luma, probe, score_clip)

CLIP = {c.name: c for c in CLIPS}


def _jpeg(bgr: np.ndarray, quality: int) -> np.ndarray:
    return cv2.imdecode(cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_COLOR)


def test_leak_criterion_on_an_untouched_and_an_anonymized_face(assets):
    """A hand-labelled face of the dinner clip: compressed but untouched → leaked; blurred,
    pixelated or half covered → as the docstring of eval.video_metrics says."""
    spec = CLIP["cut_dinner"]
    rgb, faces = frame_at(spec, 5 * FPS)  # the dinner table, after the cut
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    fid, *box = max(faces, key=lambda f: f[3] - f[1])
    box = np.array(box)
    source = luma(bgr)
    untouched = luma(_jpeg(bgr, 60))  # coarser than any video coding the benchmark uses
    assert detail_kept(source, untouched, box) > 0.7 and is_leaked(source, untouched, box)
    kept = {m: detail_kept(source, luma(anonymize_boxes(bgr, box[None], m)), box)
            for m in ("heavy_blur", "soft_blur", "blackout", "pixelation_8x8", "pixelation_16x16")}
    assert kept["heavy_blur"] < 0.3 and kept["soft_blur"] < 0.3 and kept["blackout"] < 0.3 and kept["pixelation_8x8"] < 0.3, kept
    # 16x16 cells on a 140 px face keep its coarse layout: the weakest method, below the line
    assert kept["pixelation_8x8"] < kept["pixelation_16x16"] < LEAK_DETAIL, kept
    x0, y0, x1, y1 = box
    half = np.array([x0, y0, (x0 + x1) / 2, y1])  # a box lagging half a face behind
    assert is_leaked(source, luma(anonymize_boxes(bgr, half[None], "heavy_blur")), box)


def test_clip_ground_truth_follows_the_camera(assets):
    """Frame boxes are the photo boxes under the camera: a face's box in the frame holds the same
    pixels as in the photo (checked at the centre of the whip pan, mid-motion-blur frames aside)."""
    spec = CLIP["pan_g7"]
    truth = photo_truth(spec.shots[0].photo)
    boxes = truth.boxes
    assert len(boxes) == 27 and all({"ours", "centerface"} <= set(s) for s in truth.sources)
    assert photo_truth(CLIP["cut_dinner"].shots[1].photo).description.startswith("dlib hand-labelled")
    frame, faces = frame_at(spec, 100)
    _, cy, s = spec.shots[0].camera(100 / FPS)
    assert faces and all(f[0].startswith("0:") for f in faces)
    fid, x0, y0, x1, y1 = faces[len(faces) // 2]
    photo = cv2.cvtColor(cv2.imread(str(assets / "corpus" / "photos" / spec.shots[0].photo)), cv2.COLOR_BGR2RGB)
    px0, py0, px1, py1 = boxes[int(fid.split(":")[1])]
    a = cv2.resize(frame[round(y0):round(y1), round(x0):round(x1)], (32, 32), interpolation=cv2.INTER_AREA)
    b = cv2.resize(photo[round(py0):round(py1), round(px0):round(px1)], (32, 32), interpolation=cv2.INTER_AREA)
    assert np.abs(a.astype(int) - b).mean() < 8


@pytest.mark.slow
def test_whip_pan_with_motion_blur_leaks_no_face(assets, tmp_path):
    """The first whip pan of `whip_bald` (faces of 70-220 px moving up to ~50 px a frame, motion
    blurred) through the `anonymize` command: no face-frame keeps its detail; frames, rate and
    audio survive."""
    src, truth = write_clip(CLIP["whip_bald"], tmp_path, frames=range(round(1.4 * FPS), round(2.3 * FPS)))
    out = tmp_path / "out.mp4"
    summary = anonymize_main([str(src), str(out), "--method", "heavy_blur", "--progress", "false"])
    assert summary["videos"][0]["frames"] == 22
    score = score_clip(src, out, truth).as_dict()
    assert score["face_frames"]["ge24"] > 100
    # every face-frame covered: none keeps its detail. (dlib still recognises some heavily blurred
    # faces of 150+ px: those count as leaks of the method in the benchmark, not of the tracker here)
    by_detail = {b: n - score["identity"]["leaked"].get(b, 0) for b, n in score["leaked_face_frames"].items()}
    assert by_detail == {"lt24": 0, "ge24": 0}, score
    assert score["identity"]["checked"] > 0
    a, b = probe(src), probe(out)
    assert (b.frames, b.fps, b.audio) == (a.frames, a.fps, True)
    assert b.audio_seconds == pytest.approx(a.audio_seconds, abs=0.1)


@pytest.mark.slow
def test_cut_and_generator_leak_no_face(assets, tmp_path):
    """Across the hard cut of `cut_dinner`, with the shipped generator: it covers every face in every
    frame (no face-frame keeps its detail). dlib still recognises a few of the painted dinner faces
    (2.6-3.2x upscaled 32x32 paint at distances just under 0.6). Measured with the defaults of
    2026-12-05 (the generator shown only its training band of context, one painting per track
    every 12 frames): 5 of 120 face-frames with the Poisson paste, 0 with the feathered one (with
    the earlier defaults: 3 and 10). A painting that happens to resemble the person is now carried
    for up to 12 frames; the bound below keeps it from growing (the goal of 0 is open, issue 15)."""
    src, truth = write_clip(CLIP["cut_dinner"], tmp_path, frames=range(round(3.6 * FPS), round(4.4 * FPS)))
    generator = load_generator_at(resolve_checkpoint(None))
    scores = {}
    for blend in ("poisson", "feather"):
        anonymizer = Anonymizer(AnonymizerConfig(batch_size=8, blend=blend), generator=generator)
        stats = anonymize_video(anonymizer, src, tmp_path / f"out_{blend}.mp4", VideoOptions(), progress=False)
        assert stats["frames"] == 20
        scores[blend] = score_clip(src, tmp_path / f"out_{blend}.mp4", truth).as_dict()
    score = scores["poisson"]
    assert score["face_frames"]["ge24"] > 80 and score["identity"]["checked"] == score["face_frames"]["ge24"]
    by_identity = {b: score["identity"]["leaked"].get(b, 0) for b in ("lt24", "ge24")}
    by_detail = {b: n - by_identity[b] for b, n in score["leaked_face_frames"].items()}
    assert by_detail == {"lt24": 0, "ge24": 0}, score
    assert by_identity["ge24"] <= 0.05 * score["identity"]["checked"], scores
    meta = json.loads(truth.read_text())
    assert len({f[0].split(":")[0] for frame in meta["faces"] for f in frame}) == 2  # both shots are in it


def test_tracker_memory_stays_bounded_on_a_long_video():
    """10,000 frames of three faces coming and going: what the tracker keeps does not grow."""
    tracker = FaceTracker(lookahead=12, max_missing=12)
    sizes = []
    for t in range(10_000):
        boxes = [[100 + (t % 300), 100, 160 + (t % 300), 170], [600, 300, 650, 360]][: 1 + (t // 50) % 2]
        tracker.push(np.array(boxes, np.float64), np.full(len(boxes), 0.9), cut=t % 1000 == 0)
        if t >= 12:
            tracker.boxes(t - 12)
            tracker.forget(t - 12)
        sizes.append(sum(len(tr.obs) for tr in tracker.tracks.values()) + len(tracker.shot_of))
    assert max(sizes[5000:]) <= max(sizes[:5000]) < 200


def test_a_face_found_late_is_filled_in_where_it_is_not_where_its_jittery_first_detections_point():
    """The crowd clip's leak: a 10 px face first detected at frame 5, its first two detections 3 px
    apart. Back-filled with that jitter as velocity its box would drift off the face; the camera's
    motion (the other faces of the shot, here panning 2 px/frame) puts it on the face."""
    tracker = FaceTracker(lookahead=12, max_missing=12)
    crowd = [np.array([40.0 * i, 400, 40.0 * i + 12, 412]) for i in range(1, 8)]
    late = {5: [293.0, 240, 303, 253], 6: [292.0, 240, 302, 253], 7: [295.0, 240, 305, 253], 8: [297.0, 240, 307, 253]}
    for t in range(20):
        pan = np.array([2.0 * t, 0, 2.0 * t, 0])
        boxes = [c + pan for c in crowd] + ([np.array(late[t]) + np.array([2.0 * (t - 6), 0, 2.0 * (t - 6), 0])]
                                            if t in late else [])
        tracker.push(np.array(boxes), np.full(len(boxes), 0.9))
    truth_x0 = {t: 292.0 + 2.0 * (t - 6) for t in range(5)}  # where the face was before it was found
    for t, x0 in truth_x0.items():
        boxes, _, _ = tracker.boxes(t)
        covering = [b for b in boxes if b[0] <= x0 + 1 and b[2] >= x0 + 9 and b[1] <= 241 and b[3] >= 252]
        assert covering, f"frame {t}: no box covers the face at x0 = {x0}: {np.round(boxes, 1)}"


def _replay_pipeline(tracker: FaceTracker, detections, batch: int = 16) -> dict[int, np.ndarray]:
    """Drive `tracker` in `anonymize_video`'s order: `batch` frames pushed, then every frame whose
    look-ahead is complete written (boxes of the whole write batch, then forget), and so on; the
    rest once the video ended. Returns the boxes each frame was written with."""
    written, pending = {}, deque()
    chunks = [detections[i:i + batch] for i in range(0, len(detections), batch)]
    for n, chunk in enumerate(chunks):
        for boxes in chunk:
            pending.append((tracker.push(np.array(boxes).reshape(-1, 4), np.full(len(boxes), 0.9)), None))
        for ready in ready_batches(pending, tracker.frames, tracker.lookahead, batch, n == len(chunks) - 1):
            for t, _ in ready:
                written[t] = tracker.boxes(t)[0]
            for t, _ in ready:
                tracker.forget(t)
    return written


@pytest.mark.parametrize("crowd", [4, 0], ids=["with_other_faces", "alone"])
@pytest.mark.parametrize("found_at", [31, 47])
@pytest.mark.parametrize("speed", [2.0, 4.0, 6.0])
def test_a_face_found_late_on_a_batch_boundary_is_covered_in_the_frames_before(speed, found_at, crowd):
    """Issue 15: a face first detected at the last frame of a detection batch (31, 47: batch 16,
    look-ahead 12) is back-filled in the frames before it, as the pipeline writes them; the camera
    pans `speed` px a frame. With other faces in the shot, every back-filled frame is covered
    (their motion is known up to the new face's first frame); alone, the first back-filled frame
    (written before the face's second detection exists) has no motion to go by, the rest are."""
    def face(t):
        return [300.0 + speed * t, 300, 340 + speed * t, 345]

    detections = [[[80.0 * i + speed * t - 400, 100, 80.0 * i + speed * t - 360, 145] for i in range(crowd)]
                  + ([face(t)] if t >= found_at else []) for t in range(80)]
    written = _replay_pipeline(FaceTracker(lookahead=12, max_missing=12), detections)
    checked = range(found_at - 12 + (crowd == 0), found_at)
    uncovered = [t for t in checked if not any(b[0] <= face(t)[0] and b[2] >= face(t)[2] and b[1] <= face(t)[1]
                                               and b[3] >= face(t)[3] for b in written[t])]
    assert not uncovered, f"frames {uncovered} leave the face uncovered"


def test_a_truncated_output_is_not_judged(assets, tmp_path):
    """Issue 15: the scorer zipped source and output frames and stopped at the shorter, so an
    output missing its last frames was judged on the rest, and passed. Frames judged must be the
    ground truth's frames: a truncated output is an error naming the file and both counts."""
    src, truth = write_clip(CLIP["pan_g7"], tmp_path, frames=range(10))
    assert score_clip(src, src, truth).frames_judged == 10
    short = tmp_path / "short.mp4"
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(src), "-frames:v", "7", str(short)], check=True)
    assert probe(short).frames == 7
    with pytest.raises(FrameCountError, match=rf"{short} has 7 frames, the ground truth {truth} has 10"):
        score_clip(src, short, truth)


@pytest.mark.slow
def test_a_face_the_recognizer_still_knows_is_leaked_whatever_its_detail(assets, tmp_path):
    """Issue 15: pixelation to 16x16 cells keeps less than LEAK_DETAIL of some faces' detail (not
    leaked by the detail test), yet dlib's recognizer still matches some of them to the source face
    at its 1e-3 false-match threshold for their width: on the pan's 28-43 px faces they leak.
    Gaussian 9x9 leaks (every dinner face); black-out and heavy blur do not on the dinner frames. Each method
    is applied to exactly the ground-truth boxes, so only the criterion is tested."""
    scores, by_detail = {}, {}
    for clip, start in (("cut_dinner", round(4.6 * FPS)), ("pan_g7", 0)):
        src, truth = write_clip(CLIP[clip], tmp_path / clip, frames=range(start, start + 6))
        faces = json.loads(truth.read_text())["faces"]
        methods = (UNTOUCHED, "gaussian_9x9", "pixelation_16x16") + (("blackout", "heavy_blur") if clip == "cut_dinner" else ())
        for method in methods:
            out = write_on_truth(src, truth, tmp_path / clip / f"{method}.mp4", method)
            scores[clip, method] = score_clip(src, out, truth).as_dict()
            if method == "pixelation_16x16":
                by_detail[clip] = sum(is_leaked(luma(s), luma(o), np.array(f[1:]))
                                      for s, o, frame in zip(_decoded(src), _decoded(out), faces) for f in frame)
    leaked = {k: s["leaked_face_frames"]["ge24"] for k, s in scores.items()}
    dinner = {m: n for (c, m), n in leaked.items() if c == "cut_dinner"}
    assert scores["cut_dinner", UNTOUCHED]["face_frames"]["ge24"] == 36, leaked
    assert dinner[UNTOUCHED] == dinner["gaussian_9x9"] == 36, leaked
    assert leaked["pan_g7", UNTOUCHED] == scores["pan_g7", UNTOUCHED]["face_frames"]["ge24"] > 60
    assert leaked["pan_g7", "gaussian_9x9"] > 0  # a 9 px kernel leaves the coarse face of a 28-43 px one
    assert dinner["pixelation_16x16"] >= by_detail["cut_dinner"] > 0, (leaked, by_detail)
    assert leaked["pan_g7", "pixelation_16x16"] > by_detail["pan_g7"], (leaked, by_detail)  # the recognizer's share
    assert dinner["blackout"] == dinner["heavy_blur"] == 0, leaked
    assert scores["cut_dinner", "blackout"]["identity"]["distance_min"] >= 0.6, scores["cut_dinner", "blackout"]


def test_the_identity_threshold_follows_the_face_width():
    """The recognizer's leak threshold is its 1e-3 false-match distance at the face's width: lower
    for small faces (embedded closer together), flat outside the measured widths, never dlib's 0.6."""
    assert identity_threshold(32) == pytest.approx(0.522) and identity_threshold(20) == pytest.approx(0.522)
    assert identity_threshold(36) == pytest.approx((0.522 + 0.525) / 2)
    assert identity_threshold(500) == pytest.approx(0.540)
    widths = np.arange(24, 300)
    assert np.all(np.diff([identity_threshold(w) for w in widths]) >= 0)
    assert max(identity_threshold(w) for w in widths) < IDENTITY_MATCH


def _decoded(path) -> list[np.ndarray]:
    cap, frames = cv2.VideoCapture(str(path)), []
    while (frame := cap.read())[0]:
        frames.append(frame[1])
    cap.release()
    return frames


def test_ground_truth_holds_faces_our_detector_misses(assets):
    """Issue 15: the ground truth of unlabelled photos was our own detector's, so a face it cannot
    see was never counted. Now it is the union of independent detectors (CenterFace, dlib's CNN)
    and ours, each face with its sources: on the crowd photo a 45 px face in a headscarf that ours
    misses is found by both independent detectors, and the stored detections are those the
    detectors give today (ours and CenterFace re-run on the six-face photo)."""
    crowd = photo_truth(CLIP["crowd"].shots[0].photo)
    width = crowd.boxes[:, 2] - crowd.boxes[:, 0]
    independent = [i for i, s in enumerate(crowd.sources) if "ours" not in s]
    assert len(independent) > 50 and len(crowd.boxes) == 221 + len(independent)
    both = [i for i in independent if {"centerface", "dlib_cnn"} <= set(crowd.sources[i]) and width[i] >= 40]
    assert both, "no large face found by both independent detectors and missed by ours"
    photo = CLIP["cut_dinner"].shots[0].photo
    stored = json.loads(TRUTH_FILE.read_text())[photo]
    fresh = detect_truth(photo, ("ours", "centerface"))
    for name in ("ours", "centerface"):
        assert np.allclose(np.array(fresh[name]), np.array(stored[name]), atol=0.5), name


@pytest.mark.slow
def test_a_face_only_an_independent_detector_finds_counts(assets, tmp_path):
    """A tool that blurs exactly the faces our detector finds leaks the faces only CenterFace or
    dlib found: they are counted, reported under their sources and under `not_ours`."""
    src, truth = write_clip(CLIP["crowd"], tmp_path, frames=range(2))
    out = write_on_truth(src, truth, tmp_path / "ours_only.mp4", "heavy_blur", found_by="ours")
    score = score_clip(src, out, truth, identity=False).as_dict()
    ours, others = score["by_source"]["ours"], score["by_source"]["not_ours"]
    assert ours["faces"]["lt24"] + ours["faces"]["ge24"] > 400 and others["faces"]["ge24"] > 0
    assert ours["leaked"]["ge24"] == 0 and others["leaked"]["ge24"] > 0, score["by_source"]
    assert score["leaked_face_frames"]["ge24"] == others["leaked"]["ge24"]


def test_identity_stability_is_the_largest_distance_within_a_track():
    from eval.video_metrics import ClipScore
    score = ClipScore()
    a, b = np.zeros(128), np.zeros(128)
    b[0] = 0.5  # within one identity
    far = np.zeros(128)
    far[0] = 0.9  # 0.9 from `a`: two people
    score.track_embeddings = {"steady": [a, b, a], "changes": [a, b, far], "once": [a]}
    st = score.as_dict()["identity_stability"]
    assert st["tracks"] == 2 and st["tracks_one_identity"] == 1  # a single frame says nothing
    assert st["max_distance_worst_track"] == pytest.approx(0.9) and st["max_distance_median_track"] == pytest.approx(0.7)
    score.source_embeddings = {"steady": [a, a, a], "changes": [a, far, a]}  # the real person's own spread
    src = score.as_dict()["identity_stability"]["source"]
    assert src["tracks"] == 2 and src["tracks_one_identity"] == 1 and src["max_distance_worst_track"] == pytest.approx(0.9)


def test_the_chance_rate_compares_a_painted_face_with_the_other_people_of_its_frame():
    from eval.video_metrics import ClipScore
    score = ClipScore()
    person = [np.eye(128)[i] for i in range(3)]  # three people, sqrt(2) apart
    box = lambda x: np.array([x, 0.0, x + 64, 64])  # noqa: E731
    painted_like_b = person[1] + 0.01  # the painted face of `a` looks like `b`, not like `a`
    judged = [("a", painted_like_b, person[0], box(0)), ("b", person[2] + 5, person[1], box(100)),
              ("c", person[2] + 5, person[2], box(200)),
              ("a-again", person[0], person[0], box(5))]  # a second box of `a` (IoU 0.86): not a stranger to it
    score.count_chance(judged)
    chance = score.chance()
    # pairs: a: b, c (a-again overlaps); b: a, c, a-again; c: a, b, a-again; a-again: b, c
    assert chance["pairs"] == 10
    assert chance["painted_matches_other_person"] == 1  # `a` painted as `b`
    assert chance["real_matches_other_person"] == 0  # real strangers are sqrt(2) apart
    score.identity_checked = 20
    assert chance["rate"] == pytest.approx(0.1) and score.chance()["expected_leaks"] == pytest.approx(2.0)
    score.count_chance(judged[:1])  # one face alone in its frame has no stranger to compare
    assert score.chance()["pairs"] == 10


def test_the_speed_goal_holds_only_when_every_clip_is_at_least_deface_speed():
    """Issue 15 asks frames/s >= deface on every clip: a fast total must not hide a slow clip."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import video as bench

    def result(crowd_fps: float) -> dict:
        rows = {"pan": {"generator": {"frames_per_s": 10.0}, "deface": {"frames_per_s": 9.0}},
                "crowd": {"generator": {"frames_per_s": crowd_fps}, "deface": {"frames_per_s": 1.22}}}
        total = {"generator": {"leaked_face_frames": {"lt24": 0, "ge24": 0}, "clips_with_leaks_ge24": 0,
                               "clips_not_judged": 0, "flicker_ratio_worst_clip": 1.0, "frames_per_s": 6.3,
                               "identity_stability": {"tracks": 1, "tracks_one_identity": 1}},
                 "deface": {"leaked_face_frames": {"lt24": 0, "ge24": 0}, "frames_per_s": 5.2}}
        return {"clips": {k: {"rows": v} for k, v in rows.items()}, "total": total}

    assert not bench._goals(result(1.21), ["generator", "deface"])["generator_at_least_deface_speed_every_clip"]
    assert bench._goals(result(1.25), ["generator", "deface"])["generator_at_least_deface_speed_every_clip"]
