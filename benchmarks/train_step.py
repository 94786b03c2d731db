"""img/s of one training step: bf16 against fp32 on a CPU, and Lightning against a bare loop.

`--mode precision` (the default on a CPU): the bare step of a CPU config's networks (base width 64,
batch 32, as `training/configs/utkface_cpu64.yaml`) at 32x32, 64x64 and 128x128 in fp32, bf16
autocast, bf16 autocast + channels_last, that with only the generator's PixelNorm compiled
(`--model.compile_pixel_norm`), and that with torch.compile (inductor) of G and of D outside the
gradient penalty, alternating rounds and keeping each variant's fastest step, so the ratios come
from one run on a busy machine. Goal: bf16 + channels_last >= 2.5x fp32 at 64x64 (this CPU's
AMX / AVX-512-bf16 units). The CPU configs use the variant that wins.

`--mode overhead` (the default on a GPU): the 12M config at 32x32 and 128x128. Both sides run the same networks (S=256, wide critic), the same batch of real corpus photos
already on the device, the same step (critic step with gradient penalty and drift, generator
step, EMA update, non-finite checks) with the same precision and memory format: the ratio of the
fastest loop iterations (hooks and data fetch included, alternating rounds) isolates what the
LightningModule/Trainer path costs per step (goal <= 1.1). On a GPU: bf16
autocast and channels_last, the paper's batch sizes (128 at 32x32, 64 at 128x128). On a CPU the
batches default to 4 and 2 so that it finishes in minutes. Prints one JSON object.

    python benchmarks/train_step.py --mode precision --resolutions 32 64 128
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

from fdf_core.assets import assets_dir
from training.conditioning import prepare
from training.ema import ema_beta, update_ema
from training.layers import fuse_pixel_norm
from training.loss import discriminator_loss, generator_loss, gradient_penalty
from training.module import NetworkConfig, ProgressiveGAN
from training.networks import count_parameters
from training.schedule import Schedule

PAPER_BATCH = {32: 128, 128: 64}


def real_batch(n: int, device: torch.device) -> dict[str, torch.Tensor]:
    """`n` centred 128x128 crops of corpus photos with an FDF-like face box and keypoints."""
    photos = sorted(p for p in (assets_dir() / "corpus" / "photos").iterdir() if p.suffix in (".jpg", ".png"))
    images = []
    for p in (photos * math.ceil(n / len(photos)))[:n]:
        img = Image.open(p).convert("RGB")
        side = min(img.size)
        x0, y0 = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((x0, y0, x0 + side, y0 + side)).resize((128, 128), Image.Resampling.BOX)
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    layout = torch.tensor([[0.50, 0.58], [0.68, 0.40], [0.32, 0.40], [0.95, 0.50], [0.05, 0.50],
                           [1.25, 1.45], [-0.25, 1.45]])
    kp = (0.2 + layout * 0.6).clamp(0, 1).expand(n, 7, 2)
    return {"images": torch.stack(images).to(device), "bbox": torch.tensor([[0.2, 0.2, 0.8, 0.8]] * n, device=device),
            "keypoints": kp.contiguous().to(device)}


def build(resolution: int, batch: int, device: torch.device, base_width: int = 256,
          discriminator: str = "wide") -> tuple[ProgressiveGAN, int]:
    """The model of width S=`base_width` (256: the 12M one, 512: the 46M one, 64: the CPU configs')
    and the first step of its stabilization phase at `resolution`."""
    schedule = Schedule(batch_sizes={r: batch for r in (8, 16, 32, 64, 128)})
    module = ProgressiveGAN(NetworkConfig(base_width=base_width, discriminator=discriminator), schedule,
                            channels_last=device.type == "cuda")
    phase = next(p for p in schedule.phases if p.name == f"stabilize{resolution}")
    return module, schedule.first_step(phase)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Batches(torch.utils.data.IterableDataset):
    def __init__(self, batch: dict, start: int, count: int):
        self.batch, self.start, self.count = batch, start, count

    def __iter__(self):
        for k in range(self.start, self.start + self.count):
            yield {**self.batch, "step": k}


class _Timer(pl.Callback):
    """Wall time between consecutive batch starts: the whole loop iteration, hooks included."""

    def __init__(self, device: torch.device):
        self.device, self.starts = device, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync(self.device)
        self.starts.append(time.perf_counter())


def lightning_seconds(resolution: int, batch: dict, warmup: int, steps: int, device: torch.device) -> float:
    module, start = build(resolution, batch["images"].shape[0], device)
    module.step = start
    timer = _Timer(device)
    trainer = pl.Trainer(accelerator=device.type, devices=1, precision="bf16-mixed" if device.type == "cuda" else
                         "32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_epochs=1, callbacks=[timer], num_sanity_val_steps=0)
    trainer.fit(module, torch.utils.data.DataLoader(_Batches(batch, start, warmup + steps + 1), batch_size=None))
    return min(np.diff(timer.starts[warmup:]))


def bare_step(module: ProgressiveGAN, start: int, batch: dict, device: torch.device,
              compile_backend: str | None = None, ddp: bool = False, bf16: bool | None = None,
              channels_last: bool | None = None, fused_norm: bool = False) -> Callable[[int], None]:
    """`step(i)` runs training step `start + i` of `module` on `batch` without Lightning.

    The module's own step (critic step with gradient penalty and drift, generator step, EMA update,
    non-finite checks), with fused Adam on a GPU; `bf16` autocast and `channels_last` default to on
    for a GPU and off for a CPU. Under bf16 the gradient penalty's norm and every loss reduction
    stay fp32 (training/loss.py), as in fdf-train's bf16-mixed.
    `compile_backend` (e.g. "inductor"): torch.compile G, and D everywhere except the gradient-penalty
    pass, which needs a double backward that AOTAutograd does not support; shapes are static.
    `fused_norm`: only the generators' PixelNorm compiled, as `--model.compile_pixel_norm true`.
    `ddp`: G and D each wrapped in DistributedDataParallel (find_unused_parameters, as the Lightning
    strategy of fdf-train: the blocks of other resolutions get no gradient), in an initialized
    process group. As in Lightning, G's no-grad pass and the frozen critic of the generator step
    bypass the wrappers, so each backward reduces only the network being trained.
    """
    if compile_backend and ddp:
        raise ValueError("compile with DDP is not measured: choose one")
    module.to(device)
    g, d, ema, sch = module.generator, module.discriminator, module.generator_ema, module.schedule
    bf16 = device.type == "cuda" if bf16 is None else bf16
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if fused_norm:
        for net in (g, ema):
            fuse_pixel_norm(net, device)
    g_train, g_nograd, d_train, d_gp, d_frozen = g, g, d, d, d
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        g_train = DDP(g, device_ids=ids, find_unused_parameters=True)
        d_train = d_gp = DDP(d, device_ids=ids, find_unused_parameters=True)
    if compile_backend:
        g_train = g_nograd = torch.compile(g, backend=compile_backend, dynamic=False)
        d_train = d_frozen = torch.compile(d, backend=compile_backend, dynamic=False)
    adam = dict(lr=0.00175, betas=(0.0, 0.99), fused=device.type == "cuda")
    opt_g, opt_d = torch.optim.Adam(g.parameters(), **adam), torch.optim.Adam(d.parameters(), **adam)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    rank = torch.distributed.get_rank() if ddp else 0
    rng = torch.Generator(device=device).manual_seed(rank)
    n = batch["images"].shape[0]

    def step(i: int) -> None:
        info = sch.at_step(start + i)
        flip = torch.rand(n, device=device, generator=rng) < 0.5
        p = prepare(batch["images"], batch["bbox"], batch["keypoints"], info.phase.resolution, info.alpha, flip,
                    module.flip_order)
        if channels_last:
            p.real, p.condition, p.mask = (t.contiguous(memory_format=torch.channels_last)
                                           for t in (p.real, p.condition, p.mask))
        critic = lambda net: lambda x: net(x, p.condition, p.mask, p.keypoints, info.alpha)  # noqa: E731
        with autocast:
            z = torch.randn(g.z_shape(n), device=device, generator=rng)
            with torch.no_grad():
                fake = g_nograd(p.condition, p.mask, p.keypoints, z, info.alpha)
            terms = discriminator_loss(critic(d_train)(p.real), critic(d_train)(fake),
                                       gradient_penalty(critic(d_gp), p.real, fake, rng), module.loss_cfg)
        values = dict(zip(terms, torch.stack([t.float() for t in terms.values()]).tolist()))
        if not all(math.isfinite(v) for v in values.values()):  # name them: a GPU lease saw a bare AssertionError
            raise FloatingPointError(f"critic step {start + i} ({info.phase.name}, alpha {info.alpha:.3f}, "
                                     f"bf16 {bf16}): non-finite loss terms {values}")
        opt_d.zero_grad(set_to_none=True)
        terms["d"].backward()
        opt_d.step()
        d.requires_grad_(False)
        with autocast:
            z = torch.randn(g.z_shape(n), device=device, generator=rng)
            loss = generator_loss(critic(d_frozen)(g_train(p.condition, p.mask, p.keypoints, z, info.alpha)))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"generator step {start + i} ({info.phase.name}, bf16 {bf16}): loss {loss.item()}")
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        d.requires_grad_(True)
        update_ema(ema, g, ema_beta(info.batch_size))

    return step


def step_seconds(step: Callable[[int], None], count: int, device: torch.device) -> list[float]:
    """Wall time of each of `count` calls `step(0)`, `step(1)`, ..., the device synchronized around each."""
    times = []
    for i in range(count):
        sync(device)
        t0 = time.perf_counter()
        step(i)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def bare_seconds(resolution: int, batch: dict, warmup: int, steps: int, device: torch.device) -> float:
    module, start = build(resolution, batch["images"].shape[0], device)
    return min(step_seconds(bare_step(module, start, batch, device), warmup + steps, device)[warmup:])


# name: (bf16 autocast, channels_last, torch.compile backend of G and D, the generators' PixelNorm compiled)
VARIANTS = {"fp32": (False, False, None, False), "bf16": (True, False, None, False),
            "bf16_channels_last": (True, True, None, False),
            "bf16_channels_last_fused_norm": (True, True, None, True),
            "bf16_channels_last_compiled": (True, True, "inductor", False)}


def precision_table(resolutions: list[int], batch: int, width: int, warmup: int, steps: int, rounds: int,
                    variants: list[str]) -> dict:
    """img/s of the bare step per resolution and variant (fastest step over alternating rounds), and
    each variant's speed-up over fp32. Compiling costs once per variant and resolution (reported)."""
    device = torch.device("cpu")
    data = real_batch(batch, device)
    out = {}
    for res in resolutions:
        best = {v: math.inf for v in variants}
        compile_s: dict[str, float] = {}
        steppers = {}
        for v in variants:
            bf16, cl, backend, fused_norm = VARIANTS[v]
            module, start = build(res, batch, device, width)
            steppers[v] = bare_step(module, start, data, device, backend, bf16=bf16, channels_last=cl,
                                    fused_norm=fused_norm)
            if backend or fused_norm:  # the first call compiles: time it apart from the steps
                t0 = time.perf_counter()
                steppers[v](0)
                compile_s[v] = round(time.perf_counter() - t0, 1)
        for _ in range(rounds):
            for v in variants:
                best[v] = min(best[v], min(step_seconds(steppers[v], warmup + steps, device)[warmup:]))
        row = {v: {"img_per_s": round(batch / best[v], 2), "sec_per_step": round(best[v], 4)} for v in variants}
        for v in variants:
            if "fp32" in variants:
                row[v]["speedup_vs_fp32"] = round(best["fp32"] / best[v], 2)
            if v in compile_s:
                row[v]["compile_seconds"] = compile_s[v]
        out[f"{res}x{res}"] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("precision", "overhead"), default=None,
                   help="precision: CPU fp32 vs bf16 (default on a CPU); overhead: Lightning vs bare (GPU default)")
    p.add_argument("--width", type=int, default=64, help="base width for --mode precision (the CPU configs')")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--resolutions", type=int, nargs="+", default=None,
                   help="default: 32 64 128 for precision, 32 128 for overhead")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch per resolution (default: the paper's on a GPU, 4 and 2 on a CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=2, help="alternating bare/Lightning measurements per resolution")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if (args.mode or ("overhead" if gpu else "precision")) == "precision":
        batch = (args.batch or [32])[0]
        warmup, steps = args.warmup or 1, args.steps or 3
        table = precision_table(args.resolutions or [32, 64, 128], batch, args.width, warmup, steps, args.rounds,
                                args.variants)
        print(json.dumps({"mode": "precision", "device": f"cpu ({torch.get_num_threads()} threads)",
                          "base_width": args.width, "batch": batch, "warmup_steps": warmup, "timed_steps": steps,
                          "rounds": args.rounds, "goal_speedup_at_64": 2.5, "results": table}))
        return
    args.resolutions = args.resolutions or [32, 128]
    batches = args.batch or [PAPER_BATCH[r] if gpu else {32: 4, 128: 2}[r] for r in args.resolutions]
    warmup, steps = args.warmup or (10 if gpu else 1), args.steps or (30 if gpu else 4)
    torch.backends.cudnn.benchmark = True
    model, _ = build(128, 2, torch.device("cpu"))
    result = {"device": torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)",
              "precision": "bf16-mixed, channels_last" if gpu else "fp32",
              "generator_params_at_128": count_parameters(model.generator, 128),
              "critic_params_at_128": count_parameters(model.discriminator, 128),
              "warmup_steps": warmup, "timed_steps": steps, "rounds": args.rounds, "goal_ratio": 1.1, "results": {}}
    for res, n in zip(args.resolutions, batches):
        batch = real_batch(n, device)
        bare, light = math.inf, math.inf
        for _ in range(args.rounds):  # alternate, keep each side's fastest step: robust to a busy machine
            bare = min(bare, bare_seconds(res, batch, warmup, steps, device))
            light = min(light, lightning_seconds(res, batch, warmup, steps, device))
        result["results"][f"{res}x{res}"] = {
            "batch": n, "lightning_img_per_s": round(n / light, 2), "bare_img_per_s": round(n / bare, 2),
            "lightning_sec_per_step": round(light, 4), "bare_sec_per_step": round(bare, 4),
            "ratio_lightning_to_bare": round(light / bare, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
