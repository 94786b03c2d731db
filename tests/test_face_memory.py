"""One face per track in video (eval.face_memory): fewer paintings, a steadier face, every frame covered."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from eval.anonymizer import Anonymizer, AnonymizerConfig, Faces
from eval.face_memory import TrackFaces
from eval.video import VideoOptions, anonymize_video
from fdf_core.assets import assets_dir

PHOTO = assets_dir() / "corpus" / "photos" / "face_recognition__examples_obama-240p.jpg"  # one face


def test_plan_paints_the_first_frame_then_every_kth_and_blends():
    memory = TrackFaces(paint_every=3, keep=0.5)
    assert [memory.plan(7) for _ in range(7)] == [True, False, False, True, False, False, True]
    assert memory.plan(8)  # a new track is painted at once
    assert memory.carried(7) is None
    first = memory.painted(7, np.full((4, 4, 3), 100, np.uint8))
    assert (first == 100).all() and (memory.carried(7) == 100).all()  # the first painting at once
    # a later one is blended with the face shown (0.5 of 200 on 100: 150) and reached in 3 equal
    # steps, one per frame, so the face never jumps at a painting; then it stays
    shown = [memory.painted(7, np.full((4, 4, 3), 200, np.uint8))] + [memory.carried(7) for _ in range(3)]
    assert [int(f[0, 0, 0]) for f in shown] == [117, 133, 150, 150]
    memory.forget({8})
    assert memory.carried(7) is None and memory.plan(7)
    with pytest.raises(ValueError, match="paint_every"):
        TrackFaces(paint_every=0)


def test_a_track_keeps_the_small_face_method_or_the_generator_between_its_paintings():
    """A face whose box is under the size limit in one frame and over it in the next takes one
    method from one planned painting to the next, not a blur and a painted face by turns."""
    memory = TrackFaces(paint_every=4)
    under_limit = [True, False, True, False, False, True, False, True, True, False]
    chosen = [memory.small(3, now, memory.plan(3)) for now in under_limit]
    assert chosen == [True] * 4 + [False] * 4 + [True] * 2  # chosen at frames 0, 4 and 8
    memory.forget(set())
    assert memory.small(3, False, False) is False  # a forgotten track chooses afresh


def test_a_face_leaving_over_the_frame_edge_takes_the_small_face_method_before_its_next_painting():
    """A 30-px face painted by the generator while whole is carried to its next painting; once it
    leaves over the right edge with only a 9 x 30 sliver in view it is blurred at once, while a face
    of the same size shrinking inside the frame keeps its method to the next painting (as above).
    Coming into view, it is painted as soon as enough of it shows."""
    from eval.video import small_faces_of_frame
    memory = TrackFaces(paint_every=8)
    a = Anonymizer(AnonymizerConfig(method="heavy_blur", small_face_size=20))  # the sizes are its config's
    shape = (240, 384, 3)
    def frame(x0: float, shrink: float) -> list[bool]:
        boxes = np.array([[x0, 100, x0 + 30, 130], [100, 100, 130 - shrink, 130 - shrink]])
        planned = [memory.plan(k) for k in (1, 2)]
        return small_faces_of_frame(a, memory, [1, 2], boxes, [False, False], planned, shape)
    chosen = [frame(x0, shrink) for x0, shrink in [(340, 0), (350, 12), (355, 12), (375, 12)]]
    assert chosen == [[False, False], [False, False], [False, False], [True, False]]
    # one coming into view is blurred while a sliver, painted once enough of it shows, with no wait
    # for its next painting (the choice kept between paintings is made on its whole box)
    memory.forget(set())
    chosen = [frame(x0, 0)[0] for x0 in (375, 372, 360, 350)]
    assert chosen == [True, True, False, False]


def _pan(path, frames: int = 24) -> list[np.ndarray]:
    photo = cv2.imread(str(PHOTO))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (384, 240))
    for i in range(frames):  # the face moves 1 px per frame
        writer.write(np.ascontiguousarray(photo[:, i:i + 384]))
    writer.release()
    cap, out = cv2.VideoCapture(str(path)), []
    while (ok := cap.read())[0]:
        out.append(ok[1])
    return out


def _run(tmp_path, name, opts, src):
    anonymizer = Anonymizer(AnonymizerConfig(batch_size=8))
    painted = []
    generate = anonymizer._generate
    anonymizer._generate = lambda samples, keys=None, **kw: painted.append(len(samples)) or generate(samples, keys, **kw)
    stats = anonymize_video(anonymizer, src, tmp_path / name, opts, progress=False)
    cap, frames = cv2.VideoCapture(str(tmp_path / name)), []
    while (ok := cap.read())[0]:
        frames.append(ok[1].astype(np.float32))
    return stats, sum(painted), frames


def test_carried_faces_cover_every_frame_with_one_painting_in_paint_every_and_flicker_less(tmp_path):
    src = tmp_path / "pan.mp4"
    source = _pan(src)
    every, steady = VideoOptions(paint_every=1, temporal_keep=0.0), VideoOptions()  # the defaults carry
    stats_every, painted_every, out_every = _run(tmp_path, "every.mp4", every, src)
    stats_steady, painted_steady, out_steady = _run(tmp_path, "steady.mp4", steady, src)
    assert stats_every["faces"] == stats_steady["faces"] >= len(source)
    assert painted_every == stats_every["faces"]
    assert steady.paint_every > 1
    assert painted_steady <= -(-stats_steady["faces"] // steady.paint_every) + 1  # first frame, then every k-th
    detector = Anonymizer(AnonymizerConfig(method="blackout")).detector
    box_changes = {"every": [], "steady": []}
    for t, frame in enumerate(source):
        (det,) = detector.detect([cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)])
        x0, y0, x1, y1 = det.boxes[0].astype(int)
        for name, out in (("every", out_every), ("steady", out_steady)):
            # covered: the face differs from the source in every frame, carried or painted
            assert np.abs(out[t][y0:y1, x0:x1] - frame[y0:y1, x0:x1]).mean() > 15, (name, t)
            if t:  # frame-to-frame change of the face, the pan's 1 px shift undone
                box_changes[name].append(np.abs(out[t][y0:y1, x0:x1] - out[t - 1][y0:y1, x0 + 1:x1 + 1]).mean())
    assert np.mean(box_changes["steady"]) < np.mean(box_changes["every"])


def test_detect_every_runs_the_detector_on_every_other_frame_and_still_covers_every_face(tmp_path):
    src = tmp_path / "pan.mp4"
    source = _pan(src, frames=12)
    anonymizer = Anonymizer(AnonymizerConfig(method="blackout", batch_size=8))
    looked = []
    detect = anonymizer.detect
    anonymizer.detect = lambda images, size=None: looked.append(len(images)) or detect(images, size)
    stats = anonymize_video(anonymizer, src, tmp_path / "half.mp4", VideoOptions(detect_every=2), progress=False)
    assert sum(looked) == 6 and stats["frames"] == 12 and stats["faces"] >= 12
    cap, detector = cv2.VideoCapture(str(tmp_path / "half.mp4")), anonymizer.detector
    for frame in source:
        out = cap.read()[1]
        (det,) = detector.detect([cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)])
        x0, y0, x1, y1 = det.boxes[0].astype(int)
        assert out[y0:y1, x0:x1].mean() < 12  # blacked out in every frame, looked at or not
    with pytest.raises(ValueError, match="detect_every"):
        anonymize_video(anonymizer, src, tmp_path / "x.mp4", VideoOptions(detect_every=0), progress=False)


def test_a_face_found_in_motion_blur_is_painted_from_its_sharper_later_frame(tmp_path):
    """A track born in a motion-blurred frame (a whip pan) was painted from the smeared crop, and that
    painting, no face at all, was carried into the still shot after it. With `sharper` the painting
    is made from the sharpest frame of the track within the look-ahead; off, from the blurred one."""
    photo = cv2.imread(str(PHOTO))
    kernel = np.zeros((1, 21), np.float32) + 1 / 21  # a horizontal smear of 21 px, a fast pan's
    frames = [cv2.filter2D(photo, -1, kernel) if i < 4 else photo for i in range(16)]
    src = tmp_path / "whip.mp4"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, photo.shape[1::-1])
    for frame in frames:
        writer.write(frame)
    writer.release()
    from eval.video import sharpness

    def first_painting_sharpness(sharper: float) -> float:
        anonymizer = Anonymizer(AnonymizerConfig(batch_size=8))
        seen = []
        sample = anonymizer._sample
        anonymizer._sample = lambda image, box, *rest: seen.append(sharpness(image, np.asarray(box, float))) \
            or sample(image, box, *rest)
        anonymize_video(anonymizer, src, tmp_path / f"out{sharper}.mp4", VideoOptions(sharper=sharper), progress=False)
        return seen[0]

    rgb = cv2.cvtColor(photo, cv2.COLOR_BGR2RGB)
    box = np.array([195.0, 20.0, 250.0, 92.0])  # the face
    smeared = cv2.cvtColor(frames[0], cv2.COLOR_BGR2RGB)
    assert sharpness(rgb, box) > 3 * sharpness(smeared, box)
    big = cv2.resize(rgb, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    assert 0.5 < sharpness(big, 2 * box) / sharpness(rgb, box) < 2  # a measure of the face, not of its size
    assert first_painting_sharpness(1.5) > 3 * first_painting_sharpness(0.0)


def test_a_face_entering_the_frame_is_painted_whole_from_a_frame_that_shows_all_of_it(tmp_path):
    """A face that comes in over the frame edge was painted from the part of it inside the frame and
    the repeated border pixels, and that painting then changed as later ones were blended in (the
    full-length pan's largest flicker). It is now painted from the first frame of the look-ahead that
    shows its whole box. And its box is the whole face even where the edge cuts it (the tracker
    carries the cut side past the edge): the face painted from the entry frame itself is whole, not
    squeezed into the part inside (the whip clip's striped magenta patch)."""
    photo = cv2.imread(str(PHOTO))  # the face spans x 196-250
    frames = [np.ascontiguousarray(photo[:, 215 - 5 * i:395 - 5 * i]) for i in range(16)]  # it enters from the left
    src = tmp_path / "enter.mp4"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, frames[0].shape[1::-1])
    for frame in frames:
        writer.write(frame)
    writer.release()

    def painted(sharper: float) -> list[tuple[int, float]]:
        anonymizer = Anonymizer(AnonymizerConfig(batch_size=8))
        boxes = []
        sample = anonymizer._sample
        anonymizer._sample = lambda image, box, *rest: boxes.append(box) or sample(image, box, *rest)
        anonymize_video(anonymizer, src, tmp_path / f"out{sharper}.mp4", VideoOptions(sharper=sharper), progress=False)
        # the width of the box each painting was made for, and the share of it inside the frame
        return [(b[2] - b[0], (min(b[2], frames[0].shape[1]) - max(b[0], 0)) / (b[2] - b[0])) for b in boxes]

    (face,) = Anonymizer(AnonymizerConfig(method="blackout")).detect([cv2.cvtColor(frames[-1], cv2.COLOR_BGR2RGB)])
    whole = face.boxes[0, 2] - face.boxes[0, 0]  # its detected width once inside
    chosen, at_entry = painted(VideoOptions.sharper), painted(0.0)
    assert chosen[0][0] >= 0.95 * whole and chosen[0][1] == 1.0  # the first painting saw the whole face
    assert at_entry[0][1] < 0.8  # from the entry frame it saw part of it,
    assert 0.9 * whole <= at_entry[0][0] <= 1.3 * whole  # but painted a whole face


def test_a_track_that_never_scores_paint_score_is_covered_but_not_painted(tmp_path):
    """A track whose detections all score under `paint_score` (the whip clip's smeared chest, 0.39
    to 0.57) takes the small-face method: covered as safely, but no generated face is put where
    there may be none. The same face scored as the detector scores it is painted."""
    src = tmp_path / "pan.mp4"
    source = _pan(src, frames=12)

    def run(scale: float, name: str):
        anonymizer = Anonymizer(AnonymizerConfig(batch_size=8))
        detect = anonymizer.detect
        anonymizer.detect = lambda images, *a: [Faces(d.boxes, d.scores * scale) for d in detect(images, *a)]
        painted = []
        generate = anonymizer._generate
        anonymizer._generate = lambda samples, keys=None, **kw: painted.append(len(samples)) or generate(samples, keys, **kw)
        anonymize_video(anonymizer, src, tmp_path / name, VideoOptions(), progress=False)
        cap, frames = cv2.VideoCapture(str(tmp_path / name)), []
        while (ok := cap.read())[0]:
            frames.append(ok[1].astype(np.float32))
        return sum(painted), frames

    unsure, frames = run(0.5, "unsure.mp4")  # the one face's score, about 1.0, halved: under 0.6
    assert unsure == 0
    face = (slice(25, 90), slice(200, 245))  # inside the face in every frame (it moves 1 px per frame)
    assert all(np.abs(out[face] - src_frame[face].astype(np.float32)).mean() > 10
               for out, src_frame in zip(frames, source))  # covered in every frame
    sure, _ = run(1.0, "sure.mp4")
    assert sure > 0


def test_a_track_is_painted_once_its_detections_average_paint_score_and_stays_so():
    """The pan clip's wall lamps: found in most frames, at 0.33-0.96 (a track's mean 0.47-0.57). One
    detection over `paint_score` had them painted with a face for seconds; now a track is painted
    once its detections so far (look-ahead included) average `paint_score`, and stays painted
    after that (no switch back to a blur halfway through a person)."""
    from eval.video import FaceTracker
    tracker = FaceTracker(lookahead=4, max_missing=3)
    lamp, face, fading = [0.9, 0.3, 0.4], [0.7], [0.9] * 6 + [0.3] * 30
    for t in range(36):
        boxes = np.array([[10, 10, 50, 60], [100, 10, 140, 60], [200, 10, 240, 60]], np.float64)
        scores = np.array([lamp[t % 3], face[0], fading[t]])
        tracker.push(boxes, scores)
        if t < 4:
            continue  # frame t - 4 is written once frame t is known (the look-ahead)
        assert tracker.boxes(t - 4)[2] == [0, 1, 2]
        assert not tracker.sure(0, 0.6), t  # best 0.9, mean 0.53 (0.59 at most): never painted
        assert tracker.sure(1, 0.6), t  # 0.7 throughout: painted from its first frame
        assert tracker.sure(2, 0.6), t  # sure from the start; its later detections do not undo it
