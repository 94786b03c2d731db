"""The console script of training (setup.cfg): `fdf-train`, progressive GAN training (training.train).

    fdf-train --config training/configs/tiny_cpu.yaml --data.root runs/demo/fdf   (or python -m training.cli)

Prints the run folder as one JSON line when training ends.
"""
from __future__ import annotations

import sys

from fdf_core.console import console_main, print_summary, run_command


def main(argv: list[str] | None = None) -> dict:
    from training.train import run
    # LightningCLI warns when given args while sys.argv holds options too: the console script
    # passes the process's own command line, which LightningCLI reads itself.
    run_dir = run(None if argv is not None and argv == sys.argv[1:] else argv)
    summary = {"run_dir": str(run_dir)}
    print_summary(summary)
    return summary


fdf_train = console_main("training.cli", "fdf-train")

if __name__ == "__main__":
    raise SystemExit(run_command([fdf_train]))
