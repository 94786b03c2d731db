"""One test per private call into a dependency (slurm/compat.py for submitit and Lightning, and the
few elsewhere), and the version pins that say which releases those calls were written against: an
upgrade that renames or changes one of them fails here first."""
from __future__ import annotations

import configparser
import importlib.util
import inspect
import signal
from importlib.metadata import version
from pathlib import Path

import pytest
import pytorch_lightning as pl
from packaging.requirements import Requirement
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from slurm import compat
from slurm.executor import SqueueInfoWatcher

REPO = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [line.strip() for line in cfg["options"]["install_requires"].splitlines()]
    return {(r := Requirement(line)).name: r for line in lines if line and not line.startswith("#")}


@pytest.mark.parametrize("package", ["submitit", "pytorch-lightning"])
def test_private_api_users_are_pinned_to_a_range_that_holds_the_installed_version(package):
    spec = _requirements()[package].specifier
    assert any(s.operator == "<" for s in spec), f"{package}: no upper bound in setup.cfg"
    assert spec.contains(version(package)), f"installed {package} {version(package)} is outside {spec}"


# ------------------------------------------------------------------------------------ submitit
def test_sbatch_template_and_parameter_names():
    script = compat.make_sbatch_string(command="python -u -m x", folder="/logs/%j", map_count=3, nodes=2,
                                       ntasks_per_node=4, time=30, mem=compat.convert_mem(2.5),
                                       signal_delay_s=90)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --time=30", "#SBATCH --mem=2560MB",
                 "#SBATCH --array=0-2", "#SBATCH --signal=USR2@90", "python -u -m x"):
        assert line in script, line
    assert compat.slurm_equivalents()["timeout_min"] == "time"
    assert compat.slurm_equivalents()["tasks_per_node"] == "ntasks_per_node"


def test_submit_module_exists():
    assert importlib.util.find_spec(compat.SUBMIT_MODULE) is not None


def test_node_list_and_preemption_signal():
    assert compat.parse_node_list("n[1-3],m7") == ["n1", "n2", "n3", "m7"]
    assert compat.preemption_signal() == signal.SIGUSR2


def test_squeue_watcher_hooks_into_submitits_polling():
    """submitit's update() calls the `_make_command` we override and the `read_info` we wrap."""
    calls = []

    class Fake(SqueueInfoWatcher):
        def _make_command(self):
            command = super()._make_command()  # squeue in place of compat.sacct_command's sacct
            calls.append(command)
            return ["printf", "JOBID|STATE|NODELIST\\n4242|RUNNING|n1\\n"]

    watcher = Fake(delay_s=1)
    assert compat.watcher_delay_s(watcher) == 1
    watcher.register_job("4242")
    assert compat.sacct_command(watcher)[0] == "sacct"
    assert watcher.get_state("4242", mode="force") == "RUNNING"
    assert calls and calls[0][0] == "squeue" and calls[0][-1] == "4242"


# ------------------------------------------------------------------------------------ Lightning
def test_cluster_environment_and_signal_handlers(monkeypatch):
    from slurm.train import TaskEnvironment
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, plugins=[TaskEnvironment()])
    assert isinstance(compat.cluster_environment(trainer), TaskEnvironment)
    with compat.lightning_signal_handlers(trainer):
        inside = signal.getsignal(signal.SIGTERM)  # Lightning's SIGTERM handler, for every environment
    assert inside is not before[signal.SIGTERM] and callable(inside)  # a no-op block would fail here
    assert {s: signal.getsignal(s) for s in before} == before  # and torn down after it


def test_hpc_checkpoint_name_is_lightnings():
    from pytorch_lightning.trainer.connectors import checkpoint_connector
    prefix = compat.HPC_CHECKPOINT_GLOB.split("*")[0]
    assert f'"{prefix}"' in inspect.getsource(checkpoint_connector)
    assert compat.HPC_CHECKPOINT_GLOB in (REPO / "training" / "train.py").read_text()  # what resume looks for


# ------------------------------------------------------------------------------------ elsewhere
def test_other_private_calls(monkeypatch):
    import torch
    from jsonargparse._common import debug_mode_active  # fdf_core.console: JSONARGPARSE_DEBUG
    from torchvision.models._utils import IntermediateLayerGetter  # fdf_builder.retinaface_nets

    monkeypatch.setenv("JSONARGPARSE_DEBUG", "true")  # this jsonargparse refuses "1"
    assert debug_mode_active() is True
    monkeypatch.delenv("JSONARGPARSE_DEBUG")
    assert debug_mode_active() is False
    body = IntermediateLayerGetter(torch.nn.Sequential(torch.nn.Identity()), {"0": "out"})
    assert set(body(torch.zeros(1))) == {"out"}
    a, b = [torch.zeros(2)], [torch.ones(2)]
    torch._foreach_lerp_(a, b, 0.25)  # training.ema
    assert a[0].tolist() == [0.25, 0.25]
