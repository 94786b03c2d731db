"""`python -m slurm.train`: fdf-train as one multi-node job, preemptible and requeued from `last.ckpt`.

    python -m slurm.train --cluster slurm/profiles/example_gpu.yaml --dry_run true -- \\
        --config training/configs/tiny_cpu.yaml --trainer.accelerator gpu --data.root /data/fdf
    python -m slurm.train --cluster slurm/profiles/local.yaml --cluster.executor local -- \\
        --config training/configs/tiny_cpu.yaml --data.root runs/demo/fdf

Launcher options come before `--`, fdf-train options after it. The profile decides the layout:
`trainer.num_nodes` = nodes and `trainer.devices` = tasks per node (one task per GPU). Every task
takes its rank, world size and master address/port from `slurm.launch.distributed_env_from_slurm`
through the `TaskEnvironment` plugin, so Lightning neither spawns processes nor reads SLURM itself,
and its own SLURM auto-requeue (a SIGUSR1 handler that saves an `hpc_ckpt` and calls scontrol) is
never installed: there is one requeue mechanism, submitit's.

On USR2 (preemption, `scancel --signal=USR2`, or `signal_delay_s` before the time limit) the
handler only raises a flag. At the next step boundary all ranks agree on it, write `last.ckpt`
with the full training state and stop; then task 0 requeues the job through submitit
(`TrainTask.checkpoint`, at most `max_requeues` times) and the job resumes from that checkpoint
under the same job id. Job id, log folder and requeues are tags of the MLflow run (`slurm.*`).

The resolved fdf-train config is frozen at submission in `<run_dir>/slurm/train_<hash>.yaml`
(what `--dry_run` prints), so a requeued job trains exactly what was submitted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import submitit
import torch
from jsonargparse import ActionConfigFile
from lightning_fabric.plugins.environments import ClusterEnvironment
from pytorch_lightning.loggers import MLFlowLogger

from fdf_core.tario import atomic_write_json
from fdf_core.checkpoints import FINAL, LAST, checkpoints_dir, read_progress
from fdf_core.console import ArgumentParser, print_summary
from slurm.compat import preemption_signal
from slurm.executor import ClusterProfile, add_profile_arguments, describe, profile_from_namespace
from slurm.launch import (RequeueableTask, distributed_env_from_slurm, export_distributed_env, job_logging, submit,
                          wait)
from training.checkpointing import KimgCheckpoint

log = logging.getLogger(__name__)
TAG = "slurm."


class TaskEnvironment(ClusterEnvironment):
    """Lightning's cluster environment for a task started by SLURM or submitit's local executor:
    ranks, world size and rendezvous from `distributed_env_from_slurm`, the one mapping."""

    def __init__(self) -> None:
        self._env = distributed_env_from_slurm()

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return self._env["MASTER_ADDR"]

    @property
    def main_port(self) -> int:
        return int(self._env["MASTER_PORT"])

    @staticmethod
    def detect() -> bool:
        return True

    def world_size(self) -> int:
        return int(self._env["WORLD_SIZE"])

    def set_world_size(self, size: int) -> None:
        if size != self.world_size():
            raise ValueError(f"trainer.num_nodes x trainer.devices = {size} processes, but the job has "
                             f"{self.world_size()} tasks: set them from the cluster profile (slurm.train does)")

    def global_rank(self) -> int:
        return int(self._env["RANK"])

    def set_global_rank(self, rank: int) -> None:
        if rank != self.global_rank():
            raise ValueError(f"Lightning computed global rank {rank} for the task of rank "
                             f"{self.global_rank()}: trainer.devices must equal the tasks per node")

    def local_rank(self) -> int:
        return int(self._env["LOCAL_RANK"])

    def node_rank(self) -> int:
        return int(self._env["NODE_RANK"])

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        per_node = int(self._env["LOCAL_WORLD_SIZE"])
        if num_devices * num_nodes != self.world_size() or num_devices != per_node:
            raise ValueError(f"trainer.num_nodes={num_nodes}, trainer.devices={num_devices} do not match the "
                             f"job's {self.world_size()} tasks ({per_node} per node)")


@dataclasses.dataclass
class _Attempt:
    """This process's run of a TrainTask, shared by the signal handler, the callback and the task."""
    requeues: int = 0
    signalled: bool = False
    saved: dict[str, Any] | None = None  # progress written to last.ckpt on the signal
    pid: int = dataclasses.field(default_factory=os.getpid)  # DataLoader workers inherit the handler

    def on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() == self.pid and not self.signalled:
            log.info("got %s: saving last.ckpt after this step", signal.Signals(signum).name,
                     extra={"all_ranks": True})
        self.signalled = True


_ATTEMPT = _Attempt()


def _job_facts() -> dict[str, str]:
    """Job id and log locations of the submitit job this process runs in ({} outside one)."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return {}
    env = submitit.JobEnvironment()
    return {"job_id": env.job_id, "log_dir": str(env.paths.folder), "stdout": str(env.paths.stdout),
            "executor": env.cluster, "nodes": str(env.num_nodes), "tasks": str(env.num_tasks)}


class PreemptionCheckpoint(pl.Callback):
    """Turns the preemption signal into `last.ckpt` + stop at a step boundary (all ranks together),
    and tags the MLflow run with the job (`slurm.job_id`, `slurm.log_dir`, `slurm.requeues`, ...)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = trainer.logger
        if not trainer.is_global_zero or not isinstance(logger, MLFlowLogger):
            return
        tags = {f"{TAG}{k}": v for k, v in _job_facts().items()}
        tags[f"{TAG}requeues"] = str(_ATTEMPT.requeues)
        if _ATTEMPT.requeues:
            tags[f"{TAG}resumed.{_ATTEMPT.requeues}"] = _progress_text(pl_module)
        for key, value in tags.items():
            logger.experiment.set_tag(logger.run_id, key, value)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if pl_module.step >= pl_module.schedule.total_steps:
            return  # the last step: training ends anyway and writes final.ckpt
        # any rank signalled → every rank stops after this same step (one collective per step)
        if not trainer.strategy.reduce_boolean_decision(_ATTEMPT.signalled, all=False):
            return
        path = KimgCheckpoint.directory(trainer) / LAST
        trainer.save_checkpoint(path, weights_only=False)
        trainer.should_stop = True
        _ATTEMPT.saved = {"checkpoint": str(path), "step": pl_module.step, "images_shown": pl_module.images_shown}
        if trainer.is_global_zero:
            text = _progress_text(pl_module)
            log.info("preempted: saved %s at %s", path, text)
            if isinstance(trainer.logger, MLFlowLogger):
                trainer.logger.experiment.set_tag(trainer.logger.run_id, f"{TAG}preempted.{_ATTEMPT.requeues + 1}",
                                                  text)


def _progress_text(pl_module: pl.LightningModule) -> str:
    return f"step {pl_module.step} images_shown {pl_module.images_shown}"


class TrainTask(RequeueableTask):
    """fdf-train on every task of the job (`training.train.run`, the laptop's code path).

    `config`: the frozen resolved config; `ckpt_path`: None = the config's (default `auto`), set to
    `last.ckpt` when the job requeues itself; `cpus_per_task`: torch's threads (Lightning would
    take all CPUs of the host in every task, and oversubscribed gloo ranks crawl).
    """

    def __init__(self, config: str, run_dir: str, max_requeues: int = 10, cpus_per_task: int = 1,
                 ckpt_path: str | None = None) -> None:
        self.config, self.run_dir, self.max_requeues = config, run_dir, max_requeues
        self.cpus_per_task, self.ckpt_path = cpus_per_task, ckpt_path

    def save_checkpoint(self) -> None:
        """The state is on disk already (the callback wrote it); point the requeued job at it."""
        if _ATTEMPT.saved is not None:
            self.ckpt_path = _ATTEMPT.saved["checkpoint"]

    def __call__(self) -> dict[str, Any]:
        from training.train import run as train
        job_logging("slurm.train")
        env = export_distributed_env()
        if "OMP_NUM_THREADS" not in os.environ:  # a site's setup lines may choose otherwise
            os.environ["OMP_NUM_THREADS"] = str(self.cpus_per_task)
            torch.set_num_threads(self.cpus_per_task)
        usr_sig = preemption_signal()
        requeue = signal.getsignal(usr_sig)  # submitit's checkpoint-and-requeue handler
        global _ATTEMPT
        _ATTEMPT = _Attempt(requeues=self.requeues)
        signal.signal(usr_sig, _ATTEMPT.on_signal)
        try:
            argv = ["--config", self.config] + (["--ckpt_path", self.ckpt_path] if self.ckpt_path else [])
            train(argv)
        finally:
            signal.signal(usr_sig, requeue)
        summary = {"run_dir": self.run_dir, "rank": int(env["RANK"]), "requeues": self.requeues,
                   **_job_facts()}
        if _ATTEMPT.saved is None:
            summary["progress"] = read_progress(checkpoints_dir(self.run_dir) / FINAL)
            return summary
        if summary["rank"] == 0 and callable(requeue):
            requeue(usr_sig, None)  # self.checkpoint() → scontrol requeue → exits; raises past max_requeues
        if "SUBMITIT_EXECUTOR" in os.environ:
            # No result file for this attempt: the requeued job writes the job's result.
            sys.exit(0)
        return {**summary, "preempted": _ATTEMPT.saved}


def layout_args(p: ClusterProfile) -> list[str]:
    """fdf-train options the profile decides: nodes, one process per task, our environment and callback."""
    if p.gpus_per_node and p.gpus_per_node != p.tasks_per_node:
        raise ValueError(f"cluster profile: training runs one task per GPU, got tasks_per_node={p.tasks_per_node} "
                         f"and gpus_per_node={p.gpus_per_node}")
    return ["--trainer.num_nodes", str(p.nodes), "--trainer.devices", str(p.tasks_per_node),
            '--trainer.plugins+={"class_path": "slurm.train.TaskEnvironment"}',
            '--trainer.callbacks+={"class_path": "slurm.train.PreemptionCheckpoint"}']


def _check_layout(cfg: Any, p: ClusterProfile) -> None:
    """Errors the job would hit at its start, found before it waits in the queue."""
    from training.schedule import Schedule
    if p.gpus_per_node and str(cfg.trainer.accelerator) == "cpu":
        raise ValueError(f"cluster profile asks for {p.gpus_per_node} GPUs per node but trainer.accelerator is cpu")
    world = p.nodes * p.tasks_per_node
    schedule = Schedule(**cfg.model.schedule.as_dict())
    bad = {r: b for r, b in schedule.batch_sizes.items() if r in schedule.resolutions and b % world}
    if bad:
        raise ValueError(f"model.schedule.batch_sizes {bad} are not divisible by the {world} tasks of the job "
                         f"({p.nodes} nodes x {p.tasks_per_node})")


def submit_training(train_args: Sequence[str], p: ClusterProfile, *, dry_run: bool = False,
                    max_requeues: int = 10, after: Sequence[submitit.Job] = ()) -> submitit.Job | None:
    """Submit fdf-train (`train_args`: its command line) as one job of p.nodes x p.tasks_per_node
    tasks; `dry_run` prints the profile, the sbatch script and the resolved config instead."""
    from training.train import resolve_config
    text, cfg = resolve_config([*train_args, *layout_args(p)])
    _check_layout(cfg, p)
    if dry_run:
        print(describe(p) + "\n# resolved fdf-train config\n" + text)
        return None
    folder = Path(cfg.run_dir) / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"train_{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    config.write_text(text)
    job = submit(p, TrainTask(str(config.resolve()), str(cfg.run_dir), max_requeues, p.cpus_per_task), after=after)
    atomic_write_json(folder / f"job_{job.job_id}.json", {
        "job_id": job.job_id, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
        "config": str(config), "train_args": list(train_args), "max_requeues": max_requeues,
        "cluster": dataclasses.asdict(p), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})
    log.info("run %s: config %s; the MLflow run gets tags %sjob_id, %slog_dir, %srequeues", cfg.run_dir, config,
             TAG, TAG, TAG)
    return job


def wait_tasks(job: submitit.Job, **wait_kwargs: Any) -> list[dict[str, Any]]:
    """The summaries of all tasks of a training job, in rank order (`slurm.launch.wait` per task)."""
    return wait([job.task(k) for k in range(job.num_tasks)], **wait_kwargs)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m slurm.train", allow_abbrev=False,
                            description=__doc__.split("\n\n")[0] + " Usage: [launcher options] -- [fdf-train options]")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with launcher options")
    add_profile_arguments(parser)
    parser.add_argument("--dry_run", type=bool, default=False,
                        help="print the profile, sbatch script and resolved config; submit nothing")
    parser.add_argument("--max_requeues", type=int, default=10, help="requeues on preemption before giving up")
    parser.add_argument("--wait", type=bool, default=True, help="wait for the job and print its summary")
    return parser


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    ns = build_parser().parse_args(argv[:split])
    job = submit_training(argv[split + 1:], profile_from_namespace(ns.cluster), dry_run=ns.dry_run,
                          max_requeues=ns.max_requeues)
    if job is None or not ns.wait:
        return None
    summary = wait_tasks(job)[0]
    print_summary(summary)
    return summary


if __name__ == "__main__":
    from fdf_core.console import run_main
    raise SystemExit(run_main(main, "python -m slurm.train"))
