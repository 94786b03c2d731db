"""Progress display, sample grids, FID and phase transitions, all keyed to images shown (kimg)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.loggers import MLFlowLogger
from torchvision.utils import make_grid, save_image

from training.conditioning import prepare
from training.networks import GeneratorAt

log = logging.getLogger(__name__)


def _mlflow(trainer: pl.Trainer) -> MLFlowLogger | None:
    return trainer.logger if isinstance(trainer.logger, MLFlowLogger) else None


class KimgProgressBar(TQDMProgressBar):
    """Steps of the whole schedule, with kimg, img/s, sec/kimg, resolution, alpha and the losses."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        module = trainer.lightning_module
        self.train_progress_bar.reset(total=module.schedule.total_steps)
        self.train_progress_bar.n = module.step
        self.train_progress_bar.set_description("train")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
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
    """Calls `fid_fn(generator_ema, datamodule) -> float` every `every_kimg` and at the end.

    Off unless `fid_fn` is given (an import path in YAML, e.g. `fid_fn: eval.fid.training_fid`).
    `generator_ema` is the EMA generator pinned to the current resolution and alpha
    (`GeneratorAt`: `.resolution`, `forward(condition, mask, keypoints, z=None)`); the datamodule
    offers `iter_val(batch_size)` and `training.conditioning.prepare` builds the inputs. It runs on
    global rank 0 (the other ranks wait) and is logged as metric `fid` with step = kimg.
    """

    def __init__(self, fid_fn: Callable[[torch.nn.Module, pl.LightningDataModule], float] | None = None,
                 every_kimg: float = 1000.0, min_resolution: int = 8):
        self.fid_fn, self.every_kimg, self.min_resolution = fid_fn, every_kimg, min_resolution

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        phase, alpha = pl_module.current()
        if self.fid_fn is None or phase.resolution < self.min_resolution:
            return
        if trainer.is_global_zero:
            with torch.no_grad():
                value = float(self.fid_fn(GeneratorAt(pl_module.generator_ema, phase.resolution, alpha),
                                          trainer.datamodule))
            if trainer.logger is not None:
                trainer.logger.log_metrics({"fid": value, "fid/kimg": pl_module.kimg}, step=round(pl_module.kimg))
            log.info("FID %.3f at kimg %.1f", value, pl_module.kimg)
        trainer.strategy.barrier("fid")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if pl_module.passed_kimg(self.every_kimg):
            self._measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.step < pl_module.schedule.total_steps:
            return  # stopped early (preemption): no FID inside the signal's grace period
        if not pl_module.passed_kimg(self.every_kimg):
            self._measure(trainer, pl_module)
