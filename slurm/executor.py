"""Cluster profiles (YAML) → submitit executors; one mapping for the sbatch script and the dry run.

A profile says where jobs run and with what resources (`slurm/profiles/*.yaml`). The same profile
with `executor: local` runs the same submissions as local processes, which is how a stage is
debugged before it goes to the cluster. `python -m slurm.executor --cluster <profile.yaml>`
prints the resolved profile and the sbatch script submitit would submit.
"""
from __future__ import annotations

import functools
import os
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import submitit
import yaml
from submitit.slurm.slurm import SlurmJob

from fdf_core.console import ArgumentParser
from fdf_core.errors import ConfigError, MissingInputError
from slurm.compat import (SUBMIT_MODULE, SlurmInfoWatcher, convert_mem, make_sbatch_string, sacct_command,
                          slurm_equivalents, watcher_delay_s)

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass
class ClusterProfile:
    """Where and how jobs run; the fields map onto sbatch options (see executor_parameters).

    Args:
        executor: slurm (sbatch) or local (subprocesses of this host, for tests and laptops)
        partition: sbatch --partition
        account: sbatch --account
        qos: sbatch --qos
        constraint: sbatch --constraint (node features)
        nodes: nodes per job (per array task)
        tasks_per_node: one per GPU for DDP training; 1 for data stages
        gpus_per_node: GPUs per node (sbatch --gpus-per-node)
        cpus_per_task: CPUs per task (also the task's torch threads)
        mem_gb: per node; None: the partition's default
        time_min: time limit of a job in minutes
        array_parallelism: cap on simultaneously running array tasks (`--array=0-N%cap`)
        signal_delay_s: USR2 this long before the time limit: time to checkpoint and requeue
        max_timeouts: requeues after hitting the time limit (submitit's max_num_timeout)
        extra_sbatch: `#SBATCH --key=value`
        setup: shell lines before srun (module load, venv)
        log_dir: submitit folder (~, $VARS expanded); logs in <log_dir>/<job id>/
        job_name: sbatch --job-name
    """
    executor: Literal["slurm", "local"] = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    time_min: int = 60
    array_parallelism: int = 64
    signal_delay_s: int = 90
    max_timeouts: int = 3
    extra_sbatch: dict[str, str | int | bool] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    log_dir: str = "slurm_logs"
    job_name: str = "fdf"

    def __post_init__(self) -> None:
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "time_min", "array_parallelism"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cluster profile: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "signal_delay_s", "max_timeouts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"cluster profile: {name} must be >= 0, got {getattr(self, name)}")
        if self.executor == "local" and self.nodes > 1:
            raise ConfigError(f"cluster profile: the local executor runs on one node, "
                              f"got nodes={self.nodes}")


def add_profile_arguments(parser: ArgumentParser, nested_key: str = "cluster") -> None:
    """`--cluster profile.yaml` and `--cluster.<field> value` overrides (later flags win)."""
    parser.add_class_arguments(ClusterProfile, nested_key,
                               help="Cluster profile (slurm/profiles/*.yaml)")


def profile_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a profile shipped in slurm/profiles ("local", "example_gpu")."""
    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml") and not p.exists():
        p = PROFILES_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in PROFILES_DIR.glob("*.yaml")))
        raise MissingInputError(f"cluster profile {name_or_path!r}: no file {p} (shipped: {known})")
    return p


def load_profile(name_or_path: str | Path, **overrides: Any) -> ClusterProfile:
    """Read and type-check a profile; unknown or mistyped keys raise naming the file and the key."""
    path = profile_path(name_or_path)
    parser = ArgumentParser(exit_on_error=False, allow_abbrev=False)
    add_profile_arguments(parser)
    try:
        ns = parser.parse_args(["--cluster", str(path)])
        values = ns.cluster.as_dict()
    except Exception as err:  # jsonargparse: ArgumentError / ValueError with the offending key
        raise ConfigError(f"{path}: {err}") from None
    values.pop("__path__", None)
    unknown = set(overrides) - set(values)
    if unknown:
        raise ConfigError(f"cluster profile: unknown option(s) {sorted(unknown)}")
    return ClusterProfile(**{**values, **overrides})


def profile_from_namespace(ns: Any) -> ClusterProfile:
    """The ClusterProfile of a parsed `--cluster` group."""
    values = ns.as_dict() if hasattr(ns, "as_dict") else dict(ns)
    values.pop("__path__", None)
    return ClusterProfile(**values)


def executor_parameters(p: ClusterProfile) -> dict[str, Any]:
    """`AutoExecutor.update_parameters` kwargs: generic ones, then `slurm_*` (ignored by local)."""
    params: dict[str, Any] = {"name": p.job_name, "timeout_min": p.time_min, "nodes": p.nodes,
                              "tasks_per_node": p.tasks_per_node, "cpus_per_task": p.cpus_per_task}
    if p.gpus_per_node:  # no --gpus-per-node=0: clusters without GPU GRES reject it
        params["gpus_per_node"] = p.gpus_per_node
    if p.mem_gb is not None:
        params["mem_gb"] = p.mem_gb
    slurm = {"partition": p.partition, "account": p.account, "qos": p.qos, "constraint": p.constraint,
             "array_parallelism": p.array_parallelism, "signal_delay_s": p.signal_delay_s,
             "additional_parameters": dict(p.extra_sbatch) or None, "setup": list(p.setup) or None}
    params.update({f"slurm_{k}": v for k, v in slurm.items() if v is not None})
    if p.setup:
        params["local_setup"] = list(p.setup)
    return params


def job_folder(p: ClusterProfile) -> Path:
    """`<log_dir>/%j` with `~` and `$VARS` expanded at submission time (sbatch quotes the paths)."""
    folder = os.path.expandvars(p.log_dir)
    if "$" in folder:
        raise ConfigError(f"cluster profile: log_dir {p.log_dir!r} names an unset environment variable")
    return Path(folder).expanduser().absolute() / "%j"


class SqueueInfoWatcher(SlurmInfoWatcher):
    """Job states from squeue instead of sacct, for clusters without accounting (no slurmdbd).

    submitit asks sacct; where accounting is off sacct fails, states stay UNKNOWN and a job that
    died without writing its result is waited on forever. squeue keeps finished jobs for
    MinJobAge seconds, long enough for `job.done()` to see FAILED/CANCELLED/TIMEOUT.
    """

    def _make_command(self) -> list[str] | None:
        sacct = sacct_command(self)
        if sacct is None:
            return None
        ids = [sacct[i + 1] for i, arg in enumerate(sacct) if arg == "-j"]
        return ["squeue", "--states=all", "-o", "%i|%T|%N", "-j", ",".join(ids)]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        lines = (string.decode() if isinstance(string, bytes) else string).splitlines()
        return super().read_info("\n".join(["JobID|State|NodeList", *lines[1:]]))


@functools.lru_cache(maxsize=None)
def _use_squeue_without_accounting() -> None:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    if "accounting_storage/none" in out.stdout:
        SlurmJob.watcher = SqueueInfoWatcher(delay_s=watcher_delay_s(SlurmJob.watcher))


def make_executor(p: ClusterProfile) -> submitit.AutoExecutor:
    """A submitit executor for the profile (`slurm`: sbatch; `local`: subprocesses on this host)."""
    if p.executor == "slurm":
        _use_squeue_without_accounting()
    ex = submitit.AutoExecutor(job_folder(p), cluster=p.executor,
                               **{f"{p.executor}_max_num_timeout": p.max_timeouts})
    ex.update_parameters(**executor_parameters(p))
    return ex


def render_sbatch(p: ClusterProfile, map_count: int | None = None) -> str:
    """The sbatch script submitit writes for this profile (an array of `map_count` tasks if given).

    Rendered with submitit's own sbatch template (slurm.compat.make_sbatch_string) and the same parameters `make_executor`
    passes, without constructing a SlurmExecutor (which needs `srun`), so it works anywhere.
    """
    equivalents = slurm_equivalents()
    native: dict[str, Any] = {}
    for key, value in executor_parameters(p).items():
        if key.startswith("slurm_"):
            native[key[len("slurm_"):]] = value
        elif key in equivalents:
            native[equivalents[key]] = value
    if "mem" in native:
        native["mem"] = convert_mem(native["mem"])
    folder = job_folder(p)
    command = " ".join([shlex.quote(sys.executable), "-u -m", SUBMIT_MODULE, shlex.quote(str(folder))])
    return make_sbatch_string(command=command, folder=folder, map_count=map_count, **native)


def describe(p: ClusterProfile, map_count: int | None = None) -> str:
    """The dry-run text: resolved profile as YAML, then the sbatch script (or why there is none)."""
    script = (render_sbatch(p, map_count) if p.executor == "slurm"
              else "# executor: local — runs as subprocesses of this host, no sbatch script\n")
    return "# resolved cluster profile\n" + yaml.safe_dump(asdict(p), sort_keys=False) + \
        "\n# sbatch script\n" + script


def main(argv: list[str] | None = None) -> str:
    parser = ArgumentParser(prog="python -m slurm.executor", allow_abbrev=False,
                            description="Print a resolved cluster profile and its sbatch script.")
    add_profile_arguments(parser)
    parser.add_argument("--array", type=int | None, default=None,
                        help="render as an array of N tasks")
    ns = parser.parse_args(argv)
    text = describe(profile_from_namespace(ns.cluster), ns.array)
    print(text)
    return text


if __name__ == "__main__":
    from fdf_core.console import run_main
    raise SystemExit(run_main(main, "python -m slurm.executor"))
