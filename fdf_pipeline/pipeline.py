"""`fdf-pipeline`: the main job, every stage in order, on embedded defaults.

download → build → train → evaluate → anonymize. Without `--metadata` it stands up the sample
corpus (photos embedded in `data_prep/sample/`, or any folder given with `--corpus`) on a loopback
HTTP server and writes YFCC100M metadata lines for it, so the download stage runs exactly as it
would against Flickr. Each stage is resumable, so running the pipeline again only does what is
missing. The evaluate stage computes the paper's FID (TF-2015 Inception) of every snapshot of the
tiny run on the demo's few validation faces: the machinery of a real run, on numbers too small to
mean anything. The anonymize stage uses the generator shipped with fdf (`eval/weights/`, trained
by `benchmarks/learning.py`) unless `--anonymize_checkpoint` names another, e.g. the tiny run's.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fdf_core.errors import ConfigError
from fdf_core.tario import atomic_write_json

log = logging.getLogger(__name__)
STAGES = ("download", "build", "train", "evaluate", "anonymize")


@dataclass
class PipelineConfig:
    """The whole pipeline on one machine, each stage in its folder of `workdir`.

    Args:
        workdir: folder of the stages' outputs (raw/, fdf/, train/, fid_cache/, anonymized/)
        metadata: YFCC100M files; empty: serve the sample corpus
        corpus: corpus folder (manifest.tsv + photos/) served when no metadata is given
        corpus_port: fixed, so a resumed run finds the URLs its download plan recorded
        shard_size: photos per raw shard (tiny, so the demo shows several shards)
        val_fraction: share of photos in the validation split
        resolution: side of the stored face crops
        keypoints: keypoint backend of the build stage
        device: cpu or cuda
        stages: stages to run, in order
        train_config: fdf-train YAML of the train stage
        fid_feature: the paper's FID network (inception); random_conv: fast, not FID (see fdf-eval)
        anonymize_input: photo/folder/video to anonymize (default: a sample photo)
        anonymize_checkpoint: generator for the anonymize stage (default: the shipped model)
        progress: show progress bars
    """

    workdir: str = "runs/demo"
    metadata: list[str] = field(default_factory=list)
    corpus: str | None = None
    corpus_port: int = 18765
    shard_size: int = 4
    val_fraction: float = 0.2
    resolution: int = 128
    keypoints: str = "movenet"
    device: str = "cpu"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    train_config: str = str(Path(__file__).resolve().parent.parent / "training" / "configs" / "tiny_cpu.yaml")
    fid_feature: str = "inception"
    anonymize_input: str | None = None
    anonymize_checkpoint: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ConfigError(f"--stages: unknown {sorted(unknown)}; choose from {list(STAGES)}")


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


def train_stage(cfg: PipelineConfig) -> dict:
    from training.train import run as train
    work = Path(cfg.workdir)
    run_dir = work / "train"
    train(["--config", cfg.train_config, "--data.root", str(work / "fdf"), "--run_dir", str(run_dir),
           "--trainer.enable_progress_bar", str(cfg.progress),
           "--checkpoint.snapshot_every_kimg", "0.8"])  # three points for the FID curve
    return {"run_dir": str(run_dir)}


def evaluate_stage(cfg: PipelineConfig) -> dict:
    from eval.plots import PlotConfig, run as plot
    work = Path(cfg.workdir)
    result = plot(PlotConfig(run_dir=str(work / "train"), evaluate=True, data_root=str(work / "fdf"),
                             feature=cfg.fid_feature, cache_dir=str(work / "fid_cache")))
    return {"plot": str(result["output"]), "fid_points": {k: len(v) for k, v in result["series"].items()}}


def anonymize_stage(cfg: PipelineConfig) -> dict:
    from data_prep.sample import sample_corpus_dir
    from eval.anonymize import AnonymizeConfig, run as anonymize
    work = Path(cfg.workdir)
    src = Path(cfg.anonymize_input) if cfg.anonymize_input else (
        sample_corpus_dir() / "photos" / "face_recognition__examples_two_people.jpg")
    dst = work / "anonymized" / (src.name if src.is_file() else src.name + "_anonymized")
    return anonymize(AnonymizeConfig(input=str(src), output=str(dst), progress=cfg.progress,
                                     checkpoint=cfg.anonymize_checkpoint,
                                     keypoints=cfg.keypoints, device=cfg.device))


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
    if "download" in cfg.stages:
        with corpus_metadata(cfg) as metadata:
            summary["download"] = download_stage(cfg, metadata)
    stages = {"build": build_stage, "train": train_stage, "evaluate": evaluate_stage,
              "anonymize": anonymize_stage}
    for name, stage in stages.items():
        if name in cfg.stages:
            log.info("stage %s", name)
            summary[name] = stage(cfg)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(work / "pipeline_summary.json", json.loads(json.dumps(summary, default=str)))
    log.info("done in %ss → %s", summary["seconds"], work)
    return summary

