"""WIDER FACE ground truth and the official AP protocol, on the real validation ground truth."""
import json

import numpy as np
import pytest

from fdf_core.assets import assets_dir
from eval import wider
from eval.cli import wider_ap_main


@pytest.fixture(scope="module")
def gt(assets):
    return wider.load_wider_gt(assets / "wider")


def test_mat_and_text_layout_agree(gt):
    names, boxes, labels = wider.read_gt_txt(assets_dir() / "wider" / wider.GT_TXT)
    assert len(gt.names) == 3226 and gt.num_faces == 39708
    assert names == gt.names
    assert all(a.shape == b.shape and (a == b).all() for a, b in zip(boxes, gt.boxes))
    assert all(a.shape == b.shape and (a == b).all() for a, b in zip(labels, gt.labels))
    for i in range(len(gt.names)):  # easy ⊂ medium ⊂ hard
        assert (gt.keep["easy"][i] <= gt.keep["medium"][i]).all()
        assert (gt.keep["medium"][i] <= gt.keep["hard"][i]).all()
    counts = [sum(int(m.sum()) for m in gt.keep[d]) for d in wider.DIFFICULTIES]
    assert counts[0] < counts[1] < counts[2] < gt.num_faces


def _gt_as_detections(gt, rng):
    """Every well-formed ground-truth box once, random scores, shuffled; and the kept faces that
    the protocol cannot find this way (negative width/height: IoU 0 with itself; an exact duplicate
    of an earlier box: the kit gives every hit to the first of the two)."""
    dets, unfindable = {}, np.zeros(gt.num_faces, bool)
    offset = 0
    for i, name in enumerate(gt.names):
        b = gt.boxes[i]
        _, first = np.unique(b, axis=0, return_index=True)
        ok = np.zeros(len(b), bool)
        ok[first] = True
        ok &= (b[:, 2] >= 0) & (b[:, 3] >= 0)
        unfindable[offset:offset + len(b)] = ~ok
        offset += len(b)
        d = np.concatenate([gt.boxes_xyxy(i)[ok], rng.random((ok.sum(), 1))], axis=1)
        dets[name] = d[rng.permutation(len(d))]
    return dets, unfindable


def test_ground_truth_as_detections_scores_one(gt):
    dets, unfindable = _gt_as_detections(gt, np.random.default_rng(0))
    aps = wider.evaluate(dets, gt)
    for d in wider.DIFFICULTIES:
        keep = np.concatenate(gt.keep[d])
        expected = 1 - (keep & unfindable).sum() / keep.sum()
        assert aps[d] == pytest.approx(expected, abs=1e-12), d
    # easy and medium have no such face: exactly 1; hard has two (a duplicate and a w = -2 box)
    assert aps["easy"] == pytest.approx(1.0, abs=1e-12)
    assert aps["medium"] == pytest.approx(1.0, abs=1e-12)
    assert 0.9999 < aps["hard"] < 1.0
    # the same boxes as x, y, w, h and keyed by bare file stems give the same numbers
    xywh = {name.split("/")[1][:-4]: np.concatenate([d[:, :2], d[:, 2:4] - d[:, :2], d[:, 4:]], 1)
            for name, d in dets.items()}
    assert wider.evaluate(xywh, gt, box_format="xywh") == pytest.approx(aps, abs=1e-12)


def _small_gt() -> wider.WiderGT:
    boxes = [np.array([[0, 0, 10, 10],       # a1
                       [100, 0, 10, 10],     # a2
                       [200, 0, 10, 10]]),   # a3: in no gt_list
             np.array([[0, 0, 20, 20],       # b1
                       [50, 50, 20, 20]])]   # b2: never detected
    keep = {"easy": [np.array([1, 0, 0], bool), np.array([1, 0], bool)],     # a1, b1
            "medium": [np.array([1, 1, 0], bool), np.array([1, 0], bool)],   # a1, a2, b1
            "hard": [np.array([1, 1, 0], bool), np.array([1, 1], bool)]}     # a1, a2, b1, b2
    labels = [np.zeros((len(b), 6), np.int64) for b in boxes]
    return wider.WiderGT(["0--Parade/img_a.jpg", "0--Parade/img_b.jpg"], boxes, labels, keep)


def _small_detections() -> dict[str, np.ndarray]:
    return {"0--Parade/img_a.jpg": np.array([
        [101, 0, 111, 10, 0.6],    # d4: a2 moved 1 px, kit IoU 110/132 = 0.83 -> hit a2
        [300, 300, 310, 310, 0.95],  # d3: nothing there -> false positive, the highest score
        [200, 0, 210, 10, 0.8],    # d2: a3 exactly -> hit on an ignored face
        [0, 0, 10, 10, 0.9]]),     # d1: a1 exactly
        "0--Parade/img_b.jpg": np.array([
            [1, 1, 21, 21, 0.3],   # d6: b1 moved 1 px, IoU 400/482 = 0.83 -> second hit on b1
            [0, 0, 20, 20, 0.5]])}  # d5: b1 exactly


def test_hand_worked_example():
    # Scores normalized with lo = min(1, 0.3) = 0.3, hi = max(0, 0.95) = 0.95: d3 -> 1.0 enters at
    # the first threshold (0.999), d6 -> 0.0 only at the last (0.0). Descending: d3 d1 d2 d4 d5 d6.
    # A face is found by its first hit; d6 repeats b1 -> false positive.
    # hard (4 faces; a3 ignored): after d3 P 0 R 0 | d1 P 1/2 R 1/4 | d2 ignored | d4 P 2/3 R 2/4
    #   | d5 P 3/4 R 3/4 | d6 P 3/5 R 3/4. Envelope: 3/4 for recall 1/4, 2/4, 3/4; b2 is missed.
    #   AP = 3 × 1/4 × 3/4 = 0.5625
    # medium (3 faces; a3, b2 ignored): d1 P 1/2 R 1/3 | d4 P 2/3 R 2/3 | d5 P 3/4 R 1 | d6 P 3/5.
    #   AP = 3 × 1/3 × 3/4 = 0.75
    # easy (2 faces; a2, a3, b2 ignored, so d2 and d4 are neither TP nor FP): d1 P 1/2 R 1/2 |
    #   d5 P 2/3 R 1 | d6 P 2/4 R 1. Envelope 2/3 at both recall steps: AP = 2 × 1/2 × 2/3 = 2/3
    gt, dets = _small_gt(), _small_detections()
    aps = wider.evaluate(dets, gt)
    assert aps == pytest.approx({"easy": 2 / 3, "medium": 0.75, "hard": 0.5625}, abs=1e-12)
    precision, recall = wider.pr_curves(dets, gt)["hard"]
    assert precision.shape == recall.shape == (1000,)
    assert precision[0] == 0 and recall[-1] == 0.75 and precision[-1] == pytest.approx(3 / 5)
    # scores are normalized per set: an affine change of every score changes nothing
    scaled = {k: np.concatenate([v[:, :4], 10 * v[:, 4:] - 3], 1) for k, v in dets.items()}
    assert wider.evaluate(scaled, gt) == pytest.approx(aps, abs=1e-12)


def test_unknown_image_and_bad_arrays_are_errors():
    gt = _small_gt()
    with pytest.raises(KeyError, match="not_an_image"):
        wider.evaluate({"0--Parade/not_an_image.jpg": np.zeros((0, 5))}, gt)
    with pytest.raises(ValueError, match="img_a"):
        wider.evaluate({"img_a": np.ones((2, 4))}, gt)
    with pytest.raises(ValueError, match="twice"):
        wider.evaluate({"img_a": np.zeros((0, 5)), "0--Parade/img_a.jpg": np.zeros((0, 5))}, gt)


def test_detection_text_layout_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 500, (7, 2))
    dets = {"0--Parade/img_a.jpg": np.concatenate([xy, xy + rng.uniform(1, 80, (7, 2)),
                                                   rng.random((7, 1))], 1),
            "0--Parade/img_b.jpg": np.zeros((0, 5))}
    assert wider.write_detections(tmp_path / "a", dets) == 2
    text = (tmp_path / "a" / "0--Parade" / "img_a.txt").read_text().splitlines()
    assert text[0] == "img_a" and text[1] == "7" and len(text) == 9
    x, y, w, h, s = map(float, text[2].split())
    assert (x, y, x + w, y + h, s) == pytest.approx(tuple(dets["0--Parade/img_a.jpg"][0]), abs=1e-9)
    assert (tmp_path / "a" / "0--Parade" / "img_b.txt").read_text() == "img_b\n0\n"
    back = wider.read_detections(tmp_path / "a")
    assert sorted(back) == sorted(dets)
    for k in dets:
        np.testing.assert_allclose(back[k], dets[k], atol=1e-9)
    wider.write_detections(tmp_path / "b", back)
    for k in dets:
        rel = k.replace(".jpg", ".txt")
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    gt = _small_gt()
    assert wider.evaluate(back, gt) == pytest.approx(wider.evaluate(dets, gt), abs=1e-12)


@pytest.mark.parametrize("content,where", [
    ("img_a\n2\n1 2 3 4 0.5\n", "count says 2"),
    ("img_a\ntwo\n", ":2:"),
    ("img_a\n1\n1 2 3 0.5\n", ":3:"),
    ("img_a\n1\n1 2 x 4 0.5\n", ":3:"),
    ("other_image\n0\n", ":1:"),
])
def test_bad_detection_file_names_file_and_line(tmp_path, content, where):
    (tmp_path / "0--Parade").mkdir()
    (tmp_path / "0--Parade" / "img_a.txt").write_text(content)
    with pytest.raises(ValueError, match=where) as e:
        wider.read_detections(tmp_path)
    assert "img_a.txt" in str(e.value)


def test_gt_text_original_empty_image_layout_and_errors(tmp_path):
    # the original release writes count 0 and one all-zero line; the .mat stores one zero box
    path = tmp_path / "gt.txt"
    path.write_text("1--Handshaking/1_a.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n"
                    "1--Handshaking/1_b.jpg\n2\n1 2 3 4 0 0 0 0 0 0\n5 6 7 8 2 0 0 1 0 0\n")
    names, boxes, labels = wider.read_gt_txt(path)
    assert names == ["1--Handshaking/1_a.jpg", "1--Handshaking/1_b.jpg"]
    assert boxes[0].tolist() == [[0, 0, 0, 0]] and boxes[1].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert labels[1][1].tolist() == [2, 0, 0, 1, 0, 0]
    path.write_text("1--Handshaking/1_b.jpg\n2\n1 2 3 4 0 0 0 0 0 0\n5 6 7\n")
    with pytest.raises(ValueError, match=r"gt\.txt:4:"):
        wider.read_gt_txt(path)


def test_missing_ground_truth_names_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="wider_hard_val.mat"):
        wider.load_wider_gt(tmp_path)


def test_wider_ap_cli_on_written_detections(gt, tmp_path):
    dets, _ = _gt_as_detections(gt, np.random.default_rng(2))
    dets = {k: v for k, v in dets.items() if k.startswith(("0--", "1--"))}  # two events: fewer files
    wider.write_detections(tmp_path / "pred", dets)
    expected = wider.evaluate(dets, gt)
    out = tmp_path / "ap.json"
    wider_ap_main(["--pred_dir", str(tmp_path / "pred"), "--output", str(out)])
    assert json.loads(out.read_text()) == pytest.approx(expected, abs=1e-9)
    assert json.loads((tmp_path / "ap_options.json").read_text())["pred_dir"] == str(tmp_path / "pred")
