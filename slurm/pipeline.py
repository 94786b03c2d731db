"""`fdf-pipeline`: the main job, every stage in order, on embedded defaults.

Without `--metadata` it stands up the sample corpus (photos embedded in `data_prep/sample/`, or any
folder given with `--corpus`) on a loopback HTTP server and writes YFCC100M metadata lines for it,
so the download stage runs exactly as it would against Flickr. Each stage is resumable, so running
the pipeline again only does what is missing.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep.cli_util import parse_dataclass
from data_prep.tario import atomic_write_json


@dataclass
class PipelineConfig:
    workdir: str = "runs/demo"
    metadata: list[str] = field(default_factory=list)  # YFCC100M files; empty: serve the sample corpus
    corpus: str | None = None  # corpus folder (manifest.tsv + photos/) served when no metadata is given
    corpus_port: int = 18765  # fixed, so a resumed run finds the URLs its download plan recorded
    shard_size: int = 4  # photos per raw shard (tiny, so the demo shows several shards)
    val_fraction: float = 0.2
    resolution: int = 128
    keypoints: str = "movenet"
    device: str = "cpu"
    progress: bool = True


def download_stage(cfg: PipelineConfig, metadata: list[str]) -> dict:
    from data_prep.download import DownloadConfig, run
    return run(DownloadConfig(metadata=metadata, output_dir=str(Path(cfg.workdir) / "raw"),
                              shard_size=cfg.shard_size, progress=cfg.progress))


def build_stage(cfg: PipelineConfig) -> dict:
    from fdf_builder.build import BuildConfig, run
    work = Path(cfg.workdir)
    return run(BuildConfig(input_dir=str(work / "raw"), output_dir=str(work / "fdf"),
                           resolution=cfg.resolution, keypoints=cfg.keypoints, device=cfg.device,
                           val_fraction=cfg.val_fraction, progress=cfg.progress))


@contextlib.contextmanager
def corpus_metadata(cfg: PipelineConfig):
    """The metadata files to download: the user's, or generated for a served sample corpus."""
    if cfg.metadata:
        yield list(cfg.metadata)
        return
    from data_prep import sample
    corpus = Path(cfg.corpus) if cfg.corpus else sample.sample_corpus_dir()
    with sample.CorpusServer(corpus, port=cfg.corpus_port) as base_url:
        path = Path(cfg.workdir) / "corpus" / "yfcc100m_sample.tsv"
        sample.write_yfcc_metadata(path, sample.corpus_records(base_url, corpus))
        yield [str(path)]


def run(cfg: PipelineConfig) -> dict:
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "pipeline_options.json", asdict(cfg))
    summary, start = {}, time.perf_counter()
    with corpus_metadata(cfg) as metadata:
        summary["download"] = download_stage(cfg, metadata)
    summary["build"] = build_stage(cfg)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(work / "pipeline_summary.json", summary)
    print(f"fdf-pipeline: done in {summary['seconds']}s → {work}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    return run(parse_dataclass(PipelineConfig, argv, prog="fdf-pipeline",
                               description="Run the fdf stages end to end (see README)."))


if __name__ == "__main__":
    main()
