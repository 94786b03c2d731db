"""Samples/s reading FDF shards through a DataLoader vs decoding the same JPEGs from files.

Both sides decode the same bytes with the same decoder into the same tensors, with the same
workers and batch size, so the ratio isolates what the tar/webdataset path costs (goal >= 0.9).
The samples of the built shards are repacked into shards of `--shard_samples` (real shards hold
thousands of faces; the demo's hold a handful, and opening a tar per 4 samples is not what a training
job pays). Prints one JSON object. Needs built shards: `fdf-pipeline` (runs/demo/fdf) or --fdf_dir.
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from fdf_core.tario import AtomicTarWriter, iter_samples


def decode_jpg(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def _wds_sample(sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    meta = json.loads(sample["json"])
    return decode_jpg(sample["jpg"]), torch.tensor(meta["bbox"])


class JpegFiles(torch.utils.data.Dataset):
    def __init__(self, files: list[tuple[Path, Path]]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        jpg, meta = self.files[i]
        return decode_jpg(jpg.read_bytes()), torch.tensor(json.loads(meta.read_text())["bbox"])


def timed(loader) -> tuple[int, float]:
    n, start = 0, time.perf_counter()
    for images, _ in loader:
        n += images.shape[0]
    return n, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--fdf_dir", default="runs/demo/fdf")
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--shard_samples", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    tars = sorted(Path(args.fdf_dir).glob("*/*.tar"))
    if not tars:
        raise SystemExit(f"no shards under {args.fdf_dir}/*/*.tar: run fdf-pipeline first or pass --fdf_dir")
    samples = [members for tar in tars for _, members in iter_samples(tar)]
    if not samples:
        raise SystemExit(f"the shards under {args.fdf_dir} hold no samples")
    with tempfile.TemporaryDirectory() as tmp:
        files, urls, writer = [], [], None
        for i in range(args.samples):
            members = samples[i % len(samples)]
            if i % args.shard_samples == 0:
                if writer:
                    writer.close()
                urls.append(f"{tmp}/{len(urls):05d}.tar")
                writer = AtomicTarWriter(urls[-1])
            key = f"{i:09d}"
            writer.add_sample(key, members)
            for ext in ("jpg", "json"):
                (Path(tmp) / f"{key}.{ext}").write_bytes(members[ext])
            files.append((Path(tmp) / f"{key}.jpg", Path(tmp) / f"{key}.json"))
        writer.close()
        kw = dict(batch_size=args.batch_size, num_workers=args.workers)
        shards = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                                workersplitter=wds.split_by_worker).map(_wds_sample)
        direct = JpegFiles(files)
        timed(torch.utils.data.DataLoader(direct, **kw))  # warm the page cache and workers
        rates = {"shards": [], "files": []}
        for _ in range(args.rounds):  # interleaved, so load from elsewhere hits both sides alike
            for name, ds in (("shards", shards), ("files", direct)):
                n, secs = timed(torch.utils.data.DataLoader(ds, **kw))
                assert n == args.samples, (name, n)
                rates[name].append(n / secs)
    wds_rate, dir_rate = (float(np.median(rates[k])) for k in ("shards", "files"))
    print(json.dumps({"samples": args.samples, "rounds": args.rounds,
                      "shards_samples_per_s": round(wds_rate, 1),
                      "jpeg_files_samples_per_s": round(dir_rate, 1),
                      "ratio": round(wds_rate / dir_rate, 3), "goal_ratio": 0.9,
                      "shard_samples": args.shard_samples, "batch_size": args.batch_size,
                      "workers": args.workers}))


if __name__ == "__main__":
    main()
