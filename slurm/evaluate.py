"""`python -m slurm.evaluate`: the FID of many checkpoints as one job array, one task per checkpoint.

    python -m slurm.evaluate --cluster slurm/profiles/local.yaml --run_dir runs/train/tiny \\
        --data_root runs/demo/fdf --feature random_conv
    python -m slurm.evaluate --cluster slurm/profiles/example_gpu.yaml --checkpoints '[a.ckpt, b.ckpt]' \\
        --data_root /data/fdf --device cuda --dry_run true

Every task runs fdf-eval's own `eval.evaluate.run` on its checkpoint: the result JSON goes to
`<run_dir>/eval/<metric>_<checkpoint>.json` (fdf-eval's default) and the metric to the
checkpoint's MLflow run, which also gets the array's job ids and log folder as tags
(`slurm.eval.job_ids`, `slurm.eval.log_dir`). A checkpoint that has its result JSON already is not
evaluated again (`--skip_done false` redoes it). Tasks are single processes: the profile's nodes and
tasks per node are set to 1 (and GPUs to at most 1), the job name gets `-eval`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import submitit
from jsonargparse import ActionConfigFile

from fdf_core.tario import atomic_write_json
from eval import evaluate
from fdf_core.checkpoints import list_checkpoints, mlflow_target
from fdf_core.console import ArgumentParser, print_summary
from fdf_core.errors import MissingInputError, NothingToDoError
from slurm.executor import ClusterProfile, add_profile_arguments, job_folder, profile_from_namespace
from slurm.launch import submit_array, wait

log = logging.getLogger(__name__)
TAG = "slurm.eval."


def task_profile(p: ClusterProfile) -> ClusterProfile:
    """The profile for one evaluation task: one node, one process, at most one GPU."""
    return dataclasses.replace(p, nodes=1, tasks_per_node=1, gpus_per_node=min(p.gpus_per_node, 1),
                               job_name=f"{p.job_name}-eval")


def evaluation_configs(base: evaluate.EvaluateConfig, checkpoints: Sequence[str | Path],
                       skip_done: bool = True) -> list[evaluate.EvaluateConfig]:
    """One EvaluateConfig per checkpoint (`base` with its checkpoint and output), in the given order."""
    configs = []
    for ckpt in dict.fromkeys(Path(c) for c in checkpoints):
        if not ckpt.is_file():
            raise MissingInputError(f"checkpoint {ckpt} does not exist")
        out = evaluate.default_output(ckpt, base.feature)
        if not (skip_done and out.is_file()):
            configs.append(dataclasses.replace(base, checkpoint=str(ckpt), output=str(out)))
    return configs


def _tag_runs(configs: list[evaluate.EvaluateConfig], jobs: list[submitit.Job], p: ClusterProfile) -> None:
    """Job ids and log folder on the MLflow run of every checkpoint (where the metric goes)."""
    from mlflow.tracking import MlflowClient
    tags = {f"{TAG}job_ids": " ".join(j.job_id for j in jobs), f"{TAG}log_dir": str(job_folder(p).parent),
            f"{TAG}executor": p.executor}
    targets = {mlflow_target(Path(c.checkpoint), c.tracking_uri, c.run_id) for c in configs if c.log_mlflow}
    for uri, run_id in sorted(t for t in targets if None not in t):
        client = MlflowClient(tracking_uri=uri)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)


def submit_evaluation(configs: list[evaluate.EvaluateConfig], p: ClusterProfile, *, dry_run: bool = False,
                      after: Sequence[submitit.Job] = ()) -> list[submitit.Job]:
    """`eval.evaluate.run(config)` as one array task per config (at most p.array_parallelism at once);
    `dry_run` prints the profile, the sbatch script and the configs instead."""
    p = task_profile(p)
    if dry_run:
        submit_array(p, evaluate.run, configs, dry_run=True)
        print("# evaluation tasks\n" + "\n".join(json.dumps(dataclasses.asdict(c)) for c in configs))
        return []
    jobs = submit_array(p, evaluate.run, configs, after=after)
    if not jobs:
        return []
    _tag_runs(configs, jobs, p)
    record = {"jobs": [{"job_id": j.job_id, "checkpoint": c.checkpoint, "output": c.output,
                        "stdout": str(j.paths.stdout)} for j, c in zip(jobs, configs)],
              "cluster": dataclasses.asdict(p), "config": dataclasses.asdict(configs[0])}
    for folder in dict.fromkeys(Path(c.output).parent for c in configs):
        atomic_write_json(folder / f"slurm_eval_{jobs[0].job_id.split('_')[0]}.json", record)
    return jobs


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m slurm.evaluate", description=__doc__.split("\n\n")[0],
                            allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options")
    add_profile_arguments(parser)
    parser.add_argument("--checkpoints", type=list[str], default=[], help="checkpoints to evaluate")
    parser.add_argument("--run_dir", type=str | None, default=None,
                        help="also evaluate this run's snapshots and final checkpoint (<run_dir>/checkpoints)")
    parser.add_argument("--skip_done", type=bool, default=True, help="skip checkpoints that have a result JSON")
    parser.add_argument("--dry_run", type=bool, default=False,
                        help="print the profile, sbatch script and tasks; submit nothing")
    parser.add_argument("--wait", type=bool, default=True, help="wait for the array and print the results")
    parser.add_class_arguments(evaluate.EvaluateConfig, as_group=False, skip={"checkpoint", "output"})
    return parser


def main(argv: list[str] | None = None) -> list[dict[str, Any]] | None:
    ns = build_parser().parse_args(argv)
    checkpoints = [*ns.checkpoints, *(list_checkpoints(ns.run_dir) if ns.run_dir else [])]
    if not checkpoints:
        raise NothingToDoError("nothing to evaluate: give --checkpoints and/or --run_dir (with checkpoints/img*.ckpt "
                         "or final.ckpt)")
    fields = {f.name for f in dataclasses.fields(evaluate.EvaluateConfig)} - {"checkpoint", "output"}
    base = evaluate.EvaluateConfig(checkpoint="", **{k: ns[k] for k in fields})
    configs = evaluation_configs(base, checkpoints, ns.skip_done)
    log.info("%d of %d checkpoints to evaluate", len(configs), len(checkpoints))
    jobs = submit_evaluation(configs, profile_from_namespace(ns.cluster), dry_run=ns.dry_run) if configs else []
    if not jobs or not ns.wait:
        return None
    results = wait(jobs)
    for c, r in zip(configs, results):
        log.info("%s %.4f at kimg %g of %s → %s", r["metric"], r["fid"], r["kimg"], c.checkpoint, c.output)
    print_summary(results)
    return results


if __name__ == "__main__":
    from fdf_core.console import run_main
    raise SystemExit(run_main(main, "python -m slurm.evaluate"))
