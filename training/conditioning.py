"""From stored FDF crops to what the networks see, on the device.

The loader ships the stored crops (uint8, e.g. 128x128) with their box and keypoints; here they
are average-pooled to the training resolution (the same 2x2 mean pooling FDF used for its smaller
sizes), faded during a fade-in, optionally mirrored, and the face box is blanked. A pixel that
overlaps the box at all is blanked, so no face pixel reaches the generator at any resolution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fdf_core.keypoints import flip_permutation
from training.layers import downsample, upsample

@dataclass
class Prepared:
    real: torch.Tensor       # (B,3,r,r) in [-1, 1]
    condition: torch.Tensor  # real with the box pixels set to 0 (mid-grey)
    mask: torch.Tensor       # (B,1,r,r): 1 = background (kept), 0 = box (generated)
    keypoints: torch.Tensor  # (B,K,2) normalized, (-1, -1) = missing


def box_mask(bbox: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B,1,r,r) mask, 0 on every pixel that overlaps the normalized box [x0, y0, x1, y1]."""
    lo = (bbox[:, :2] * resolution).floor()
    hi = (bbox[:, 2:] * resolution).ceil()
    grid = torch.arange(resolution, device=bbox.device, dtype=bbox.dtype)
    inside_x = (grid >= lo[:, 0:1]) & (grid < hi[:, 0:1])  # (B, r)
    inside_y = (grid >= lo[:, 1:2]) & (grid < hi[:, 1:2])
    inside = inside_y[:, :, None] & inside_x[:, None, :]
    return (~inside).unsqueeze(1).to(torch.float32)


def hflip(images: torch.Tensor, bbox: torch.Tensor, keypoints: torch.Tensor, flip: torch.Tensor,
          permutation: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mirror the samples where `flip` is True: image, box x, keypoint x and left/right channels."""
    f = flip.view(-1, 1, 1, 1)
    images = torch.where(f, images.flip(-1), images)
    fb = torch.stack([1 - bbox[:, 2], bbox[:, 1], 1 - bbox[:, 0], bbox[:, 3]], dim=1)
    bbox = torch.where(flip.view(-1, 1), fb, bbox)
    valid = ((keypoints >= 0) & (keypoints <= 1)).all(dim=-1, keepdim=True)
    mirrored = torch.where(valid, torch.stack([1 - keypoints[..., 0], keypoints[..., 1]], dim=-1), keypoints)
    mirrored = mirrored[:, list(permutation)]
    keypoints = torch.where(flip.view(-1, 1, 1), mirrored, keypoints)
    return images, bbox, keypoints


def prepare(images: torch.Tensor, bbox: torch.Tensor, keypoints: torch.Tensor, resolution: int,
            alpha: float = 1.0, flip: torch.Tensor | None = None,
            permutation: Sequence[int] | None = None) -> Prepared:
    """uint8 crops (B,3,S,S) + boxes (B,4) + keypoints (B,K,2) → the inputs at `resolution`.

    During a fade-in (alpha < 1) the real image is the lerp between its 2x-pooled-and-upsampled
    version and itself, matching the generator's blended output.
    """
    stored = images.shape[-1]
    if stored % resolution or stored < resolution:
        raise ValueError(f"stored crops are {stored}x{stored}: cannot train at {resolution}x{resolution}")
    real = downsample(images.float() / 127.5 - 1, stored // resolution)
    if alpha < 1:
        real = torch.lerp(upsample(downsample(real, 2)), real, alpha)
    bbox, keypoints = bbox.float(), keypoints.float()
    if flip is not None:
        real, bbox, keypoints = hflip(real, bbox, keypoints, flip,
                                      permutation or flip_permutation())
    mask = box_mask(bbox, resolution)
    return Prepared(real, real * mask, mask, keypoints)
