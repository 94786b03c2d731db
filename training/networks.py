"""DeepPrivacy's pose-conditioned U-Net generator and background-conditioned discriminators.

All blocks up to the target resolution are built at construction; a forward pass at resolution R
(taken from the input size) uses the blocks up to R, and while R fades in (alpha < 1) also the
R/2 from-RGB / to-RGB path, blended with alpha as in progressive growing (Karras et al. 2018).
Building everything up front keeps the parameter set fixed, which is what DDP, optimizers and
checkpoints need; the parameters of blocks not yet reached receive no gradient and do not move.

Widths follow the paper code (hukkelas/DeepPrivacy 2019): S at 4-32, S/2 at 64, S/4 at 128, S/8
at 256 (multiples of 8); S=256 is the "12M" model, S=512 the "46M" one. `python -m
training.networks` prints the parameter counts of both against the published ones.
"""
from __future__ import annotations

import math
from copy import deepcopy
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn

from fdf_core.errors import ConfigError
from fdf_core import precision as inference_precision
from training.layers import (ConvAct, EqualizedConv2d, EqualizedLinear, MinibatchStd, downsample,
                             like, pose_maps, upsample)
from training.schedule import Schedule

IMAGE_CHANNELS = 3
MASK_CHANNELS = 1


def _round8(width: int) -> int:
    return width // 8 * 8 if width >= 8 else width


def level_width(base: int, resolution: int) -> int:
    """Width at `resolution`: `base` up to 32x32, halved at every doubling above."""
    return _round8(base // max(1, resolution // 32))


def _resolutions(low: int, high: int) -> list[int]:
    return [2 ** i for i in range(int(math.log2(low)), int(math.log2(high)) + 1)]


def _check_power_of_two(name: str, value: int, low: int = 4) -> None:
    if value < low or value & (value - 1):
        raise ConfigError(f"{name} must be a power of two >= {low}, got {value}")


class _Progressive(nn.Module):
    """Resolution bookkeeping shared by G and D."""

    min_resolution: int
    max_resolution: int

    def _setup_resolutions(self, min_resolution: int, max_resolution: int) -> None:
        _check_power_of_two("min_resolution", min_resolution)
        _check_power_of_two("max_resolution", max_resolution)
        if min_resolution > max_resolution:
            raise ConfigError(f"min_resolution {min_resolution} > max_resolution {max_resolution}")
        self.min_resolution, self.max_resolution = min_resolution, max_resolution

    def _check_input(self, resolution: int, alpha: float) -> None:
        if resolution not in _resolutions(self.min_resolution, self.max_resolution):
            raise ValueError(f"{type(self).__name__}: input resolution {resolution} is not a power of two "
                             f"in [{self.min_resolution}, {self.max_resolution}]")
        if alpha < 1 and resolution == self.min_resolution:
            raise ValueError(f"cannot fade in the first resolution {resolution} (alpha={alpha})")

    def parameters_at(self, resolution: int) -> Iterator[nn.Parameter]:
        """The parameters a forward pass at `resolution` touches, including the fade-in path."""
        for name, p in self.named_parameters():
            group, level = name.split(".")[:2]
            if group in ("from_rgb", "to_rgb"):
                if int(level) in (resolution, resolution // 2):
                    yield p
            elif group not in ("encoder", "decoder", "blocks") or int(level) <= resolution:
                yield p


class Generator(_Progressive):
    """Conditional U-Net: sees the crop with the face box blanked, the box mask and the keypoints.

    Encoder level r: 1x1 from-RGB (at the input level), two 3x3 convs, 2x2 average pool; skip kept.
    Bottleneck (4x4): two 3x3, then concat pose maps and z, 1x1 and two 3x3. Decoder level r:
    nearest x2, concat the skip and the pose maps of level r, 1x1 and two 3x3; linear 1x1 to RGB.
    Output = condition·mask + G·(1 - mask): the background is kept exactly, only the box is drawn.
    """

    def __init__(self, base_width: int = 256, max_resolution: int = 128, min_resolution: int = 8,
                 num_keypoints: int = 7, z_channels: int = 32):
        super().__init__()
        self._setup_resolutions(min_resolution, max_resolution)
        self.base_width, self.num_keypoints, self.z_channels = base_width, num_keypoints, z_channels
        w = lambda r: level_width(base_width, r)  # noqa: E731
        in_ch = IMAGE_CHANNELS + MASK_CHANNELS
        levels = _resolutions(8, max_resolution)
        self.from_rgb = nn.ModuleDict({str(r): ConvAct(in_ch, w(r), 1, pixel_norm=True)
                                       for r in _resolutions(min_resolution, max_resolution)})
        self.encoder = nn.ModuleDict({str(r): nn.Sequential(ConvAct(w(r), w(r // 2), 3, pixel_norm=True),
                                                            ConvAct(w(r // 2), w(r // 2), 3, pixel_norm=True))
                                      for r in levels})
        self.encoder["4"] = nn.Sequential(ConvAct(w(4), w(4), 3, pixel_norm=True),
                                          ConvAct(w(4), w(4), 3, pixel_norm=True))
        self.bottleneck = nn.Sequential(ConvAct(w(4) + num_keypoints + z_channels, w(4), 1, pixel_norm=True),
                                        ConvAct(w(4), w(4), 3, pixel_norm=True),
                                        ConvAct(w(4), w(4), 3, pixel_norm=True))
        self.decoder = nn.ModuleDict({
            str(r): nn.Sequential(ConvAct(2 * w(r // 2) + num_keypoints, w(r // 2), 1, pixel_norm=True),
                                  ConvAct(w(r // 2), w(r), 3, pixel_norm=True),
                                  ConvAct(w(r), w(r), 3, pixel_norm=True))
            for r in levels})
        self.to_rgb = nn.ModuleDict({str(r): EqualizedConv2d(w(r), IMAGE_CHANNELS, 1)
                                     for r in _resolutions(min_resolution, max_resolution)})

    def z_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        return (batch_size, self.z_channels, 4, 4)

    def forward(self, condition: torch.Tensor, mask: torch.Tensor, keypoints: torch.Tensor,
                z: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
        """condition (B,3,R,R) in [-1,1], box pixels 0; mask (B,1,R,R) 1 = keep; keypoints (B,K,2).

        `z` (B,32,4,4) ~ N(0,1) in training; None means z = 0, the evaluation setting of the paper.
        """
        res = condition.shape[-1]
        self._check_input(res, alpha)
        x_in = torch.cat([condition, mask.to(condition.dtype)], dim=1)
        x = self.from_rgb[str(res)](x_in)
        skips = {}
        r = res
        while r > 4:
            x = self.encoder[str(r)](x)
            skips[r] = x
            x = downsample(x, 2)
            if r == res and alpha < 1:
                x = torch.lerp(self.from_rgb[str(r // 2)](downsample(x_in, 2)).to(x.dtype), x, alpha)
            r //= 2
        x = self.encoder["4"](x)
        if z is None:
            z = torch.zeros(self.z_shape(x.shape[0]), device=x.device)
        x = self.bottleneck(torch.cat([x, pose_maps(keypoints, 4, **like(x)), z.to(x.dtype)], dim=1))
        old_rgb = None
        for r in _resolutions(8, res):
            if r == res and alpha < 1:
                old_rgb = upsample(self.to_rgb[str(r // 2)](x))
            x = upsample(x)
            x = self.decoder[str(r)](torch.cat([x, skips[r], pose_maps(keypoints, r, **like(x))], dim=1))
        rgb = self.to_rgb[str(res)](x)
        if old_rgb is not None:
            # CUDA autocast runs upsampling in fp32 (CPU autocast does not): blend in one dtype
            rgb = torch.lerp(old_rgb.to(rgb.dtype), rgb, alpha)
        return condition * mask + rgb.to(condition.dtype) * (1 - mask)


class _HalfResidual(nn.Module):
    """(x + f(x)) / 2, the residual block of the paper's deep discriminator."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.body(x)) / 2


class Discriminator(_Progressive):
    """Background-conditioned critic: input image ⊕ condition ⊕ mask; pose maps enter every level.

    `wide` (the paper's choice): widths S·√2, per level concat pose, two 3x3, average pool.
    `deep`: widths S, per level concat pose, 1x1, a residual block of four 3x3 (three at 4x4), 1x1,
    average pool (docs/reference.md, Model: the paper code's ablation; its counts match this layout).
    At 4x4: concat pose, minibatch-stddev (optional), conv, 4x4 valid conv, linear to one score.
    No normalization layers.
    """

    def __init__(self, base_width: int = 256, max_resolution: int = 128, min_resolution: int = 8,
                 num_keypoints: int = 7, variant: Literal["wide", "deep"] = "wide", mbstd_group_size: int = 4):
        super().__init__()
        self._setup_resolutions(min_resolution, max_resolution)
        if variant not in ("wide", "deep"):
            raise ConfigError(f"discriminator variant must be 'wide' or 'deep', got {variant!r}")
        self.variant, self.num_keypoints = variant, num_keypoints
        top = int(base_width * math.sqrt(2)) // 8 * 8 if variant == "wide" else base_width
        w = lambda r: level_width(top, r)  # noqa: E731
        k = num_keypoints
        in_ch = 2 * IMAGE_CHANNELS + MASK_CHANNELS
        self.from_rgb = nn.ModuleDict({str(r): ConvAct(in_ch, w(r), 1, pixel_norm=False)
                                       for r in _resolutions(min_resolution, max_resolution)})
        blocks = {}
        for r in _resolutions(8, max_resolution):
            if variant == "wide":
                blocks[str(r)] = nn.Sequential(ConvAct(w(r) + k, w(r), 3, pixel_norm=False),
                                               ConvAct(w(r), w(r // 2), 3, pixel_norm=False))
            else:
                blocks[str(r)] = nn.Sequential(
                    ConvAct(w(r) + k, w(r), 1, pixel_norm=False),
                    _HalfResidual(*[ConvAct(w(r), w(r), 3, pixel_norm=False) for _ in range(4)]),
                    ConvAct(w(r), w(r // 2), 1, pixel_norm=False))
        self.blocks = nn.ModuleDict(blocks)
        self.mbstd = MinibatchStd(mbstd_group_size) if mbstd_group_size > 0 else None
        c4 = w(4) + k + (1 if self.mbstd else 0)
        if variant == "wide":
            head = [ConvAct(c4, w(4), 3, pixel_norm=False)]
        else:
            head = [ConvAct(c4, w(4), 1, pixel_norm=False),
                    _HalfResidual(*[ConvAct(w(4), w(4), 3, pixel_norm=False) for _ in range(3)])]
        self.head = nn.Sequential(*head, ConvAct(w(4), w(4), 4, pixel_norm=False, padding=0))
        self.output = EqualizedLinear(w(4), 1)

    def forward(self, image: torch.Tensor, condition: torch.Tensor, mask: torch.Tensor,
                keypoints: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """One score per sample, shape (B,)."""
        res = image.shape[-1]
        self._check_input(res, alpha)
        x_in = torch.cat([image, condition.to(image.dtype), mask.to(image.dtype)], dim=1)
        x = self.from_rgb[str(res)](x_in)
        r = res
        while r > 4:
            x = self.blocks[str(r)](torch.cat([x, pose_maps(keypoints, r, **like(x))], dim=1))
            x = downsample(x, 2)
            if r == res and alpha < 1:
                x = torch.lerp(self.from_rgb[str(r // 2)](downsample(x_in, 2)).to(x.dtype), x, alpha)
            r //= 2
        x = torch.cat([x, pose_maps(keypoints, 4, **like(x))], dim=1)
        if self.mbstd is not None:
            x = self.mbstd(x)
        return self.output(self.head(x).flatten(1)).squeeze(1)


class GeneratorAt(nn.Module):
    """A generator pinned to one resolution and fade-in alpha: what evaluation hooks receive.

    `forward(condition, mask, keypoints, z=None)` at `resolution` (z = None: zeros, the paper's
    evaluation setting); `.resolution` tells the caller which input size to build. `.precision`
    ("fp32", "bf16" or "auto", fdf_core.precision) is the number format of the forward pass; the
    output is fp32 either way, so callers never see bf16.
    """

    def __init__(self, generator: Generator, resolution: int, alpha: float = 1.0, precision: str = "fp32"):
        super().__init__()
        self.generator, self.resolution, self.alpha, self.precision = generator, resolution, alpha, precision
        self._bf16: tuple[tuple, nn.Module] | None = None  # (weights' key, bf16 channels_last copy)

    def forward(self, condition: torch.Tensor, mask: torch.Tensor, keypoints: torch.Tensor,
                z: torch.Tensor | None = None) -> torch.Tensor:
        if inference_precision.resolve(self.precision, condition.device) == "bf16" and not torch.is_grad_enabled():
            # oneDNN's bf16 convolutions pay in NHWC: bf16 alone is no faster than fp32 on this CPU,
            # bf16 + channels_last about twice as fast (tests/test_precision.py; benchmarks/anonymize.py).
            # The weights are cast once (autocast casts weights that need no grad at every call) and
            # PixelNorm stays in bf16: 3.1 ms a face at 64x64, batch 16, instead of 4.3-5.0
            net = self._bf16_generator(condition.device)
            low = [t.to(torch.bfloat16).contiguous(memory_format=torch.channels_last) for t in (condition, mask)]
            out = net(*low, keypoints, None if z is None else z.to(torch.bfloat16), self.alpha).float()
            return (condition * mask + out * (1 - mask)).contiguous()  # the background exact, not bf16-rounded
        with inference_precision.autocast(self.precision, condition.device):
            out = self.generator(condition, mask, keypoints, z, self.alpha)
        return out.float().contiguous()

    def _bf16_generator(self, device: torch.device) -> nn.Module:
        """A bf16, channels_last copy of the generator, made again whenever its weights change in
        place (an EMA or optimizer step bumps each tensor's version) or move."""
        params = list(self.generator.parameters()) + list(self.generator.buffers())
        key = (device, tuple(_version(p) for p in params), tuple(p.data_ptr() for p in params))
        if self._bf16 is None or self._bf16[0] != key:
            copy = deepcopy(self.generator).to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)
            self._bf16 = (key, copy.eval().requires_grad_(False))
        return self._bf16[1]


def _version(t: torch.Tensor) -> int:
    """The in-place version counter of `t`; -1 for a tensor made in inference mode, which has none
    (and cannot be changed in place outside it)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def count_parameters(net: _Progressive, resolution: int | None = None) -> int:
    """Parameters used at `resolution` (default: the target one), fade-in path included."""
    return sum(p.numel() for p in net.parameters_at(resolution or net.max_resolution))


PUBLISHED_MILLIONS = {  # docs/reference.md, Model: parameter counts at 128x128
    256: {"generator": 11.74, "wide": 11.41, "deep": 11.17},
    512: {"generator": 46.93, "wide": 45.53, "deep": 44.65},
}


@dataclass
class NetworkConfig:
    """Generator and critic sizes (training.networks).

    Args:
        base_width: S: 256 = the "12M" model, 512 = "46M"
        discriminator: wide or deep critic (the paper's two variants)
        discriminator_width: S of the critic; None = base_width
        mbstd_group_size: minibatch-stddev group; 0 = off (as the paper code)
        z_channels: channels of the generator's latent code
        num_keypoints: keypoints of the pose condition
    """

    base_width: int = 256
    discriminator: Literal["wide", "deep"] = "wide"
    discriminator_width: int | None = None
    mbstd_group_size: int = 4
    z_channels: int = 32
    num_keypoints: int = 7


def build_generator(network: NetworkConfig, schedule: Schedule) -> Generator:
    return Generator(network.base_width, schedule.max_resolution, schedule.start_resolution,
                     network.num_keypoints, network.z_channels)


def load_generator(path: str, ema: bool = True, map_location: str | torch.device = "cpu") -> Generator:
    """The (EMA) generator of a training checkpoint or of an exported model (`training.export`), in
    eval mode, loaded with weights_only=True."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    return generator_from(ckpt, path, ema, map_location)


def generator_from(ckpt: dict, path: str, ema: bool = True, map_location: str | torch.device = "cpu") -> Generator:
    """`load_generator` of a checkpoint or export already read (or one embedded in an export's
    `lower`, FORMAT.md §3); `path` names it in errors."""
    hp = ckpt["hyper_parameters"]
    generator = build_generator(NetworkConfig(**hp["network"]), Schedule(**hp["schedule"]))
    generator.load_state_dict(generator_state(ckpt, path, ema))
    return generator.to(map_location).eval().requires_grad_(False)


def generator_state(ckpt: dict, path: str, ema: bool = True) -> dict[str, torch.Tensor]:
    """The (EMA) generator's weights of a training checkpoint or an export already read."""
    if "generator_ema" in ckpt:  # an export holds the EMA weights only
        if not ema:
            raise ValueError(f"{path}: an exported model holds the EMA generator only")
        return dict(ckpt["generator_ema"])
    prefix = "generator_ema." if ema else "generator."
    return {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def main() -> None:
    """Print the parameter counts of both paper sizes at 128x128 against the published counts."""
    print(f"{'S':>4} {'network':>10} {'params':>12} {'published':>10}")
    for base, published in PUBLISHED_MILLIONS.items():
        nets = {"generator": Generator(base, 128),
                "wide": Discriminator(base, 128, variant="wide", mbstd_group_size=0),
                "deep": Discriminator(base, 128, variant="deep", mbstd_group_size=0)}
        for name, net in nets.items():
            print(f"{base:>4} {name:>10} {count_parameters(net, 128):>12,} {published[name]:>9.2f}M")


if __name__ == "__main__":
    main()
