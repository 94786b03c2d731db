"""Exports of a GPU training run of `training/configs/utkface_gpu128.yaml` (benchmarks/gpu_lease.sh).

For the run folder given: the EMA generator where training stopped (128x128 once it got there), and
the 64x64 model that the same run finished on its way (the first snapshot past stabilize64,
exported with `training.export --resolution 64`), each with its model card. Prints one JSON line.

    python benchmarks/gpu_export.py --run_dir runs/gpu/w64 --out OUT --started EPOCH_S --device "H200"
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.learning import CARD_DATA, CARD_LICENSE  # noqa: E402
from fdf_core.checkpoints import LAST, checkpoints_dir, read_progress  # noqa: E402
from training.export import export_generator  # noqa: E402


def run_precision(run_dir: Path) -> str:
    """The trainer precision the run was started with (its config.yaml): a lease may fall back to fp32."""
    import yaml
    config = run_dir / "config.yaml"
    return str(yaml.safe_load(config.read_text())["trainer"]["precision"]) if config.is_file() else "unknown"


def card(width: int, resolution: int, kimg: float, wall_s: float, device: str, note: str, precision: str) -> dict:
    return {
        "name": f"fdf-utkface{resolution} (DeepPrivacy U-Net, base width {width}, {resolution}x{resolution}, "
                f"GPU-trained)",
        "data": CARD_DATA,
        "license": CARD_LICENSE,
        "precision": precision,
        "kimg": round(kimg, 1),
        "wall_time_hours": round(wall_s / 3600, 3),
        "notes": f"Trained {kimg:g} kimg in {wall_s / 60:.1f} min of wall time on one {device} with "
                 f"training/configs/utkface_gpu128.yaml (base width {width}), stopped by --trainer.max_time "
                 f"(benchmarks/gpu_lease.sh). {note}",
    }


def first_past(run_dir: Path, resolution: int) -> Path | None:
    """The earliest checkpoint whose training has moved past `resolution` (its stabilization done)."""
    found = []
    for path in checkpoints_dir(run_dir).glob("*.ckpt"):
        progress = read_progress(path) or {}
        if int(progress.get("resolution", 0)) > resolution:
            found.append((int(progress["images_shown"]), path))
    return min(found)[1] if found else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run_dir", required=True)
    p.add_argument("--out", required=True, help="folder of the exported .pt files")
    p.add_argument("--width", type=int, required=True, help="the run's base width (file names and card)")
    p.add_argument("--started", type=float, required=True, help="the run's start, seconds since the epoch")
    p.add_argument("--device", default="GPU")
    args = p.parse_args(argv)
    run_dir, out = Path(args.run_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"run_dir": str(run_dir), "width": args.width}
    last = checkpoints_dir(run_dir) / LAST
    if not last.is_file():
        result["error"] = f"{last}: no checkpoint"
        print(json.dumps(result))
        return result
    progress, precision = read_progress(last), run_precision(run_dir)
    kimg, wall = progress["images_shown"] / 1000, last.stat().st_mtime - args.started
    res, alpha = int(progress["resolution"]), float(progress["alpha"])
    final_res = res if alpha >= 1.0 else res // 2  # in a fade-in: the resolution it has finished
    at = None if final_res == res else final_res
    name = out / f"fdf_utkface{final_res}_w{args.width}_ema.pt"
    export_generator(last, name, card(args.width, final_res, kimg, wall, args.device,
                                      f"Stopped in {progress['phase']} (alpha {alpha:.3f}).", precision),
                     crop_rule="pad", resolution=at)
    result["last"] = {"file": name.name, "kimg": round(kimg, 1), "phase": progress["phase"], "alpha": alpha,
                      "wall_s": round(wall, 1)}
    if final_res > 64:
        past = first_past(run_dir, 64)
        if past is not None:
            pp = read_progress(past)
            k64 = pp["images_shown"] / 1000
            name64 = out / f"fdf_utkface64_w{args.width}_ema.pt"
            export_generator(past, name64, card(args.width, 64, k64, past.stat().st_mtime - args.started, args.device,
                                                "The same run's 64x64 model: its first snapshot past stabilize64 "
                                                f"({pp['phase']}, alpha {float(pp['alpha']):.4f}), exported at 64x64.",
                                                precision),
                             crop_rule="pad", resolution=64)
            result["model64"] = {"file": name64.name, "kimg": round(k64, 1), "from": past.name}
    result["exported_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
