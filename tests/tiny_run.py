"""Real training runs of the tiny config, shared by the tests that need a trained model.

`tiny_run`: `fdf-train` (training.cli) on the `fdf_shards` fixture in this process: 8x8 → 16x16 →
32x32 in 12 steps of 8 images, a snapshot every 24 images, MLflow in `<run_dir>/mlflow.db`; for the
evaluation and anonymization tests.

`resume_reference`: an uninterrupted `fdf-train` subprocess with :data:`RESUME_ARGS`, the run that
interrupted and resumed runs must reproduce exactly (tests/test_resume.py). Made once per session;
`ffcv_resume_reference` is the same run reading `train.beton` with FFCV.
Both fixtures are registered in conftest.py (pytest_plugins).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny_cpu.yaml"
SNAPSHOT_IMAGES = (24, 48, 72, 96)
# 4 steps of 8 images per phase: 8 stabilizes (steps 0-3), 16 fades in (4-7) and stabilizes (8-11),
# 32 fades in (12-15) and stabilizes (16-23); last.ckpt every 5 steps; 2 loader workers, so the data
# position of several workers must survive a restart.
RESUME_STEPS = 24
RESUME_ARGS = ["--config", str(TINY), "--model.schedule.fade_kimg", "0.032",
               "--model.schedule.stabilize_kimg", "0.032", "--model.schedule.total_kimg", "0.192",
               "--checkpoint.every_kimg", "0.04", "--samples.every_kimg", "1", "--data.num_workers", "2"]


def train_subprocess(root: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    """`fdf-train` with :data:`RESUME_ARGS` as a subprocess (stdout and stderr merged, as text)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    cmd = [sys.executable, "-m", "training.cli", *RESUME_ARGS, "--data.root", str(root), "--run_dir", str(run_dir),
           *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


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


@pytest.fixture(scope="session")
def resume_reference(fdf_shards, tmp_path_factory) -> Path:
    """The run folder of an uninterrupted run with :data:`RESUME_ARGS`."""
    run_dir = tmp_path_factory.mktemp("resume_reference") / "run"
    finish(train_subprocess(fdf_shards, run_dir))
    return run_dir


@pytest.fixture(scope="session")
def ffcv_resume_reference(fdf_beton, tmp_path_factory) -> Path:
    """The run folder of an uninterrupted run with :data:`RESUME_ARGS` reading `train.beton` with FFCV."""
    run_dir = tmp_path_factory.mktemp("ffcv_resume_reference") / "run"
    finish(train_subprocess(fdf_beton, run_dir, "--data.format", "ffcv"))
    return run_dir
