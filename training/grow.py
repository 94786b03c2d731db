"""Grow a trained run to a higher resolution: `fdf-train --grow_from <checkpoint>`.

Progressive growing trains each resolution on top of the ones below it, so a finished 64x64 run is
exactly the state a 128x128 run of the same networks reaches at the end of its 64x64
stabilization. This module turns the lower run's checkpoint into the first checkpoint of the
higher run, and `fdf-train` resumes from it as from any checkpoint of its own:

- every tensor of the lower run (both networks, the EMA generator) is copied by name; the layers of
  the new resolutions keep their fresh initialization (seeded as any run of the config);
- both Adam states are carried by parameter name (the new layers start without moments, as
  parameters do the first time Adam steps them);
- the step, data position and random states carry over unchanged, which is only right when the new
  config's schedule puts every step up to that point at the same images, resolution, alpha and
  batch: `schedule.stabilize_kimg_at` states how long the lower run stayed at its top resolution,
  and anything else is refused before a file is written;
- the checkpoint starts a new MLflow run (the lower run's store is elsewhere) and records where it
  came from under `grown_from`.

It is a checkpoint like any other: it loads with `weights_only=True`, and is written atomically to
`<run_dir>/checkpoints/last.ckpt`, only when the run has no checkpoint yet (nothing is overwritten).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fdf_core.errors import ConfigError, MissingInputError
from fdf_core.tario import atomic_path
from training.schedule import Schedule

log = logging.getLogger(__name__)
GROW_WAIT_S = 900.0  # how long the other ranks of a multi-process run wait for rank zero's grown checkpoint


def wait_for_file(path: Path, timeout_s: float) -> None:
    """Block until `path` exists (written atomically by another rank), or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise MissingInputError(f"{path}: rank zero did not write the grown checkpoint in {timeout_s:g} s")
        time.sleep(1.0)


def _same_steps(old: Schedule, new: Schedule, steps: int, source: Path) -> None:
    """Refuse unless both schedules put each of the first `steps` steps at the same images, phase
    resolution, alpha and batch (the lower run trained those; the higher run must believe it did)."""
    for name in ("start_resolution",):
        if getattr(old, name) != getattr(new, name):
            raise ConfigError(f"--grow_from {source}: schedule.{name} {getattr(new, name)} differs from the "
                              f"checkpoint's {getattr(old, name)}")
    if new.max_resolution <= old.max_resolution:
        raise ConfigError(f"--grow_from {source}: the checkpoint already trains up to {old.max_resolution}x"
                          f"{old.max_resolution}; schedule.max_resolution must be higher (it is {new.max_resolution})")
    if steps > new.total_steps:
        raise ConfigError(f"--grow_from {source}: the checkpoint is at step {steps}, past this schedule's "
                          f"{new.total_steps} steps (raise schedule.total_kimg)")
    for k in range(steps):
        a, b = old.at_step(k), new.at_step(k)
        if (a.images, a.phase.resolution, a.phase.kind, a.alpha, a.batch_size) != (
                b.images, b.phase.resolution, b.phase.kind, b.alpha, b.batch_size):
            top = old.max_resolution
            raise ConfigError(
                f"--grow_from {source}: step {k} is {a.phase.name} at {a.images} images with batch {a.batch_size} "
                f"in the checkpoint's schedule but {b.phase.name} at {b.images} with batch {b.batch_size} in "
                f"this one; keep fade_kimg, stabilize_kimg and batch_sizes of the lower run and set "
                f"schedule.stabilize_kimg_at {{{top}: {(old.total_images - old.phases[-1].start_images) / 1000:g}}}"
                f" (how long it stayed at {top}x{top})")


def _carry_tensors(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], source: Path) -> int:
    """Copy every tensor of `old` into `new` by name; returns how many of `new` stay fresh."""
    for name, tensor in old.items():
        if name not in new:
            raise ConfigError(f"--grow_from {source}: the checkpoint's tensor {name} has no place in this "
                              "config's networks (a different network layout?)")
        if new[name].shape != tensor.shape:
            raise ConfigError(f"--grow_from {source}: tensor {name} is {tuple(tensor.shape)} in the checkpoint "
                              f"and {tuple(new[name].shape)} here (a different model.network?)")
        new[name] = tensor.clone()
    return len(new) - len(old)


def _carry_adam(old_state: dict[str, Any], module: torch.nn.Module, prefix: str, old_names: set[str],
                fresh: torch.optim.Optimizer, source: Path) -> dict[str, Any]:
    """The Adam state of `module`'s optimizer in the grown network: the lower run's moments moved
    from its parameter indices to the new ones (the same code builds both networks, so the lower
    network's parameters are the new one's in the same order, without the new layers)."""
    names = [n for n, _ in module.named_parameters()]
    kept = [i for i, n in enumerate(names) if f"{prefix}.{n}" in old_names]
    old_indices = old_state["param_groups"][0]["params"]
    if len(kept) != len(old_indices) or len(old_state["param_groups"]) != 1:
        raise ConfigError(f"--grow_from {source}: the checkpoint's {prefix} optimizer holds {len(old_indices)} "
                          f"parameters, {len(kept)} of this network's match its tensors")
    params = dict(module.named_parameters())
    state = {}
    for old_index, new_index in zip(old_indices, kept):
        moments = old_state["state"].get(old_index)
        if moments is None:
            continue
        shape = params[names[new_index]].shape
        if moments["exp_avg"].shape != shape:
            raise ConfigError(f"--grow_from {source}: Adam moments of {prefix}.{names[new_index]} are "
                              f"{tuple(moments['exp_avg'].shape)}, the parameter {tuple(shape)}")
        state[new_index] = moments
    group = {**fresh.state_dict()["param_groups"][0], **{k: v for k, v in old_state["param_groups"][0].items()
                                                       if k != "params"}}
    group["params"] = list(range(len(names)))
    return {"state": state, "param_groups": [group]}


def grow_checkpoint(source: str | os.PathLike, model: Any, dest: str | os.PathLike) -> dict[str, Any]:
    """Write the first checkpoint of `model`'s (a ProgressiveGAN) run at `dest` from the lower run's
    checkpoint `source` (module docstring). Returns what `grown_from` records."""
    source, dest = Path(source), Path(dest)
    if not source.is_file():
        raise MissingInputError(f"--grow_from {source}: no such checkpoint")
    if dest.exists():
        raise ConfigError(f"--grow_from: {dest} exists; the run resumes from it (grow only starts a run)")
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    missing = [k for k in ("state_dict", "optimizer_states", "hyper_parameters", "progress") if k not in ckpt]
    if missing:
        raise ConfigError(f"--grow_from {source}: not an fdf-train checkpoint (no {', '.join(missing)}; an "
                          "exported generator cannot be grown: give the run's checkpoints/*.ckpt)")
    hp = ckpt["hyper_parameters"]
    if hp["network"] != asdict(model.network):
        differ = sorted(k for k in hp["network"] if hp["network"][k] != asdict(model.network).get(k))
        raise ConfigError(f"--grow_from {source}: model.network differs from the checkpoint's in {differ}")
    old_schedule = Schedule(**hp["schedule"])
    step = int(ckpt["progress"]["step"])
    _same_steps(old_schedule, model.schedule, step, source)

    state = model.state_dict()
    fresh = _carry_tensors(ckpt["state_dict"], state, source)
    optimizers = model.configure_optimizers()
    old_names = set(ckpt["state_dict"])
    ckpt["optimizer_states"] = [
        _carry_adam(old, module, prefix, old_names, opt, source)
        for old, module, prefix, opt in zip(ckpt["optimizer_states"], (model.generator, model.discriminator),
                                            ("generator", "discriminator"), optimizers)]
    images = model.schedule.images_before(step)
    phase = model.schedule.phase_at(images)
    grown_from = {"checkpoint": str(source.resolve()), "step": step, "images_shown": images,
                  "max_resolution": old_schedule.max_resolution, "new_tensors": fresh}
    ckpt.update(state_dict=state, hyper_parameters=dict(model.hparams), grown_from=grown_from,
                progress={"step": step, "images_shown": images, "resolution": phase.resolution,
                          "alpha": phase.alpha(images), "phase": phase.name,
                          "done": step >= model.schedule.total_steps})
    ckpt.pop("mlflow_run_id", None)  # the lower run logged to its own store: this run starts a new one
    with atomic_path(dest) as tmp:
        torch.save(ckpt, tmp)
    log.info("grew %s (%dx%d, step %d, %.1f kimg) into %s: %d new tensors, next %s", source,
             old_schedule.max_resolution, old_schedule.max_resolution, step, images / 1000, dest, fresh, phase.name)
    return grown_from
