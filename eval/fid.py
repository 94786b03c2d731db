"""One FID definition for training callbacks and the evaluation job.

The paper's FID (docs/reference.md, "Published results") is the 2048-d pool3 feature of the
2015-12-05 TensorFlow Inception graph, on 128×128 crops, real = the FDF validation faces, fake = the
generator's output for the same conditions with z = 0. Here that is torchmetrics' `FrechetInceptionDistance` on
torch-fidelity's port of those weights (`weights-inception-2015-12-05-6726825d.pth`) with the
TensorFlow-compatible bilinear resize to 299 (`antialias=False`, as torch-fidelity itself computes
it). Nothing is downloaded: the file comes from `--inception_weights` or `$FDF_INCEPTION_WEIGHTS`.

Any `nn.Module` mapping uint8 `N×3×H×W` images to `N×D` features can replace Inception, e.g.
:class:`RandomConvFeatures` for tests and the tiny demo; such FIDs are only comparable with
themselves.

Batches are FDF batches (FORMAT.md §2 as the training datamodule yields them): a dict whose `img`
is a float tensor in [-1, 1], `N×3×H×W`; `generate_fn(batch)` returns the fakes in the same form.
Both are quantized to uint8 like saved images before feature extraction.

The real statistics (feature sum, sum of outer products, count) depend only on the data, the
resolution and the feature network, so they are cached in `cache_dir` under a hash of those and
written atomically. Under `torch.distributed` every rank iterates its own slice of the data (e.g. a
loader split by rank); torchmetrics sums the statistics over ranks.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from data_prep.assets import resolve_file
from data_prep.tario import atomic_write_bytes
from fdf_core.errors import InputError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "FDF_INCEPTION_WEIGHTS"
INCEPTION_FLAG = "--inception_weights"
CACHE_VERSION = 1


class RandomConvFeatures(nn.Module):
    """A fixed-seed, randomly initialised 3-layer conv net with global average pooling.

    Cheap (no weights file) and deterministic, so tests and the CPU demo can compute an FID; it
    measures low-level image statistics only and is *not* comparable with the paper's FID.
    """

    def __init__(self, dim: int = 64, seed: int = 0):
        super().__init__()
        self.num_features = dim
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(64, dim, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in self.net:
                if isinstance(m, nn.Conv2d):
                    fan_in = m.weight[0].numel()
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
                    m.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 127.5 - 1)


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The local Inception file (flag, then `$FDF_INCEPTION_WEIGHTS`, then the assets folder)."""
    return resolve_file(path, INCEPTION_ENV, f"weights/inception/{INCEPTION_FILE}",
                        f"FID Inception weights ({INCEPTION_FILE}, torch-fidelity's port of the "
                        "2015-12-05 TensorFlow Inception)", INCEPTION_FLAG)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _module_id(module: nn.Module) -> str:
    """Class name + hash of the weights: two networks share cached statistics only if identical."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(module).__qualname__}:{h.hexdigest()[:16]}"


def build_fid_metric(feature: str | nn.Module = "inception",
                     inception_weights: str | os.PathLike | None = None):
    """`(FrechetInceptionDistance, feature_id)` for Inception or a custom feature module."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    if isinstance(feature, nn.Module):
        return FrechetInceptionDistance(feature=feature, sync_on_compute=True), _module_id(feature)
    if feature != "inception":
        raise ValueError(f"feature must be 'inception' or an nn.Module, not {feature!r}")
    path = resolve_inception_weights(inception_weights)
    try:
        # torch-fidelity loads the file with weights_only=False; refuse anything a safe load rejects
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{path}: not a safely loadable Inception state_dict ({e}); give "
                         f"{INCEPTION_FILE} with {INCEPTION_FLAG} or ${INCEPTION_ENV}") from e
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise InputError(f"{path}: not torch-fidelity's Inception state_dict (no 'fc.weight'); "
                         f"give {INCEPTION_FILE} with {INCEPTION_FLAG} or ${INCEPTION_ENV}")
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path),
                                      antialias=False, sync_on_compute=True)
    return metric, f"inception-2015-12-05-pool3:{_file_sha256(path)[:16]}"


def real_stats_key(data_files: Sequence[str | os.PathLike], resolution: int, feature_id: str) -> str:
    """Hash of the data set's files (`parent/name` and size), the resolution and the features."""
    files = sorted((f"{Path(p).parent.name}/{Path(p).name}", Path(p).stat().st_size) for p in data_files)
    blob = json.dumps({"v": CACHE_VERSION, "files": files, "resolution": resolution,
                       "feature": feature_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float → uint8 [0, 255], rounded as when writing an image file."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def compute_fid(generate_fn: Callable[[dict], torch.Tensor], real_loader: Iterable[dict],
                feature: str | nn.Module = "inception", cache_dir: str | os.PathLike | None = None,
                data_files: Sequence[str | os.PathLike] | None = None,
                inception_weights: str | os.PathLike | None = None,
                device: str | torch.device = "cpu") -> float:
    """FID between `real_loader`'s images and `generate_fn` applied to the same batches.

    With `cache_dir` and `data_files` (the files the loader reads, e.g. the val shards) the real
    statistics are read from / written to `cache_dir/fid_real_<key>.pt`. Real and generated image
    counts must agree (a cached entry of another size means the loader no longer reads what the
    key names: an error).
    """
    metric, feature_id = build_fid_metric(feature, inception_weights)
    metric = metric.to(device)
    use_cache = cache_dir is not None and data_files is not None
    cache_path, cached = None, None
    with torch.no_grad():
        for batch in real_loader:
            real = batch["img"]
            if use_cache and cache_path is None:
                key = real_stats_key(data_files, int(real.shape[-1]), feature_id)
                cache_path = Path(cache_dir) / f"fid_real_{key}.pt"
                cached = _load_real_stats(cache_path, feature_id)
                if cached is not None and _rank() == 0:  # other ranks add zeros when states are summed
                    metric.real_features_sum += cached["sum"].to(metric.real_features_sum)
                    metric.real_features_cov_sum += cached["cov_sum"].to(metric.real_features_cov_sum)
                    metric.real_features_num_samples += int(cached["num_samples"])
            if cached is None:
                metric.update(to_uint8(real.to(device)), real=True)
            metric.update(to_uint8(generate_fn(batch).to(device)), real=False)
    with metric.sync_context():
        num_real, num_fake = int(metric.real_features_num_samples), int(metric.fake_features_num_samples)
        if num_real != num_fake:
            where = f" (real statistics from {cache_path})" if cached is not None else ""
            raise ValueError(f"FID saw {num_real} real{where} but {num_fake} generated images: a stale "
                             "cache (delete it or fix data_files), ranks that disagree on the cache, or a "
                             "generate_fn that changes the batch size")
        if cache_path is not None and cached is None and _rank() == 0:
            _save_real_stats(cache_path, metric, feature_id)
    return float(metric.compute())


def _load_real_stats(path: Path, feature_id: str) -> dict | None:
    if not path.is_file():
        return None
    stats = torch.load(path, map_location="cpu", weights_only=True)
    if stats.get("feature") != feature_id or stats.get("version") != CACHE_VERSION:
        raise ValueError(f"{path}: cached statistics are for {stats.get('feature')!r} "
                         f"(version {stats.get('version')}), expected {feature_id!r}")
    return stats


def _save_real_stats(path: Path, metric, feature_id: str) -> None:
    buf = io.BytesIO()
    torch.save({"version": CACHE_VERSION, "feature": feature_id,
                "sum": metric.real_features_sum.cpu(), "cov_sum": metric.real_features_cov_sum.cpu(),
                "num_samples": int(metric.real_features_num_samples)}, buf)
    atomic_write_bytes(path, buf.getvalue())
