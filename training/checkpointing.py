"""When and how training state reaches disk.

Checkpoints hold everything a resumed run needs (both networks, the EMA generator, both Adam
states, the AMP grad scaler, the step and images shown, resolution/alpha, RNG states and the data
position), contain only tensors and plain Python values (they load with `weights_only=True`), and
are written to a temporary file that is fsynced and renamed: a killed run leaves either the old
`last.ckpt` or the new one, never half of one.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.loggers import MLFlowLogger

from fdf_core.checkpoints import FINAL, LAST, checkpoints_dir, snapshot_name
from fdf_core.errors import MissingInputError
from fdf_core.tario import atomic_path

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save through `fdf_core.tario.atomic_path` (temporary name, fsync, rename); load with
    weights_only=True."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).is_file():
            raise MissingInputError(f"checkpoint {path} does not exist")
        return torch.load(path, map_location=map_location, weights_only=True)


class KimgCheckpoint(pl.Callback):
    """`<run_dir>/checkpoints/last.ckpt` every `every_kimg`, optional snapshots, and `final.ckpt`.

    The final checkpoint is also logged to MLflow as an artifact (`checkpoints/final.ckpt`).
    """

    def __init__(self, every_kimg: float = 100.0, snapshot_every_kimg: float | None = None,
                 log_final_artifact: bool = True):
        self.every_kimg, self.snapshot_every_kimg = every_kimg, snapshot_every_kimg
        self.log_final_artifact = log_final_artifact

    @staticmethod
    def directory(trainer: pl.Trainer) -> Path:
        return checkpoints_dir(trainer.default_root_dir)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:  # leftovers of a run killed while writing
            for stale in self.directory(trainer).glob("*.ckpt.tmp-*"):
                stale.unlink(missing_ok=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if pl_module.passed_kimg(self.every_kimg):
            trainer.save_checkpoint(self.directory(trainer) / LAST, weights_only=False)
        if pl_module.passed_kimg(self.snapshot_every_kimg):
            snapshot = self.directory(trainer) / snapshot_name(pl_module.images_shown)
            trainer.save_checkpoint(snapshot, weights_only=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.step < pl_module.schedule.total_steps:
            # stopped early (--trainer.max_time, a signal): last.ckpt becomes this step, the resume point
            trainer.save_checkpoint(self.directory(trainer) / LAST, weights_only=False)
            return
        final = self.directory(trainer) / FINAL
        trainer.save_checkpoint(final, weights_only=False)
        trainer.save_checkpoint(self.directory(trainer) / LAST, weights_only=False)
        logger = trainer.logger
        if self.log_final_artifact and trainer.is_global_zero and isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(final), "checkpoints")
