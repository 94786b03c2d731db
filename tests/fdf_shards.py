"""FDF webdataset shards (FORMAT.md §2) made from the real corpus photos, for the training tests.

Stand-in for `fdf_builder.build.run(...)` output until the tests switch to built shards: square
crops of real photos resized to the crop resolution, with a face box and 7 keypoints placed where
an FDF crop has them (box = the central 1/1.7 of the crop, keypoints at their usual places in it),
jittered per sample. Written with `AtomicTarWriter`, with `sizes.json` and `index.json` beside.
Registered for every test module by `pytest_plugins` in conftest.py.
"""
from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import pytest
from PIL import Image

from data_prep.sample import read_manifest
from fdf_core.keypoints import KEYPOINT_NAMES as _NAMES
from fdf_core.tario import AtomicTarWriter, atomic_write_json, json_bytes

KEYPOINT_NAMES = list(_NAMES)
# Keypoints in box coordinates (0..1 across the face box); the subject's left is the image's right.
_FACE_LAYOUT = [(0.50, 0.58), (0.68, 0.40), (0.32, 0.40), (0.95, 0.50), (0.05, 0.50), (1.25, 1.45), (-0.25, 1.45)]


def _photos(corpus: Path) -> tuple[list[Path], dict[str, dict]]:
    """The corpus photos in name order and their manifest rows."""
    rows = [r for r in read_manifest(corpus) if r["file"].lower().endswith((".jpg", ".jpeg", ".png"))]
    return [corpus / r["file"] for r in sorted(rows, key=lambda r: r["file"])], {r["file"]: r for r in rows}


def _sample(photo: Image.Image, rng: random.Random, resolution: int) -> tuple[bytes, list, list]:
    w, h = photo.size
    side = int(min(w, h) * rng.uniform(0.6, 1.0))
    x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    crop = photo.crop((x0, y0, x0 + side, y0 + side)).resize((resolution, resolution), Image.Resampling.BOX)
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=95)
    face = rng.uniform(0.5, 0.65)
    cx, cy = 0.5 + rng.uniform(-0.04, 0.04), 0.5 + rng.uniform(-0.04, 0.04)
    box = [cx - face / 2, cy - face / 2, cx + face / 2, cy + face / 2]
    keypoints = []
    for kx, ky in _FACE_LAYOUT:
        x = box[0] + (kx + rng.uniform(-0.04, 0.04)) * face
        y = box[1] + (ky + rng.uniform(-0.04, 0.04)) * face
        keypoints.append([round(x, 5), round(y, 5), round(rng.uniform(0.3, 1.0), 3)])
    return buf.getvalue(), [round(v, 5) for v in box], keypoints


def write_fdf_shards(out: str | Path, corpus: str | Path, resolution: int = 32, n_train: int = 96,
                     n_val: int = 16, per_shard: int = 12, seed: int = 0) -> Path:
    """`out/train/*.tar`, `out/val/*.tar`, `out/sizes.json`, `out/index.json`; returns `out`."""
    out, corpus = Path(out), Path(corpus)
    photos, manifest = _photos(corpus)
    rng = random.Random(seed)
    opened = []
    for p in photos:
        img = Image.open(p).convert("RGB")
        img.thumbnail((4 * resolution, 4 * resolution), Image.Resampling.BOX)  # keep the fixture fast
        opened.append(img)
    sizes: dict[str, int] = {}
    for split, count in (("train", n_train), ("val", n_val)):
        for shard in range(-(-count // per_shard)):
            name = f"{split}/{shard:05d}.tar"
            with AtomicTarWriter(out / name) as tar:
                for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                    index = i if split == "train" else n_train + i
                    p = index % len(photos)
                    jpg, box, kps = _sample(opened[p], rng, resolution)
                    row = manifest[str(photos[p].relative_to(corpus))]
                    photo_key = f"{shard:05d}{i % per_shard:04d}"
                    key = f"{photo_key}_{index // len(photos):02d}"
                    meta = {
                        "key": key, "photo_key": photo_key,
                        "photo_id": hashlib.sha1(row["file"].encode()).hexdigest()[:12],
                        "line_index": p, "face_index": index // len(photos), "resolution": resolution,
                        "bbox": box, "keypoints": kps, "keypoint_names": KEYPOINT_NAMES,
                        "keypoint_backend": "fixture", "detector": "fixture", "detector_score": 1.0,
                        "orig_bbox": box, "orig_keypoints": kps, "crop_box": [0, 0, 1, 1],
                        "license_name": row["license"], "license_url": "", "author": row["repo"].split("/")[0],
                        "user_nsid": "", "photo_url": row["path"], "page_url": f"https://github.com/{row['repo']}",
                    }
                    tar.add_sample(key, {"jpg": jpg, "json": json_bytes(meta)})
            sizes[name] = tar.count // 2
    atomic_write_json(out / "sizes.json", sizes)
    atomic_write_json(out / "index.json", {"train": n_train, "val": n_val, "keypoint_names": KEYPOINT_NAMES})
    return out


@pytest.fixture(scope="session")
def fdf_shards(tmp_path_factory, assets) -> Path:
    """96 train / 16 val faces at 32x32 in 12-sample shards."""
    return write_fdf_shards(tmp_path_factory.mktemp("fdf"), assets / "corpus", resolution=32)


@pytest.fixture(scope="session")
def fdf_beton(fdf_shards, ffcv_extra, tmp_path_factory) -> Path:
    """A copy of `fdf_shards` with `train.beton` (fdf-build --ffcv true's export) beside the tars."""
    import shutil
    from fdf_builder.ffcv_export import export_ffcv
    out = tmp_path_factory.mktemp("fdf_beton") / "fdf"
    shutil.copytree(fdf_shards, out)
    export_ffcv(out, "train", num_workers=1)
    return out
