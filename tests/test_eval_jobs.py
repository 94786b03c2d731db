"""Evaluation jobs: the WIDER table, the FID job logged to MLflow, the FID curve, identity removal."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from tiny_run import SNAPSHOT_IMAGES

from fdf_core.assets import MissingAssetError, assets_dir
from eval import identity, wider_job
from eval.cli import evaluate_main, identity_main, plot_fid_main, wider_main
from eval.baselines import BASELINES, PAPER_AP
from eval.wider import DIFFICULTIES, evaluate as wider_ap, load_wider_gt, read_detections

PHOTOS = assets_dir() / "corpus" / "photos"


def _dlib_faces() -> list[tuple[np.ndarray, np.ndarray]]:
    """(BGR photo, hand-labelled face box x0 y0 x1 y1) for every labelled face of the dlib photos."""
    root = ET.parse(PHOTOS / "dlib__examples_faces_training.xml").getroot()
    faces = []
    for node in root.iter("image"):
        path = PHOTOS / f"dlib__examples_faces_{node.get('file')}"
        if not path.is_file():  # the XML lists one photo that the corpus does not hold
            continue
        photo = cv2.imread(str(path))
        for b in node.iter("box"):
            x, y, w, h = (int(b.get(k)) for k in ("left", "top", "width", "height"))
            faces.append((photo, np.array([x, y, x + w, y + h], np.float64)))
    return faces


def _wider_like_images(root, gt, count: int = 4) -> list[str]:
    """Photos named like the first `count` WIDER val images with 1-3 easy faces of 60-200 px: a real
    background (the corpus photo without faces) with real corpus faces pasted into the ground-truth
    boxes (the labelled box scaled onto the ground-truth box, with 40% context around it)."""
    background = cv2.imread(str(PHOTOS / "ternaus__tests_data_no_face.jpg"))
    faces = _dlib_faces()
    names, k = [], 0
    for i, name in enumerate(gt.names):
        b = gt.boxes[i]
        if not 1 <= len(b) <= 3 or not gt.keep["easy"][i].all() or b[:, 2].min() < 60 or b[:, 2].max() > 200 \
                or not (0.9 <= b[:, 3] / b[:, 2]).all() or not (b[:, 3] / b[:, 2] <= 1.5).all():
            continue
        xyxy = gt.boxes_xyxy(i)
        w, h = int(xyxy[:, 2].max()) + 40, int(xyxy[:, 3].max()) + 40
        if max(w, h) > 800:
            continue
        canvas = cv2.resize(background, (w, h), interpolation=cv2.INTER_AREA)
        for box in xyxy:
            photo, src = faces[k % len(faces)]
            k += 1
            sx, sy = (box[2] - box[0]) / (src[2] - src[0]), (box[3] - box[1]) / (src[3] - src[1])
            m = 0.4 * (src[2:] - src[:2])
            c0 = np.maximum(src[:2] - m, 0).astype(int)
            c1 = np.minimum(src[2:] + m, photo.shape[1::-1]).astype(int)
            patch = cv2.resize(photo[c0[1]:c1[1], c0[0]:c1[0]], None, fx=sx, fy=sy, interpolation=cv2.INTER_AREA)
            x0, y0 = int(round(box[0] - (src[0] - c0[0]) * sx)), int(round(box[1] - (src[1] - c0[1]) * sy))
            px0, py0 = max(x0, 0), max(y0, 0)
            px1, py1 = min(x0 + patch.shape[1], w), min(y0 + patch.shape[0], h)
            canvas[py0:py1, px0:px1] = patch[py0 - y0:py1 - y0, px0 - x0:px1 - x0]
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), canvas, [cv2.IMWRITE_JPEG_QUALITY, 95])
        names.append(name)
        if len(names) == count:
            return names
    raise AssertionError("not enough suitable ground-truth images")


def test_wider_table_on_generated_images_with_real_ground_truth(tiny_run, tmp_path):
    gt = load_wider_gt()
    names = _wider_like_images(tmp_path / "images", gt)
    out = tmp_path / "wider"
    result = wider_main(["--images", str(tmp_path / "images"), "--output_dir", str(out),
                             "--checkpoint", str(tiny_run / "checkpoints" / "final.ckpt"), "--progress", "false"])
    table = json.loads((out / "wider_table.json").read_text())
    assert table == result and table["images"] == 4 and table["images_in_gt"] == 3226
    assert table["faces"] == sum(len(gt.boxes[gt.index(n)]) for n in names)
    assert 0 <= table["faces_without_pose"] <= table["faces"]
    rows = {r["method"]: r for r in table["rows"]}
    assert list(rows) == ["original", *BASELINES, "generator"]
    assert rows["generator"]["paper_ap"] == dict(zip(DIFFICULTIES, PAPER_AP["deepprivacy"]))
    assert rows["blackout"]["paper_ap"] == dict(zip(DIFFICULTIES, PAPER_AP["blackout"]))
    assert rows["original"]["ap"]["easy"] > 70  # the detector finds the pasted real faces
    assert rows["blackout"]["ap"]["easy"] < rows["original"]["ap"]["easy"] - 30  # and not blacked-out ones
    assert rows["original"]["retained"]["easy"] == 100
    for r in table["rows"]:
        assert all(0 <= v <= 100 for v in r["ap"].values())
    # the detections on disk (the kit's layout) reproduce the table on the same images
    subset = wider_job.subset(gt, [gt.index(n) for n in names])
    for method in ("original", "generator"):
        dets = read_detections(out / "detections" / method)
        assert sorted(dets) == sorted(names)
        assert {d: round(100 * v, 2) for d, v in wider_ap(dets, subset).items()} == rows[method]["ap"]
    assert json.loads((out / "options.json").read_text())["confidence"] == 0.02


def test_wider_job_names_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"none of the 3226 WIDER FACE val images.*0--Parade/"):
        wider_main(["--images", str(tmp_path), "--methods", "[original]", "--output_dir", str(tmp_path / "o")])


def test_fid_job_writes_json_and_logs_to_the_run(tiny_run, fdf_shards, tmp_path):
    ckpt = tiny_run / "checkpoints" / "final.ckpt"
    args = ["--checkpoint", str(ckpt), "--data_root", str(fdf_shards), "--feature", "random_conv",
            "--cache_dir", str(tmp_path / "cache"), "--batch_size", "8"]
    first = evaluate_main(args + ["--output", str(tmp_path / "fid.json")])
    saved = json.loads((tmp_path / "fid.json").read_text())
    assert saved["fid"] == first["fid"] > 0 and saved["num_images"] == 16 and saved["resolution"] == 32
    assert saved["images_shown"] == 96 and saved["run_id"] == torch.load(ckpt, weights_only=True)["mlflow_run_id"]
    assert len(list((tmp_path / "cache").glob("fid_real_*.pt"))) == 1
    second = evaluate_main(args + ["--output", str(tmp_path / "fid2.json")])  # real statistics from the cache
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-6)
    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_run}/mlflow.db")
    history = client.get_metric_history(saved["run_id"], "eval/fd_random_conv")
    assert [(m.step, m.value) for m in history][-1] == (12, pytest.approx(first["fid"]))  # the training step
    assert [m.value for m in client.get_metric_history(saved["run_id"], "eval/fd_random_conv/kimg")][-1] == 0.096
    assert "eval/fid.json" in [a.path for a in client.list_artifacts(saved["run_id"], "eval")]


def test_fid_curve_over_the_run_checkpoints(tiny_run, fdf_shards, tmp_path):
    png = tmp_path / "curve.png"
    result = plot_fid_main(["--run_dir", str(tiny_run), "--evaluate", "true", "--data_root", str(fdf_shards),
                         "--feature", "random_conv", "--cache_dir", str(tmp_path / "cache"), "--output", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    kimg = [x for x, _ in result["series"]["eval/fd_random_conv"]]
    assert kimg == pytest.approx([n / 1000 for n in SNAPSHOT_IMAGES])
    assert [name for _, name in result["phases"]][:3] == ["stabilize8", "fade16", "stabilize16"]
    assert len(list((tiny_run / "eval").glob("fd_random_conv_img??????????.json"))) == len(SNAPSHOT_IMAGES)


LFW = assets_dir() / "faces" / "lfw_pairs"


def test_dlib_recognizer_tells_same_from_different_people():
    faces = identity.DlibFaces()
    a1, a2, b1 = (identity._read(LFW / f) for f in ("Abdullah_0001.jpg", "Abdullah_0002.jpg", "Abel_Pacheco_0001.jpg"))
    e = {k: faces.embed(im, faces.detect(im)[0]) for k, im in (("a1", a1), ("a2", a2), ("b1", b1))}
    assert np.linalg.norm(e["a1"] - e["a2"]) < identity.DLIB_THRESHOLD < np.linalg.norm(e["a1"] - e["b1"])


def test_identity_job_on_lfw_pairs(tmp_path):
    out = tmp_path / "identity.json"
    result = identity_main(["--pairs_dir", str(LFW), "--num_pairs", "6", "--methods", "[blackout, gaussian_9x9]",
                            "--output", str(out), "--progress", "false"])
    assert json.loads(out.read_text()) == result and result["pairs"] + result["pairs_skipped_no_face"] == 6
    original = result["original"]
    assert original["same_person_distance_median"] < 0.6 < original["different_person_distance_median"]
    assert original["tpr_at_far"] > 0.8 and original["still_detected"] == 1.0  # the CNN detector's ceiling
    blackout, blur = result["methods"]["blackout"], result["methods"]["gaussian_9x9"]
    assert blackout["deidentification_rate"] == 1.0 and blackout["tpr_at_far"] == 0.0
    assert blackout["still_detected"] == 0.0  # nothing face-like is left for an independent detector
    assert blur["deidentification_rate"] < 0.5  # a 9x9 blur of a 250 px face keeps the identity
    assert blackout["grayscale_kept"] == blur["grayscale_kept"] == f"{result['pairs']}/{result['pairs']}"


def test_identity_job_reuses_originals_and_baselines_of_an_earlier_run(tmp_path, monkeypatch):
    """A second run on the same pairs reads the originals' embeddings and the baselines' results back
    (the evaluation of a new model re-scores only the generator) and gives the same figures."""
    out = tmp_path / "identity.json"
    args = ["--pairs_dir", str(LFW), "--num_pairs", "4", "--methods", "[blackout]", "--output", str(out),
            "--progress", "false"]
    first = identity_main(args)
    assert (tmp_path / "identity_originals.npz").is_file()
    calls = []
    monkeypatch.setattr(identity, "subjects", lambda *a: calls.append("subjects"))
    monkeypatch.setattr(identity, "score_method", lambda *a: calls.append("score"))
    again = identity_main(args)
    assert calls == [] and again["methods"] == first["methods"] and again["original"] == first["original"]
    with pytest.raises(TypeError):  # other pairs: the originals are embedded again (here: the stub)
        identity_main([*args[:3], "3", *args[4:]])
    assert calls == ["subjects"]


def test_identity_job_names_missing_models(monkeypatch, tmp_path):
    monkeypatch.setenv(identity.DLIB_MODELS_ENV, str(tmp_path))
    with pytest.raises(MissingAssetError, match=f"lacks {identity.EMBEDDING_FILE}.*{identity.DLIB_MODELS_ENV}"):
        identity_main(["--pairs_dir", str(LFW), "--methods", "[blackout]"])
