"""FDF crop rule: square, expand by 35% per side, stay inside the photo, pad only as a fallback."""
import numpy as np
import pytest

from fdf_builder import crop as fc


@pytest.mark.parametrize("box,hw", [
    ((100, 120, 160, 200), (480, 640)),   # tall box in the middle
    ((0, 0, 50, 30), (300, 400)),         # wide box at the corner
    ((590, 400, 640, 480), (480, 640)),   # at the bottom-right border
    ((10, 10, 290, 200), (300, 400)),     # face nearly as large as the photo
])
def test_crop_is_square_inside_and_contains_face(box, hw):
    c = fc.crop_box(np.array(box, float), hw)
    x0, y0, x1, y1 = c.box
    assert x1 - x0 == y1 - y0
    assert not c.padded
    assert 0 <= x0 and 0 <= y0 and x1 <= hw[1] and y1 <= hw[0]
    assert x0 <= box[0] and y0 <= box[1] and x1 >= box[2] and y1 >= box[3]


def test_expansion_is_35_percent_when_room():
    c = fc.crop_box(np.array([200, 200, 300, 300], float), (1000, 1000))
    assert c.box == (165, 165, 335, 335)  # 100 px face + 35 px on each side = 1.7x


def test_expansion_capped_by_photo():
    c = fc.crop_box(np.array([10, 10, 90, 90], float), (100, 100))
    assert c.side == 100 and c.box == (0, 0, 100, 100)


def test_fallback_pads_with_zeros_when_face_larger_than_photo():
    image = np.full((100, 300, 3), 200, np.uint8)
    box = np.array([100, -20, 220, 100], float)  # 120 px tall: does not fit a 100 px photo
    c = fc.crop_box(box, image.shape[:2])
    assert c.padded and c.side == round(120 * 1.7)
    pixels = fc.cut(image, c.box)
    assert pixels.shape == (c.side, c.side, 3)
    assert pixels[0, 0].tolist() == [0, 0, 0]  # above the photo: zeros
    assert (pixels[c.side // 2, c.side // 2] == 200).all()


def test_edge_fill_repeats_the_nearest_photo_pixel_past_the_border():
    """The anonymizer's cut (Anonymizer._sample): past the photo's border the nearest border pixel
    is repeated instead of zeros, so a face entering a video frame is not shown black beside it;
    inside the photo both cuts are the photo."""
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    box = (-2, 3, 5, 9)  # 2 px left of the photo, 3 px below it
    zeros, edge = fc.cut(image, box), fc.cut(image, box, edge=True)
    assert zeros.shape == edge.shape == (6, 7, 3)
    assert (edge[:3, 2:] == image[3:6, 0:5]).all() and (zeros[:3, 2:] == edge[:3, 2:]).all()
    assert (edge[:3, 0] == image[3:6, 0]).all() and (edge[3:, 2:] == image[5, 0:5]).all()
    assert (edge[5, 0] == image[5, 0]).all() and not zeros[:, :2].any() and not zeros[3:].any()
    assert not fc.cut(image, (10, 10, 12, 12), edge=True).any()  # no photo pixel in the box: zeros


def test_pad_rule_keeps_fdf_context_for_tight_face_crops():
    box = np.array([10, 10, 90, 90], float)  # a face filling a 100 px photo, as in UTKFace
    capped, padded = fc.crop_box(box, (100, 100)), fc.crop_box(box, (100, 100), rule="pad")
    assert capped.box == (0, 0, 100, 100) and not capped.padded  # FDF's rule: no room for context
    assert padded.box == (-18, -18, 118, 118) and padded.padded and padded.side == round(80 * 1.7)
    roomy = fc.crop_box(np.array([200, 200, 300, 300], float), (1000, 1000), rule="pad")
    assert roomy.box == (165, 165, 335, 335) and not roomy.padded  # where it fits, the rules agree
    with pytest.raises(ValueError, match="crop rule"):
        fc.crop_box(box, (100, 100), rule="wide")


def test_crop_coords_normalize_to_unit_square():
    c = fc.Crop((100, 50, 300, 250), padded=False)
    pts = fc.to_crop_coords(np.array([[100, 50, 0.9], [300, 250, 0.5], [200, 150, 0.1]]), c)
    np.testing.assert_allclose(pts, [[0, 0, 0.9], [1, 1, 0.5], [0.5, 0.5, 0.1]])


def test_resize_area_downsamples_to_resolution():
    crop = np.zeros((256, 256, 3), np.uint8)
    crop[:, 128:] = 255
    out = fc.resize(crop, 128)
    assert out.shape == (128, 128, 3)
    assert out[:, :64].max() == 0 and out[:, 64:].min() == 255


def test_visible_margins_of_a_padded_crop_measure_the_band_of_photo_around_the_box():
    """A 200x200 face photo whose box nearly fills it, cut by the pad rule and resized as the
    builder does: the photo reaches exactly as far past each box side as the geometry says."""
    rng = np.random.default_rng(0)
    photo = rng.integers(60, 200, (200, 200, 3), dtype=np.uint8)
    box = np.array([20.0, 2.0, 180.0, 170.0])  # 160x168: 20 px left/right, 2 above, 30 below
    c = fc.crop_box(box, photo.shape[:2], rule="pad")
    stored = fc.resize(fc.cut(photo, c.box), 128)
    bbox = fc.to_crop_coords(box.reshape(2, 2), c).reshape(4)
    side = 168.0
    expected = np.array([20, 2, 20, 30]) / side
    assert np.allclose(fc.visible_margins(stored, bbox), expected, atol=2.5 / 128 * c.side / side)
    assert fc.context_margins([[0.1, 0.0, 0.2, 0.05], [0.3, 0.02, 0.0, 0.07], [0.1, 0.01, 0.1, 0.06]]) \
        == [0.1, 0.01, 0.1, 0.06]  # medians, left/right averaged (training mirrors faces)


def test_limit_context_keeps_the_box_and_its_band_and_zeros_the_rest():
    crop = np.full((100, 100, 3), 7, np.uint8)
    out = fc.limit_context(crop, (30.0, 20.0, 70.0, 60.0), [0.25, 0.0, 0.5, 0.1])  # side 40
    kept = np.argwhere(out[..., 0] == 7)
    assert kept.min(0).tolist() == [20, 20] and kept.max(0).tolist() == [63, 89]  # rows 20..63, cols 20..89
    assert (out[out[..., 0] != 7] == 0).all()
    assert fc.limit_context(crop, (30.0, 20.0, 70.0, 60.0), None) is crop
