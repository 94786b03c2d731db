"""slurm.evaluate: the FID job as an array over checkpoints on the real two-node loopback cluster.

One array task per checkpoint runs fdf-eval's `run` and writes that checkpoint's result JSON and
metric; the same array on the local executor gives the same numbers; done checkpoints are skipped;
the dry run submits nothing and runs every task as one process.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from fdf_shards import fdf_shards  # noqa: F401  (fixture)
from mlflow.tracking import MlflowClient

from eval import evaluate
from slurm import evaluate as slurm_eval
from slurm.executor import PROFILES_DIR

pytestmark = pytest.mark.slow  # the loopback SLURM cluster

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = ("img0000000024.ckpt", "final.ckpt")  # 8x8 → 16x16 fade-in at 24 images, 32x32 at the end


@pytest.fixture(scope="module")
def run_dir(fdf_shards, tmp_path_factory) -> Path:
    """A finished tiny run of its own (8x8 → 32x32 in 12 steps, a snapshot every 24 images)."""
    from training.cli import main
    run_dir = tmp_path_factory.mktemp("slurm_eval") / "run"
    main(["--config", str(REPO / "training" / "configs" / "tiny_cpu.yaml"), "--data.root", str(fdf_shards),
          "--run_dir", str(run_dir), "--data.num_workers", "0", "--model.schedule.fade_kimg", "0.016",
          "--model.schedule.stabilize_kimg", "0.016", "--model.schedule.total_kimg", "0.096",
          "--checkpoint.every_kimg", "0.096", "--checkpoint.snapshot_every_kimg", "0.024",
          "--samples.every_kimg", "1", "--trainer.enable_progress_bar", "false"])
    return run_dir


def _args(run_dir: Path, fdf_shards: Path, logs: Path, *extra: str) -> list[str]:
    return ["--cluster", str(PROFILES_DIR / "local.yaml"), "--cluster.log_dir", str(logs),
            "--checkpoints", json.dumps([str(run_dir / "checkpoints" / n) for n in CHECKPOINTS]),
            "--data_root", str(fdf_shards), "--feature", "random_conv", "--batch_size", "8",
            "--cache_dir", str(logs.parent / "fid_cache"), *extra]


def test_dry_run_submits_nothing_and_runs_single_process_tasks(run_dir, fdf_shards, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="slurm")
    args = _args(run_dir, fdf_shards, tmp_path / "logs", "--dry_run", "true")
    args[1] = str(PROFILES_DIR / "example_gpu.yaml")  # 4 nodes x 8 GPUs: each task gets 1 node, 1 GPU
    assert slurm_eval.main(args + ["--device", "cuda"]) is None
    out = capsys.readouterr().out  # the dry run's output: profile, sbatch script, tasks
    assert "2 of 2 checkpoints to evaluate" in caplog.text
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --job-name=fdf-train-eval",
                 "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=1", "# evaluation tasks",
                 f'"output": "{run_dir / "eval" / "fd_random_conv_final.json"}"'):
        assert line in out, line
    assert not (tmp_path / "logs").exists() and not (run_dir / "eval").exists()

    slurm_eval.main(["--run_dir", str(run_dir), "--data_root", str(fdf_shards), "--dry_run", "true"])
    snapshots = sorted(p.name for p in (run_dir / "checkpoints").glob("img*.ckpt"))
    assert snapshots == [f"img{n:010d}.ckpt" for n in (24, 48, 72, 96)]
    assert "5 of 5 checkpoints to evaluate" in caplog.text  # the snapshots and final.ckpt

    with pytest.raises(FileNotFoundError, match="no_such.ckpt does not exist"):
        slurm_eval.main(["--checkpoints", f"[{tmp_path / 'no_such.ckpt'}]", "--dry_run", "true"])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        slurm_eval.main(["--dry_run", "true"])


def test_array_over_two_checkpoints_writes_one_result_each(slurm_cluster, run_dir, fdf_shards, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="slurm")
    logs = tmp_path / "logs"
    results = slurm_eval.main(_args(run_dir, fdf_shards, logs))
    out = caplog.text
    assert "submitted fdf-eval (slurm): 2 tasks" in out and str(logs) in out
    array_id = out.split("job ids ")[1].split("_")[0]
    record = json.loads((run_dir / "eval" / f"slurm_eval_{array_id}.json").read_text())
    assert [j["job_id"] for j in record["jobs"]] == [f"{array_id}_0", f"{array_id}_1"]

    run_id = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True)["mlflow_run_id"]
    expected = {"img0000000024": (24, 16), "final": (96, 32)}  # images shown, resolution reached
    for r, (stem, (images, resolution)) in zip(results, expected.items()):
        saved = json.loads((run_dir / "eval" / f"fd_random_conv_{stem}.json").read_text())
        assert saved == r and saved["checkpoint"] == str(run_dir / "checkpoints" / f"{stem}.ckpt")
        assert (saved["images_shown"], saved["resolution"], saved["num_images"]) == (images, resolution, 16)
        assert saved["fid"] > 0 and saved["run_id"] == run_id
    assert results[0]["fid"] != results[1]["fid"]

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    history = {m.step: m.value for m in client.get_metric_history(run_id, "eval/fd_random_conv")}
    assert history == {3: pytest.approx(results[0]["fid"]), 12: pytest.approx(results[1]["fid"])}  # training steps
    tags = client.get_run(run_id).data.tags
    assert tags["slurm.eval.job_ids"] == f"{array_id}_0 {array_id}_1" and tags["slurm.eval.log_dir"] == str(logs)

    # The laptop's path: fdf-eval in this process gives the array task's number.
    local = evaluate.run(evaluate.EvaluateConfig(
        checkpoint=str(run_dir / "checkpoints" / "final.ckpt"), data_root=str(fdf_shards), feature="random_conv",
        batch_size=8, cache_dir=str(tmp_path / "fid_cache"), output=str(tmp_path / "final.json"), log_mlflow=False))
    assert local["fid"] == pytest.approx(results[1]["fid"], rel=1e-6)

    caplog.clear()
    assert slurm_eval.main(_args(run_dir, fdf_shards, logs)) is None  # both done: nothing submitted
    assert "0 of 2 checkpoints to evaluate" in caplog.text

    again = slurm_eval.main(_args(run_dir, fdf_shards, tmp_path / "local_logs", "--cluster.executor", "local",
                                  "--skip_done", "false"))
    assert [r["fid"] for r in again] == pytest.approx([r["fid"] for r in results], rel=1e-6)
    assert client.get_run(run_id).data.tags["slurm.eval.executor"] == "local"
