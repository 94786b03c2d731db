"""Does the generator paint a training person back? Nearest training face by dlib embedding.

An anonymizer must never put a real person's face into someone else's photo; a GAN trained on a few
thousand faces could reproduce training faces. The check (no DeepPrivacy anchor reports one): every
training face of the FDF shards is embedded with dlib's ResNet (the recognizer of `eval.identity`),
then for each held-out face, painted by the generator, the distance to its nearest training face.
The share of painted faces closer than dlib's same-person threshold (0.6) is compared with the same
share for the held-out real faces themselves: real people who are not in the training set, so their
share is the chance rate of "looks like someone in the training set" for this recognizer and data.
A generator that copies training identities scores above it.

Faces are embedded at the size the stored FDF crop holds them (128x128 crops, the box about 75 px
wide: dlib is 98% accurate on LFW at 64 px, `../shared/assets/README.md`), aligned by dlib's
5-point model inside the FDF box; painted faces are upsampled to the stored size first. The held-out
split is held out by photo, so a person photographed twice in the source set may sit on both sides;
that raises the real faces' share (the chance rate), never the painted faces'.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eval.identity import DLIB_THRESHOLD, DlibFaces
from fdf_core.fid import content_digest, to_uint8
from fdf_core.tario import atomic_path
from training.conditioning import prepare
from training.datamodule import FDFDataModule
from training.fid import drawn_latents
from training.networks import GeneratorAt


def _pixel_boxes(bbox: torch.Tensor, size: int) -> np.ndarray:
    return (bbox.double().numpy() * size).reshape(-1, 4)


def embed_batch(faces: DlibFaces, images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(B, 128) embeddings of (B, S, S, 3) uint8 crops, each at its box."""
    return np.stack([faces.embed(im, box) for im, box in zip(images, boxes)])


def training_embeddings(faces: DlibFaces, data: FDFDataModule, cache_dir: str | Path | None,
                        batch_size: int = 64) -> np.ndarray:
    """Embeddings of every training face (cached by the shards' names and bytes: a few minutes to make)."""
    # content, not just names: two builds may share shard names and padded sizes
    key = hashlib.sha256(json.dumps([Path(s).name + ":" + content_digest(s) for s in data.train_shards]).encode())
    cache = Path(cache_dir) / f"dlib_train_{key.hexdigest()[:16]}.npy" if cache_dir else None
    if cache is not None and cache.is_file():
        return np.load(cache)
    out = []
    for b in data.iter_split("train", batch_size):
        images = b["images"].permute(0, 2, 3, 1).numpy()
        out.append(embed_batch(faces, images, _pixel_boxes(b["bbox"], images.shape[1])))
    emb = np.concatenate(out)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, emb)
    return emb


def nearest_distances(queries: np.ndarray, references: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Distance of each query embedding to its nearest reference embedding."""
    return np.concatenate([np.linalg.norm(queries[i:i + chunk, None] - references[None], axis=-1).min(axis=1)
                           for i in range(0, len(queries), chunk)])


@torch.inference_mode()
def held_out_embeddings(faces: DlibFaces, generator: GeneratorAt, data: FDFDataModule, num_images: int,
                        batch_size: int = 50, latent: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(painted, real) embeddings of the first `num_images` held-out faces: the generator's face
    (z = latent x N(0, 1) drawn in order from `seed`, as training.fid.generator_fid draws it; 0: z = 0;
    upsampled to the stored size) and the real one, each at the FDF box."""
    painted, real = [], []
    draws = torch.Generator().manual_seed(seed)
    for b in data.iter_val(batch_size, num_images):
        size = b["images"].shape[-1]
        p = prepare(b["images"], b["bbox"], b["keypoints"], generator.resolution, generator.alpha)
        z = drawn_latents(generator, len(p.condition), latent, draws)
        fake = F.interpolate(generator(p.condition, p.mask, p.keypoints, z), size=(size, size), mode="bilinear",
                             align_corners=False)
        boxes = _pixel_boxes(b["bbox"], size)
        painted.append(embed_batch(faces, to_uint8(fake).permute(0, 2, 3, 1).numpy(), boxes))
        real.append(embed_batch(faces, b["images"].permute(0, 2, 3, 1).numpy(), boxes))
    return np.concatenate(painted), np.concatenate(real)


def memorization(generator: GeneratorAt, data: FDFDataModule, num_images: int = 1000,
                 cache_dir: str | Path | None = None, threshold: float = DLIB_THRESHOLD,
                 dlib_models: str | None = None, latent: float = 0.0) -> dict:
    """Share of painted vs real held-out faces whose nearest training face is within `threshold`;
    faces painted with z = `latent` x N(0, 1) (0: z = 0)."""
    faces = DlibFaces(dlib_models)
    train = training_embeddings(faces, data, cache_dir)
    painted, real = held_out_embeddings(faces, generator, data, num_images, latent=latent)
    d_painted, d_real = nearest_distances(painted, train), nearest_distances(real, train)
    return {"training_faces": len(train), "held_out_faces": len(real), "threshold": threshold, "latent": latent,
            "painted_matching_a_training_face": float((d_painted < threshold).mean()),
            "real_held_out_matching_a_training_face": float((d_real < threshold).mean()),
            "painted_nearest_distance_median": float(np.median(d_painted)),
            "real_nearest_distance_median": float(np.median(d_real)),
            "by_threshold": by_threshold(d_painted, d_real)}


# Stricter than dlib's 0.6, where chance is already ~99 % among thousands of training faces: 0.536 is
# the distance at which dlib accepts 1 in 1,000 different-person pairs of 64 px faces
# (eval.video_metrics.IDENTITY_THRESHOLDS), the size the faces are embedded at here.
STRICTER = (0.4, 0.45, 0.5, 0.536, 0.6)


def by_threshold(d_painted: np.ndarray, d_real: np.ndarray, thresholds: tuple[float, ...] = STRICTER) -> dict:
    """Per threshold, the share of painted and of real held-out faces with a training face that close:
    memorization shows as a painted share above the real one, most clearly where chance is low."""
    return {f"{t:g}": {"painted": round(float((d_painted < t).mean()), 4), "real": round(float((d_real < t).mean()), 4)}
            for t in thresholds}
