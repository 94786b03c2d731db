"""DDP on 2 CPU processes (gloo) through the real CLI: both ranks end with identical parameters.

The test runs this file as a script: `fdf-train` with `--trainer.devices 2` and a callback (below)
that saves every rank's parameters, batches and losses. Lightning relaunches the script for rank 1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

pytestmark = pytest.mark.slow  # two DDP processes

REPO = Path(__file__).resolve().parents[1]


class DumpRankState(pl.Callback):
    """Per rank: the initial and final state, the keys of every batch, every step's gradient penalty."""

    def __init__(self, out_dir: str):
        self.out_dir, self.keys, self.gp, self.init = Path(out_dir), [], [], {}

    def on_train_start(self, trainer, pl_module):
        self.init = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys += batch["keys"] if "keys" in batch else batch["indices"].tolist()  # tar / ffcv
        self.gp.append(pl_module.stats["loss/gp"])

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"init": self.init, "state": pl_module.state_dict(), "keys": self.keys, "gp": self.gp,
                    "world_size": trainer.world_size, "backend": torch.distributed.get_backend(),
                    "strategy": type(trainer.strategy).__name__, "step": pl_module.step},
                   self.out_dir / f"rank{trainer.global_rank}.pt")


@pytest.mark.parametrize("data_format", ["tar", "ffcv"])
def test_ddp_two_cpu_processes_keep_identical_parameters(data_format, request, tmp_path):
    """With ffcv each rank reads its part in FFCV's distributed mode (batches keyed by beton index)."""
    root = request.getfixturevalue("fdf_beton" if data_format == "ffcv" else "fdf_shards")
    out = tmp_path / "ranks"
    proc = subprocess.run([sys.executable, __file__, str(root), str(tmp_path / "run"), str(out), data_format],
                          cwd=REPO,
                          env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == 2 and r0["backend"] == "gloo" and r0["strategy"] == "DDPStrategy"
    assert r0["step"] == r1["step"] == 16
    assert len(r0["keys"]) == len(r1["keys"]) == 16 * 4
    epoch = r0["keys"][:48] + r1["keys"][:48]  # 96 faces, 12 steps of 2 x 4 an epoch (tar: 4 of 8 shards a rank)
    assert len(set(epoch)) == 96, "each rank must train on its own half of the data"
    assert all(gp > 0 for gp in r0["gp"] + r1["gp"]) and r0["gp"] != r1["gp"]
    for name, tensor in r0["state"].items():
        assert torch.equal(tensor, r1["state"][name]), f"{name} differs between ranks"
        assert torch.equal(r0["init"][name], r1["init"][name]), f"{name} started differently"
    trained = [n for n in r0["state"] if n.startswith(("generator.", "discriminator."))]
    changed = [n for n in trained if not torch.equal(r0["state"][n], r0["init"][n])]
    # 8x8, 16x16 and the fade to 32x32 touch every level, the fade-in paths included.
    assert len(changed) == len(trained), sorted(set(trained) - set(changed))


if __name__ == "__main__":
    from training.cli import main

    shards, run_dir, out, data_format = sys.argv[1:5]
    # 4 steps per phase: 8x8, fade to 16 (the R/2 path active), 16x16, fade to 32; 2 x 4 images per step.
    main(["--config", "training/configs/tiny_cpu.yaml", "--data.root", shards, "--run_dir", run_dir,
          "--model.schedule.fade_kimg", "0.032", "--model.schedule.stabilize_kimg", "0.032",
          "--model.schedule.total_kimg", "0.128", "--data.num_workers", "1", "--trainer.devices", "2",
          "--data.format", data_format,
          "--trainer.enable_progress_bar", "false",
          "--trainer.callbacks+=" + json.dumps({"class_path": "__main__.DumpRankState",
                                                "init_args": {"out_dir": out}})])
