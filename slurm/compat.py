"""The private parts of submitit and Lightning that the launchers rely on, and nothing else.

Each name below wraps one private function, attribute or hook of a pinned dependency (setup.cfg:
`submitit>=1.5,<1.6`, `pytorch-lightning>=2.2,<2.7`); tests/test_compat.py calls every one of them,
so an upgrade that renames or changes one fails there, not on a cluster. The rest of slurm/ uses
only these names and the libraries' public API.

Lightning's SLURM checkpoint files (`hpc_ckpt_<n>.ckpt`, which `training.train` looks for when it
resumes) are a file-name convention of the same pinned versions, tested in tests/test_compat.py too.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import submitit
from submitit.slurm import slurm as _slurm

# ------------------------------------------------------------------------------------ submitit
SUBMIT_MODULE = "submitit.core._submit"  # what submitit's sbatch scripts run: python -u -m <this> <folder>
SlurmInfoWatcher = _slurm.SlurmInfoWatcher  # job states from sacct; subclasses override `_make_command`


def make_sbatch_string(**parameters: Any) -> str:
    """submitit's own sbatch script for `parameters` (SlurmExecutor's native names)."""
    return _slurm._make_sbatch_string(**parameters)


def convert_mem(mem_gb: float) -> str:
    """A memory size in GB as sbatch's `--mem` value, as submitit writes it."""
    return _slurm._convert_mem(mem_gb)


def slurm_equivalents() -> dict[str, Any]:
    """AutoExecutor's generic parameter names → SlurmExecutor's (`timeout_min` → `time`, ...)."""
    return _slurm.SlurmExecutor._equivalence_dict()


def parse_node_list(node_list: str) -> list[str]:
    """SLURM's compressed host list (`n[1-3],m7`) → host names, as submitit expands it."""
    return _slurm._parse_node_list(node_list)


def preemption_signal() -> int:
    """The signal submitit's handler turns into checkpoint-and-requeue (USR2 unless configured)."""
    return submitit.JobEnvironment._usr_sig()


def watcher_delay_s(watcher: Any) -> float:
    """The polling delay of a submitit InfoWatcher (to build a replacement with the same one)."""
    return watcher._delay_s


def sacct_command(watcher: Any) -> list[str] | None:
    """The sacct command line a SlurmInfoWatcher would run for its registered jobs (None: none)."""
    return SlurmInfoWatcher._make_command(watcher)


# ------------------------------------------------------------------------------------ Lightning
HPC_CHECKPOINT_GLOB = "hpc_ckpt_*.ckpt"  # Lightning's checkpoint on its own SLURM requeue signal


def cluster_environment(trainer: Any) -> Any:
    """The ClusterEnvironment a Trainer chose (ours, or Lightning's SLURMEnvironment)."""
    return trainer._accelerator_connector.cluster_environment


@contextlib.contextmanager
def lightning_signal_handlers(trainer: Any) -> Iterator[None]:
    """The signal handlers a Trainer installs for fit (its SLURM auto-requeue among them), while
    inside the block."""
    trainer._signal_connector.register_signal_handlers()
    try:
        yield
    finally:
        trainer._signal_connector.teardown()
