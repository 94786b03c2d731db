"""One FDF sample (FORMAT.md §2) decoded into tensors: the one decoder of training, evaluation and
the anonymizer. Kept apart from `training.datamodule` so that what only paints faces (`anonymize`,
the video path) does not import PyTorch Lightning: that import is most of `anonymize`'s start-up.
"""
from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image

from fdf_core.keypoints import KEYPOINT_NAMES


def decode_sample(shard: str, key: str, members: dict[str, bytes],
                  keypoint_threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 image (3,S,S), box (4,), keypoints (K,2) with missing/low-score ones at (-1, -1))."""
    where = f"{shard}: sample {key!r}"
    for ext in ("jpg", "json"):
        if ext not in members:
            raise ValueError(f"{where} has no .{ext} member (FORMAT.md §2)")
    try:
        meta = json.loads(members["json"])
        bbox, points, names = meta["bbox"], meta["keypoints"], meta["keypoint_names"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{where}.json: {type(e).__name__}: {e}") from None
    if list(names) != list(KEYPOINT_NAMES):
        raise ValueError(f"{where}.json: keypoint_names {names} != expected {list(KEYPOINT_NAMES)}")
    image = np.asarray(Image.open(io.BytesIO(members["jpg"])).convert("RGB"))
    if image.shape[0] != image.shape[1]:
        raise ValueError(f"{where}.jpg is {image.shape[1]}x{image.shape[0]}, expected a square crop")
    kp = torch.tensor(points, dtype=torch.float32).reshape(len(names), -1)
    xy = kp[:, :2].clone()
    if kp.shape[1] > 2:
        xy[kp[:, 2] < keypoint_threshold] = -1
    return torch.from_numpy(image.copy()).permute(2, 0, 1), torch.tensor(bbox, dtype=torch.float32), xy
