"""slurm.train on the real two-node loopback cluster: fdf-train as one job of two tasks (one per
node, gloo on CPU) through the tiny config's resolution transitions, preempted mid-run with USR2,
requeued, and resumed from the images shown at the signal; the requeue bound; the same task on the
local executor; the dry run for 4 nodes x 8 GPUs; Lightning's own SLURM handling switched off.
"""
from __future__ import annotations

import json
import logging
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import submitit
import torch
from fdf_shards import fdf_shards  # noqa: F401  (fixture)
from mlflow.tracking import MlflowClient
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from slurm import train
from slurm.compat import cluster_environment, lightning_signal_handlers
from slurm.executor import PROFILES_DIR, load_profile

pytestmark = pytest.mark.slow  # the loopback SLURM cluster, multi-process training

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "training" / "configs" / "tiny_cpu.yaml")
STEPS = 120  # of 8 images: 4 per phase 8 → fade16 → 16 → fade32, then 104 at 32x32


def _train_args(root: Path, run_dir: Path, total_kimg: float = STEPS * 8 / 1000) -> list[str]:
    # No periodic checkpoint before the end: the only last.ckpt mid-run is the one the signal makes.
    return ["--config", TINY, "--data.root", str(root), "--run_dir", str(run_dir),
            "--model.schedule.fade_kimg", "0.032", "--model.schedule.stabilize_kimg", "0.032",
            "--model.schedule.total_kimg", str(total_kimg), "--checkpoint.every_kimg", "100",
            "--samples.every_kimg", "100", "--trainer.enable_progress_bar", "false"]


def _profile(tmp_path: Path, **overrides) -> object:
    return load_profile("local", log_dir=str(tmp_path / "logs"), **overrides)


def _last_logged_step(run_dir: Path) -> int:
    try:
        with sqlite3.connect(f"file:{run_dir / 'mlflow.db'}?mode=ro", uri=True, timeout=5) as db:
            (step,) = db.execute("SELECT MAX(step) FROM metrics WHERE key = 'loss/d'").fetchone()
    except sqlite3.Error:  # not created or locked by the writer right now
        return -1
    return -1 if step is None else step


def _wait_for_step(run_dir: Path, step: int, job: submitit.Job, timeout_s: float = 120) -> int:
    end = time.time() + timeout_s
    while (logged := _last_logged_step(run_dir)) < step:
        assert time.time() < end, f"training did not reach step {step} in {timeout_s} s: {job.paths.stderr}"
        time.sleep(0.1)
    return logged


def _mlflow(run_dir: Path) -> tuple[MlflowClient, str, dict]:
    final = torch.load(run_dir / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    return client, final["mlflow_run_id"], final["progress"]


def test_two_node_training_is_preempted_requeued_and_resumes(slurm_cluster, fdf_shards, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="slurm")
    run_dir = tmp_path / "run"
    p = _profile(tmp_path, nodes=2, tasks_per_node=1, time_min=10)
    job = train.submit_training(_train_args(fdf_shards, run_dir), p, max_requeues=2)
    out = caplog.text
    assert f"job {job.job_id}" in out and str(job.paths.stdout) in out  # where the logs are
    record = json.loads((run_dir / "slurm" / f"job_{job.job_id}.json").read_text())
    assert record["cluster"]["nodes"] == 2 and Path(record["config"]).is_file()

    signalled_after = _wait_for_step(run_dir, 6, job)  # past the first transition (fade16 from step 4)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)  # what preemption sends
    ranks = train.wait_tasks(job, timeout_s=240)
    assert [r["rank"] for r in ranks] == [0, 1] and {r["job_id"] for r in ranks} == {job.job_id}
    assert all(r["requeues"] == 1 and r["progress"]["done"] and r["progress"]["step"] == STEPS for r in ranks)
    client, run_id, progress = _mlflow(run_dir)
    assert progress == {"step": STEPS, "images_shown": 8 * STEPS, "resolution": 32, "alpha": 1.0,
                        "phase": "stabilize32", "done": True}
    tags = client.get_run(run_id).data.tags
    assert tags["slurm.job_id"] == job.job_id and tags["slurm.requeues"] == "1"
    assert tags["slurm.log_dir"] == str(tmp_path / "logs" / job.job_id)
    assert tags["slurm.nodes"] == "2" and tags["slurm.tasks"] == "2"
    saved = tags["slurm.preempted.1"]  # "step S images_shown 8S", written at the step after the signal
    step = int(saved.split()[1])
    assert signalled_after < step < STEPS and saved == f"step {step} images_shown {8 * step}"
    assert tags["slurm.resumed.1"] == saved  # the requeued job started from exactly that state
    phases = sorted(v.split()[0] for k, v in tags.items() if k.startswith("phase/"))
    assert phases == ["fade16", "fade32", "stabilize16", "stabilize32", "stabilize8"]
    # each transition logged once, where it happened, not again where the requeued job resumed
    transitions = sorted(int(m.value) for m in client.get_metric_history(run_id, "transition/phase"))
    assert transitions == [0, 1, 2, 3, 4]

    # Every step trained and logged exactly once: nothing lost or replayed around the requeue.
    logged = [m.step for m in client.get_metric_history(run_id, "loss/d")]
    assert sorted(logged) == list(range(STEPS))
    log = job.stdout()
    assert "requeue: job %s checkpointed, requeue 1/2" % job.job_id in log
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'} at step {step}, kimg {8 * step / 1000:.3f}" in log
    # Lightning's own SLURM requeue never ran: it would have written an hpc checkpoint.
    assert not list(run_dir.rglob("hpc_ckpt_*.ckpt"))


def test_requeue_bound_ends_the_job_with_the_state_saved(slurm_cluster, fdf_shards, tmp_path):
    run_dir = tmp_path / "run"
    job = train.submit_training(_train_args(fdf_shards, run_dir, total_kimg=4.0), _profile(tmp_path),
                                max_requeues=0)
    _wait_for_step(run_dir, 3, job)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="checkpoint function returned None"):
        train.wait_tasks(job, timeout_s=120)
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["progress"]
    assert 3 < saved["step"] < 500 and not saved["done"]  # resubmitting resumes from here
    assert "was requeued 0 times already (max_requeues=0); giving up" in job.stdout()
    assert not (run_dir / "checkpoints" / "final.ckpt").exists()


def test_local_executor_runs_the_same_task_with_two_processes(fdf_shards, tmp_path):
    run_dir = tmp_path / "run"
    p = _profile(tmp_path, executor="local", tasks_per_node=2)
    job = train.submit_training(_train_args(fdf_shards, run_dir, total_kimg=0.128), p)
    ranks = train.wait_tasks(job, timeout_s=240)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["progress"]["step"] == 16 for r in ranks)
    client, run_id, _ = _mlflow(run_dir)
    tags = client.get_run(run_id).data.tags
    assert tags["slurm.executor"] == "local" and tags["slurm.tasks"] == "2" and tags["slurm.job_id"] == job.job_id
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss/d")) == list(range(16))


def test_dry_run_for_four_nodes_of_eight_gpus(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("USER", "alice")
    gpu = load_profile("example_gpu")
    run_dir = tmp_path / "run"
    args = ["--data.root", "/data/fdf", "--run_dir", str(run_dir), "--trainer.accelerator", "gpu",
            "--trainer.precision", "16-mixed"]
    train.main(["--cluster", str(PROFILES_DIR / "example_gpu.yaml"), "--dry_run", "true", "--", *args])
    out = capsys.readouterr().out
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR2@120", " -u -m submitit.core._submit /checkpoint/alice/fdf/slurm_logs/%j",
                 "# resolved fdf-train config", "num_nodes: 4", "devices: '8'", "precision: 16-mixed",
                 "- class_path: slurm.train.TaskEnvironment", "- class_path: slurm.train.PreemptionCheckpoint",
                 "base_width: 256", f"run_dir: {run_dir}"):
        assert line in out, line
    assert not run_dir.exists()  # nothing written, nothing submitted

    with pytest.raises(ValueError, match=r"batch_sizes \{8: 8, 16: 8, 32: 8\} are not divisible by the 32 tasks"):
        train.submit_training(["--config", TINY, "--trainer.accelerator", "gpu"], gpu, dry_run=True)
    with pytest.raises(ValueError, match="trainer.accelerator is cpu"):
        train.submit_training(["--config", TINY], gpu, dry_run=True)
    with pytest.raises(ValueError, match="one task per GPU"):
        train.submit_training(args, load_profile("example_gpu", tasks_per_node=1), dry_run=True)


SLURM_TASK = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
              "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]",
              "SLURM_NNODES": "2", "SLURM_JOB_NAME": "fdf", "SLURM_NTASKS_PER_NODE": "1"}


def test_lightning_takes_the_layout_from_our_mapping_and_installs_no_requeue(monkeypatch):
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # the trainers below set it to 1
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}

    default = pl.Trainer(accelerator="cpu", devices=1, num_nodes=2, logger=False)  # what we switch off
    assert type(cluster_environment(default)).__name__ == "SLURMEnvironment"
    with lightning_signal_handlers(default):
        assert signal.getsignal(signal.SIGUSR1) != before[signal.SIGUSR1]  # Lightning's auto-requeue

    trainer = pl.Trainer(accelerator="cpu", devices=1, num_nodes=2, logger=False,
                         plugins=[train.TaskEnvironment()])
    env = cluster_environment(trainer)
    assert isinstance(env, train.TaskEnvironment) and env.creates_processes_externally
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (2, 1, 0, 1)
    assert (env.main_address, env.main_port) == ("n1", 20000 + 4242 % 12000)
    with lightning_signal_handlers(trainer):
        assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(ValueError, match=r"num_nodes=1, trainer.devices=2 do not match the job's 2 tasks \(1 per"):
        env.validate_settings(num_devices=2, num_nodes=1)
