"""RetinaFace detector on the real MobileNet-0.25 weights and the shared photo corpus."""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from fdf_core.assets import MissingAssetError, assets_dir
from fdf_builder import detector as detector_module
from fdf_builder.detector import MNET_ASSET, OnnxNetwork, _nms, build_detector, load_state_dict
from fdf_builder.retinaface_nets import RetinaFaceMobileNet

REPO = Path(__file__).resolve().parents[1]
PHOTOS = assets_dir() / "corpus" / "photos"
DLIB_XML = PHOTOS / "dlib__examples_faces_training.xml"
DLIB_PREFIX = "dlib__examples_faces_"


def load_imglab_boxes(xml: Path) -> dict[str, np.ndarray]:
    """dlib imglab XML → {image file: (N, 4) float32 x0, y0, x1, y1}."""
    out = {}
    for image in ET.parse(xml).getroot().iter("image"):
        boxes = [[float(b.get(k)) for k in ("left", "top", "width", "height")]
                 for b in image.iter("box")]
        arr = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        arr[:, 2:] += arr[:, :2]
        out[image.get("file")] = arr
    return out


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def detector():
    return build_detector("retinaface_mnet025")


def test_mnet_weights_load_strictly_and_module_prefix_is_accepted(detector, tmp_path):
    path = assets_dir() / MNET_ASSET
    state = load_state_dict(path)
    assert set(state) == set(RetinaFaceMobileNet().state_dict())  # every key used, none missing
    prefixed = tmp_path / "dp.pth"
    torch.save({"module." + k: v for k, v in state.items()}, prefixed)
    again = load_state_dict(prefixed)
    assert list(again) == list(state) and all(torch.equal(again[k], state[k]) for k in state)
    photo = [read_rgb(PHOTOS / "ultralight__imgs_1.jpg")]
    (ours,), (theirs,) = detector.detect(photo), build_detector("retinaface_mnet025", weights=str(prefixed)).detect(photo)
    assert len(ours) > 0 and np.array_equal(ours.boxes, theirs.boxes)
    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("LandmarkHead")}, broken)
    with pytest.raises(ValueError, match=r"(?s)broken\.pth.*LandmarkHead"):
        build_detector("retinaface_mnet025", weights=str(broken))


def test_recall_on_dlib_labelled_faces(detector):
    truth = {f: b for f, b in load_imglab_boxes(DLIB_XML).items()
             if (PHOTOS / (DLIB_PREFIX + f)).exists()}
    assert len(truth) >= 3
    files = sorted(truth)
    dets = detector.detect([read_rgb(PHOTOS / (DLIB_PREFIX + f)) for f in files])
    found = total = extra = 0
    for f, det in zip(files, dets):
        iou = box_iou(torch.from_numpy(truth[f]), torch.from_numpy(det.boxes))
        total += len(truth[f])
        if len(det):
            found += int((iou.max(dim=1).values >= 0.5).sum())
            extra += int((iou.max(dim=0).values < 0.5).sum())
        assert np.all(np.diff(det.scores) <= 0), "detections must be sorted by score"
        assert det.landmarks.shape == (len(det), 5, 2) and det.boxes.dtype == np.float32
    recall = found / total
    print(f"dlib recall@0.5 {found}/{total} = {recall:.3f}, unmatched detections {extra}")
    assert recall >= 0.9
    assert extra <= 0.25 * total


def test_no_face_photo_gives_no_detection(detector):
    assert len(detector.detect([read_rgb(PHOTOS / "ternaus__tests_data_no_face.jpg")])[0]) == 0


def test_batched_equals_one_by_one_and_is_deterministic():
    detector = build_detector("retinaface_mnet025", batch_size=3, max_size=640)
    # three 500x375 photos share a padded size (one batch); the others come in their own sizes
    names = ["2008_001322.jpg", "2008_002079.jpg", "2008_002506.jpg", "2008_001009.jpg",
             "Tom_Cruise_avp_2014_4.jpg"]
    images = [read_rgb(PHOTOS / (DLIB_PREFIX + n)) for n in names]
    batched = detector.detect(images)
    single = [detector.detect([im])[0] for im in images]
    again = detector.detect(images)
    for b, s, a in zip(batched, single, again):
        assert len(b) == len(s) > 0
        np.testing.assert_allclose(b.boxes, s.boxes, atol=1e-2)
        np.testing.assert_allclose(b.scores, s.scores, atol=1e-4)
        np.testing.assert_allclose(b.landmarks, s.landmarks, atol=1e-2)
        assert b.boxes.tobytes() == a.boxes.tobytes() and b.scores.tobytes() == a.scores.tobytes()
        assert b.landmarks.tobytes() == a.landmarks.tobytes()


def test_boxes_are_in_source_pixels_when_the_photo_is_downscaled(detector):
    image = read_rgb(PHOTOS / (DLIB_PREFIX + "2008_001322.jpg"))
    big = cv2.resize(image, (image.shape[1] * 2, image.shape[0] * 2), interpolation=cv2.INTER_CUBIC)
    small = build_detector("retinaface_mnet025", max_size=max(image.shape[:2]))
    ref, scaled = detector.detect([image])[0], small.detect([big])[0]
    assert len(ref) == len(scaled) > 0
    iou = box_iou(torch.from_numpy(ref.boxes * 2), torch.from_numpy(scaled.boxes))
    assert iou.diag().min() > 0.9
    h, w = big.shape[:2]
    assert scaled.boxes[:, [0, 2]].max() <= w and scaled.boxes[:, [1, 3]].max() <= h


def test_missing_mnet_weights_name_flag_and_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FDF_ASSETS", str(tmp_path))
    monkeypatch.delenv("FDF_RETINAFACE_WEIGHTS", raising=False)
    with pytest.raises(MissingAssetError, match=r"--detector_weights.*FDF_RETINAFACE_WEIGHTS"):
        build_detector("retinaface_mnet025")
    with pytest.raises(MissingAssetError, match="nope.pth"):
        build_detector("retinaface_mnet025", weights=str(tmp_path / "nope.pth"))


def test_r50_without_weights_names_flag_env_and_download(monkeypatch):
    monkeypatch.delenv("FDF_RETINAFACE_R50_WEIGHTS", raising=False)
    with pytest.raises(MissingAssetError) as err:
        build_detector("retinaface_r50")
    msg = str(err.value)
    assert "--detector_weights" in msg and "FDF_RETINAFACE_R50_WEIGHTS" in msg
    assert "allow_download" in msg and "ResNet-50" in msg


def test_r50_rejects_weights_of_another_network():
    mnet = assets_dir() / MNET_ASSET
    with pytest.raises(ValueError, match=r"mobilenet0\.25_Final\.pth: weights do not fit "
                                         r"retinaface_r50"):
        build_detector("retinaface_r50", weights=str(mnet))


def test_bad_arguments(detector):
    with pytest.raises(ValueError, match="unknown detector"):
        build_detector("dsfd")
    with pytest.raises(ValueError, match="image 1"):
        detector.detect([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)])


def test_onnxruntime_finds_the_same_faces_as_torch(detector):
    """The default CPU runtime runs the same weights exported to ONNX: on real photos of every size
    (one face to a crowd, batched and alone) it returns the faces torch returns, to a thousandth of
    a pixel, with the same scores and landmarks."""
    assert detector.runtime == "onnxruntime"
    by_torch = build_detector("retinaface_mnet025", runtime="torch")
    names = ["face_recognition__examples_obama-720p.jpg", "deep_privacy2__media_regjeringen.jpg",
             "ultralight__imgs_1.jpg", "dlib__examples_faces_2008_002470.jpg"]
    images = [read_rgb(PHOTOS / n) for n in names]
    for ours, theirs in zip(detector.detect(images) + detector.detect(images[:1]),
                            by_torch.detect(images) + by_torch.detect(images[:1])):
        assert len(ours) == len(theirs) > 0
        assert np.abs(ours.boxes - theirs.boxes).max() < 1e-2
        assert np.abs(ours.scores - theirs.scores).max() < 1e-4
        assert np.abs(ours.landmarks - theirs.landmarks).max() < 1e-2
    with pytest.raises(ValueError, match="--detector_runtime: unknown detector runtime 'tensorrt'"):
        build_detector("retinaface_mnet025", runtime="tensorrt")


def test_the_onnx_threads_sleep_between_calls(detector):
    """Between two detector calls the anonymizer's other work runs on the same cores, which a
    spinning thread pool would take (see OnnxNetwork)."""
    options = detector._forward.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_the_onnx_export_is_made_once_per_machine_and_remade_when_damaged(tmp_path, monkeypatch):
    """A run on a machine that has exported the detector before loads the export from the cache,
    without building (or importing) the torch network; a damaged cache file is exported again."""
    monkeypatch.setenv("FDF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(OnnxNetwork, "_exported", {})  # as in a fresh process
    photo = [read_rgb(PHOTOS / "ultralight__imgs_1.jpg")]
    (first,) = build_detector("retinaface_mnet025").detect(photo)
    (cached,) = list((tmp_path / "onnx").glob("retinaface_mnet025-*.onnx"))

    def no_export(*args):
        raise AssertionError("exported although the cache holds the export")

    monkeypatch.setattr(OnnxNetwork, "_exported", {})
    monkeypatch.setattr(detector_module, "build_network", no_export)
    (again,) = build_detector("retinaface_mnet025").detect(photo)
    assert len(first) > 0 and np.array_equal(first.boxes, again.boxes)

    monkeypatch.undo()
    monkeypatch.setenv("FDF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(OnnxNetwork, "_exported", {})
    cached.write_bytes(cached.read_bytes()[:1000])  # e.g. a disk that filled up under another writer
    (remade,) = build_detector("retinaface_mnet025").detect(photo)
    assert np.array_equal(first.boxes, remade.boxes) and cached.stat().st_size > 1_000_000


def test_a_photo_run_on_a_cpu_does_not_import_torchvision(tmp_path):
    """torchvision (and with it torch._dynamo) took 1.7 s of a one-photo `anonymize` run; with the
    export cached, detecting on a CPU needs neither it nor the torch network."""
    code = ("import sys, numpy as np; from fdf_builder.detector import build_detector; "
            "build_detector('retinaface_mnet025').detect([np.zeros((64, 64, 3), np.uint8)]); "
            "print('torchvision' in sys.modules)")
    env = {**os.environ, "FDF_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[-1].stderr[-2000:]
    assert [r.stdout.split()[-1] for r in runs] == ["True", "False"]  # the first run exports, the second need not


def test_prior_boxes_equal_the_packages_loop():
    """Our vectorized anchors are retinaface-pytorch's own, value for value and in its order."""
    from retinaface.prior_box import priorbox
    from fdf_builder.detector import _MIN_SIZES, _STEPS, prior_boxes
    for shape in [(640, 640), (480, 352), (97, 161), (32, 1024)]:
        assert torch.equal(prior_boxes(shape), priorbox(_MIN_SIZES, _STEPS, clip=False, image_size=shape)), shape


def test_nms_keeps_what_torchvision_keeps():
    """OpenCV's greedy NMS in place of torchvision's: the same boxes, in the same order, on dense
    random clusters of boxes (many overlaps near the threshold)."""
    from torchvision.ops import nms
    rng = np.random.default_rng(0)
    for trial in range(50):
        centres = rng.uniform(0, 200, (rng.integers(1, 6), 2))
        xy = centres[rng.integers(0, len(centres), 80)] + rng.normal(0, 6, (80, 2))
        wh = rng.uniform(8, 40, (80, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        scores = rng.uniform(0.3, 1.0, 80).astype(np.float32)
        for threshold in (0.3, 0.5):
            want = nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold).numpy()
            assert np.array_equal(_nms(boxes, scores, threshold), want), (trial, threshold)
    assert _nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.3).shape == (0,)


def test_a_second_finer_look_finds_the_crowd_faces_under_the_smallest_anchor(detector):
    """The crowd photo of the video benchmark at 720p (faces of 8-80 px): its faces that only the
    independent detectors (CenterFace, dlib's CNN) found at full resolution are mostly under 16 px,
    RetinaFace's smallest anchor. The rescan at 2x finds clearly more of them (82 faces of 10-40 px:
    0.87 → 1.00 found), keeps every face of the first pass (a small one maybe as a finer box), adds
    no face on a photo whose faces are all large, and reports in its pixels."""
    from eval.video_clips import CROWD, photo_truth
    truth = photo_truth(CROWD)
    image = read_rgb(PHOTOS / CROWD)
    f = 720 / image.shape[0]
    image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    theirs = np.array([not {"ours", "hand"} & set(s) for s in truth.sources])
    boxes = torch.from_numpy(truth.boxes[theirs] * f).float()
    widths = boxes[:, 2] - boxes[:, 0]
    boxes = boxes[widths >= 10]

    def recall(d) -> float:
        return float((box_iou(boxes, torch.from_numpy(d.boxes)).amax(dim=1) >= 0.3).float().mean())

    (first,) = detector.detect([image], max_size=1280)
    (both,) = detector.rescan_small([image], [first], below=20, scale=2.0, max_size=1280)
    assert len(boxes) > 50
    assert recall(both) >= recall(first) + 0.1 and recall(both) >= 0.9, (recall(first), recall(both))
    assert len(both) > len(first)
    kept = box_iou(torch.from_numpy(first.boxes), torch.from_numpy(both.boxes)).amax(dim=1)
    large = torch.from_numpy(first.boxes[:, 2] - first.boxes[:, 0]) >= 20
    assert bool((kept[large] > 0.999).all())  # the first pass's larger faces are all still there, unmoved
    assert bool((kept[~large] >= 0.3).all())  # a small one stays, or a finer box of it replaces it
    assert np.all(np.diff(both.scores) <= 0) and both.boxes[:, 2].max() <= image.shape[1] + 1
    portrait = read_rgb(PHOTOS / "face_recognition__examples_obama-720p.jpg")
    (one,) = detector.detect([portrait])
    assert detector.rescan_small([portrait], [one], below=20, scale=2.0)[0] is one  # nothing under 20 px: no second pass


def test_a_face_cut_by_the_photo_edge_is_not_a_small_face_to_look_at_again(detector):
    """A face entering a video frame is a narrow box for a few frames. Judged by its width, it sent
    38 % of the pan clip's frames through the 4x costlier second look, which found only hands, a
    lamp and the floor. Where the left or right edge cuts a face, its height says how large it is."""
    from eval.video_clips import G7, photo_truth
    image = read_rgb(PHOTOS / G7)  # 2771x683: the line-up's faces are 27-41 px, none under 20
    truth = photo_truth(G7).boxes
    cut = None
    for x0, y0, x1, y1 in sorted(truth.tolist()):  # a face cut to its right 40 % at the left edge
        left = int(x0 + 0.6 * (x1 - x0))
        (first,) = detector.detect([image[:, left:left + 1280]], max_size=1280)
        narrow = first.boxes[(first.boxes[:, 0] <= 1.0) & (first.boxes[:, 2] - first.boxes[:, 0] < 20)]
        if len(narrow) and (first.boxes[:, 3] - first.boxes[:, 1]).min() >= 20:
            cut = image[:, left:left + 1280], first
            break
    assert cut is not None, "no face of the line-up is found cut at the left edge"
    assert detector.rescan_small([cut[0]], [cut[1]], below=20, scale=2.0, max_size=1280)[0] is cut[1]
    mirrored = np.ascontiguousarray(cut[0][:, ::-1])  # the same face cut by the right edge
    (first,) = detector.detect([mirrored], max_size=1280)
    assert (first.boxes[:, 2] >= mirrored.shape[1] - 1.0).any()
    assert detector.rescan_small([mirrored], [first], below=20, scale=2.0, max_size=1280)[0] is first
