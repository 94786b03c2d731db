"""`FID vs kimg` of a training run as a PNG, from the run's MLflow metric history.

Series: `fid` (training's FIDCallback) and `eval/fid` / `eval/fd_random_conv` (the `fdf-eval`
job). All are logged at the training step; the x of a point is the `<series>/kimg` logged with it
at the same step. With `--evaluate`, the
checkpoints of `<run_dir>/checkpoints/` (`img*.ckpt` snapshots and `final.ckpt`) that have no result
JSON yet are evaluated first, so one command turns a finished run into its curve. Phase changes
(the `phase/NN` tags of the run) are drawn as dotted lines.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from fdf_core.tario import atomic_write_json
from eval import evaluate
from fdf_core.checkpoints import list_checkpoints, mlflow_target
from fdf_core.errors import ConfigError, NothingToDoError

SERIES = ("fid", *(f"eval/{name}" for name in evaluate.METRIC_NAMES.values()))


@dataclass
class PlotConfig:
    """Plot FID against kimg for one run.

    Args:
        run_dir: the training run folder (config.yaml, checkpoints/, mlflow.db)
        output: PNG path (default `<run_dir>/fid_vs_kimg.png`)
        evaluate: compute the FID of checkpoints that have none yet (needs data_root)
        data_root: FDF shards, as fdf-eval
        feature: as fdf-eval (inception or random_conv)
        inception_weights: as fdf-eval
        num_images: the first that many validation faces; None = all (as fdf-eval)
        batch_size: as fdf-eval
        cache_dir: as fdf-eval
        device: as fdf-eval
        tracking_uri: the MLflow tracking URI (default: from the run's checkpoints, as fdf-eval)
        run_id: the MLflow run (default: from the run's checkpoints, as fdf-eval)
    """

    run_dir: str
    output: str | None = None
    evaluate: bool = False
    data_root: str | None = None
    feature: str = "inception"
    inception_weights: str | None = None
    num_images: int | None = None
    batch_size: int = 50
    cache_dir: str | None = "runs/fid_cache"
    device: str = "cpu"
    tracking_uri: str | None = None
    run_id: str | None = None

    def __post_init__(self) -> None:
        if self.evaluate and self.data_root is None:
            raise ConfigError("--evaluate needs --data_root (the FDF shards the run was trained on)")


def fid_history(tracking_uri: str, run_id: str) -> tuple[dict[str, list[tuple[float, float]]], list[tuple[float, str]]]:
    """({series: [(kimg, fid), ...] sorted}, [(kimg, phase name), ...]) of one MLflow run."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    series = {}
    for key in SERIES:
        if key not in run.data.metrics:
            continue
        kimg_at = {m.step: m.value for m in client.get_metric_history(run_id, f"{key}/kimg")}
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
        series[key] = sorted({kimg_at.get(m.step, float("nan")): m.value for m in history}.items())  # last wins
    # a phase starts where its first `transition/kimg` was logged (metric history is append-only;
    # the `phase/NN` tags of runs resumed before the fix were overwritten at the resume)
    started = {}
    kimg_at = {m.step: m.value for m in client.get_metric_history(run_id, "transition/kimg")}
    for m in sorted(client.get_metric_history(run_id, "transition/phase"), key=lambda m: (m.step, m.timestamp)):
        started.setdefault(int(m.value), kimg_at.get(m.step))
    phases = []
    for tag, text in run.data.tags.items():
        m = re.fullmatch(r"(\S+) from kimg ([0-9.]+).*", text) if tag.startswith("phase/") else None
        if m:
            first = started.get(int(tag.split("/", 1)[1]))
            phases.append((first if first is not None else float(m.group(2)), m.group(1)))
    return series, sorted(phases)


def plot_fid(series: dict[str, list[tuple[float, float]]], phases: list[tuple[float, str]], output: Path,
             title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=key)
    for kimg, name in phases:
        ax.axvline(kimg, color="grey", linestyle=":", linewidth=0.8)
        ax.annotate(name, (kimg, 1), xycoords=("data", "axes fraction"), rotation=90, fontsize=6,
                    va="top", ha="right", color="grey")
    ax.set_xlabel("kimg (thousands of real images shown)")
    ax.set_ylabel("FID (Inception)" if any(not k.endswith("random_conv") for k in series) else
                  "Fréchet distance (random_conv, not FID)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return output


def run(cfg: PlotConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    ckpts = list_checkpoints(run_dir)
    if cfg.evaluate:
        for ckpt in ckpts:
            out = evaluate.default_output(ckpt, cfg.feature)
            if not out.is_file():
                evaluate.run(evaluate.EvaluateConfig(
                    checkpoint=str(ckpt), data_root=cfg.data_root, feature=cfg.feature,
                    inception_weights=cfg.inception_weights, num_images=cfg.num_images, batch_size=cfg.batch_size,
                    cache_dir=cfg.cache_dir, output=str(out), tracking_uri=cfg.tracking_uri, run_id=cfg.run_id,
                    device=cfg.device))
    uri, run_id = cfg.tracking_uri, cfg.run_id
    if (uri is None or run_id is None) and ckpts:
        uri, run_id = mlflow_target(ckpts[-1], uri, run_id)
    if uri is None or run_id is None:
        raise ConfigError(f"{run_dir}: no checkpoint naming its MLflow run: give --tracking_uri and --run_id")
    series, phases = fid_history(uri, run_id)
    if not series:
        raise NothingToDoError(f"MLflow run {run_id} ({uri}) has no FID metric yet: run fdf-eval on its checkpoints "
                               "or pass --evaluate")
    output = Path(cfg.output) if cfg.output else run_dir / "fid_vs_kimg.png"
    atomic_write_json(output.with_name(output.stem + "_options.json"), asdict(cfg))
    plot_fid(series, phases, output, f"{run_dir.name} ({run_id[:8]})")
    return {"output": output, "series": series, "phases": phases}

