"""A real finished training run of the tiny config, for the evaluation and anonymization tests.

`fdf-train` (training.cli) on the `fdf_shards` fixture: 8x8 → 16x16 → 32x32 in 12 steps of 8
images, a snapshot every 24 images, MLflow in `<run_dir>/mlflow.db`. Both fixtures are
registered in conftest.py (pytest_plugins).
"""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny_cpu.yaml"
SNAPSHOT_IMAGES = (24, 48, 72, 96)


@pytest.fixture(scope="session")
def tiny_run(fdf_shards, tmp_path_factory) -> Path:
    """The run folder: checkpoints/{img*.ckpt, final.ckpt, last.ckpt}, config.yaml, mlflow.db."""
    from training.cli import main
    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    main(["--config", str(TINY), "--data.root", str(fdf_shards), "--run_dir", str(run_dir),
          "--data.num_workers", "0", "--model.schedule.fade_kimg", "0.016",
          "--model.schedule.stabilize_kimg", "0.016", "--model.schedule.total_kimg", "0.096",
          "--checkpoint.every_kimg", "0.096", "--checkpoint.snapshot_every_kimg", "0.024",
          "--samples.every_kimg", "1"])
    assert (run_dir / "checkpoints" / "final.ckpt").is_file()
    return run_dir
