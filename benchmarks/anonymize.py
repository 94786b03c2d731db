"""Throughput of `anonymize` on CPU: photos/s, video frames/s, and where the time goes; one JSON object.

Photos: the first `--images` photos of the shared corpus (by name). Video: `--frames` frames of a
corpus photo panned across a 1280x720 window, written with OpenCV, anonymized through the streaming
ffmpeg path. The generator is the paper's 12M model (S=256, 128x128) with random weights unless
`--checkpoint` is given: speed does not depend on the weights. One warm-up photo is not timed.
`*_fraction` = share of wall time in detection, keypoints, generator calls, and the rest (crops,
JPEG round trip of the FDF sample, paste-back, decoding, encoding).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from fdf_core.assets import assets_dir
from eval.anonymize import anonymize_images
from eval.images import IMAGE_EXTS
from eval.anonymizer import Anonymizer, AnonymizerConfig, load_generator_at
from eval.video import VideoOptions, anonymize_video
from training.networks import Generator, GeneratorAt

VIDEO_PHOTO = "face_recognition__examples_obama-720p.jpg"


def _fractions(timings: dict[str, float], wall: float) -> dict[str, float]:
    parts = {k: timings.get(k, 0.0) for k in ("detection", "keypoints", "generation")}
    out = {f"{k}_fraction": round(v / wall, 4) for k, v in parts.items()}
    out["rest_fraction"] = round(1 - sum(parts.values()) / wall, 4)
    return out


def _pan_video(path: Path, frames: int) -> None:
    photo = cv2.imread(str(assets_dir() / "corpus" / "photos" / VIDEO_PHOTO))
    photo = cv2.resize(photo, (1400, 788)) if photo.shape[1] < 1400 else photo
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (1280, 720))
    for i in range(frames):
        x = round(i * (photo.shape[1] - 1280) / max(frames - 1, 1))
        writer.write(np.ascontiguousarray(photo[:720, x:x + 1280]))
    writer.release()


def photo_throughput(anonymizer: Anonymizer, photos: list[Path], tmp: Path) -> dict:
    """photos/s of `anonymize_images` over `photos`, after one untimed warm-up photo."""
    anonymize_images(anonymizer, [(photos[0], tmp / "warmup.jpg")], progress=False)
    anonymizer.timings.clear()
    start = time.perf_counter()
    stats = anonymize_images(anonymizer, [(p, tmp / "photos" / p.name) for p in photos], progress=False)
    wall = time.perf_counter() - start
    return {"images": stats["images"], "faces": stats["faces"], "wall_seconds": round(wall, 2),
            "images_per_s": round(stats["images"] / wall, 3),
            "faces_per_s": round(stats["faces"] / wall, 3), **_fractions(anonymizer.timings, wall)}


def video_throughput(anonymizer: Anonymizer, frames: int, tmp: Path) -> dict:
    """frames/s of `anonymize_video` on a `frames`-frame 1280x720 pan over a corpus photo."""
    _pan_video(tmp / "pan.mp4", frames)
    anonymizer.timings.clear()
    start = time.perf_counter()
    video = anonymize_video(anonymizer, tmp / "pan.mp4", tmp / "pan_anon.mp4", VideoOptions(), progress=False)
    wall = time.perf_counter() - start
    return {"frames": video["frames"], "size": "1280x720", "faces": video["faces"],
            "wall_seconds": round(wall, 2), "frames_per_s": round(video["frames"] / wall, 3),
            **_fractions(anonymizer.timings, wall)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        generator = load_generator_at(args.checkpoint)
    else:
        generator = GeneratorAt(Generator(256, 128).eval().requires_grad_(False), 128)
    cfg = AnonymizerConfig(batch_size=args.batch_size)
    photos = sorted(p for p in (assets_dir() / "corpus" / "photos").iterdir() if p.suffix.lower() in IMAGE_EXTS)
    photos = photos[:args.images]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        anonymizer = Anonymizer(cfg, generator=generator)
        photo_result = photo_throughput(anonymizer, photos, tmp)
        video_result = video_throughput(anonymizer, args.frames, tmp)
    print(json.dumps({"device": "cpu", "threads": args.threads,
                      "generator": args.checkpoint or "paper 12M (S=256, 128x128), random weights",
                      "photos": photo_result, "video": video_result}))


if __name__ == "__main__":
    main()
