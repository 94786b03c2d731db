"""What every launcher shares: submit (or dry-run) through a profile, wait, requeue, DDP env.

Stages stay plain functions of a config object; these helpers submit them as single jobs or job
arrays with the executor of a `ClusterProfile` (SLURM or local), log job ids and log paths, and
wait for results. In a job, the records of our packages go to the job's stdout log
(:func:`job_logging`). Long jobs derive from `RequeueableTask`: on USR2 (preemption, or
`signal_delay_s` before the time limit) submitit calls `checkpoint()` and requeues the job, which
resumes from its own checkpoint under the same job id.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import submitit

from fdf_core.console import setup_logging
from slurm.compat import parse_node_list
from slurm.executor import ClusterProfile, describe, make_executor

log = logging.getLogger(__name__)
MASTER_PORT_BASE, MASTER_PORT_SPAN = 20000, 12000  # below Linux's ephemeral range (32768+)


def distributed_env_from_slurm(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """torch.distributed's env:// variables for this task, from SLURM_* (or submitit's local
    executor variables; a plain process gets a world of 1).

    MASTER_ADDR is the first node of the job and MASTER_PORT is derived from the job id, so every
    task of a job agrees on both without talking to each other, and two jobs sharing a node
    differ.
    """
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" in env and "SLURM_JOB_ID" in env:
        job_id = env["SLURM_JOB_ID"]
        hosts = parse_node_list(env.get("SLURM_JOB_NODELIST", "")) or ["127.0.0.1"]
        world, rank = int(env.get("SLURM_NTASKS", "1")), int(env["SLURM_PROCID"])
        local_rank, node_rank = int(env.get("SLURM_LOCALID", "0")), int(env.get("SLURM_NODEID", "0"))
        num_nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", str(len(hosts)))))
    elif "SUBMITIT_LOCAL_JOB_ID" in env:
        job_id, hosts, num_nodes, node_rank = env["SUBMITIT_LOCAL_JOB_ID"], ["127.0.0.1"], 1, 0
        world, rank = int(env["SUBMITIT_LOCAL_NTASKS"]), int(env["SUBMITIT_LOCAL_GLOBALID"])
        local_rank = int(env["SUBMITIT_LOCAL_LOCALID"])
    else:
        job_id, hosts, num_nodes, node_rank, world, rank, local_rank = "0", ["127.0.0.1"], 1, 0, 1, 0, 0
    port = MASTER_PORT_BASE + int(job_id) % MASTER_PORT_SPAN
    return {"MASTER_ADDR": hosts[0], "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
            "RANK": str(rank), "LOCAL_RANK": str(local_rank), "NODE_RANK": str(node_rank),
            "LOCAL_WORLD_SIZE": str(max(1, world // max(1, num_nodes)))}


def export_distributed_env() -> dict[str, str]:
    """Put `distributed_env_from_slurm()` into os.environ (for `init_process_group("env://")`)."""
    env = distributed_env_from_slurm()
    os.environ.update(env)
    return env


def job_logging(prog: str) -> None:
    """In a job: our packages' records on the job's stdout log, as `<prog>: ...` (rank zero's INFO)."""
    setup_logging(prog, stream="stdout")


class _InJob:
    """`fn(*args)` in a job, with :func:`job_logging` set up first (picklable for submitit)."""

    def __init__(self, fn: Callable[..., Any], prog: str) -> None:
        self.fn, self.prog = fn, prog

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        job_logging(self.prog)
        return self.fn(*args, **kwargs)


def _in_job(fn: Callable[..., Any], p: ClusterProfile) -> Callable[..., Any]:
    # A requeueable task must reach submitit itself (its checkpoint() is looked up on it).
    return fn if isinstance(fn, RequeueableTask) else _InJob(fn, p.job_name)


class RequeueableTask(submitit.helpers.Checkpointable):
    """A callable job that submitit requeues on USR2, at most `max_requeues` times.

    submitit itself bounds only time-limit requeues; a job preempted over and over would requeue
    forever. Subclasses implement `__call__` so that it resumes from their own on-disk state
    (`self.requeues` says how often the job came back) and may override `save_checkpoint()` to
    write that state when the signal arrives. `__call__` should start with `job_logging(...)`.
    """
    max_requeues: int = 10
    requeues: int = 0

    def save_checkpoint(self) -> None:
        """Persist what `__call__` needs to resume (default: nothing; state is saved as it goes)."""

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        job = os.environ.get("SLURM_JOB_ID", os.environ.get("SUBMITIT_LOCAL_JOB_ID", "?"))
        job_logging("requeue")
        if self.requeues >= self.max_requeues:
            log.warning("job %s was requeued %d times already (max_requeues=%d); giving up", job, self.requeues,
                        self.max_requeues)
            return None  # submitit then ends the job with UncompletedJobError
        self.save_checkpoint()
        self.requeues += 1
        log.info("job %s checkpointed, requeue %d/%d", job, self.requeues, self.max_requeues)
        return super().checkpoint(*args, **kwargs)


def _log_submitted(p: ClusterProfile, jobs: Sequence[submitit.Job]) -> None:
    first = jobs[0]
    if len(jobs) == 1:
        log.info("submitted %s (%s): job %s, logs %s %s", p.job_name, p.executor, first.job_id, first.paths.stdout,
                 first.paths.stderr)
        return
    log.info("submitted %s (%s): %d tasks, job ids %s..%s (at most %d at once), logs %s ... %s", p.job_name,
             p.executor, len(jobs), first.job_id, jobs[-1].job_id, p.array_parallelism, first.paths.stdout,
             jobs[-1].paths.stdout)


def submit(p: ClusterProfile, fn: Callable[..., Any], *args: Any, dry_run: bool = False,
           after: Sequence[submitit.Job] = (), **kwargs: Any) -> submitit.Job | None:
    """Submit `fn(*args, **kwargs)` as one job (nodes × tasks_per_node tasks); `dry_run` prints
    the profile and sbatch script instead (on stdout: the dry run's output). `after`: start only once those jobs succeeded."""
    if dry_run:
        print(describe(p))
        return None
    ex = make_executor(p)
    _depend(ex, p, after)
    job = ex.submit(_in_job(fn, p), *args, **kwargs)
    _log_submitted(p, [job])
    return job


def submit_array(p: ClusterProfile, fn: Callable[[Any], Any], items: Sequence[Any], *,
                 dry_run: bool = False, after: Sequence[submitit.Job] = ()) -> list[submitit.Job]:
    """One array task per item, `fn(item)`, at most `p.array_parallelism` running at once.

    The local executor has no scheduler to enforce the cap, so there the tasks run in waves of
    `array_parallelism` and this call returns when the last wave has been submitted.
    """
    if dry_run:  # submitit submits a single item as a plain job, not an array
        print(describe(p, len(items) if len(items) > 1 else None))
        return []
    if not items:
        return []
    ex = make_executor(p)
    _depend(ex, p, after)
    if p.executor == "slurm":
        jobs = ex.map_array(_in_job(fn, p), items)
        _log_submitted(p, jobs)
        return jobs
    jobs = []
    for start in range(0, len(items), p.array_parallelism):
        wait(jobs)
        wave = ex.map_array(_in_job(fn, p), items[start:start + p.array_parallelism])
        _log_submitted(p, wave)
        jobs += wave
    return jobs


def _depend(ex: submitit.AutoExecutor, p: ClusterProfile, after: Sequence[submitit.Job]) -> None:
    if not after:
        return
    if p.executor == "slurm":
        ids = sorted({j.job_id.split("_")[0] for j in after}, key=int)
        ex.update_parameters(slurm_dependency="afterok:" + ":".join(ids))
    else:
        wait(after)  # local: nothing schedules dependencies, so wait for them here


def wait(jobs: Sequence[submitit.Job], poll_s: float = 1.0, check_s: float = 10.0,
         timeout_s: float | None = None) -> list[Any]:
    """Results of `jobs` in order (task 0's for multi-task jobs; `job.results()` has all).

    Result files are looked for every `poll_s`; the scheduler is asked at least every `check_s`
    (one query covers all jobs), so a job that died without a result fails here within about
    `check_s` instead of submitit's backoff of up to minutes. The first failure raises submitit's
    FailedJobError/UncompletedJobError, which names the task's log files; `timeout_s` bounds
    the wait (TimeoutError; the jobs keep running).
    """
    pending, last_check = list(jobs), time.monotonic()
    deadline = None if timeout_s is None else last_check + timeout_s
    while pending:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"jobs {[j.job_id for j in pending]} not done after {timeout_s} s")
        force = time.monotonic() - last_check >= check_s
        if force:
            last_check = time.monotonic()
        pending = [j for i, j in enumerate(pending) if not j.done(force_check=force and i == 0)]
        if pending:
            time.sleep(poll_s)
    return [j.results()[0] if j.num_tasks > 1 else j.result() for j in jobs]
