"""`fdf-eval`: the FID of one training checkpoint, written as JSON and logged to its MLflow run.

The FID is the paper's definition (`eval.fid`): the EMA generator with z = 0 on the conditions of
the FDF validation faces, against those faces, at the resolution (and fade-in) the checkpoint had
reached. `--feature random` swaps Inception for `RandomConvFeatures` (no weights file; for the CPU
demo and tests, comparable only with itself).

Where the run is: a training checkpoint holds its MLflow run id (`mlflow_run_id`, written by
`training.module`), but not the tracking URI. The URI is that of the run folder the checkpoint lies
in (`<run_dir>/checkpoints/<name>.ckpt`): `tracking_uri` of `<run_dir>/config.yaml` when training was
given one, else training's default `sqlite:///<run_dir>/mlflow.db`. `--tracking_uri` / `--run_id`
override both. The metric is logged as `eval/fid_<feature>` with step = images shown, and the JSON
as an artifact under `eval/`.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import yaml

from data_prep.tario import atomic_write_json
from eval.anonymizer import load_generator_at
from eval.fid import RandomConvFeatures, compute_fid
from fdf_core.errors import ConfigError, InputError, MissingInputError, NothingToDoError
from training.conditioning import prepare
from training.datamodule import FDFDataModule

log = logging.getLogger(__name__)
FEATURES = ("inception", "random")


@dataclass
class EvaluateConfig:
    """FID of one checkpoint on the FDF validation split.

    checkpoint: training checkpoint (`<run_dir>/checkpoints/*.ckpt`)
    data_root: FDF shards (`val/*.tar`, `sizes.json`)
    feature: inception (the paper's FID; weights via inception_weights / $FDF_INCEPTION_WEIGHTS) or
        random (RandomConvFeatures, no weights, not comparable with published numbers)
    num_images: validation faces to use (None = all; the paper: all 50,000)
    cache_dir: cached real statistics (keyed by data, resolution and feature network)
    output: result JSON (default `<run_dir>/eval/fid_<feature>_<checkpoint name>.json`)
    tracking_uri / run_id: MLflow run to log to (default: found from the checkpoint, see module doc)
    log_mlflow: log the metric and the JSON to MLflow
    keypoint_threshold: as the run's `data.keypoint_threshold` (default: read from its config.yaml)
    """

    checkpoint: str
    data_root: str = "runs/demo/fdf"
    feature: str = "inception"
    inception_weights: str | None = None
    num_images: int | None = None
    batch_size: int = 64
    cache_dir: str | None = "runs/fid_cache"
    output: str | None = None
    tracking_uri: str | None = None
    run_id: str | None = None
    log_mlflow: bool = True
    keypoint_threshold: float | None = None
    device: str = "cpu"


def run_dir_of(checkpoint: Path) -> Path | None:
    """`<run_dir>` for `<run_dir>/checkpoints/<name>.ckpt` (training's layout), else None."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == "checkpoints" else None


def run_config(run_dir: Path | None) -> dict:
    """The run's resolved training options (`config.yaml`), or {} when there is none."""
    path = run_dir / "config.yaml" if run_dir else None
    if path is None or not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not readable YAML ({e})") from None


def mlflow_target(checkpoint: Path, tracking_uri: str | None = None,
                  run_id: str | None = None) -> tuple[str | None, str | None]:
    """(tracking URI, run id) of the run a checkpoint came from; see the module docstring."""
    if run_id is None:
        run_id = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("mlflow_run_id")
    if tracking_uri is None:
        run_dir = run_dir_of(checkpoint)
        if run_dir is not None:
            tracking_uri = run_config(run_dir).get("tracking_uri") or f"sqlite:///{run_dir}/mlflow.db"
    return tracking_uri, run_id


class _Conditions:
    """Validation batches as `compute_fid` wants them: real image in [-1, 1] plus its condition."""

    def __init__(self, data: FDFDataModule, batch_size: int, limit: int | None, resolution: int,
                 alpha: float, device: torch.device):
        self.data, self.batch_size, self.limit = data, batch_size, limit
        self.resolution, self.alpha, self.device = resolution, alpha, device

    def __iter__(self) -> Iterator[dict]:
        for b in self.data.iter_val(self.batch_size, self.limit):
            p = prepare(b["images"].to(self.device), b["bbox"].to(self.device), b["keypoints"].to(self.device),
                        self.resolution, self.alpha)
            yield {"img": p.real, "condition": p.condition, "mask": p.mask, "keypoints": p.keypoints}


def run(cfg: EvaluateConfig) -> dict:
    start = time.perf_counter()
    if cfg.feature not in FEATURES:
        raise ConfigError(f"--feature must be one of {FEATURES}, not {cfg.feature!r}")
    ckpt = Path(cfg.checkpoint)
    if not ckpt.is_file():
        raise MissingInputError(f"--checkpoint {ckpt} does not exist")
    run_dir = run_dir_of(ckpt)
    threshold = cfg.keypoint_threshold
    if threshold is None:
        threshold = float(run_config(run_dir).get("data", {}).get("keypoint_threshold", 0.0))
    device = torch.device(cfg.device)
    g = load_generator_at(ckpt, device)
    progress = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("progress", {})
    data = FDFDataModule(cfg.data_root, keypoint_threshold=threshold)
    data.setup("validate")
    if not sum(data.val_sizes):
        raise NothingToDoError(f"no validation faces under {Path(cfg.data_root) / 'val'}: the FID is defined on the val split")
    feature = RandomConvFeatures() if cfg.feature == "random" else "inception"
    batches = _Conditions(data, cfg.batch_size, cfg.num_images, g.resolution, g.alpha, device)
    # the cache key names the files, not how many faces were read from them
    cache = Path(cfg.cache_dir) / (f"first_{cfg.num_images}" if cfg.num_images else "all") if cfg.cache_dir else None
    with torch.inference_mode():
        value = compute_fid(lambda b: g(b["condition"], b["mask"], b["keypoints"]), batches, feature,
                            cache, data.val_shards, cfg.inception_weights, device)
    images_shown = int(progress.get("images_shown", 0))
    key = f"eval/fid_{cfg.feature}"
    result = {"metric": key, "fid": value, "feature": cfg.feature, "checkpoint": str(ckpt),
              "images_shown": images_shown, "kimg": images_shown / 1000, "resolution": g.resolution,
              "alpha": g.alpha, "num_images": min(cfg.num_images or sum(data.val_sizes), sum(data.val_sizes)),
              "data_root": cfg.data_root, "seconds": round(time.perf_counter() - start, 2)}
    default_out = (run_dir or ckpt.parent) / "eval" / f"fid_{cfg.feature}_{ckpt.stem}.json"
    out = Path(cfg.output) if cfg.output else default_out
    atomic_write_json(out.with_name(out.stem + "_options.json"), asdict(cfg))
    if cfg.log_mlflow:
        uri, run_id = mlflow_target(ckpt, cfg.tracking_uri, cfg.run_id)
        if run_id is None or uri is None:
            raise ConfigError(f"{ckpt}: no MLflow run recorded (no mlflow_run_id, or not in <run_dir>/checkpoints/): "
                              "give --run_id and --tracking_uri, or --log_mlflow false")
        result.update(tracking_uri=uri, run_id=run_id)
        atomic_write_json(out, result)
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=uri)
        client.log_metric(run_id, key, value, step=images_shown)
        client.log_artifact(run_id, str(out), "eval")
    else:
        atomic_write_json(out, result)
    print(json.dumps({k: result[k] for k in ("metric", "fid", "kimg", "resolution", "num_images", "seconds")}
                     | {"output": str(out)}))
    return result


def main(argv: list[str] | None = None) -> dict:
    from data_prep.cli_util import parse_dataclass
    return run(parse_dataclass(EvaluateConfig, argv, prog="fdf-eval",
                               description="FID of a training checkpoint (EMA generator, z = 0, FDF val)."))


if __name__ == "__main__":
    from fdf_core.console import run_main
    raise SystemExit(run_main(main, "fdf-eval"))
