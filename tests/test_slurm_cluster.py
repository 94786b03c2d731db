"""slurm/: profiles → submitit on the real two-node loopback cluster (slurm/cluster/start.sh).

Single job (its script == the dry run), array with a parallelism cap, a 2-node job that runs a
real gloo all-reduce across n1 and n2, USR2 → checkpoint → requeue → resume (and the requeue
bound), a cancelled job failing instead of hanging, the local executor on the same code, and the
data_prep / fdf_builder arrays writing the same shards as local runs (and redoing only what is
missing).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import cloudpickle
import pyarrow.parquet as pq
import pytest
import submitit

from fdf_core.shards import split_shards
from slurm import build
from slurm.executor import PROFILES_DIR, describe, load_profile, main as show_main, render_sbatch
from slurm.launch import RequeueableTask, distributed_env_from_slurm, submit, submit_array, wait

pytestmark = pytest.mark.slow  # the loopback SLURM cluster (and its dry runs beside it)

# Job functions live in this test module, which jobs cannot import: ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
ENV_KEYS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NODEID",
            "SLURMD_NODENAME", "SLURM_PROCID", "SLURM_NTASKS", "SUBMITIT_LOCAL_JOB_ID")


def task_report(out_dir: str, sleep_s: float = 0.0) -> dict:
    """What a task sees, with its running interval; also written to `out_dir`."""
    start = time.time()
    time.sleep(sleep_s)
    rep = {k: os.environ.get(k) for k in ENV_KEYS}
    rep.update(hostname=socket.gethostname(), dist=distributed_env_from_slurm(), start=start,
               end=time.time())
    name = f"{rep['SLURM_JOB_ID'] or rep['SUBMITIT_LOCAL_JOB_ID']}_{rep['dist']['RANK']}.json"
    Path(out_dir, name).write_text(json.dumps(rep))
    return rep


def gloo_all_reduce() -> dict:
    """Join the job's process group from the SLURM env and sum (rank + 1) over all tasks."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from slurm.launch import export_distributed_env
    env = export_distributed_env()
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    total = torch.tensor([float(env["RANK"]) + 1.0])
    dist.all_reduce(total)
    dist.destroy_process_group()
    return {**{k: os.environ.get(k) for k in ENV_KEYS}, "dist": env, "sum": total.item()}


class StepCounter(RequeueableTask):
    """Counts to `steps`, saving the count after every step; a requeued run resumes from the file."""

    def __init__(self, state: str, steps: int, step_s: float, max_requeues: int = 2) -> None:
        self.state, self.steps, self.step_s, self.max_requeues = state, steps, step_s, max_requeues

    def __call__(self) -> int:
        path = Path(self.state)
        count = int(path.read_text()) if path.exists() else 0
        with open(f"{self.state}.starts", "a") as f:
            f.write(json.dumps({"count": count, "requeues": self.requeues,
                                "job": os.environ.get("SLURM_JOB_ID")}) + "\n")
        while count < self.steps:
            time.sleep(self.step_s)
            count += 1
            path.write_text(str(count))
        return count


def _profile(tmp_path: Path, **overrides):
    return load_profile("local", log_dir=str(tmp_path / "logs"), **overrides)


def test_profiles_dry_run_and_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("USER", "alice")  # example_gpu's log_dir: /checkpoint/$USER/...
    gpu = load_profile("example_gpu")
    assert (gpu.nodes, gpu.tasks_per_node, gpu.gpus_per_node) == (4, 8, 8)
    script = render_sbatch(gpu)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=my_project", "#SBATCH --exclusive",
                 "#SBATCH --signal=USR2@120", "#SBATCH --time=1440", "#SBATCH --mem=480GB",
                 "source ~/fdf-venv/bin/activate"):
        assert line in script.splitlines()
    assert "--array" not in script
    assert "#SBATCH --output=/checkpoint/alice/fdf/slurm_logs/%j/%j_0_log.out" in script.splitlines()
    monkeypatch.delenv("USER")
    with pytest.raises(ValueError, match="log_dir.*unset environment variable"):
        render_sbatch(gpu)
    monkeypatch.setenv("USER", "alice")
    assert "#SBATCH --array=0-9%3" in render_sbatch(replace(gpu, array_parallelism=3), map_count=10)
    assert "--gpus-per-node" not in render_sbatch(load_profile("local"))  # no GRES asked for on CPU
    text = show_main(["--cluster", str(PROFILES_DIR / "example_gpu.yaml"), "--cluster.nodes", "2"])
    assert "#SBATCH --nodes=2" in text and "nodes: 2" in text
    assert capsys.readouterr().out.strip() == text.strip()
    assert "no sbatch script" in describe(load_profile("local", executor="local"))

    bad = tmp_path / "bad.yaml"
    bad.write_text("partition: debug\nnodez: 2\n")
    with pytest.raises(ValueError, match=r"(?s)bad\.yaml.*nodez"):
        load_profile(bad)
    bad.write_text("nodes: many\n")
    with pytest.raises(ValueError, match=r"(?s)bad\.yaml.*cluster.nodes.*many"):
        load_profile(bad)
    with pytest.raises(FileNotFoundError, match="no_such_profile.*shipped: example_gpu, local"):
        load_profile("no_such_profile")
    with pytest.raises(ValueError, match="local executor runs on one node"):
        load_profile("local", executor="local", nodes=2)
    assert split_shards(range(3, 10), 3) == ["3:6", "6:9", "9"]
    assert split_shards([], 4) == []


def test_distributed_env_mapping():
    env = distributed_env_from_slurm({
        "SLURM_JOB_ID": "4242", "SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_NODEID": "1",
        "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu-[007,012]"})
    assert env == {"MASTER_ADDR": "gpu-007", "MASTER_PORT": str(20000 + 4242 % 12000),
                   "WORLD_SIZE": "16", "RANK": "11", "LOCAL_RANK": "3", "NODE_RANK": "1",
                   "LOCAL_WORLD_SIZE": "8"}
    assert distributed_env_from_slurm({})["WORLD_SIZE"] == "1"


def test_single_job_runs_the_dry_run_script(slurm_cluster, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="slurm")
    p = _profile(tmp_path)
    job = submit(p, task_report, str(tmp_path))
    rep = wait([job])[0]
    assert rep["SLURM_JOB_ID"] == job.job_id and rep["SLURMD_NODENAME"] in ("n1", "n2")
    assert job.paths.submission_file.read_text() == render_sbatch(p)  # dry run == what was submitted
    out = caplog.text  # the launcher logs job ids and log paths
    assert f"job {job.job_id}" in out and str(job.paths.stdout) in out
    assert (tmp_path / f"{job.job_id}_0.json").is_file()


def test_job_killed_without_result_fails_instead_of_hanging(slurm_cluster, tmp_path):
    # No accounting here: the squeue watcher must see CANCELLED, or wait() would poll forever.
    job = submit(_profile(tmp_path), StepCounter(str(tmp_path / "count"), steps=600, step_s=0.2))
    _wait_for(lambda: _count(tmp_path / "count") >= 1, 60, "the job to start")
    subprocess.run(["scancel", job.job_id], check=True)
    job._results_timeout_s = 1  # submitit's 15 s grace for a slow shared filesystem; none here
    start = time.time()
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        wait([job], check_s=2, timeout_s=60)
    assert time.time() - start < 20, f"took {time.time() - start:.0f} s to notice"


def test_array_respects_parallelism_cap(slurm_cluster, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="slurm")
    p = _profile(tmp_path, array_parallelism=2)
    jobs = submit_array(p, _sleepy_report, [str(tmp_path)] * 4)
    reps = wait(jobs)
    assert sorted(r["SLURM_ARRAY_TASK_ID"] for r in reps) == ["0", "1", "2", "3"]
    assert len({r["SLURM_ARRAY_JOB_ID"] for r in reps}) == 1
    events = sorted([(r["start"], 1) for r in reps] + [(r["end"], -1) for r in reps])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak == 2, f"expected 2 tasks at once (4 CPUs free, cap 2), saw at most {peak}"
    # submitit leaves an array's script in the log folder itself
    submitted = [f.read_text() for f in (tmp_path / "logs").glob(".submission_file_*.sh")]
    assert submitted == [render_sbatch(p, map_count=4)] and "#SBATCH --array=0-3%2" in submitted[0]
    assert "4 tasks" in caplog.text


def _sleepy_report(out_dir: str) -> dict:
    return task_report(out_dir, sleep_s=3.0)


def test_two_node_job_all_reduces_across_nodes(slurm_cluster, tmp_path):
    p = _profile(tmp_path, nodes=2, tasks_per_node=1, time_min=5)
    job = submit(p, gloo_all_reduce)
    reps = job.results()
    assert {r["SLURM_JOB_ID"] for r in reps} == {job.job_id}
    assert sorted(r["SLURM_NODEID"] for r in reps) == ["0", "1"]
    assert sorted(r["SLURMD_NODENAME"] for r in reps) == ["n1", "n2"]
    assert sorted(r["dist"]["RANK"] for r in reps) == ["0", "1"]
    assert {r["dist"]["MASTER_ADDR"] for r in reps} == {"n1"}
    assert {r["dist"]["MASTER_PORT"] for r in reps} == {str(20000 + int(job.job_id) % 12000)}
    assert [r["sum"] for r in reps] == [3.0, 3.0]  # 1 + 2: both ranks joined one process group


def _wait_for(cond, timeout_s: float, what: str) -> None:
    end = time.time() + timeout_s
    while not cond():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def _count(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except FileNotFoundError:
        return 0


def test_usr2_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    state = tmp_path / "count"
    p = _profile(tmp_path, time_min=5)
    job = submit(p, StepCounter(str(state), steps=20, step_s=0.2))
    _wait_for(lambda: _count(state) >= 4, 60, "the counter to start")
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)  # what preemption sends
    assert wait([job])[0] == 20
    starts = [json.loads(line) for line in Path(f"{state}.starts").read_text().splitlines()]
    assert len(starts) == 2 and starts[0]["count"] == 0 and starts[0]["requeues"] == 0
    assert starts[1]["requeues"] == 1 and 4 <= starts[1]["count"] < 20  # resumed, not restarted
    assert starts[0]["job"] == starts[1]["job"] == job.job_id  # requeued under the same id
    assert "checkpointed, requeue 1/2" in job.stdout()

    # The bound: with max_requeues=0 the signal ends the job instead of requeuing it.
    state0 = tmp_path / "count0"
    job0 = submit(p, StepCounter(str(state0), steps=200, step_s=0.2, max_requeues=0))
    _wait_for(lambda: _count(state0) >= 2, 60, "the second counter to start")
    subprocess.run(["scancel", "--signal=USR2", job0.job_id], check=True)
    with pytest.raises(submitit.core.utils.UncompletedJobError,
                       match="checkpoint function returned None"):
        wait([job0])
    assert _count(state0) < 200


def test_local_executor_runs_the_same_code(tmp_path):
    p = _profile(tmp_path, executor="local")
    job = submit(p, task_report, str(tmp_path))
    rep = wait([job])[0]
    assert rep["SLURM_JOB_ID"] is None and rep["SUBMITIT_LOCAL_JOB_ID"] == job.job_id
    assert rep["dist"]["WORLD_SIZE"] == "1" and rep["dist"]["MASTER_ADDR"] == "127.0.0.1"


def _shards(out: Path) -> dict:
    """Shard bytes and per-record status, without timings."""
    tars = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
    status = {p.name: [(r["key"], r["status"], r["error"]) for r in pq.read_table(p).to_pylist()]
              for p in sorted(out.glob("[0-9]" * 5 + ".parquet"))}
    return {"tars": tars, "status": status}


def _tars(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*.tar"))}


def test_data_stage_arrays_match_local_runs(slurm_cluster, yfcc_metadata, tmp_path, capsys):
    from data_prep.download import DownloadConfig
    from fdf_builder.build import BuildConfig, run as build_run
    cfg = DownloadConfig(metadata=yfcc_metadata.paths[:1], output_dir=str(tmp_path / "cluster"),
                         shard_size=4, threads=4, timeout=5.0, retries=1, progress=False)
    jobs = build.submit_stage("data_prep", cfg, _profile(tmp_path, array_parallelism=2),
                              shards_per_task=2)
    summaries = wait(jobs)
    plan = json.loads((tmp_path / "cluster" / "plan.json").read_text())
    assert plan["num_shards"] >= 5 and len(jobs) == (plan["num_shards"] + 1) // 2 + 1
    assert summaries[-1]["shards"] == plan["num_shards"] and summaries[-1]["run_records"] == 0
    assert summaries[-1]["ok"] == 20  # the 20 served photos; the filtered records never left the plan

    local_cfg = replace(cfg, output_dir=str(tmp_path / "local"))
    local = build.submit_stage("data_prep", local_cfg, _profile(tmp_path, executor="local"),
                               shards_per_task=2)
    wait(local)
    cluster_shards = _shards(tmp_path / "cluster")
    assert cluster_shards == _shards(tmp_path / "local")
    assert len(cluster_shards["tars"]) == plan["num_shards"]

    # Rerun of the array after losing shard 00002: only the task holding it downloads anything.
    for name in ("00002_stats.json", "00002.tar", "00002.parquet"):
        (tmp_path / "cluster" / name).unlink()
    rerun = wait(build.submit_stage("data_prep", cfg, _profile(tmp_path), shards_per_task=2))
    assert [s["run_records"] > 0 for s in rerun[:-1]] == [i == 1 for i in range(len(rerun) - 1)]
    assert _shards(tmp_path / "cluster") == cluster_shards

    # fdf_builder over those raw shards: the CLI's dry run submits nothing, the array (real
    # detector + keypoints in every task) writes what one in-process run writes.
    capsys.readouterr()
    argv = ["--cluster", str(PROFILES_DIR / "local.yaml"), "--cluster.log_dir", str(tmp_path / "logs"),
            "--shards_per_task", "1", "fdf_builder", "--input_dir", str(tmp_path / "cluster"),
            "--output_dir", str(tmp_path / "fdf")]
    build.main(argv[:6] + ["--dry_run", "true"] + argv[6:])
    assert f"#SBATCH --array=0-{plan['num_shards'] - 1}%2" in capsys.readouterr().out
    assert not (tmp_path / "fdf").exists()
    index = build.main(argv + ["--shards", "1:3"])  # 2 tasks of 4 photos: the models are slow here
    local_index = build_run(BuildConfig(input_dir=str(tmp_path / "cluster"), shards="1:3",
                                        output_dir=str(tmp_path / "fdf_local"), progress=False))
    assert sorted(p.name for p in (tmp_path / "fdf" / "stats").iterdir()) == ["00001.json",
                                                                              "00002.json"]
    assert index == local_index and sum(index["splits"].values()) > 0
    assert _tars(tmp_path / "fdf") == _tars(tmp_path / "fdf_local")
