"""A training run on disk: the folder layout, and what a checkpoint says about itself.

One owner for what training writes and every later stage reads (README, "Training"):

    <run_dir>/config.yaml                       the resolved fdf-train options
    <run_dir>/checkpoints/last.ckpt             the resume point
    <run_dir>/checkpoints/img<images>.ckpt      snapshots (images shown, 10 digits)
    <run_dir>/checkpoints/final.ckpt            the end of the schedule
    <run_dir>/mlflow.db, mlartifacts/           the default MLflow store (`--tracking_uri` elsewhere)
    <run_dir>/eval/<metric>_<checkpoint>.json   evaluation results (fdf-eval, slurm.evaluate)

A checkpoint (or an exported generator, FORMAT.md §3) holds `progress` (step, images_shown,
resolution, alpha, phase, done) and, when it was logged, `mlflow_run_id`; a training checkpoint of a
run grown from a lower-resolution one (`fdf-train --grow_from`, training.grow) also holds
`grown_from` (checkpoint, step, images_shown, max_resolution, new_tensors). They are read here
without loading the weights (mmap, weights_only).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fdf_core.errors import InputError

CHECKPOINTS = "checkpoints"
LAST, FINAL = "last.ckpt", "final.ckpt"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's dict, tensors memory-mapped (cheap to open for its small entries)."""
    import torch
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def read_progress(path: str | os.PathLike) -> dict[str, Any] | None:
    """Where training stood when `path` was saved (None for a file without it)."""
    return read_checkpoint(path).get("progress")


def read_mlflow_run_id(path: str | os.PathLike) -> str | None:
    """The MLflow run the checkpoint's training logged to (None if it logged nowhere)."""
    return read_checkpoint(path).get("mlflow_run_id")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def snapshot_name(images_shown: int) -> str:
    return f"img{images_shown:010d}.ckpt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Snapshots in training order, then the final checkpoint (`last.ckpt` repeats one of them)."""
    folder = checkpoints_dir(run_dir)
    return sorted(folder.glob("img*.ckpt")) + sorted(folder.glob(FINAL))


def run_dir_of(checkpoint: str | os.PathLike) -> Path | None:
    """`<run_dir>` for `<run_dir>/checkpoints/<name>.ckpt` (training's layout), else None."""
    parent = Path(checkpoint).resolve().parent
    return parent.parent if parent.name == CHECKPOINTS else None


def default_tracking_uri(run_dir: str | os.PathLike) -> str:
    """Training's MLflow store when `--tracking_uri` is not given: sqlite in the run folder."""
    return f"sqlite:///{Path(run_dir).resolve()}/mlflow.db"


def run_config(run_dir: str | os.PathLike | None) -> dict[str, Any]:
    """The run's resolved training options (`config.yaml`), or {} when there is none."""
    path = Path(run_dir) / "config.yaml" if run_dir else None
    if path is None or not path.is_file():
        return {}
    import yaml
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not readable YAML ({e})") from None


def mlflow_target(checkpoint: str | os.PathLike, tracking_uri: str | None = None,
                  run_id: str | None = None) -> tuple[str | None, str | None]:
    """(tracking URI, run id) of the run a checkpoint came from. The run id is in the checkpoint;
    the URI is the `tracking_uri` of the run folder's config.yaml, else training's default store
    there. Given values win."""
    if run_id is None:
        run_id = read_mlflow_run_id(checkpoint)
    if tracking_uri is None:
        run_dir = run_dir_of(checkpoint)
        if run_dir is not None:
            tracking_uri = run_config(run_dir).get("tracking_uri") or default_tracking_uri(run_dir)
    return tracking_uri, run_id


def result_path(checkpoint: str | os.PathLike, metric: str) -> Path:
    """Where an evaluation of a checkpoint goes: `<run_dir>/eval/<metric>_<checkpoint name>.json`
    (beside the checkpoint when it is not in a run folder)."""
    checkpoint = Path(checkpoint)
    return (run_dir_of(checkpoint) or checkpoint.parent) / "eval" / f"{metric}_{checkpoint.stem}.json"
