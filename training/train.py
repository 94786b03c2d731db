"""`fdf-train`: progressive GAN training from YAML configs (LightningCLI), logged to MLflow.

    fdf-train --config training/configs/tiny_cpu.yaml --data.root runs/demo/fdf
    fdf-train --config training/configs/fdf128_12m.yaml --trainer.devices 4 --run_dir runs/train/12m

Everything of a run lives in `--run_dir`: `config.yaml` (the resolved options), `checkpoints/`
(`last.ckpt`, `final.ckpt`), `samples/`, and by default the MLflow store `mlflow.db` with its
artifacts in `mlartifacts/` (`--tracking_uri` points anywhere else, e.g. an `mlflow server`).
Running the same command again resumes from `checkpoints/last.ckpt` (`--ckpt_path auto`), so a
preempted or crashed job is simply resubmitted. `--grow_from <checkpoint>` starts a run from a
finished lower-resolution run (training.grow: a 64x64 run grown to 128x128). `run(args)` is that
command for every caller: the console script (training.cli), the pipeline and the SLURM job
(slurm.train), with a command line or the options as a dict.
"""
from __future__ import annotations

import fcntl
import logging
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import MLFlowLogger

from fdf_core.checkpoints import LAST, checkpoints_dir, default_tracking_uri, read_mlflow_run_id, read_progress
from fdf_core.console import OneLineErrors
from fdf_core.errors import MissingInputError
from training.callbacks import FIDCallback, KimgProgressBar, PhaseLogger, SampleGrid
from training.checkpointing import AtomicCheckpointIO, KimgCheckpoint
from training.datamodule import FDFDataModule
from training.grow import GROW_WAIT_S, grow_checkpoint, wait_for_file
from training.module import ProgressiveGAN

log = logging.getLogger(__name__)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def tracking_uri(cfg) -> str:
    """`--tracking_uri`, else the run folder's own sqlite store."""
    return cfg.tracking_uri or default_tracking_uri(cfg.run_dir)


def run_page(experiment_id: str, run_id: str) -> str:
    """The run's metric charts in the MLflow UI, in its model-training view (MLflow 3.x UIs open
    the GenAI view unless the URL or the experiment's `mlflow.experimentKind` tag says otherwise)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}/model-metrics?workflowType=machine_learning"


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _create_sqlite_store(uri: str, run_dir: Path) -> None:
    """Create the store's tables under a file lock: ranks that srun starts together would otherwise
    race to create them and fail ("duplicate column name")."""
    from mlflow.tracking import MlflowClient
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".mlflow-store.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(tracking_uri=uri)


class ConfigToRunDir(SaveConfigCallback):
    """`<run_dir>/config.yaml`, plus the whole resolved config as MLflow params and artifact."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        path = Path(trainer.default_root_dir) / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, path, overwrite=True, multifile=False)
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger):
            # MLflow 3 files experiments without this tag under its GenAI views; this one is model training
            logger.experiment.set_experiment_tag(logger.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            log.info("MLflow run %s in %s; in `mlflow ui` open %s", logger.run_id, tracking_uri(self.config),
                     run_page(logger.experiment_id, logger.run_id))
            params = {k: v for k, v in _flatten(self.config.as_dict()).items() if k not in ("ckpt_path", "config")}
            existing = logger.experiment.get_run(logger.run_id).data.params
            changed = {k for k, v in params.items() if k in existing and existing[k] != str(v)[:250]}
            if changed:  # a resumed run with edited options: MLflow params cannot change, keep a record
                logger.experiment.set_tag(logger.run_id, "resumed_with_changed_params", ", ".join(sorted(changed)))
            logger.log_hyperparams({k: v for k, v in params.items() if k not in existing})  # values cut at 250
            logger.experiment.log_artifact(logger.run_id, str(path))  # the full text


class TrainArgumentParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser with the one-line option errors of every fdf command."""


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", "--run-dir", type=str, default="runs/train/default",
                            help="Folder of this run: config.yaml, checkpoints/, samples/, mlflow.db")
        parser.add_argument("--tracking_uri", "--tracking-uri", type=str | None, default=None,
                            help="MLflow tracking URI (default: sqlite:///<run_dir>/mlflow.db)")
        parser.add_argument("--experiment_name", "--experiment-name", type=str, default="fdf")
        parser.add_argument("--run_name", "--run-name", type=str | None, default=None)
        parser.add_argument("--ckpt_path", "--ckpt-path", type=str | None, default="auto",
                            help="Checkpoint to resume from; 'auto' = <run_dir>/checkpoints/last.ckpt if it "
                                 "exists; 'none' = start fresh")
        parser.add_argument("--grow_from", "--grow-from", type=str | None, default=None,
                            help="Start this run from a finished lower-resolution run's checkpoint "
                                 "(training.grow); ignored once the run has a checkpoint of its own")
        parser.add_lightning_class_args(KimgCheckpoint, "checkpoint")
        parser.add_lightning_class_args(SampleGrid, "samples")
        parser.add_lightning_class_args(FIDCallback, "fid")
        parser.link_arguments("run_dir", "trainer.default_root_dir")
        parser.link_arguments("seed_everything", "model.seed", compute_fn=int)
        parser.link_arguments("seed_everything", "data.seed", compute_fn=int)
        parser.set_defaults({"trainer.enable_checkpointing": False, "trainer.max_epochs": -1,
                             "trainer.num_sanity_val_steps": 0, "trainer.limit_val_batches": 0})

    def resume_path(self) -> Path | None:
        spec = self.config.ckpt_path
        if spec in (None, "", "none"):
            return None
        if spec == "auto":  # our last.ckpt, or a newer one Lightning saved on a SLURM requeue signal
            run_dir = Path(self.config.run_dir)
            found = [p for p in [checkpoints_dir(run_dir) / LAST, *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
            return max(found, key=lambda p: read_progress(p)["step"], default=None)
        if not Path(spec).is_file():
            raise MissingInputError(f"--ckpt_path {spec}: no such checkpoint (give an existing .ckpt, "
                                    "'auto' or 'none')")
        return Path(spec)

    def instantiate_trainer(self, **kwargs: Any):
        cfg = self.config_init
        trainer_cfg = cfg["trainer"]
        run_dir = Path(cfg.run_dir)
        if trainer_cfg.get("logger") in (None, True):
            ckpt = self.resume_path()
            run_id = None
            if ckpt:
                run_id = read_mlflow_run_id(ckpt)
            uri = tracking_uri(cfg)
            local = uri.startswith(("sqlite:", "file:"))
            if uri.startswith("sqlite:"):
                _create_sqlite_store(uri, run_dir)
            kwargs["logger"] = MLFlowLogger(
                experiment_name=cfg.experiment_name, run_name=cfg.run_name or run_dir.name, tracking_uri=uri,
                artifact_location=(run_dir / "mlartifacts").resolve().as_uri() if local else None, run_id=run_id)
        plugins = trainer_cfg.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        kwargs["plugins"] = plugins + [AtomicCheckpointIO()]
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = (callbacks if isinstance(callbacks, list) else [callbacks]) + [PhaseLogger()]
        if trainer_cfg.get("enable_progress_bar") is not False:
            callbacks.append(KimgProgressBar())
        kwargs["callbacks"] = callbacks
        if trainer_cfg.get("strategy") == "auto" and self._multi_process(trainer_cfg):
            # The critic and generator steps leave each other's parameters without gradients.
            kwargs["strategy"] = "ddp_find_unused_parameters_true"
        return super().instantiate_trainer(**kwargs)

    @staticmethod
    def _multi_process(trainer_cfg: dict[str, Any]) -> bool:
        devices, nodes = trainer_cfg.get("devices", "auto"), int(trainer_cfg.get("num_nodes", 1) or 1)
        if nodes > 1:
            return True
        if isinstance(devices, (list, tuple)):
            return len(devices) > 1
        if isinstance(devices, str) and "," in devices:
            return len([d for d in devices.split(",") if d.strip()]) > 1
        if str(devices) in ("auto", "-1"):
            accel = str(trainer_cfg.get("accelerator", "auto"))
            return accel in ("auto", "gpu", "cuda") and torch.cuda.device_count() > 1
        return int(devices) > 1


def make_cli(args: list[str] | dict[str, Any] | None, cli_class: type[TrainCLI] = TrainCLI) -> TrainCLI:
    """fdf-train's LightningCLI on `args` (None: the process's command line), nothing run yet."""
    return cli_class(ProgressiveGAN, FDFDataModule, args=args, run=False, seed_everything_default=0,
                     auto_configure_optimizers=False,
                     save_config_callback=ConfigToRunDir, save_config_kwargs={"save_to_log_dir": False},
                     parser_kwargs={"prog": "fdf-train", "description": __doc__}, parser_class=TrainArgumentParser)


class _ParseOnly(TrainCLI):
    def instantiate_classes(self) -> None:
        pass


def resolve_config(args: list[str]) -> tuple[str, Any]:
    """fdf-train's options resolved as it would resolve them (YAML text, namespace), without
    building the model, the data or an MLflow run."""
    cli = make_cli(list(args), _ParseOnly)
    return cli.parser.dump(cli.config), cli.config


def run(args: list[str] | dict[str, Any] | None = None) -> Path:
    """Train (or resume) from a command line, or a config dict with the YAML's structure (model,
    data, trainer, run_dir, ...); None reads the process's own command line. Returns the run folder."""
    cli = make_cli(args)
    ckpt = cli.resume_path()
    if ckpt is None and cli.config.grow_from:
        ckpt = checkpoints_dir(cli.config.run_dir) / LAST
        if cli.trainer.is_global_zero:
            grow_checkpoint(cli.config.grow_from, cli.model, ckpt)
        else:  # no process group before fit(): the other ranks wait for rank zero's file
            wait_for_file(ckpt, GROW_WAIT_S)
    if ckpt and cli.trainer.is_global_zero:
        progress = read_progress(ckpt)
        log.info("resuming from %s at step %d, kimg %.3f, %s alpha %.3f", ckpt, progress["step"],
                 progress["images_shown"] / 1000, progress["phase"], progress["alpha"])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, weights_only=True)
    return Path(cli.config.run_dir)
