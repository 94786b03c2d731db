"""The building blocks of DeepPrivacy's networks (Hukkelås et al. 2019, after Karras et al. 2018).

Every convolution uses the equalized learning rate: weights are drawn from N(0, 1) and scaled by
gain/sqrt(fan_in) at run time, so Adam's per-parameter step sizes are the same for every layer.
"""
from __future__ import annotations

import functools
import math
import os
import shutil

import torch
import torch.nn.functional as F
from torch import nn

from fdf_core.errors import ConfigError

GAIN = math.sqrt(2.0)


class EqualizedConv2d(nn.Module):
    """Conv2d with run-time He scaling; zero-padded "same" output unless `padding=0`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = GAIN / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = kernel_size // 2 if padding is None else padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel_size={k}, padding={self.padding}"


class EqualizedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = GAIN / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class PixelNorm(nn.Module):
    """Normalize each pixel's feature vector to unit RMS; computed in fp32 (it overflows in fp16),
    except a bf16 tensor at inference (no autograd; bf16 has fp32's range): the round trip through
    fp32 was a fifth of the 64x64 generator's time a face on this CPU, and training keeps fp32.

    `fused` (set by `fuse_pixel_norm`): the same fp32 arithmetic as one compiled kernel. Why: in
    eager mode every step of it is a pass over the features (cast up, square, mean, multiply, cast
    down, and as many backward), and at 128x128 with 16-32 channels those passes cost more than the
    convolutions: a bf16 training step of the CPU configs ran 1.3x as fast with it (docs/learning.md).
    """

    fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            # the norm is one reduction (squares summed in fp32 inside it) where square-then-mean
            # is two passes; the 64x64 generator took 4.9 against 6.5 ms a face on a CPU without AMX,
            # FID on 1,000 held-out faces 16.09 against 16.07 (fp32: 16.13; benchmarks/learning.py fid_table)
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            return x * torch.rsqrt(norm.square() / x.shape[1] + 1e-8)
        return _compiled_pixel_norm()(x) if self.fused else pixel_norm_fp32(x)


def pixel_norm_fp32(x: torch.Tensor) -> torch.Tensor:
    """`PixelNorm` in fp32 whatever the autocast, returned in `x`'s dtype."""
    with torch.autocast(x.device.type, enabled=False):
        y = x.float()
        y = y * torch.rsqrt(y.square().mean(dim=1, keepdim=True) + 1e-8)
    return y.to(x.dtype)


@functools.cache
def _compiled_pixel_norm():
    """`pixel_norm_fp32` through torch.compile (inductor), for any shape (compiled once per dtype)."""
    return torch.compile(pixel_norm_fp32, dynamic=True)


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would build with ($CXX, else g++, c++, clang++)."""
    found = (shutil.which(name) for name in (os.environ.get("CXX"), "g++", "c++", "clang++") if name)
    return next((path for path in found if path), None)


def fuse_pixel_norm(net: nn.Module, device: torch.device | str = "cpu") -> int:
    """Run every `PixelNorm` of `net` as one compiled kernel (`PixelNorm.fused`); the count of them.
    On a CPU torch.compile builds C++ at run time: without a compiler, say so before training."""
    if torch.device(device).type == "cpu" and cpp_compiler() is None:
        raise ConfigError("model.compile_pixel_norm true needs a C++ compiler on a CPU (torch.compile builds "
                          "its kernel with it): install g++ (apt-get install g++) or set $CXX, or set it false")
    norms = [m for m in net.modules() if isinstance(m, PixelNorm)]
    for m in norms:
        m.fused = True
    return len(norms)


class ConvAct(nn.Sequential):
    """Equalized conv → LeakyReLU(0.2) → PixelNorm (generator) or no normalization (discriminator)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, pixel_norm: bool,
                 padding: int | None = None):
        layers: list[nn.Module] = [EqualizedConv2d(in_channels, out_channels, kernel_size, padding),
                                   nn.LeakyReLU(0.2)]
        if pixel_norm:
            layers.append(PixelNorm())
        super().__init__(*layers)


class MinibatchStd(nn.Module):
    """Append the mean per-feature standard deviation over groups of samples as one channel.

    Karras et al. 2018; lets the critic see sample diversity. `group_size` must divide the
    per-device batch (it is clipped to the batch when the batch is smaller).
    """

    def __init__(self, group_size: int):
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        if n % g:
            raise ValueError(f"minibatch-std group size {g} does not divide the batch of {n}")
        with torch.autocast(x.device.type, enabled=False):
            y = x.float().reshape(g, n // g, c, h, w)
            y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (n // g,)
            y = y.reshape(1, n // g, 1, 1, 1).expand(g, n // g, 1, h, w).reshape(n, 1, h, w)
        return torch.cat([x, y.to(x.dtype)], dim=1)


def pose_maps(keypoints: torch.Tensor, resolution: int, dtype: torch.dtype = torch.float32,
              channels_last: bool = False) -> torch.Tensor:
    """One-hot keypoint maps (B, K, r, r): pixel (floor(y·r), floor(x·r)) of channel k is 1.

    `keypoints` (B, K, 2) holds normalized crop coordinates; a keypoint outside [0, 1] (e.g. the
    (-1, -1) that marks a missing one) gives an empty map. x = 1 exactly falls in the last pixel.
    `channels_last`: laid out as the channels_last features they are concatenated with. Why: a
    concatenation of mixed layouts comes out NCHW, and the next convolution copies it back to
    NHWC; at 64x64 those two copies took a tenth of the bf16 generator's time a face. `like(x)`
    gives the arguments that match features `x`.
    """
    b, k, _ = keypoints.shape
    xy = keypoints[..., :2].float()
    valid = ((xy >= 0) & (xy <= 1)).all(dim=-1)
    ij = (xy * resolution).floor().long().clamp_(0, resolution - 1)
    index = ij[..., 1] * resolution + ij[..., 0]
    if channels_last:  # (B, r·r, K) memory viewed as (B, K, r, r): NHWC strides, no copy
        maps = torch.zeros(b, resolution * resolution, k, device=keypoints.device, dtype=dtype)
        maps.scatter_(1, index.unsqueeze(1), valid.unsqueeze(1).to(dtype))
        return maps.view(b, resolution, resolution, k).permute(0, 3, 1, 2)
    maps = torch.zeros(b, k, resolution * resolution, device=keypoints.device, dtype=dtype)
    maps.scatter_(2, index.unsqueeze(-1), valid.unsqueeze(-1).to(dtype))
    return maps.view(b, k, resolution, resolution)


def like(maps_of: torch.Tensor) -> dict:
    """`pose_maps` keyword arguments for maps concatenated with the features `maps_of` (dtype, layout)."""
    return {"dtype": maps_of.dtype, "channels_last": maps_of.dim() == 4 and maps_of.shape[1] > 1
            and maps_of.is_contiguous(memory_format=torch.channels_last) and not maps_of.is_contiguous()}


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    return x if factor == 1 else F.avg_pool2d(x, factor)


def upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")
