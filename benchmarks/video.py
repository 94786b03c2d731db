"""Video leak benchmark: our anonymizer (generator, one blur baseline) and deface on the same clips.

The clips come from `eval.video_clips` (camera paths over real group photos, exact face boxes per
frame); every output is scored by `eval.video_metrics` from pixels alone: leaked face-frames per
size bin, flicker, and whether frame count, frame rate and audio survived. Prints one JSON object:
per clip and in total, one row per method.

    python benchmarks/video.py --quick              # each clip's hard part, a few minutes
    python benchmarks/video.py                      # the full clips (about 37 s of 720p video)
    python benchmarks/video.py --checkpoint RUN/checkpoints/final.ckpt --methods generator

Methods: `generator` (DeepPrivacy; `--checkpoint`, else the generator shipped in `eval/weights/`,
its card there; `--generator_width N` instead runs a randomly initialised one of base width N at 128x128:
leaks do not depend on what the generator paints, and the paper's 12M generator, width 256, runs
at about 1 face/s on 2 CPU cores, hours on the crowd clip), `heavy_blur` (the blur baseline: box
filter of 30 % of the face width, the same tracking), and `deface` (deface 1.5.0 through its command
line with default settings, in its own environment made by `benchmarks/deface_env.sh`; skipped with
the reason if that is missing). `--calibrate` adds the leak test's calibration: `untouched` (the
source re-encoded) and baselines applied to exactly the ground-truth boxes (`<method>@truth`);
untouched, Gaussian 9x9 and pixelation 16x16 must be counted as leaking; black-out, heavy blur and
soft blur (the anonymizer's method for faces under 20 px) not. Measured: heavy blur does leak two
faces of the quick clips (38 and 43 px) by identity, in every frame the recognizer judged them
(eval.video_metrics): a box filter of 30 % of the face width leaves what dlib needs there.

Speed on a busy machine: the methods run back to back on each clip, so their ratio is measured
under the same load. Ours runs in this process with the models loaded beforehand; deface runs as
a subprocess, so its time includes starting Python and loading its model (`deface_startup_s`,
measured once on a 1-frame clip, is subtracted in `frames_per_s`; `frames_per_s_wall` keeps it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from eval.anonymizer import VIDEO_LATENT, Anonymizer, AnonymizerConfig, load_generator_at  # noqa: E402
from eval.video import VideoOptions, anonymize_video, ffmpeg_exe  # noqa: E402
from eval.video_clips import UNTOUCHED, select, write_clip, write_on_truth  # noqa: E402
from eval.video_metrics import BINS, FrameCountError, probe, score_clip  # noqa: E402
from training.networks import Generator, GeneratorAt  # noqa: E402

DEFACE = REPO / ".venv-deface" / "bin" / "deface"
BLUR = "heavy_blur"
ON_TRUTH = "@truth"  # suffix: the baseline applied to exactly the ground-truth boxes (no detector, no tracker)
MUST_LEAK = (UNTOUCHED, f"gaussian_9x9{ON_TRUTH}", f"pixelation_16x16{ON_TRUTH}")
MUST_NOT_LEAK = (f"blackout{ON_TRUTH}", f"heavy_blur{ON_TRUTH}", f"soft_blur{ON_TRUTH}")  # soft_blur: small faces


def _deface_cmd(exe: Path, src: Path, dst: Path) -> list[str]:
    return [str(exe), str(src), "--output", str(dst)]  # every other setting at its default


def deface_startup(exe: Path, tmp: Path) -> float:
    """Seconds deface needs for a 1-frame clip: process start, imports, model load, one frame."""
    one = tmp / "one_frame.mp4"
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", "color=gray:s=1280x720:d=0.04",
                    "-frames:v", "1", "-pix_fmt", "yuv420p", str(one)], check=True)
    start = time.perf_counter()
    subprocess.run(_deface_cmd(exe, one, tmp / "one_frame_out.mp4"), check=True, capture_output=True)
    return time.perf_counter() - start


def run_deface(exe: Path, src: Path, dst: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(_deface_cmd(exe, src, dst), capture_output=True, text=True)
    if done.returncode != 0 or not dst.is_file():
        raise RuntimeError(f"deface failed on {src} (exit {done.returncode}): {done.stderr[-1500:]}")
    return time.perf_counter() - start


def build_generator(args) -> tuple[GeneratorAt, str]:
    if not args.generator_width:
        from eval.anonymizer import SHIPPED_MODEL
        path = args.checkpoint or SHIPPED_MODEL
        return load_generator_at(path), str(path)
    torch.manual_seed(0)
    g = GeneratorAt(Generator(args.generator_width, 128).eval().requires_grad_(False), 128)
    n = sum(p.numel() for p in g.parameters())
    return g, f"random init, width {args.generator_width} at 128x128 ({n / 1e6:.1f}M parameters)"


def row(source: Path, output: Path, truth: Path, seconds: float, frames: int, src_info, extra: dict,
        identity_every: int = 1) -> dict:
    """Scores of one output; an output whose frame count is not the ground truth's is not judged:
    its row holds `not_judged` (the reason) and counts as a failed clip in the totals and goals."""
    out_info = probe(output)
    try:
        score = score_clip(source, output, truth, identity_every=identity_every).as_dict()
    except FrameCountError as e:
        return {"not_judged": str(e), "frames_in": src_info.frames, "frames_out": out_info.frames,
                "frame_count_kept": False, **extra}
    return {**score, "frames_per_s": round(frames / seconds, 3) if seconds else None, **extra,
            "frames_in": src_info.frames, "frames_out": out_info.frames,
            "frame_count_kept": out_info.frames == src_info.frames,
            "frame_rate_kept": abs(out_info.fps - src_info.fps) < 0.01,
            "audio_kept": out_info.audio and src_info.audio_seconds is not None and out_info.audio_seconds is not None
            and abs(out_info.audio_seconds - src_info.audio_seconds) < 0.1}


def total(rows: list[dict]) -> dict:
    failed = [r for r in rows if "not_judged" in r]
    rows = [r for r in rows if "not_judged" not in r]
    faces = {b: sum(r["face_frames"][b] for r in rows) for b in BINS}
    leaked = {b: sum(r["leaked_face_frames"][b] for r in rows) for b in BINS}
    pairs = sum(r["flicker_pairs"] for r in rows)
    flick = sum(r["flicker"] * r["flicker_pairs"] for r in rows) / max(pairs, 1)
    flick_src = sum(r["flicker_source"] * r["flicker_pairs"] for r in rows) / max(pairs, 1)
    frames = sum(r["frames_in"] for r in rows)
    identity = [r["identity"] for r in rows]
    distances = [d["distance_min"] for d in identity if d["distance_min"] is not None]
    timed = [r for r in rows if r["frames_per_s"]]
    seconds = sum(r["frames_in"] / r["frames_per_s"] for r in timed)
    frames_timed = sum(r["frames_in"] for r in timed)
    return {"face_frames": faces, "leaked_face_frames": leaked,
            "leak_rate": {b: round(leaked[b] / faces[b], 4) if faces[b] else None for b in BINS},
            "flicker": round(flick, 3), "flicker_source": round(flick_src, 3),
            "flicker_ratio": round(flick / flick_src, 3) if flick_src else None,
            "frames": frames, "frames_per_s": round(frames_timed / seconds, 3) if seconds else None,
            "clips_with_leaks_ge24": sum(r["leaked_face_frames"]["ge24"] > 0 for r in rows),
            "clips_not_judged": len(failed),
            "by_source": _sum_sources([r["by_source"] for r in rows]),
            "identity": {"checked": sum(d["checked"] for d in identity),
                         "leaked": {b: sum(d["leaked"][b] for d in identity) for b in BINS},
                         "under_0_6": sum(d.get("under_0_6", 0) for d in identity),
                         "distance_min": min(distances) if distances else None,
                         "chance": _sum_chance([d["chance"] for d in identity if "chance" in d])},
            "identity_stability": _stability([r["identity_stability"] for r in rows]),
            "flicker_ratio_worst_clip": max((r["flicker_ratio"] for r in rows if r["flicker_ratio"] is not None),
                                            default=None),
            "all_kept": not failed and all(r["frame_count_kept"] and r["frame_rate_kept"] and r["audio_kept"]
                                           for r in rows)}


def _sum_chance(per_clip: list[dict]) -> dict:
    """The recognizer's chance rate (`ClipScore.count_chance`) over clips: pairs and matches summed,
    `expected_leaks` the clips' own expectations summed."""
    pairs = sum(c["pairs"] for c in per_clip)
    painted = sum(c["painted_matches_other_person"] for c in per_clip)
    real = sum(c["real_matches_other_person"] for c in per_clip)
    return {"pairs": pairs, "painted_matches_other_person": painted, "rate": round(painted / pairs, 4) if pairs else None,
            "real_matches_other_person": real, "rate_real": round(real / pairs, 4) if pairs else None,
            "expected_leaks": round(sum(c["expected_leaks"] or 0 for c in per_clip), 1)}


def _stability(per_clip: list[dict]) -> dict:
    """Identity stability over clips: tracks judged, tracks that stayed one identity, the worst track."""
    def summed(clips: list[dict]) -> dict:
        worst = [c["max_distance_worst_track"] for c in clips if c["max_distance_worst_track"] is not None]
        return {"tracks": sum(c["tracks"] for c in clips),
                "tracks_one_identity": sum(c["tracks_one_identity"] for c in clips),
                "max_distance_worst_track": max(worst) if worst else None}

    return {**summed(per_clip), "source": summed([c["source"] for c in per_clip if "source" in c])}


def _sum_sources(per_clip: list[dict]) -> dict:
    """Faces and leaks per ground-truth source, summed over clips."""
    out: dict = {}
    for clip in per_clip:
        for name, counts in clip.items():
            entry = out.setdefault(name, {"faces": dict.fromkeys(BINS, 0), "leaked": dict.fromkeys(BINS, 0)})
            for key in ("faces", "leaked"):
                for b in BINS:
                    entry[key][b] += counts[key][b]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only the hard part of each clip (about 1 s each)")
    p.add_argument("--clips", default=None, help="comma-separated clip names (default: all)")
    p.add_argument("--methods", default=f"generator,{BLUR},deface")
    p.add_argument("--calibrate", action="store_true",
                   help=f"also score {', '.join(MUST_LEAK + MUST_NOT_LEAK)}: the leak test must find leaks in the "
                        "first three and none in the last two")
    p.add_argument("--checkpoint", default=None, help="training checkpoint of the generator")
    p.add_argument("--generator_width", type=int, default=0,
                   help="run a randomly initialised generator of this base width at 128x128 instead")
    p.add_argument("--deface", default=str(DEFACE), help="deface executable (benchmarks/deface_env.sh)")
    p.add_argument("--work_dir", default=None, help="keep clips and outputs here (default: a temporary folder)")
    p.add_argument("--resume", action="store_true",
                   help="in --work_dir, score outputs that are already there (with their timing) again "
                        "instead of making them anew, e.g. after a change of the metrics")
    p.add_argument("--identity_every", type=int, default=1,
                   help="dlib's recognizer judges faces >= 32 px in every N-th frame (1: all; the rest keep the "
                        "detail test alone): about 0.2 s a face-frame on an idle core, far more on a busy machine")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--paint_every", type=int, default=VideoOptions.paint_every,
                   help="the generator paints a track every N frames and carries it between (eval.face_memory)")
    p.add_argument("--temporal_keep", type=float, default=VideoOptions.temporal_keep,
                   help="weight of a track's previous painting when a new one is blended in")
    p.add_argument("--seam_keep", type=float, default=VideoOptions.seam_keep,
                   help="weight of a track's previous seam correction when this frame's is blended in")
    p.add_argument("--sharper", type=float, default=VideoOptions.sharper,
                   help="paint a face from the later frame of its track that shows more of it, or this many times sharper (0: off)")
    p.add_argument("--paint_score", type=float, default=VideoOptions.paint_score,
                   help="the generator paints a track once a detection of it scored this; before, the small-face method")
    p.add_argument("--max_covered", type=float, default=VideoOptions.max_covered,
                   help="drop a detection with more than this share of its box inside higher-scoring ones (1: keep all)")
    p.add_argument("--detect_every", type=int, default=VideoOptions.detect_every,
                   help="the detector runs on every N-th frame; the boxes between come from both sides")
    p.add_argument("--latent", type=float, default=VIDEO_LATENT,
                   help="the generator's latent: z = latent x N(0, 1), one per track (0: z = 0; default: the video default)")
    p.add_argument("--small_face_method", default=AnonymizerConfig.small_face_method,
                   help="what the generator's anonymizer gives faces under its small_face_size")
    p.add_argument("--small_face_size", type=int, default=AnonymizerConfig.small_face_size,
                   help="faces under this many px take --small_face_method instead of the generator")
    args = p.parse_args(argv)
    video_options = VideoOptions(paint_every=args.paint_every, temporal_keep=args.temporal_keep,
                                 seam_keep=args.seam_keep, sharper=args.sharper, paint_score=args.paint_score,
                                 max_covered=args.max_covered, detect_every=args.detect_every)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",") + (list(MUST_LEAK + MUST_NOT_LEAK) if args.calibrate else [])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result: dict = {"device": "cpu", "threads": args.threads, "quick": args.quick, "clips": {}, "total": {},
                        "video_options": video_options.__dict__,
                        "small_face_method": args.small_face_method, "small_face_size": args.small_face_size,
                        "latent": args.latent,
                        "identity_every": args.identity_every}
        ours: dict[str, Anonymizer] = {}
        base = Anonymizer(AnonymizerConfig(method=BLUR, batch_size=args.batch_size))
        if "generator" in methods:
            generator, result["generator"] = build_generator(args)
            ours["generator"] = Anonymizer(AnonymizerConfig(batch_size=args.batch_size, latent=args.latent,
                                                            small_face_method=args.small_face_method,
                                                            small_face_size=args.small_face_size), generator=generator,
                                           detector=base.detector, keypoint_model=base.keypoint_model)
        if BLUR in methods:
            ours[BLUR] = base
        deface = Path(args.deface)
        if "deface" in methods:
            if deface.is_file():
                result["deface"] = {"version": subprocess.run([str(deface), "--version"], capture_output=True,
                                                              text=True).stdout.strip(),
                                    "settings": "defaults (threshold 0.2, mask scale 1.3, ellipse blur)",
                                    "startup_s": round(deface_startup(deface, work), 2)}
            else:
                result["deface"] = {"skipped": f"{deface} not found: run bash benchmarks/deface_env.sh"}
                methods.remove("deface")
        per_method: dict[str, list[dict]] = {m: [] for m in methods}
        for spec in select(args.clips):
            src, truth = work / "clips" / f"{spec.name}.mp4", work / "clips" / f"{spec.name}.json"
            if not (args.resume and src.is_file() and truth.is_file()):
                src, truth = write_clip(spec, work / "clips", args.quick)
            src_info = probe(src)
            result["clips"][spec.name] = {"what": spec.what, "frames": src_info.frames, "rows": {}}
            for method in methods:
                out = work / "out" / f"{spec.name}_{method}.mp4"
                timing = out.with_suffix(".timing.json")
                if args.resume and out.is_file() and timing.is_file():
                    run = json.loads(timing.read_text())
                elif method == UNTOUCHED or method.endswith(ON_TRUTH):
                    start = time.perf_counter()
                    write_on_truth(src, truth, out, method.removesuffix(ON_TRUTH))
                    run = {"seconds": time.perf_counter() - start, "frames": src_info.frames,
                           "boxes": "ground truth"}
                elif method == "deface":
                    wall = run_deface(deface, src, out)
                    run = {"seconds": max(wall - result["deface"]["startup_s"], 1e-6), "frames": src_info.frames,
                           "frames_per_s_wall": round(src_info.frames / wall, 3)}
                else:
                    ours[method].timings.clear()
                    stats = anonymize_video(ours[method], src, out, video_options, progress=False)
                    run = {"seconds": stats["seconds"], "frames": stats["frames"], "boxes_anonymized": stats["faces"],
                           "time_fractions": {k: round(v / stats["seconds"], 3)
                                              for k, v in ours[method].timings.items()}}
                timing.write_text(json.dumps(run))
                extra = {k: v for k, v in run.items() if k not in ("seconds", "frames")}
                r = row(src, out, truth, run["seconds"], run["frames"], src_info, extra, args.identity_every)
                per_method[method].append(r)
                result["clips"][spec.name]["rows"][method] = r
        result["total"] = {m: total(rows) for m, rows in per_method.items() if rows}
        if BLUR in result["total"] and "deface" in result["total"]:
            ratio = result["total"][BLUR]["frames_per_s"] / result["total"]["deface"]["frames_per_s"]
            result["blur_vs_deface_speed"] = round(ratio, 3)
        result["goals"] = _goals(result, methods)
    print(json.dumps(result))
    return result


def _goals(result: dict, methods: list[str]) -> dict:
    """The issue's goals, checked on this run's numbers."""
    t = result["total"]
    goals = {}
    for m in [m for m in MUST_LEAK if m in t]:
        goals[f"{m}_counted_as_leaking"] = t[m]["leaked_face_frames"]["ge24"] > 0
    for m in [m for m in MUST_NOT_LEAK if m in t]:
        goals[f"{m}_no_leaks_ge24"] = t[m]["leaked_face_frames"]["ge24"] == 0
    for m in [m for m in methods if m != "deface" and m not in MUST_LEAK + MUST_NOT_LEAK]:
        goals[f"{m}_zero_leaks_ge24_every_clip"] = t[m]["clips_with_leaks_ge24"] == 0 == t[m]["clips_not_judged"]
        if m == "generator":
            goals["generator_flicker_ratio_le_1.2_every_clip"] = (t[m]["flicker_ratio_worst_clip"] or 99) <= 1.2
            st = t[m]["identity_stability"]
            goals["generator_every_track_one_identity"] = st["tracks"] > 0 and st["tracks_one_identity"] == st["tracks"]
            if "deface" in t:  # the issue asks it of every clip, not of the total alone
                rows = [c["rows"] for c in result["clips"].values() if m in c["rows"] and "deface" in c["rows"]]
                goals["generator_at_least_deface_speed_every_clip"] = bool(rows) and all(
                    (r[m].get("frames_per_s") or 0) >= (r["deface"].get("frames_per_s") or float("inf")) for r in rows)
        if "deface" in t:
            goals[f"{m}_fewer_leaks_than_deface_every_bin"] = all(
                t[m]["leaked_face_frames"][b] <= t["deface"]["leaked_face_frames"][b] for b in BINS)
    if "blur_vs_deface_speed" in result:
        goals["blur_within_2x_of_deface_speed"] = result["blur_vs_deface_speed"] >= 0.5
    return goals


if __name__ == "__main__":
    main()
