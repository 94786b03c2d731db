"""A trained generator as a small file: the EMA weights, how to rebuild the network, and its model card.

Training checkpoints hold both networks, optimizer states and RNG states (tens of MB to GB); what
anonymization needs is the EMA generator at the resolution it reached. `export_generator` writes
exactly that (FORMAT.md §3), loadable with `torch.load(weights_only=True)` and by
`training.module.load_generator`, which reads exports and training checkpoints alike.

    python -m training.export --checkpoint RUN/checkpoints/final.ckpt --output model.pt \\
        --name my-model --data "what it was trained on" --license "terms of the data"
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch

from fdf_core.tario import atomic_write_bytes
from training.networks import generator_state

EXPORT_FORMAT = "fdf-generator-ema/1"


def export_generator(checkpoint: str | Path, output: str | Path, card: dict, crop_rule: str | None = None,
                     resolution: int | None = None, context_margins: list[float] | None = None,
                     lower: list[str | Path] | None = None) -> Path:
    """Write the EMA generator of a training checkpoint with `card` (name, data, license, ...), the
    crop rule of the faces it was trained on (`fdf_builder.crop`) and the band of photo those crops
    showed around the box (`context_margins`, from `measure_context`; None: full crops), which the
    anonymizer then uses. None: what the checkpoint records (`FDFDataModule.crop_record`), else
    "fdf" and full crops.

    `resolution`: export the model at a resolution its training has already finished stabilizing,
    below the one it is at (a run continued to 128x128 also holds a finished 64x64 model, cheaper per
    face); the progress recorded is then that resolution at alpha 1. None: where training is.

    `lower`: training checkpoints or exports of finished lower-resolution generators of the same
    faces (a grown run's: the run it grew from), embedded so that the anonymizer paints the faces
    and videos that need no more resolution with them (FORMAT.md §3, `lower`; eval.anonymizer
    `MAX_UPSCALE`). Not the grown network's own lower output: its lower layers trained on for the
    new one, and that output layer is not trained once the fade-in ends.
    """
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = generator_state(ckpt, str(checkpoint))
    crop_rule = crop_rule or ckpt.get("crop_rule", "fdf")
    if context_margins is None:
        context_margins = ckpt.get("context_margins")
    hp = ckpt["hyper_parameters"]
    progress = dict(ckpt["progress"])
    if resolution is not None:
        progress = _at_resolution(progress, int(resolution), checkpoint)
    exported = {"format": EXPORT_FORMAT, "generator_ema": state,
                "hyper_parameters": {"network": hp["network"], "schedule": hp["schedule"]},
                "progress": progress, "crop_rule": crop_rule, "card": dict(card)}
    if context_margins is not None:
        exported["context_margins"] = [float(v) for v in context_margins]
    if lower:
        exported["lower"] = [_lower_generator(path, crop_rule, int(progress["resolution"])) for path in lower]
    buf = io.BytesIO()
    torch.save(exported, buf)
    atomic_write_bytes(output, buf.getvalue())
    return Path(output)


def _lower_generator(path: str | Path, crop_rule: str, resolution: int) -> dict:
    """A finished lower-resolution generator to embed (`export_generator(lower=...)`): its EMA
    weights, network and progress; refused unless it is finished (alpha 1), below `resolution` and
    cut by the same crop rule."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    progress = dict(ckpt["progress"])
    if progress["resolution"] >= resolution or float(progress["alpha"]) < 1.0:
        raise ValueError(f"{path}: a lower generator must have finished a resolution below {resolution}x{resolution} "
                         f"(it is at {progress['resolution']}x{progress['resolution']}, alpha {progress['alpha']:g})")
    if ckpt.get("crop_rule", "fdf") != crop_rule:
        raise ValueError(f"{path}: its faces were cut by crop rule {ckpt.get('crop_rule', 'fdf')!r}, this model's "
                         f"by {crop_rule!r}")
    hp = ckpt["hyper_parameters"]
    return {"generator_ema": generator_state(ckpt, str(path)), "progress": progress,
            "hyper_parameters": {"network": hp["network"], "schedule": hp["schedule"]}}


def measure_context(data_root: str | Path, num_faces: int = 1000) -> list[float]:
    """The band of photo around the face box in the first `num_faces` training crops of a build
    (`fdf_builder.crop.context_margins`: left, top, right, bottom as fractions of the box side,
    left and right averaged since training mirrors faces)."""
    from fdf_builder.crop import context_margins, visible_margins
    from training.datamodule import FDFDataModule
    data = FDFDataModule(str(data_root))
    data.setup("validate")
    margins = [visible_margins(image.permute(1, 2, 0).numpy(), box.numpy())
               for batch in data.iter_split("train", 100, num_faces)
               for image, box in zip(batch["images"], batch["bbox"])]
    if not margins:
        raise ValueError(f"{data_root}: no training faces to measure the context of")
    return context_margins(margins)


def _at_resolution(progress: dict, resolution: int, checkpoint: str | Path) -> dict:
    """`progress` moved back to `resolution` at alpha 1, refused unless that resolution is finished:
    the checkpoint is past it, or at it with the fade-in done."""
    now, alpha = int(progress["resolution"]), float(progress["alpha"])
    if resolution > now or (resolution == now and alpha < 1.0):
        raise ValueError(f"{checkpoint}: training is at {now}x{now} (alpha {alpha:g}); it has not finished "
                         f"{resolution}x{resolution}, so that model cannot be exported from it")
    return {**progress, "resolution": resolution, "alpha": 1.0, "phase": f"stabilize{resolution}",
            "training_phase": progress.get("phase"), "training_resolution": now, "training_alpha": alpha}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint (e.g. RUN/checkpoints/final.ckpt)")
    p.add_argument("--output", required=True, help="the exported .pt file")
    for key in ("name", "data", "license"):
        p.add_argument(f"--{key}", required=True, help=f"model card: {key}")
    p.add_argument("--notes", default="", help="model card: anything else a user must know")
    p.add_argument("--crop_rule", default=None, choices=["fdf", "pad"],
                   help="the fdf-build --crop_rule of the training data (the anonymizer crops faces the same way; "
                        "default: what the checkpoint records, else fdf)")
    p.add_argument("--context_from", default=None,
                   help="the fdf-build output folder of the training data: records the band of photo its crops show "
                        "around the box (needed for builds of tight crops, e.g. --crop_rule pad; default: what the "
                        "checkpoint records, else full crops)")
    p.add_argument("--resolution", type=int, default=None,
                   help="export at this resolution, one the checkpoint has finished (default: where it is)")
    p.add_argument("--lower", nargs="*", default=None,
                   help="checkpoints or exports of finished lower-resolution generators of the same faces to embed "
                        "(the anonymizer paints smaller faces and videos with them; e.g. the run this one grew from)")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint}: no such file")
    card = {k: getattr(args, k) for k in ("name", "data", "license", "notes")}
    try:
        margins = None if args.context_from is None else measure_context(args.context_from)
        out = export_generator(args.checkpoint, args.output, card, args.crop_rule, args.resolution, margins,
                               args.lower)
    except ValueError as e:
        p.error(str(e))
    print(out)
    return out


if __name__ == "__main__":
    main()
