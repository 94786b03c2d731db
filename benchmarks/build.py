"""Throughput of fdf-build on the shared sample corpus; prints one JSON object.

The corpus is downloaded once (loopback HTTP, as in the tests) into raw shards; only the build is
timed. `outside_models_fraction` is the share of build wall time not spent in the detector and
keypoint model calls (decode, crop, encode, tar writing that the prefetch thread does not hide;
goal <= 0.10).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from data_prep import sample
from fdf_core.assets import assets_dir
from data_prep.download import DownloadConfig
from data_prep.download import run as download
from fdf_builder.build import BuildConfig
from fdf_builder.build import run as build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--corpus", default=str(assets_dir() / "corpus"))
    p.add_argument("--shard_size", type=int, default=16)
    p.add_argument("--keypoints", default="movenet")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--processes", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        meta = Path(tmp) / "meta.tsv"
        with sample.CorpusServer(args.corpus) as url:
            sample.write_yfcc_metadata(meta, sample.corpus_records(url, args.corpus))
            download(DownloadConfig(metadata=[str(meta)], output_dir=f"{tmp}/raw",
                                    shard_size=args.shard_size, progress=False))
        cfg = BuildConfig(input_dir=f"{tmp}/raw", output_dir=f"{tmp}/fdf", keypoints=args.keypoints,
                          batch_size=args.batch_size, processes=args.processes, progress=False)
        start = time.perf_counter()
        build(cfg)
        wall = time.perf_counter() - start
        stats = [json.loads(f.read_text()) for f in sorted(Path(tmp, "fdf", "stats").glob("*.json"))]
    photos = sum(s["photos"] for s in stats)
    faces = sum(s["faces_kept"] for s in stats)
    shard_secs = sum(s["seconds"] for s in stats)
    model_secs = sum(s["model_seconds"] for s in stats)
    print(json.dumps({
        "photos": photos, "faces_detected": sum(s["faces_detected"] for s in stats), "faces_kept": faces,
        "wall_seconds": round(wall, 2), "images_per_s": round(photos / wall, 3),
        "faces_per_s": round(faces / wall, 3),
        "outside_models_fraction": round(1 - model_secs / shard_secs, 4), "goal_outside": 0.10,
        "keypoints": args.keypoints, "processes": args.processes,
    }))


if __name__ == "__main__":
    main()
