"""DeepPrivacy's progressive, pose-conditioned WGAN-GP as a LightningModule (manual optimization).

One training step = one critic step then one generator step, on the batch of that step. The
resolution, alpha and batch size of a step come from the schedule and the step index alone, and
all randomness of a step (flips, z, the gradient-penalty mix) is drawn from a generator seeded by
(seed, step, rank), so a resumed run repeats an uninterrupted one. Non-finite losses stop the run
(on every rank at the same step) before any weight is updated with them.
"""
from __future__ import annotations

import copy
import hashlib
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from fdf_core.errors import ConfigError
from fdf_core.keypoints import KEYPOINT_NAMES, flip_permutation
from training.conditioning import Prepared, prepare
from training.ema import ema_beta, update_ema
from training.layers import fuse_pixel_norm
from training.loss import LossConfig, discriminator_loss, generator_loss, gradient_penalty
from training.networks import Discriminator, NetworkConfig, build_generator, count_parameters
from training.schedule import Phase, Schedule, StepInfo


@dataclass
class AdamConfig:
    lr: float = 0.00175
    betas: tuple[float, float] = (0.0, 0.99)
    eps: float = 1e-8


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN/inf: training stops instead of stepping on it."""


def _as(cls, value):
    return cls(**value) if isinstance(value, dict) else value


class ProgressiveGAN(pl.LightningModule):
    def __init__(self, network: NetworkConfig = NetworkConfig(), schedule: Schedule = Schedule(),
                 loss: LossConfig = LossConfig(), optimizer: AdamConfig = AdamConfig(),
                 ema_half_life_kimg: float = 10.0, hflip: bool = True, channels_last: bool = True,
                 seed: int = 0, compile_pixel_norm: bool = False):
        """
        Args:
            network: widths and discriminator variant.
            schedule: progressive growing, in kimg, with the global batch size per resolution.
            loss: WGAN-GP weights.
            optimizer: Adam settings, shared by G and D (paper: lr 0.00175, betas (0, 0.99)).
            ema_half_life_kimg: half-life of the generator EMA in thousands of images (paper: 10).
            hflip: mirror half of the training samples (left/right keypoints swapped).
            channels_last: NHWC memory format (faster convolutions on tensor-core GPUs).
            seed: seeds the per-step randomness (flips, z, gradient-penalty mixing).
            compile_pixel_norm: the generators' PixelNorm as one torch.compile kernel (training.layers
                `fuse_pixel_norm`): the same fp32 arithmetic, 1.3x the bf16 step of the CPU configs at
                128x128 and 1.2x at 64x64; needs a C++ compiler on a CPU. Unmeasured on a GPU.
        """
        super().__init__()
        self.network, self.schedule = _as(NetworkConfig, network), _as(Schedule, schedule)
        self.loss_cfg, self.adam = _as(LossConfig, loss), _as(AdamConfig, optimizer)
        self.ema_half_life_kimg, self.hflip, self.channels_last, self.seed = (
            ema_half_life_kimg, hflip, channels_last, seed)
        self.compile_pixel_norm = compile_pixel_norm
        # Plain dicts only: checkpoints must load with torch.load(weights_only=True). Not sent to the
        # logger: the CLI logs the whole resolved config once, and tags options a resumed run changed
        # (Lightning's own logging would fail the resume, as MLflow params cannot change).
        self.save_hyperparameters({
            "network": asdict(self.network), "schedule": asdict(self.schedule), "loss": asdict(self.loss_cfg),
            "optimizer": asdict(self.adam), "ema_half_life_kimg": ema_half_life_kimg, "hflip": hflip,
            "channels_last": channels_last, "seed": seed, "compile_pixel_norm": compile_pixel_norm}, logger=False)
        self.automatic_optimization = False
        net, sch = self.network, self.schedule
        self.generator = build_generator(net, sch)
        self.discriminator = Discriminator(net.discriminator_width or net.base_width, sch.max_resolution,
                                           sch.start_resolution, net.num_keypoints, net.discriminator,
                                           net.mbstd_group_size)
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)
        self.flip_order = flip_permutation(KEYPOINT_NAMES[:net.num_keypoints])
        self.step = 0  # index of the next training step
        self.grown_from: dict[str, Any] | None = None  # the lower run this one grew from (training.grow)
        self.stats: dict[str, float] = {}  # the last step's values, for the progress bar and callbacks
        self._last_step_end: float | None = None

    # ---------------------------------------------------------------- state
    @property
    def images_shown(self) -> int:
        return self.schedule.images_before(self.step)

    @property
    def kimg(self) -> float:
        return self.images_shown / 1000

    def current(self) -> tuple[Phase, float]:
        """Phase and alpha at the images shown so far (those of the next step)."""
        phase = self.schedule.phase_at(self.images_shown)
        return phase, phase.alpha(self.images_shown)

    def passed_kimg(self, every_kimg: float | None) -> bool:
        """Whether the step just taken passed a multiple of `every_kimg` thousand images."""
        if not every_kimg or self.step == 0:
            return False
        every = round(every_kimg * 1000)
        return self.schedule.images_before(self.step - 1) // every != self.images_shown // every

    def parameter_counts(self) -> dict[str, int]:
        r = self.schedule.max_resolution
        return {"generator": count_parameters(self.generator, r),
                f"discriminator_{self.network.discriminator}": count_parameters(self.discriminator, r)}

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size
        bad = {r: b for r, b in self.schedule.batch_sizes.items() if r in self.schedule.resolutions and b % world}
        if bad:
            raise ConfigError(f"schedule.batch_sizes {bad} are not divisible by the world size {world}")
        counts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in self.parameter_counts().items())
        rank_zero_info(f"parameters at {self.schedule.max_resolution}x{self.schedule.max_resolution}: {counts}; "
                       f"{self.schedule.total_steps} steps to {self.schedule.total_kimg:g} kimg")
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.compile_pixel_norm:
            for net in (self.generator, self.generator_ema):
                fuse_pixel_norm(net, self.device)

    def configure_optimizers(self):
        fused = self.device.type == "cuda"
        kw = dict(lr=self.adam.lr, betas=tuple(float(b) for b in self.adam.betas), eps=self.adam.eps, fused=fused)
        return [torch.optim.Adam(self.generator.parameters(), **kw),
                torch.optim.Adam(self.discriminator.parameters(), **kw)]

    # ---------------------------------------------------------------- training
    def _step_rng(self) -> torch.Generator:
        key = hashlib.blake2b(f"{self.seed}/{self.step}/{self.global_rank}".encode(), digest_size=8).digest()
        g = torch.Generator(device=self.device)
        g.manual_seed(int.from_bytes(key, "little") >> 1)
        return g

    def prepare_batch(self, batch: dict[str, torch.Tensor], info: StepInfo, rng: torch.Generator) -> Prepared:
        images = batch["images"]
        flip = (torch.rand(images.shape[0], device=self.device, generator=rng) < 0.5) if self.hflip else None
        p = prepare(images, batch["bbox"], batch["keypoints"], info.phase.resolution, info.alpha, flip,
                    self.flip_order)
        if self.channels_last:
            p.real, p.condition, p.mask = (t.contiguous(memory_format=torch.channels_last)
                                           for t in (p.real, p.condition, p.mask))
        return p

    def _checked(self, what: str, terms: dict[str, torch.Tensor], info: StepInfo) -> dict[str, float]:
        """The values of `terms` as floats; raises on every rank if any is non-finite on any rank."""
        values = torch.stack([t.detach().float() for t in terms.values()])
        bad = (~torch.isfinite(values)).any().float()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        *floats, n_bad = torch.cat([values, bad.view(1)]).tolist()
        if n_bad:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in zip(terms, floats))
            raise NonFiniteLossError(
                f"non-finite {what} loss at step {info.step} (kimg {info.images / 1000:.3f}, "
                f"{info.phase.name}, alpha {info.alpha:.3f}) on {int(n_bad)} rank(s); this rank: {shown}. "
                "Nothing was stepped with it; resume from the last checkpoint with a lower learning rate "
                "or another seed.")
        return dict(zip(terms, floats))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        info = self.schedule.at_step(self.step)
        if int(batch["step"]) != self.step:
            raise RuntimeError(f"data stream delivered step {int(batch['step'])} to the module at step {self.step}")
        res, alpha = info.phase.resolution, info.alpha
        rng = self._step_rng()
        p = self.prepare_batch(batch, info, rng)
        n = p.real.shape[0]
        opt_g, opt_d = self.optimizers()
        critic = lambda x: self.discriminator(x, p.condition, p.mask, p.keypoints, alpha)  # noqa: E731

        # Critic step: WGAN loss + gradient penalty + drift, generator frozen.
        z = torch.randn(self.generator.z_shape(n), device=self.device, generator=rng)
        with torch.no_grad():
            fake = self.generator(p.condition, p.mask, p.keypoints, z, alpha)
        d_terms = discriminator_loss(critic(p.real), critic(fake), gradient_penalty(critic, p.real, fake, rng),
                                     self.loss_cfg)
        d_stats = self._checked("discriminator", d_terms, info)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_terms["d"])
        opt_d.step()

        # Generator step: critic frozen.
        self.toggle_optimizer(opt_g)
        z = torch.randn(self.generator.z_shape(n), device=self.device, generator=rng)
        g_loss = generator_loss(critic(self.generator(p.condition, p.mask, p.keypoints, z, alpha)))
        g_stats = self._checked("generator", {"g": g_loss}, info)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        update_ema(self.generator_ema, self.generator, ema_beta(info.batch_size, self.ema_half_life_kimg))

        self.step += 1
        now = time.perf_counter()
        dt = now - self._last_step_end if self._last_step_end is not None else None
        self._last_step_end = now
        self.stats = {
            "loss/d": d_stats["d"], "loss/g": g_stats["g"], "loss/gp": d_stats["gp"],
            "loss/drift": d_stats["drift"], "loss/wasserstein": d_stats["wasserstein"],
            "score/real": d_stats["score_real"], "score/fake": d_stats["score_fake"],
            "progress/kimg": self.kimg, "progress/resolution": float(res), "progress/alpha": alpha,
            "progress/batch_size": float(info.batch_size), "progress/phase": float(info.phase.index),
        }
        if dt:
            self.stats["speed/img_per_s"] = info.batch_size / dt
            self.stats["speed/sec_per_kimg"] = dt * 1000 / info.batch_size
        if self.logger is not None and info.step % self.trainer.log_every_n_steps == 0:
            self.logger.log_metrics(self.stats, step=info.step)  # x-axis = step index, stable across resumes
        if self.step >= self.schedule.total_steps:
            self.trainer.should_stop = True

    def on_train_start(self) -> None:
        self._last_step_end = None
        if self.step >= self.schedule.total_steps:
            self.trainer.should_stop = True  # resumed from a finished run: nothing left to do

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        phase, alpha = self.current()
        checkpoint["progress"] = {
            "step": self.step, "images_shown": self.images_shown, "resolution": phase.resolution,
            "alpha": alpha, "phase": phase.name, "done": self.step >= self.schedule.total_steps}
        state = np.random.get_state()
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"key": torch.from_numpy(state[1].astype(np.int64)), "pos": int(state[2]),
                      "has_gauss": int(state[3]), "cached_gaussian": float(state[4])},
            "python": random.getstate()}
        run_id = getattr(self.logger, "run_id", None)
        if run_id:
            checkpoint["mlflow_run_id"] = run_id
        record = getattr(self.trainer.datamodule, "crop_record", None)
        if record is not None:  # how its training faces were cut, for whoever paints with it
            checkpoint.update(record())
        if self.grown_from:
            checkpoint["grown_from"] = self.grown_from

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        progress = checkpoint["progress"]
        self.step = int(progress["step"])
        self.grown_from = checkpoint.get("grown_from")
        if self.images_shown != progress["images_shown"]:
            raise ValueError(
                f"checkpoint was saved at {progress['images_shown']} images (step {self.step}), but this "
                f"config's schedule puts step {self.step} at {self.images_shown} images: resume with the "
                "checkpoint's schedule (only total_kimg may change)")
        rng = checkpoint["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        n = rng["numpy"]
        np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        random.setstate(rng["python"])
