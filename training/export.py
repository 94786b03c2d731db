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

EXPORT_FORMAT = "fdf-generator-ema/1"


def export_generator(checkpoint: str | Path, output: str | Path, card: dict, crop_rule: str = "fdf") -> Path:
    """Write the EMA generator of a training checkpoint with `card` (name, data, license, ...) and the
    crop rule of the faces it was trained on (`fdf_builder.crop`), which the anonymizer then uses."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    prefix = "generator_ema."
    state = {k[len(prefix):]: v.clone() for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    hp = ckpt["hyper_parameters"]
    exported = {"format": EXPORT_FORMAT, "generator_ema": state,
                "hyper_parameters": {"network": hp["network"], "schedule": hp["schedule"]},
                "progress": ckpt["progress"], "crop_rule": crop_rule, "card": dict(card)}
    buf = io.BytesIO()
    torch.save(exported, buf)
    atomic_write_bytes(output, buf.getvalue())
    return Path(output)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint (e.g. RUN/checkpoints/final.ckpt)")
    p.add_argument("--output", required=True, help="the exported .pt file")
    for key in ("name", "data", "license"):
        p.add_argument(f"--{key}", required=True, help=f"model card: {key}")
    p.add_argument("--notes", default="", help="model card: anything else a user must know")
    p.add_argument("--crop_rule", default="fdf", choices=["fdf", "pad"],
                   help="the fdf-build --crop_rule of the training data (the anonymizer crops faces the same way)")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint}: no such file")
    card = {k: getattr(args, k) for k in ("name", "data", "license", "notes")}
    out = export_generator(args.checkpoint, args.output, card, args.crop_rule)
    print(out)
    return out


if __name__ == "__main__":
    main()
