"""Samples/s per loader core at 128x128: the tar reader, the FFCV loader, and the same JPEGs from files.

What a cluster user needs to choose `--data.format`: how many CPU cores each reader needs per GPU to
feed 1,000 img/s. Each reader runs with ONE worker (a DataLoader process for the tar reader and the
files, an FFCV thread) and delivers what training consumes: the batch of training.datamodule
(uint8 images (B,3,128,128), boxes, keypoints with low scores masked), 64 per batch as the paper's
128x128 phase. The augmentations training uses (mirroring, pooling to the phase's resolution,
fading, blanking the box: training.conditioning.prepare) run on the GPU inside the training step,
so they cost no loader core; `prepare_on_cpu` is their price on one CPU core, for a CPU-only run.

- tar: training.datamodule.ShardStream, the training path (tar reading, shuffle buffer, PIL decode)
- ffcv: training.ffcv_stream.FFCVStream over the split's `.beton` (fdf_builder.ffcv_export), the
  training path with FFCV's compiled turbojpeg decode
- files: the same JPEG and JSON bytes as one file each, decoded like the tar reader (the floor a
  tar reader cannot beat with this decoder)

The samples are real faces: the built shards under `--fdf_dir` (128x128), else the UTKFace crops of
the shared assets resized to 128x128, repeated to `--samples` and packed into shards of
`--shard_samples`. Rounds are interleaved, so load from other jobs on the machine hits every reader
alike: the ratios of one run are the figures to compare. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from fdf_core.assets import assets_dir
from fdf_core.keypoints import KEYPOINT_NAMES
from fdf_core.tario import AtomicTarWriter, atomic_write_json, iter_samples, json_bytes
from training.datamodule import ShardStream, collate, decode_sample, list_shards
from training.schedule import Schedule

RESOLUTION, BATCH, TARGET_IMG_PER_S = 128, 64, 1000


def utkface_samples(folder: Path, limit: int) -> list[dict[str, bytes]]:
    """UTKFace crops as FDF samples at 128x128 (box and keypoints at their usual places: what the
    loader pays does not depend on their values)."""
    out = []
    for path in sorted(folder.glob("*.jpg"))[:limit]:
        image = Image.open(path).convert("RGB").resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=95)
        meta = {"bbox": [0.2, 0.2, 0.8, 0.8], "keypoint_names": list(KEYPOINT_NAMES),
                "keypoints": [[0.5, 0.55, 0.9], [0.6, 0.4, 0.9], [0.4, 0.4, 0.9], [0.75, 0.5, 0.5],
                              [0.25, 0.5, 0.5], [0.9, 0.95, 0.3], [0.1, 0.95, 0.3]]}
        out.append({"jpg": buf.getvalue(), "json": json_bytes(meta)})
    return out


def source_samples(fdf_dir: str | None, limit: int) -> list[dict[str, bytes]]:
    if fdf_dir:
        tars = sorted(Path(fdf_dir).glob("*/*.tar"))
        samples = [m for tar in tars for _, m in iter_samples(tar)]
        if not samples:
            raise SystemExit(f"no samples under {fdf_dir}/*/*.tar")
        side = Image.open(io.BytesIO(samples[0]["jpg"])).size[0]
        if side != RESOLUTION:
            raise SystemExit(f"{fdf_dir}: crops are {side}x{side}, the benchmark is at {RESOLUTION}x{RESOLUTION}")
        return samples
    folder = assets_dir() / "faces" / "utkface"
    if not folder.is_dir():
        raise SystemExit(f"no --fdf_dir and no UTKFace crops at {folder} (set FDF_ASSETS)")
    return utkface_samples(folder, limit)


def write_inputs(samples: list[dict[str, bytes]], n: int, shard_samples: int, root: Path) -> list[tuple[Path, Path]]:
    """`root/train/*.tar` + sizes.json + train.beton, and every sample as files: the same bytes."""
    sizes, files, writer = {}, [], None
    for i in range(n):
        if i % shard_samples == 0:
            if writer:
                writer.close()
            name = f"train/{i // shard_samples:05d}.tar"
            writer = AtomicTarWriter(root / name)
            sizes[name] = min(shard_samples, n - i)
        members = samples[i % len(samples)]
        writer.add_sample(f"{i:09d}", members)
        pair = (root / "files" / f"{i:09d}.jpg", root / "files" / f"{i:09d}.json")
        pair[0].parent.mkdir(exist_ok=True)
        pair[0].write_bytes(members["jpg"])
        pair[1].write_bytes(members["json"])
        files.append(pair)
    writer.close()
    atomic_write_json(root / "sizes.json", sizes)
    from fdf_builder.ffcv_export import export_ffcv
    export_ffcv(root, "train", num_workers=1)
    return files


class JpegFiles(torch.utils.data.Dataset):
    """The samples as files, decoded by the tar reader's decode_sample, batched by its collate."""

    def __init__(self, files: list[tuple[Path, Path]]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        jpg, meta = self.files[i]
        return decode_sample(str(jpg), jpg.stem, {"jpg": jpg.read_bytes(), "json": meta.read_bytes()}, 0.0)


def _collate(items):
    return collate(items, "files")


def timed(batches) -> tuple[int, float, float]:
    """(samples after the first batch, their seconds, seconds to the first batch)."""
    start = time.perf_counter()
    it = iter(batches)
    next(it)
    first = time.perf_counter()
    n = sum(b["images"].shape[0] for b in it)
    return n, time.perf_counter() - first, first - start


def readers(root: Path, files: list[tuple[Path, Path]], n: int, shuffle_buffer: int):
    """{name: a function making a fresh one-worker reader of the n samples}."""
    from training.ffcv_stream import FFCVStream, open_beton
    schedule = Schedule(start_resolution=RESOLUTION, max_resolution=RESOLUTION, total_kimg=n / 1000,
                        batch_sizes={RESOLUTION: BATCH})
    shards, sizes = list_shards(root, "train")
    beton = open_beton(root / "train.beton")
    return {
        "tar": lambda: torch.utils.data.DataLoader(
            ShardStream(shards, sizes, schedule, 0, 0, 1, 0, shuffle_buffer, 0.0), batch_size=None,
            num_workers=1, prefetch_factor=4),
        "ffcv": lambda: FFCVStream(beton, schedule, 0, 0, 1, 0, 1, 0.0),
        "files": lambda: torch.utils.data.DataLoader(JpegFiles(files), batch_size=BATCH, shuffle=True,
                                                     num_workers=1, prefetch_factor=4, collate_fn=_collate),
    }


def prepare_rate(rounds: int) -> float:
    """Samples/s of training.conditioning.prepare (mirror, pool to 64, fade, blank) on one CPU core."""
    from fdf_core.keypoints import flip_permutation
    from training.conditioning import prepare
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (BATCH, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8, generator=g)
    bbox = torch.tensor([[0.2, 0.2, 0.8, 0.8]]).repeat(BATCH, 1)
    kps = torch.rand(BATCH, len(KEYPOINT_NAMES), 2, generator=g)
    flip = torch.rand(BATCH, generator=g) < 0.5
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(20):
            prepare(images, bbox, kps, 64, 0.5, flip, flip_permutation())
        rates.append(20 * BATCH / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fdf_dir", default=None, help="built FDF shards at 128x128 (default: UTKFace crops)")
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--source_samples", type=int, default=2000, help="distinct UTKFace crops to repeat")
    p.add_argument("--shard_samples", type=int, default=1000)
    p.add_argument("--shuffle_buffer", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)  # the consumer's copies too: one core per reader, as a DataLoader worker has
    n = args.samples - args.samples % BATCH
    samples = source_samples(args.fdf_dir, args.source_samples)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_inputs(samples, n, args.shard_samples, root)
        make = readers(root, files, n, args.shuffle_buffer)
        for name, reader in make.items():  # warm the page cache, FFCV's code generation
            timed(reader())
        rates: dict[str, list[float]] = {k: [] for k in make}
        startup: dict[str, list[float]] = {k: [] for k in make}
        for _ in range(args.rounds):
            for name, reader in make.items():
                got, secs, first = timed(reader())
                assert got == n - BATCH, (name, got)
                rates[name].append(got / secs)
                startup[name].append(first)
    per_core = {k: statistics.median(v) for k, v in rates.items()}
    print(json.dumps({
        "resolution": RESOLUTION, "batch_size": BATCH, "samples": n, "rounds": args.rounds,
        "source": args.fdf_dir or "UTKFace crops (shared assets) resized to 128x128",
        "distinct_faces": len(samples), "shard_samples": args.shard_samples, "workers": 1,
        "samples_per_s_per_core": {k: round(v, 1) for k, v in per_core.items()},
        "cores_per_gpu_at_1000_img_per_s": {k: round(TARGET_IMG_PER_S / v, 3) for k, v in per_core.items()},
        "seconds_to_first_batch": {k: round(statistics.median(v), 2) for k, v in startup.items()},
        "ffcv_over_tar": round(per_core["ffcv"] / per_core["tar"], 3), "goal_ffcv_over_tar": 1.5,
        "tar_over_files": round(per_core["tar"] / per_core["files"], 3),
        "prepare_on_cpu_samples_per_s_per_core": round(prepare_rate(args.rounds), 1),
        "all_rounds": {k: [round(r, 1) for r in v] for k, v in rates.items()},
        "load_average_1min": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
