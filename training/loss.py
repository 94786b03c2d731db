"""WGAN-GP with the ε drift penalty (Gulrajani et al. 2017; Karras et al. 2018), as in the paper."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class LossConfig:
    """WGAN-GP with drift (the paper's loss).

    Args:
        gp_lambda: weight of the two-sided gradient penalty (‖∇D(x̂)‖ − 1)²
        epsilon_drift: weight of D(real)², keeps the critic's output near 0
    """

    gp_lambda: float = 10.0
    epsilon_drift: float = 0.001


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                     fake: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(‖∇ₓ D(x̂)‖₂ − 1)² per sample at x̂ = lerp(fake, real, u), u ~ U(0, 1) per sample.

    `critic` closes over the condition, mask and keypoints: only the image is interpolated. The
    inner gradient is taken unscaled (its entries are O(1/√pixels), far from fp16 underflow), and
    with `create_graph` so the penalty trains the critic.
    """
    u = torch.rand(real.shape[0], 1, 1, 1, device=real.device, generator=generator)
    x_hat = torch.lerp(fake.detach().float(), real.float(), u).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.float().flatten(1).norm(2, dim=1) - 1).square()


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor, gp: torch.Tensor,
                       cfg: LossConfig) -> dict[str, torch.Tensor]:
    d_real, d_fake = d_real.float(), d_fake.float()
    terms = {
        "wasserstein": (d_real - d_fake).mean(),
        "gp": gp.mean(),
        "drift": d_real.square().mean(),
        "score_real": d_real.mean(),
        "score_fake": d_fake.mean(),
    }
    terms["d"] = -terms["wasserstein"] + cfg.gp_lambda * terms["gp"] + cfg.epsilon_drift * terms["drift"]
    return terms


def generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    return -d_fake.float().mean()
