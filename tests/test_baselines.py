"""Traditional anonymizers on real photos with dlib's hand-labelled face boxes."""
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest

from fdf_core.assets import assets_dir
from eval.baselines import BASELINES, PAPER_AP, SMALL_FACE_METHODS, anonymize_boxes

PHOTOS = assets_dir() / "corpus" / "photos"


def _photo_and_boxes(file: str) -> tuple[np.ndarray, np.ndarray]:
    """RGB photo and its labelled faces as x0, y0, x1, y1 (dlib imglab XML)."""
    root = ET.parse(PHOTOS / "dlib__examples_faces_training.xml").getroot()
    node = next(n for n in root.iter("image") if n.get("file") == file)
    boxes = [[int(b.get("left")), int(b.get("top")), int(b.get("left")) + int(b.get("width")),
              int(b.get("top")) + int(b.get("height"))] for b in node.iter("box")]
    image = cv2.cvtColor(cv2.imread(str(PHOTOS / f"dlib__examples_faces_{file}")), cv2.COLOR_BGR2RGB)
    return image, np.array(boxes, np.float64)


def _mask(shape, boxes) -> np.ndarray:
    m = np.zeros(shape[:2], bool)
    for x0, y0, x1, y1 in boxes:
        m[max(0, int(np.floor(y0))):int(np.ceil(y1)), max(0, int(np.floor(x0))):int(np.ceil(x1))] = True
    return m


@pytest.mark.parametrize("method", sorted(SMALL_FACE_METHODS))
def test_changes_only_pixels_inside_boxes_and_each_box(method):
    image, boxes = _photo_and_boxes("2008_002079.jpg")  # six faces, two of them overlapping
    h, w = image.shape[:2]
    boxes = np.concatenate([boxes, [[w - 30.5, h - 20.2, w + 15, h + 9]],  # partly outside the photo
                            [[5, 5, 5, 40], [50, 60, 40, 90]]])           # empty boxes: no pixel
    before = image.copy()
    out = anonymize_boxes(image, boxes, method)
    assert (image == before).all()  # input untouched
    assert out.dtype == np.uint8 and out.shape == image.shape
    changed = (out != image).any(axis=2)
    assert not changed[~_mask(image.shape, boxes)].any()
    for box in boxes[:-2]:
        assert changed[_mask(image.shape, [box])].mean() > 0.5, box


def test_blackout_is_true_black():
    image, boxes = _photo_and_boxes("2008_001009.jpg")
    out = anonymize_boxes(image, boxes, "blackout")
    assert (out[_mask(image.shape, boxes)] == 0).all()


@pytest.mark.parametrize("method,cells", [("pixelation_16x16", 16), ("pixelation_8x8", 8)])
def test_pixelation_is_blocky_area_average(method, cells):
    image, boxes = _photo_and_boxes("2008_001009.jpg")  # faces of 76 and 90x91 px
    boxes = np.concatenate([boxes, [[10, 300, 10 + 4 * cells, 300 + 4 * cells]]])  # 4 px blocks
    out = anonymize_boxes(image, boxes, method).astype(int)
    for x0, y0, x1, y1 in boxes.astype(int):
        face = out[y0:y1, x0:x1]
        rows = np.arange(y1 - y0) * cells // (y1 - y0)
        cols = np.arange(x1 - x0) * cells // (x1 - x0)
        first = face[np.searchsorted(rows, rows)][:, np.searchsorted(cols, cols)]
        assert (face == first).all()  # constant within each cell: nearest, not bilinear
        assert len(np.unique(face.reshape(-1, 3), axis=0)) <= cells * cells
    # on a box that divides evenly, each cell holds the mean of its pixels (area interpolation)
    x0, y0 = 10, 300
    orig = image[y0:y0 + 4 * cells, x0:x0 + 4 * cells].astype(float)
    means = orig.reshape(cells, 4, cells, 4, 3).mean(axis=(1, 3))
    assert np.abs(out[y0:y0 + 4 * cells:4, x0:x0 + 4 * cells:4] - means).max() <= 1


@pytest.mark.parametrize("method,reference", [
    ("gaussian_9x9", lambda img, w: cv2.GaussianBlur(img, (9, 9), 3)),
    ("heavy_blur", lambda img, w: cv2.blur(img, (round(0.3 * w), round(0.3 * w)))),
])
def test_blurs_match_the_recorded_kernels(method, reference):
    image, boxes = _photo_and_boxes("2008_001009.jpg")  # faces well inside the photo, apart
    out = anonymize_boxes(image, boxes, method)
    for x0, y0, x1, y1 in boxes.astype(int):
        expected = reference(image, x1 - x0)[y0:y1, x0:x1]  # the filter with the photo as context
        assert (out[y0:y1, x0:x1] == expected).all()


def test_registry_records_parameters_and_paper_numbers():
    assert set(BASELINES) == {"blackout", "pixelation_16x16", "pixelation_8x8", "gaussian_9x9",
                              "heavy_blur"}
    assert BASELINES["pixelation_8x8"].params == {"cells": 8}
    assert BASELINES["gaussian_9x9"].params == {"kernel": 9, "sigma": 3.0}
    assert BASELINES["heavy_blur"].params == {"width_fraction": 0.3}
    assert PAPER_AP["original"] == (96.6, 95.7, 90.4) and PAPER_AP["blackout"] == (24.9, 36.3, 54.8)
    with pytest.raises(ValueError, match="unknown anonymizer"):
        anonymize_boxes(np.zeros((8, 8, 3), np.uint8), np.zeros((0, 4)), "noise")
    with pytest.raises(ValueError, match="uint8"):
        anonymize_boxes(np.zeros((8, 8, 3), np.float32), np.zeros((0, 4)), "blackout")


def test_soft_blur_follows_a_small_face_to_a_fraction_of_a_pixel():
    """A 14 px face sliding and growing by a tenth of a pixel a frame, as a tracked crowd face does:
    soft_blur's output changes a little every frame, heavy_blur's stays, then jumps by a column or a
    kernel step. Mean change per frame, in grey levels, over the box: soft_blur's largest step is a
    small share of heavy_blur's largest, and at least as strong a blur (less detail left)."""
    image, boxes = _photo_and_boxes("2008_001009.jpg")  # faces of 76 and 90x91 px
    x0, y0, x1, y1 = boxes[0]
    scale = 14 / (x1 - x0)
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    box0 = boxes[0] * scale
    steps = {}
    for method in ("heavy_blur", "soft_blur"):
        outs = [anonymize_boxes(small, (box0 + [0.1 * t, 0.05 * t, 0.2 * t, 0.15 * t])[None], method)
                for t in range(20)]
        region = (slice(int(box0[1]) - 1, int(np.ceil(box0[3])) + 4), slice(int(box0[0]) - 1, int(np.ceil(box0[2])) + 6))
        steps[method] = [np.abs(a[region].astype(int) - b[region]).mean() for a, b in zip(outs, outs[1:])]
    assert max(steps["soft_blur"]) < 0.2 * max(steps["heavy_blur"]), steps
    inside = (slice(int(np.ceil(box0[1])), int(box0[3])), slice(int(np.ceil(box0[0])), int(box0[2])))
    detail = {m: cv2.Laplacian(anonymize_boxes(small, box0[None], m)[inside], cv2.CV_64F).std()
              for m in ("heavy_blur", "soft_blur")}
    assert detail["soft_blur"] <= detail["heavy_blur"] * 1.05, detail
