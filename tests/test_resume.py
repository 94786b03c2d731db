"""SIGKILL in the middle of training, resume, and land on the weights of an uninterrupted run.

Both runs are `fdf-train` subprocesses with the tiny config (deterministic algorithms, 2 loader
workers). The resumed run must continue from the checkpoint's step and images shown with the
same resolution and alpha per step, replay the lost steps with the same losses, and finish with
the same weights, EMA and Adam states as the uninterrupted run: tolerance 1e-6 absolute (in
practice the results are bit-identical on one machine).
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6
# 4 steps of 8 images per phase, 8 → 16 → 32, then 40 steps at 32: 64 steps; last.ckpt every 5 steps.
ARGS = ["--config", "training/configs/tiny_cpu.yaml", "--model.schedule.fade_kimg", "0.032",
        "--model.schedule.stabilize_kimg", "0.032", "--model.schedule.total_kimg", "0.512",
        "--checkpoint.every_kimg", "0.04", "--samples.every_kimg", "1", "--data.num_workers", "2"]


def _train(root: Path, run_dir: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "training.cli", *ARGS, "--data.root", str(root), "--run_dir", str(run_dir)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def _history(run_dir: Path, run_id: str, key: str) -> dict[int, list[float]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    values: dict[int, list[float]] = {}
    for m in client.get_metric_history(run_id, key):
        values.setdefault(m.step, []).append(m.value)
    return values


def _two_steps_past_a_checkpoint(run_dir: Path) -> bool:
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return False
    step = torch.load(last, weights_only=True, mmap=True)["progress"]["step"]
    with sqlite3.connect(f"file:{run_dir / 'mlflow.db'}?mode=ro", uri=True, timeout=5) as db:
        (logged,) = db.execute("SELECT MAX(step) FROM metrics WHERE key = 'loss/d'").fetchone()
    return step >= 10 and logged is not None and logged >= step + 1


def test_sigkill_and_resume_matches_an_uninterrupted_run(fdf_shards, tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = _train(fdf_shards, reference_dir)  # runs alongside the one to be killed
    victim = _train(fdf_shards, killed_dir)
    last = killed_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not _two_steps_past_a_checkpoint(killed_dir):  # so that the kill loses some training
        assert victim.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint at step >= 10 within 300 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL

    saved = torch.load(last, map_location="cpu", weights_only=True)
    progress = saved["progress"]
    assert not progress["done"] and progress["step"] % 5 == 0 and progress["images_shown"] == 8 * progress["step"]
    killed_losses = _history(killed_dir, saved["mlflow_run_id"], "loss/d")
    lost = [s for s in killed_losses if s >= progress["step"]]  # trained after the checkpoint, then lost

    out = _finish(_train(fdf_shards, killed_dir))
    _finish(reference)
    assert (f"resuming from {last} at step {progress['step']}, kimg {progress['images_shown'] / 1000:.3f}, "
            f"{progress['phase']} alpha {progress['alpha']:.3f}") in out

    ref = torch.load(reference_dir / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    res = torch.load(killed_dir / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    assert res["progress"] == ref["progress"] and res["progress"]["step"] == 64
    assert res["mlflow_run_id"] == saved["mlflow_run_id"]  # the resumed run continues the same MLflow run
    worst = max((a - ref["state_dict"][k]).abs().max().item() for k, a in res["state_dict"].items())
    assert worst <= TOLERANCE, f"weights differ by {worst}"
    for opt_ref, opt_res in zip(ref["optimizer_states"], res["optimizer_states"]):
        for i, st in opt_ref["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.allclose(st[name], opt_res["state"][i][name], atol=TOLERANCE, rtol=0)

    ref_id = ref["mlflow_run_id"]
    for key in ("progress/kimg", "progress/resolution", "progress/alpha", "loss/d", "loss/gp", "loss/g"):
        want, got = _history(reference_dir, ref_id, key), _history(killed_dir, res["mlflow_run_id"], key)
        assert sorted(got) == list(range(64)), key
        for step, values in got.items():  # replayed steps were logged twice, with the same values
            assert all(abs(v - want[step][0]) <= TOLERANCE for v in values), (key, step, values, want[step])
    assert lost, "the kill should have lost some steps after the checkpoint"
    assert all(len(_history(killed_dir, res["mlflow_run_id"], "loss/d")[s]) == 2 for s in lost)
    assert not list((killed_dir / "checkpoints").glob("*.tmp-*"))
