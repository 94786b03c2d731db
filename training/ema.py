"""Exponential moving average of the generator's weights, used for all sampling and evaluation."""
from __future__ import annotations

import torch
from torch import nn


def ema_beta(batch_size: int, half_life_kimg: float = 10.0) -> float:
    """β = 0.5^(batch / half-life): the average forgets half its value every `half_life_kimg` images."""
    return 0.5 ** (batch_size / (half_life_kimg * 1000))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema ← β·ema + (1 − β)·model, parameter by parameter (the networks hold no buffers)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - beta)
