"""Job arrays over shard ranges for the data stages: `data_prep` (download) and `fdf_builder`.

Each array task calls the stage's own `run(cfg)` with `cfg.shards` set to its K shards (the
`--shards` syntax of fdf_core.shards): the code a laptop runs. A stage skips shards whose stats file exists, so submitting
the same array again redoes only what is missing. After the array one more task runs the stage
over the whole range: every shard is done by then, so it only writes the stage's totals
(fdf_builder's index.json/sizes.json, which array tasks finishing in any order could leave stale).

    python -m slurm.build --cluster slurm/profiles/local.yaml --shards_per_task 4 \\
        fdf_builder --input_dir runs/raw --output_dir runs/fdf
    python -m slurm.build --cluster slurm/profiles/local.yaml --dry_run true data_prep --config dl.yaml
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import submitit
from jsonargparse import ActionConfigFile

from fdf_core.tario import atomic_write_json
from fdf_core.console import ArgumentParser, console_main, print_summary
from fdf_core.errors import NothingToDoError
from fdf_core.shards import EMPTY, format_shards, select_shards, split_shards
from slurm.executor import ClusterProfile, add_profile_arguments, profile_from_namespace
from slurm.launch import submit, submit_array, wait

log = logging.getLogger(__name__)


@dataclass
class Stage:
    config_cls: type
    run: Callable[[Any], dict]
    count_shards: Callable[[Any, ClusterProfile, bool], int]  # shard numbers are 0..count-1


def _data_prep_shards(cfg: Any, p: ClusterProfile, dry_run: bool) -> int:
    """From plan.json; without one, plan first in one job (the stage's run over an empty range)."""
    plan_file = Path(cfg.output_dir) / "plan.json"
    if not plan_file.exists() and not dry_run:
        planner = dataclasses.replace(p, job_name=f"{p.job_name}-plan", nodes=1, tasks_per_node=1)
        wait([submit(planner, _data_prep_stage().run,
                     dataclasses.replace(cfg, shards=EMPTY, progress=False))])
    if not plan_file.exists():
        log.info("no %s yet: a planning job runs first, then the array", plan_file)
        return 1
    return int(json.loads(plan_file.read_text())["num_shards"])


def _fdf_builder_shards(cfg: Any, p: ClusterProfile, dry_run: bool) -> int:
    from fdf_builder.shards import raw_shard_ids
    ids = raw_shard_ids(cfg.input_dir)
    return int(ids[-1]) + 1 if ids else 0


def _data_prep_stage() -> Stage:
    from data_prep.download import DownloadConfig, run
    return Stage(DownloadConfig, run, _data_prep_shards)


def _fdf_builder_stage() -> Stage:
    from fdf_builder.build import BuildConfig, run
    return Stage(BuildConfig, run, _fdf_builder_shards)


STAGES: dict[str, Callable[[], Stage]] = {"data_prep": _data_prep_stage,
                                          "fdf_builder": _fdf_builder_stage}


def submit_stage(stage: str, cfg: Any, p: ClusterProfile, shards_per_task: int = 1,
                 dry_run: bool = False) -> list[submitit.Job]:
    """Submit `stage` over `cfg.shards` (all shards if None) as an array of `shards_per_task`
    shards per task, then the whole-range task; return [*array tasks, final task]."""
    st = STAGES[stage]()
    if not isinstance(cfg, st.config_cls):
        raise TypeError(f"{stage}: expected a {st.config_cls.__name__}, got {type(cfg).__name__}")
    selected = select_shards(cfg.shards, range(st.count_shards(cfg, p, dry_run)))
    ranges = split_shards(selected, shards_per_task)
    if not ranges and not cfg.allow_empty:
        raise NothingToDoError(f"{stage}: no shard to submit in {cfg.shards or 'the input'} (check the input "
                               "folder and --shards, or pass --allow_empty true)")
    log.info("%s shards %s in %d tasks of %d", stage, format_shards(selected), len(ranges), shards_per_task)
    if dry_run:
        submit_array(p, st.run, [dataclasses.replace(cfg, shards=r) for r in ranges], dry_run=True)
        return []
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(cfg.output_dir) / f"slurm_{stage}_options.json",
                      {"stage": stage, "shards_per_task": shards_per_task,
                       "cluster": dataclasses.asdict(p), "config": dataclasses.asdict(cfg)})
    # A task's range may fall in a gap of unfinished input shards: that task has nothing to do.
    tasks = [dataclasses.replace(cfg, shards=r, progress=False, allow_empty=True) for r in ranges]
    jobs = submit_array(p, st.run, tasks)
    final = submit(dataclasses.replace(p, job_name=f"{p.job_name}-total"), st.run,
                   dataclasses.replace(cfg, shards=format_shards(selected), progress=False), after=jobs)
    return [*jobs, final]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m slurm.build", description=__doc__.split("\n\n")[0],
                            allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options")
    add_profile_arguments(parser)
    parser.add_argument("--shards_per_task", type=int, default=1, help="shards per array task")
    parser.add_argument("--dry_run", type=bool, default=False,
                        help="print the resolved profile and sbatch script; submit nothing")
    parser.add_argument("--wait", type=bool, default=True,
                        help="wait for the jobs and print the summary")
    sub = parser.add_subcommands(dest="stage")
    for name, make in STAGES.items():
        st = make()
        sp = ArgumentParser(description=f"{name} options (same as its own command line)",
                            allow_abbrev=False)
        sp.add_argument("--config", action=ActionConfigFile)
        sp.add_class_arguments(st.config_cls, as_group=False)
        sub.add_subcommand(name, sp)
    return parser


def main(argv: list[str] | None = None) -> dict | None:
    ns = build_parser().parse_args(argv)
    stage_ns = ns[ns.stage].clone()
    stage_ns.pop("config", None)
    cfg = STAGES[ns.stage]().config_cls(**stage_ns.as_dict())
    jobs = submit_stage(ns.stage, cfg, profile_from_namespace(ns.cluster), ns.shards_per_task,
                        ns.dry_run)
    if not jobs or not ns.wait:
        return None
    summary = wait(jobs)[-1]
    print_summary(summary)
    return summary


fdf_slurm_build = console_main("slurm.build", "fdf-slurm-build")  # the console script (setup.cfg)

if __name__ == "__main__":
    raise SystemExit(fdf_slurm_build())
