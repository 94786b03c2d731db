"""FID of a generator on the FDF validation faces: one function for training and `fdf-eval`.

The paper's protocol (docs/reference.md): the EMA generator with z = 0 on the conditions of the
validation faces (box blanked, keypoints), against those faces, at the resolution (and fade-in
alpha) the generator is at: during a fade-in the conditions and the real faces are faded with the
generator's alpha, as in training, the sample grids and the anonymizer. The first `num_images`
validation faces in file order are used, so every evaluation of a run sees the same faces, and their
statistics are cached per (data content, resolution, alpha, feature network, num_images). Under DDP
every rank embeds every `world_size`-th batch and the statistics are summed (torchmetrics), so the
value does not depend on the number of ranks.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from fdf_core.errors import NothingToDoError
from fdf_core.fid import compute_fid
from training.conditioning import prepare
from training.datamodule import FDFDataModule
from training.networks import GeneratorAt


@dataclass
class ValConditions:
    """Validation batches as `compute_fid` wants them: the real image in [-1, 1] and its condition
    at `resolution`, faded with `alpha` during a fade-in (as training prepares them); this rank's
    share of them."""

    data: FDFDataModule
    batch_size: int
    num_images: int | None
    resolution: int
    device: torch.device
    rank: int = 0
    world_size: int = 1
    alpha: float = 1.0

    def __iter__(self) -> Iterator[dict]:
        batches = self.data.iter_val(self.batch_size, self.num_images)
        for b in itertools.islice(batches, self.rank, None, self.world_size):
            p = prepare(b["images"].to(self.device), b["bbox"].to(self.device), b["keypoints"].to(self.device),
                        self.resolution, self.alpha)
            yield {"img": p.real, "condition": p.condition, "mask": p.mask, "keypoints": p.keypoints}


def validation_count(data: FDFDataModule, num_images: int | None) -> int:
    """Faces the FID uses: `num_images` of the val split (all when None); an error if there are none."""
    total = sum(data.val_sizes)
    if not total:
        raise NothingToDoError(f"no validation faces under {Path(data.root) / 'val'}: the FID is defined on the "
                               "val split (build with a val_fraction > 0)")
    return min(num_images or total, total)


def drawn_latents(generator: GeneratorAt, count: int, latent: float, draws: torch.Generator) -> torch.Tensor | None:
    """z = latent x N(0, 1) for the next `count` faces, drawn in order from `draws`; None for z = 0
    (`latent` 0). Every held-out figure with a drawn latent (FID, eval.memorization) draws it so."""
    if not latent:
        return None
    return latent * torch.randn(generator.generator.z_shape(count), generator=draws)


@torch.inference_mode()
def generator_fid(generator: GeneratorAt, data: FDFDataModule, num_images: int | None = 1000,
                  batch_size: int = 50, feature: str | nn.Module = "inception",
                  cache_dir: str | Path | None = None, inception_weights: str | None = None,
                  device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                  latent: float = 0.0, seed: int = 0) -> float:
    """FID (or, with a module as `feature`, the Fréchet distance in its features) of `generator`, at
    its resolution and fade-in alpha (`GeneratorAt.alpha`: conditions and reals are faded with it).
    `latent`: z = latent x N(0, 1) per face, drawn in order from `seed` (0: z = 0, the paper's
    protocol), as `anonymize --latent` paints."""
    count = validation_count(data, num_images)
    batches = ValConditions(data, batch_size, count, generator.resolution, torch.device(device),
                            rank, world_size, generator.alpha)
    draws = torch.Generator().manual_seed(seed + rank)

    def generate(b: dict) -> torch.Tensor:
        z = drawn_latents(generator, b["condition"].shape[0], latent, draws)
        return generator(b["condition"], b["mask"], b["keypoints"], None if z is None else z.to(b["condition"].device))

    return compute_fid(generate, batches, feature,
                       cache_dir, data.val_shards, inception_weights, device, num_images=count,
                       alpha=generator.alpha)
