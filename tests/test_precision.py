"""Inference precision: bf16 where the CPU has bf16 units, the same faces as fp32, fp32 out."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.anonymizer import load_generator_at, resolve_checkpoint
from fdf_core import precision
from fdf_core.errors import ConfigError
from training.conditioning import prepare


def test_auto_follows_the_cpu_flags(tmp_path):
    with_units, without = tmp_path / "amx", tmp_path / "old"
    with_units.write_text("flags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    without.write_text("flags\t\t: fpu sse avx2\n")
    assert precision.cpu_has_native_bf16(str(with_units)) == torch.backends.mkldnn.is_available()
    assert not precision.cpu_has_native_bf16(str(without))
    assert not precision.cpu_has_native_bf16(str(tmp_path / "missing"))
    assert precision.resolve("fp32", "cpu") == "fp32" and precision.resolve("bf16", "cpu") == "bf16"
    assert precision.resolve("auto", "cpu") == ("bf16" if precision.cpu_has_native_bf16() else "fp32")
    with pytest.raises(ConfigError, match="--precision 'half'"):
        precision.resolve("half", "cpu")


def test_bf16_generator_paints_the_fp32_faces_and_keeps_the_background_exactly():
    g = load_generator_at(resolve_checkpoint(None))
    r = g.resolution
    rng = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 128, 128), dtype=torch.uint8, generator=rng)
    bbox = torch.tensor([[0.25, 0.2, 0.75, 0.8]]).expand(6, 4)
    keypoints = torch.rand(6, 7, 2, generator=rng) * 0.5 + 0.25
    p = prepare(images, bbox, keypoints, r)
    with torch.inference_mode():
        g.precision = "fp32"
        ref = g(p.condition, p.mask, p.keypoints)
        g.precision = "bf16"
        low = g(p.condition, p.mask, p.keypoints)
    assert low.dtype == torch.float32 and low.is_contiguous()
    keep = p.mask.expand_as(low).bool()
    assert torch.equal(low[keep], p.condition[keep])  # the background is the condition, bit for bit
    diff = (low - ref).abs()[~keep]
    assert 0 < diff.mean() < 0.03 and np.isfinite(low.numpy()).all()  # bf16 ran, and paints the same face


def test_fade_in_under_autocast_that_upsamples_in_fp32(monkeypatch):
    """CUDA autocast runs upsampling (and may run other ops) in fp32 while convolutions give bf16;
    the fade-in blends of both networks must accept that (a GPU lease found `torch.lerp` refusing
    float and bf16 operands at the first fade-in). CPU autocast keeps upsampling in bf16, so the
    CUDA behaviour is reproduced by making `upsample` and `downsample` return fp32."""
    import training.networks as networks
    from training.layers import downsample, upsample
    monkeypatch.setattr(networks, "upsample", lambda x: upsample(x).float())
    monkeypatch.setattr(networks, "downsample", lambda x, f: downsample(x, f).float())
    g, d = networks.Generator(base_width=16, max_resolution=16), networks.Discriminator(base_width=16, max_resolution=16)
    cond, mask = torch.zeros(4, 3, 16, 16), torch.ones(4, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 0
    kp = torch.rand(4, 7, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake = g(cond, mask, kp, torch.randn(g.z_shape(4)), alpha=0.5)
        score = d(fake, cond, mask, kp, alpha=0.5)
    assert fake.shape == (4, 3, 16, 16) and score.shape == (4,)
    assert torch.isfinite(fake).all() and torch.isfinite(score.float()).all()


def test_bf16_inference_follows_weights_changed_in_place():
    """At inference the bf16 path runs a bf16 copy of the generator; an in-place update of its
    weights (an EMA step during training) must reach that copy, not leave it painting stale faces."""
    from training.networks import Generator, GeneratorAt
    torch.manual_seed(0)
    g = GeneratorAt(Generator(base_width=16, max_resolution=16).eval(), 16, precision="bf16")
    cond, mask, kp = torch.rand(2, 3, 16, 16) * 2 - 1, torch.ones(2, 1, 16, 16), torch.rand(2, 7, 2)
    mask[:, :, 4:12, 4:12] = 0
    with torch.inference_mode():
        before = g(cond, mask, kp)
    with torch.no_grad():
        for p in g.generator.parameters():
            p.mul_(1.5)
    with torch.inference_mode():
        after = g(cond, mask, kp)
        fresh = GeneratorAt(g.generator, 16, precision="bf16")(cond, mask, kp)
    assert not torch.equal(before, after) and torch.equal(after, fresh)


def test_bf16_inference_runs_a_generator_built_in_inference_mode():
    """Tensors made under torch.inference_mode() keep no version counter; the bf16 copy's key must
    not need one (RuntimeError: Inference tensors do not track version counter)."""
    from training.networks import Generator, GeneratorAt
    with torch.inference_mode():
        g = GeneratorAt(Generator(base_width=16, max_resolution=16).eval(), 16, precision="bf16")
        out = g(torch.zeros(1, 3, 16, 16), torch.ones(1, 1, 16, 16), torch.rand(1, 7, 2))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
