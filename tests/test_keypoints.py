"""Keypoints: MoveNet on real portraits, FDF matching on hand-made persons, backend errors."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from fdf_core.assets import MissingAssetError, assets_dir
from fdf_builder.detector import MNET_ASSET, build_detector
from fdf_core.keypoints import KEYPOINT_NAMES
from fdf_builder.keypoints import (MOVENET_ASSET, MoveNetKeypoints,
                                   build_keypoint_model, movenet_region)
from fdf_builder.matching import match_faces

PHOTOS = assets_dir() / "corpus" / "photos"
PORTRAITS = ["elliottzheng__examples_obama.jpg", "elliottzheng__examples_trump.jpg",
             "face_recognition__examples_obama-720p.jpg", "deep_privacy2__media_erling.jpg",
             "face_recognition__examples_knn_examples_train_rose_leslie_img1.jpg"]
NOSE, LEFT_EYE, RIGHT_EYE, LEFT_SHOULDER, RIGHT_SHOULDER = 0, 1, 2, 5, 6


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def movenet():
    return build_keypoint_model("movenet")


@pytest.fixture(scope="module")
def portraits():
    detector = build_detector("retinaface_mnet025")
    images = [read_rgb(PHOTOS / name) for name in PORTRAITS]
    return list(zip(PORTRAITS, images, detector.detect(images)))


def test_keypoint_names_are_coco_0_to_6():
    assert KEYPOINT_NAMES == ("nose", "left_eye", "right_eye", "left_ear", "right_ear",
                              "left_shoulder", "right_shoulder")


def test_movenet_on_portraits(movenet, portraits):
    for name, image, det in portraits:
        assert len(det) >= 1, name
        kps = movenet.keypoints_for_faces(image, det.boxes, det.scores)
        assert len(kps) == len(det)
        kp, (x0, y0, x1, y1) = kps[0], det.boxes[0]  # the most confident face
        assert kp is not None and kp.shape == (7, 3) and kp.dtype == np.float32, name
        face = kp[[NOSE, LEFT_EYE, RIGHT_EYE]]
        assert np.all((face[:, 0] >= x0) & (face[:, 0] <= x1))
        assert np.all((face[:, 1] >= y0) & (face[:, 1] <= y1))
        assert kp[LEFT_EYE, 0] > kp[RIGHT_EYE, 0], f"{name}: subject's left eye is image right"
        assert kp[LEFT_SHOULDER, 0] > kp[RIGHT_SHOULDER, 0], name
        assert np.all(kp[[LEFT_SHOULDER, RIGHT_SHOULDER], 1] > y1), f"{name}: shoulders below face"
        assert np.all((kp[:, 2] >= 0) & (kp[:, 2] <= 1))


def test_movenet_keypoints_follow_the_photo_and_survive_the_border(movenet, portraits):
    _, image, det = portraits[0]
    box = det.boxes[0]
    ref = movenet.keypoints_for_faces(image, box[None], det.scores[:1])[0]
    dx, dy = 37, 23
    shifted = np.zeros((image.shape[0] + dy, image.shape[1] + dx, 3), np.uint8)
    shifted[dy:, dx:] = image
    moved = movenet.keypoints_for_faces(shifted, (box + [dx, dy, dx, dy])[None], det.scores[:1])[0]
    np.testing.assert_allclose(moved[:, :2], ref[:, :2] + [dx, dy], atol=1e-3)
    np.testing.assert_array_equal(moved[:, 2], ref[:, 2])
    # a face at the top-left corner: its region is padded with zeros, still found, in photo pixels
    x0, y0 = int(box[0]) - 5, int(box[1]) - 5
    assert movenet_region(box)[0] < x0  # the region passes the new left border
    corner = np.ascontiguousarray(image[y0:, x0:])
    kp = movenet.keypoints_for_faces(corner, (box - [x0, y0, x0, y0])[None], det.scores[:1])[0]
    assert kp is not None
    np.testing.assert_allclose(kp[:3, :2], ref[:3, :2] - [x0, y0], atol=0.1 * (box[2] - box[0]))


def test_movenet_without_face_in_region_gives_none(movenet):
    image = read_rgb(PHOTOS / "ternaus__tests_data_no_face.jpg")
    box = np.array([[100, 100, 180, 190]])
    assert movenet.keypoints_for_faces(image, box, np.array([0.9])) == [None]
    assert movenet.keypoints_for_faces(image, np.zeros((0, 4)), np.zeros(0)) == []


def _person(nose, left_eye, right_eye, score=1.0):
    kp = np.zeros((7, 3), np.float32)
    kp[:3, :2] = [nose, left_eye, right_eye]
    kp[:, 2] = score
    return kp


def test_matching_gives_first_unused_person_to_boxes_by_score():
    boxes = np.array([[0, 0, 100, 100], [0, 0, 100, 100], [200, 0, 300, 100]], np.float32)
    inside = _person((50, 60), (70, 40), (30, 40))
    other = _person((55, 60), (75, 40), (35, 40))
    far = _person((250, 60), (270, 40), (230, 40))
    persons = np.stack([far, inside, other])
    # the second box is the more confident: it takes the first fitting person (1), the first box 2
    assert match_faces(boxes, np.array([0.5, 0.9, 0.7]), persons, np.ones(3)) == [2, 1, 0]
    # only one person fits the two overlapping boxes: the less confident box is dropped
    assert match_faces(boxes, np.array([0.5, 0.9, 0.7]), persons[:2], np.ones(2)) == [None, 1, 0]
    # equal scores keep the boxes' order
    assert match_faces(boxes[:2], np.array([0.8, 0.8]), persons[1:], np.ones(2)) == [0, 1]


def test_matching_needs_nose_and_both_eyes_inside_and_person_score():
    box = np.array([[0, 0, 100, 100]], np.float32)
    one = np.array([0.9])
    on_border = _person((100, 100), (0, 0), (50, 50))
    assert match_faces(box, one, on_border[None], np.ones(1)) == [0]
    for outside in [_person((101, 50), (70, 40), (30, 40)), _person((50, 60), (70, -1), (30, 40)),
                    _person((50, 60), (70, 40), (30, 100.5))]:
        assert match_faces(box, one, outside[None], np.ones(1)) == [None]
    assert match_faces(box, one, on_border[None], np.array([0.19])) == [None]
    assert match_faces(box, one, on_border[None], np.array([0.2])) == [0]
    assert match_faces(box, one, np.zeros((0, 7, 3)), np.zeros(0)) == [None]
    assert match_faces(np.zeros((0, 4)), np.zeros(0), on_border[None], np.ones(1)) == []
    with pytest.raises(ValueError, match="counts must agree"):
        match_faces(box, one, on_border[None], np.ones(2))


def test_movenet_drops_faces_with_unsure_face_keypoints(movenet, portraits):
    _, image, det = portraits[0]
    found = movenet.keypoints_for_faces(image, det.boxes[:1], det.scores[:1])[0]
    least = float(found[:3, 2].min())
    stricter = MoveNetKeypoints(str(assets_dir() / MOVENET_ASSET), threshold=least + 1e-3)
    assert stricter.keypoints_for_faces(image, det.boxes[:1], det.scores[:1]) == [None]
    exact = MoveNetKeypoints(str(assets_dir() / MOVENET_ASSET), threshold=least)
    assert exact.keypoints_for_faces(image, det.boxes[:1], det.scores[:1])[0] is not None


def test_keypoint_rcnn_without_weights_names_flag_and_env(monkeypatch):
    monkeypatch.delenv("FDF_KEYPOINT_RCNN_WEIGHTS", raising=False)
    with pytest.raises(MissingAssetError) as err:
        build_keypoint_model("keypoint-rcnn")
    msg = str(err.value)
    assert "--keypoint_weights" in msg and "FDF_KEYPOINT_RCNN_WEIGHTS" in msg
    assert "allow_download" in msg


def test_keypoint_rcnn_rejects_weights_of_another_network():
    with pytest.raises(ValueError, match="do not fit keypointrcnn_resnet50_fpn"):
        build_keypoint_model("keypoint-rcnn", weights=str(assets_dir() / MNET_ASSET))


def test_movenet_weight_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("FDF_ASSETS", str(tmp_path))
    monkeypatch.delenv("FDF_MOVENET_WEIGHTS", raising=False)
    with pytest.raises(MissingAssetError, match=r"--keypoint_weights.*FDF_MOVENET_WEIGHTS"):
        build_keypoint_model("movenet")
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer" * 8)
    with pytest.raises(ValueError, match="junk.tflite"):
        build_keypoint_model("movenet", weights=str(junk))
    with pytest.raises(ValueError, match="unknown keypoint backend"):
        build_keypoint_model("openpose")
