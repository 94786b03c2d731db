"""Networks, layers and conditioning: published parameter counts, fade-in algebra, no face leaks."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from fdf_core.keypoints import KEYPOINT_NAMES, flip_permutation
from training.conditioning import box_mask, hflip, prepare
from fdf_core.errors import ConfigError
from training.layers import (EqualizedConv2d, PixelNorm, downsample, fuse_pixel_norm, pixel_norm_fp32,
                             pose_maps, upsample)
from training.networks import (PUBLISHED_MILLIONS, Discriminator, Generator, count_parameters,
                               level_width)

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


@pytest.mark.parametrize("base", [256, 512])
def test_parameter_counts_match_the_paper(base):
    published = PUBLISHED_MILLIONS[base]
    g = Generator(base, 128)
    assert round(count_parameters(g, 128) / 1e6, 2) == published["generator"]
    for variant in ("wide", "deep"):
        d = Discriminator(base, 128, variant=variant, mbstd_group_size=0)
        assert round(count_parameters(d, 128) / 1e6, 2) == published[variant], variant
        # Minibatch-stddev (off in the paper code) adds one input channel to the first 4x4 conv.
        with_std = Discriminator(base, 128, variant=variant, mbstd_group_size=4)
        kernel = 9 if variant == "wide" else 1
        head_width = level_width(int(base * math.sqrt(2)) // 8 * 8 if variant == "wide" else base, 4)
        assert count_parameters(with_std, 128) - count_parameters(d, 128) == kernel * head_width


def test_widths_follow_the_paper():
    assert [level_width(256, r) for r in (4, 8, 16, 32, 64, 128, 256)] == [256, 256, 256, 256, 128, 64, 32]
    assert [level_width(360, r) for r in (4, 32, 64, 128)] == [360, 360, 176, 88]  # wide D of S=256


def test_equalized_learning_rate():
    conv = EqualizedConv2d(8, 4, 3)
    assert conv.scale == pytest.approx(math.sqrt(2) / math.sqrt(8 * 9))
    assert conv.weight.std().item() == pytest.approx(1.0, abs=0.2)  # N(0, 1) storage
    x = torch.randn(2, 8, 5, 5)
    ref = torch.nn.functional.conv2d(x, conv.weight * conv.scale, conv.bias, padding=1)
    assert torch.allclose(conv(x), ref)


def test_pixel_norm_runs_in_fp32():
    x = torch.full((1, 4, 2, 2), 300.0, dtype=torch.float16)  # x² = 90000 overflows fp16
    y = PixelNorm()(x)
    assert y.dtype == torch.float16 and torch.allclose(y.float(), torch.ones_like(y, dtype=torch.float32))


def test_pixel_norm_at_bf16_inference_is_the_fp32_norm_to_bf16_rounding():
    """The bf16 inference path (one vector_norm instead of square-then-mean) keeps its layout and
    dtype and is the fp32 PixelNorm to within bf16's rounding (2^-8 relative, a few roundings), for
    large and small features alike: features of 1e3 would overflow fp16 but not bf16."""
    torch.manual_seed(0)
    x = (torch.randn(3, 96, 9, 9) * torch.logspace(-3, 3, 96).view(1, -1, 1, 1)).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        y = PixelNorm()(x)
    ref = pixel_norm_fp32(x.float())
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert ((y.float() - ref).abs() <= 4 * 2 ** -8 * ref.abs() + 1e-6).all()


def test_fused_pixel_norm_is_the_fp32_arithmetic_forward_and_backward():
    """One compiled kernel (torch.compile builds it here, for real) against the eager fp32 passes,
    on bf16 channels_last features (the CPU configs' training) and on fp32 ones (FID, EMA)."""
    g = Generator(16, 16)
    assert fuse_pixel_norm(g) == sum(isinstance(m, PixelNorm) for m in g.modules()) > 10
    norm = next(m for m in g.modules() if isinstance(m, PixelNorm))
    assert norm.fused and not PixelNorm().fused
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        x = (torch.randn(4, 24, 16, 16) * 30).to(dtype).contiguous(memory_format=torch.channels_last)
        grad_out = torch.randn(x.shape).to(dtype)
        outs = []
        for f in (pixel_norm_fp32, norm):
            xi = x.clone().requires_grad_()
            y = f(xi)
            y.backward(grad_out)
            outs.append((y.detach().float(), xi.grad.float()))
        (y0, g0), (y1, g1) = outs
        assert (y0.square().mean(dim=1) - 1).abs().max() < 0.05  # unit RMS per pixel
        assert (y0 - y1).abs().max() <= tol * y0.abs().max()
        assert (g0 - g1).abs().max() <= tol * g0.abs().max()


def test_fusing_pixel_norm_on_a_cpu_without_a_compiler_is_a_config_error(monkeypatch):
    import training.layers as layers
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(layers.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="compile_pixel_norm true needs a C\\+\\+ compiler"):
        fuse_pixel_norm(Generator(16, 16))


def test_pose_maps_one_pixel_per_keypoint():
    kp = torch.tensor([[[0.5, 0.25], [-1.0, -1.0], [1.0, 0.0], [0.99, 0.99]]])
    maps = pose_maps(kp, 8)
    assert maps.shape == (1, 4, 8, 8)
    assert maps[0, 0, 2, 4] == 1 and maps[0, 0].sum() == 1
    assert maps[0, 1].sum() == 0  # missing keypoint: empty map
    assert maps[0, 2, 0, 7] == 1  # x = 1 falls in the last column
    assert maps[0, 3, 7, 7] == 1


def test_pose_maps_in_channels_last_hold_the_same_maps_without_a_copy():
    kp = torch.rand(3, 7, 2) * 1.2 - 0.1  # some outside the crop: empty maps
    nchw, nhwc = pose_maps(kp, 16), pose_maps(kp, 16, channels_last=True)
    assert torch.equal(nchw, nhwc)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()


def test_channels_last_networks_feed_features_and_pose_maps_to_their_convolutions_channels_last():
    """The pose maps join the features in their layout: a mixed concatenation comes out NCHW and
    the convolution after it copies it back (the bf16 anonymizer and channels_last training)."""
    g, d = Generator(16, 32).to(memory_format=torch.channels_last), Discriminator(16, 32)
    d = d.to(memory_format=torch.channels_last)
    with_pose = [g.decoder[r][0][0] for r in ("8", "16", "32")] + [d.blocks[r][0][0] for r in ("8", "16", "32")]
    seen = []
    hooks = [conv.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for conv in with_pose]
    cl = dict(memory_format=torch.channels_last)
    image = torch.rand(4, 3, 32, 32).contiguous(**cl)
    mask = torch.ones(4, 1, 32, 32).contiguous(**cl)
    kp = torch.rand(4, 7, 2)
    with torch.no_grad():
        d(g(image, mask, kp), image, mask, kp)
    for h in hooks:
        h.remove()
    assert len(seen) == 6
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x in seen), \
        [tuple(x.shape) for x in seen if not x.is_contiguous(memory_format=torch.channels_last)]


def test_box_mask_blanks_every_overlapping_pixel():
    mask = box_mask(torch.tensor([[0.3, 0.3, 0.7, 0.7]]), 8)[0, 0]
    blanked = (mask == 0).nonzero()
    assert blanked[:, 0].unique().tolist() == [2, 3, 4, 5] and blanked[:, 1].unique().tolist() == [2, 3, 4, 5]


def test_hflip_mirrors_and_swaps_left_right():
    perm = flip_permutation(KEYPOINT_NAMES)
    assert [KEYPOINT_NAMES[i] for i in perm] == ["nose", "right_eye", "left_eye", "right_ear", "left_ear",
                                                 "right_shoulder", "left_shoulder"]
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    bbox = torch.tensor([[0.1, 0.2, 0.5, 0.6]] * 2)
    kp = torch.rand(2, 7, 2)
    kp[0, 3] = -1  # a missing left ear stays missing (as the right ear after the flip)
    flip = torch.tensor([True, False])
    i2, b2, k2 = hflip(img, bbox, kp, flip, perm)
    assert torch.equal(i2[0], img[0].flip(-1)) and torch.equal(i2[1], img[1])
    assert torch.allclose(b2[0], torch.tensor([0.5, 0.2, 0.9, 0.6])) and torch.equal(b2[1], bbox[1])
    assert torch.allclose(k2[0, 1], torch.stack([1 - kp[0, 2, 0], kp[0, 2, 1]]))  # new left eye = old right eye
    assert torch.equal(k2[0, 4], torch.tensor([-1.0, -1.0]))
    assert torch.equal(k2[1], kp[1])
    back = hflip(i2, b2, k2, flip, perm)
    assert all(torch.allclose(a, b) for a, b in zip(back, (img, bbox, kp)))


def _batch(n: int = 4, stored: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, stored, stored), generator=g, dtype=torch.uint8)
    bbox = torch.tensor([[0.25, 0.25, 0.75, 0.75]]).repeat(n, 1)
    kp = 0.3 + 0.4 * torch.rand(n, 7, 2, generator=g)
    return images, bbox, kp


def test_prepare_downsamples_on_device_and_fades():
    images, bbox, kp = _batch()
    p = prepare(images, bbox, kp, 8)
    assert torch.allclose(p.real, downsample(images.float() / 127.5 - 1, 4))
    assert torch.equal(p.condition, p.real * p.mask)
    faded = prepare(images, bbox, kp, 16, alpha=0.25).real
    full = downsample(images.float() / 127.5 - 1, 2)
    assert torch.allclose(faded, 0.75 * upsample(downsample(full, 2)) + 0.25 * full, atol=1e-6)


@pytest.mark.parametrize("res,alpha", [(8, 1.0), (16, 0.3), (32, 1.0)])
def test_generator_never_sees_the_face_and_keeps_the_background(res, alpha):
    torch.manual_seed(0)
    g = Generator(16, 32, 8)
    images, bbox, kp = _batch()
    other = images.clone()
    other[:, :, 8:24, 8:24] = 255 - other[:, :, 8:24, 8:24]  # a different face inside the box
    z = torch.randn(g.z_shape(4))
    a, b = prepare(images, bbox, kp, res, alpha), prepare(other, bbox, kp, res, alpha)
    out_a = g(a.condition, a.mask, a.keypoints, z, alpha)
    out_b = g(b.condition, b.mask, b.keypoints, z, alpha)
    assert torch.equal(out_a, out_b)
    keep = a.mask.bool().expand_as(out_a)
    assert torch.equal(out_a[keep], a.real[keep])  # background kept bit for bit
    assert not torch.allclose(out_a[~keep], a.real[~keep])


def test_fade_in_at_alpha_zero_is_the_lower_resolution_network():
    torch.manual_seed(0)
    g, d = Generator(16, 32, 8), Discriminator(16, 32, 8, variant="wide", mbstd_group_size=4)
    images, bbox, kp = _batch()
    p = prepare(images, bbox, kp, 16)
    z = torch.randn(g.z_shape(4))
    low_mask = downsample(p.mask, 2)
    high = g(p.condition, p.mask, kp, z, alpha=0.0)
    low = g(downsample(p.condition, 2), low_mask, kp, z)
    inside = (upsample(low_mask) == 0) & (p.mask == 0)
    assert inside.any()
    assert torch.allclose(high[inside.expand_as(high)], upsample(low)[inside.expand_as(high)], atol=1e-5)
    d_high = d(p.real, p.condition, p.mask, kp, alpha=0.0)
    d_low = d(downsample(p.real, 2), downsample(p.condition, 2), low_mask, kp)
    assert torch.allclose(d_high, d_low, atol=1e-5)


def test_deep_discriminator_and_bad_inputs():
    d = Discriminator(16, 32, 8, variant="deep", mbstd_group_size=2)
    images, bbox, kp = _batch()
    p = prepare(images, bbox, kp, 32)
    assert d(p.real, p.condition, p.mask, kp).shape == (4,)
    with pytest.raises(ValueError, match="resolution 64"):
        d(upsample(p.real), upsample(p.condition), upsample(p.mask), kp)
    with pytest.raises(ValueError, match="cannot fade in the first resolution"):
        Generator(16, 32, 8)(downsample(p.condition, 4), downsample(p.mask, 4), kp, alpha=0.5)
    with pytest.raises(ValueError, match="variant"):
        Discriminator(16, 32, variant="tall")


def _resolved(name: str, *flags: str) -> dict:
    """A training config as fdf-train resolves it (its `config:` base file included)."""
    from training.train import resolve_config
    return yaml.safe_load(resolve_config(["--config", str(CONFIGS / f"{name}.yaml"), *flags])[0])


@pytest.mark.parametrize("name,base", [("fdf128_12m", 256), ("fdf128_46m", 512)])
def test_paper_configs_build_the_published_sizes(name, base):
    from training.module import ProgressiveGAN

    cfg = _resolved(name)["model"]
    assert cfg["network"]["base_width"] == base
    counts = ProgressiveGAN(**cfg).parameter_counts()
    assert round(counts["generator"] / 1e6, 2) == PUBLISHED_MILLIONS[base]["generator"]
    assert round((counts["discriminator_wide"] - 9 * level_width(int(base * math.sqrt(2)) // 8 * 8, 4)) / 1e6, 2) \
        == PUBLISHED_MILLIONS[base]["wide"]  # minus the minibatch-stddev channel the paper code did not have


def test_46m_config_is_the_12m_config_with_its_width_and_run_dir():
    """fdf128_46m.yaml holds only what differs; resolved, it is the old full copy: the 12M options
    with S = 512 and its own run_dir (later flags still win over both files)."""
    base, composed = _resolved("fdf128_12m"), _resolved("fdf128_46m")
    assert yaml.safe_load((CONFIGS / "fdf128_46m.yaml").read_text())["config"] == "fdf128_12m.yaml"
    base["model"]["network"]["base_width"], base["run_dir"] = 512, "runs/train/fdf128_46m"
    assert composed == base
    assert _resolved("fdf128_46m", "--model.network.base_width", "64")["model"]["network"]["base_width"] == 64


def test_tiny_config_grows_twice_in_a_few_hundred_steps():
    from training.schedule import Schedule

    schedule = Schedule(**yaml.safe_load((CONFIGS / "tiny_cpu.yaml").read_text())["model"]["schedule"])
    assert schedule.resolutions == [8, 16, 32] and [p.kind for p in schedule.phases].count("fade") == 2
    assert 200 <= schedule.total_steps <= 400
