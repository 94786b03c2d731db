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

from data_prep.assets import MissingAssetError, assets_dir
from eval import evaluate, identity, plots, wider_job
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
    result = wider_job.main(["--images", str(tmp_path / "images"), "--output_dir", str(out),
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
        wider_job.main(["--images", str(tmp_path), "--methods", "[original]", "--output_dir", str(tmp_path / "o")])


def test_fid_job_writes_json_and_logs_to_the_run(tiny_run, fdf_shards, tmp_path):
    ckpt = tiny_run / "checkpoints" / "final.ckpt"
    args = ["--checkpoint", str(ckpt), "--data_root", str(fdf_shards), "--feature", "random",
            "--cache_dir", str(tmp_path / "cache"), "--batch_size", "8"]
    first = evaluate.main(args + ["--output", str(tmp_path / "fid.json")])
    saved = json.loads((tmp_path / "fid.json").read_text())
    assert saved["fid"] == first["fid"] > 0 and saved["num_images"] == 16 and saved["resolution"] == 32
    assert saved["images_shown"] == 96 and saved["run_id"] == torch.load(ckpt, weights_only=True)["mlflow_run_id"]
    assert len(list((tmp_path / "cache" / "all").glob("fid_real_*.pt"))) == 1
    second = evaluate.main(args + ["--output", str(tmp_path / "fid2.json")])  # real statistics from the cache
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-6)
    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_run}/mlflow.db")
    history = client.get_metric_history(saved["run_id"], "eval/fid_random")
    assert [(m.step, m.value) for m in history][-1] == (96, pytest.approx(first["fid"]))
    assert "eval/fid.json" in [a.path for a in client.list_artifacts(saved["run_id"], "eval")]


def test_fid_curve_over_the_run_checkpoints(tiny_run, fdf_shards, tmp_path):
    png = tmp_path / "curve.png"
    result = plots.main(["--run_dir", str(tiny_run), "--evaluate", "true", "--data_root", str(fdf_shards),
                         "--feature", "random", "--cache_dir", str(tmp_path / "cache"), "--output", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    kimg = [x for x, _ in result["series"]["eval/fid_random"]]
    assert kimg == pytest.approx([n / 1000 for n in SNAPSHOT_IMAGES])
    assert [name for _, name in result["phases"]][:3] == ["stabilize8", "fade16", "stabilize16"]
    assert len(list((tiny_run / "eval").glob("fid_random_img??????????.json"))) == len(SNAPSHOT_IMAGES)


def test_identity_metric_needs_an_embedder(monkeypatch, tmp_path):
    monkeypatch.delenv(identity.EMBEDDER_ENV, raising=False)
    with pytest.raises(MissingAssetError, match=f"--embedder.*{identity.EMBEDDER_ENV}"):
        identity.main(["--images", str(PHOTOS), "--threshold", "0.5", "--method", "blackout"])


def test_identity_distances_with_a_torchscript_embedder(monkeypatch, tmp_path):
    model = tmp_path / "embedder.pt"  # a stand-in embedding: the face at 8x8 pixels, as a TorchScript file
    torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(8), torch.nn.Flatten())).save(str(model))
    monkeypatch.setenv(identity.EMBEDDER_ENV, str(model))
    embedder = identity.load_embedder()
    image = cv2.cvtColor(cv2.imread(str(PHOTOS / "dlib__examples_faces_2008_001009.jpg")), cv2.COLOR_BGR2RGB)
    boxes = np.array([[150.0, 100, 226, 176]])
    same = identity.embed(embedder, identity.face_crops(image, boxes, 64, 0.2), 127.5, 127.5)
    assert identity.cosine_distances(same, same) == pytest.approx([0], abs=1e-6)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes((PHOTOS / "dlib__examples_faces_2008_001009.jpg").read_bytes())
    result = identity.main(["--images", str(photos), "--method", "blackout", "--threshold", "0.01",
                            "--input_size", "64", "--output", str(tmp_path / "id.json"), "--progress", "false"])
    assert result["faces"] >= 2 and result["distance_mean"] > 0.01
    assert result["deidentification_rate"] == 1.0 and result["embedder"] == str(model)
    assert json.loads((tmp_path / "id.json").read_text()) == result
