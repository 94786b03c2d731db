"""Metrics by name, one calling convention for the training callback and the evaluation job.

As in stylegan2-ada's `metric_main`: a metric is a function of :class:`MetricOptions` returning
`{result name: value}`, registered under its function name; :func:`calc_metric` times it and
:func:`report_metric` appends the result as one JSON line to `<run_dir>/metric-<name>.jsonl`, so
every checkpoint's numbers stay beside the run.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from eval import wider
from fdf_core import fid


@dataclass
class MetricOptions:
    """Everything a metric may need; each metric uses its own subset.

    generate_fn / real_loader / data_files: see :func:`fdf_core.fid.compute_fid`.
    detections_dir: detections in the WIDER kit's text layout; wider_root: the kit's .mat files.
    """

    generate_fn: Callable[[dict], torch.Tensor] | None = None
    real_loader: Iterable[dict] | None = None
    data_files: list[str] | None = None
    feature: str | nn.Module = "inception"
    inception_weights: str | None = None
    cache_dir: str | None = None
    device: str = "cpu"
    detections_dir: str | None = None
    wider_root: str | None = None


_metric_dict: dict[str, Callable[[MetricOptions], dict[str, float]]] = {}


def register_metric(fn: Callable[[MetricOptions], dict[str, float]]):
    _metric_dict[fn.__name__] = fn
    return fn


def is_valid_metric(metric: str) -> bool:
    return metric in _metric_dict


def list_valid_metrics() -> list[str]:
    return list(_metric_dict)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def calc_metric(metric: str, opts: MetricOptions) -> dict:
    """Run one metric: `{"metric", "results", "total_time", "num_ranks"}`."""
    if not is_valid_metric(metric):
        raise ValueError(f"unknown metric {metric!r}; choose from {list_valid_metrics()}")
    start = time.perf_counter()
    results = _metric_dict[metric](opts)
    return {"metric": metric, "results": results, "total_time": time.perf_counter() - start,
            "num_ranks": _world_size()}


def report_metric(result: dict, run_dir: str | os.PathLike, snapshot: str | None = None) -> Path | None:
    """Append the result to `<run_dir>/metric-<name>.jsonl` (rank 0 only; one write per line)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    path = Path(run_dir) / f"metric-{result['metric']}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({**result, "snapshot": snapshot, "timestamp": time.time()}, sort_keys=True)
    with open(path, "a") as f:
        f.write(line + "\n")
    return path


def _require(opts: MetricOptions, metric: str, *names: str) -> None:
    missing = [n for n in names if getattr(opts, n) is None]
    if missing:
        raise ValueError(f"metric {metric!r} needs MetricOptions.{', '.join(missing)}")


@register_metric
def fid_val(opts: MetricOptions) -> dict[str, float]:
    """FID over everything `real_loader` yields (the paper: all 50,000 val faces, 128×128, z = 0)."""
    _require(opts, "fid_val", "generate_fn", "real_loader")
    return {"fid_val": fid.compute_fid(opts.generate_fn, opts.real_loader, opts.feature, opts.cache_dir,
                                       opts.data_files, opts.inception_weights, opts.device)}


@register_metric
def wider_ap(opts: MetricOptions) -> dict[str, float]:
    """WIDER FACE val AP (official protocol) of detections written in the kit's text layout."""
    _require(opts, "wider_ap", "detections_dir")
    detections, gt = wider.read_detections(opts.detections_dir), wider.load_wider_gt(opts.wider_root)
    wider.check_coverage(detections, gt, opts.detections_dir)
    aps = wider.evaluate(detections, gt)
    return {f"wider_ap_{d}": ap for d, ap in aps.items()}
