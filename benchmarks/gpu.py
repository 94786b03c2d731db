"""GPU figures of the whole pipeline in one run (at most ~8 minutes on one GPU); prints one JSON object.

    python3 benchmarks/gpu.py                      # on a GPU machine, from the repository root
    python3 benchmarks/gpu.py --tiny               # the same code paths on a CPU (~30 s of CPU time)

Sections, most important first (each is skipped, and says so, when the time budget cannot hold it):
- training: img/s at 128x128 (stabilize128) of the 12M and 46M configs, per-GPU batch 64 (the
  paper's) and 256, eager and torch.compile'd (compile time apart, not in img/s): the bare step of
  benchmarks/train_step.py (bf16 autocast, channels_last, fused Adam), its peak GPU memory, and
  the model FLOPs per image counted over one eager step, hence the fraction of `--peak_tflops`.
  Goal for the 12M model: >= 1,000 img/s on an H100/H200-class GPU (the paper: 27 img/s on two V100s).
- builder: fdf-build's detector (RetinaFace MobileNet-0.25 on the GPU) + keypoints (MoveNet, a
  TFLite model that runs on the CPU, one thread, even on a GPU machine) over the corpus photos,
  through the builder's own `build_shard` on one raw shard: photos/s of one build process.
- anonymizer: photos/s over the corpus photos and frames/s of a 1280x720 pan clip, the paper's 12M
  generator (random weights: speed does not depend on them), detector and generator on the GPU.
- ddp: with N > 1 GPUs visible, img/s of the 12M bare step (eager, batch 64 per GPU) under
  DistributedDataParallel + NCCL on 1, 2, 4, ... N GPUs, and the per-GPU efficiency.

`--tiny` runs every section on the CPU with tiny networks, batches and resolution, one thread:
torch.compile once (12M key, first batch) with the `aot_eager` backend (Dynamo and AOTAutograd
without code generation, which would take minutes on a CPU), DDP on 2 gloo processes. The test
suite runs it so that this script cannot rot. The exit status is 1 when a section failed (its key
then holds the error; running out of GPU memory is a result, not a failure); the JSON is printed
regardless.
"""
from __future__ import annotations

import time

START = time.monotonic()  # the budget counts the imports and CUDA start too

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's packages, whatever the environment has installed

import torch  # noqa: E402

from benchmarks.train_step import bare_step, build, real_batch, step_seconds  # noqa: E402
from fdf_core.assets import assets_dir  # noqa: E402
from training.networks import count_parameters  # noqa: E402

PEAK_TFLOPS = 989.4  # H100/H200 SXM, dense BF16 tensor cores (NVIDIA datasheets; 1,979 is with 2:4 sparsity)
GOAL_IMG_PER_S = 1000
PAPER_IMG_PER_S = 27  # DeepPrivacy, two V100s (docs/reference.md, "Published results")
CONFIGS = {"12m": 256, "46m": 512}  # base width S of training/configs/fdf128_<name>.yaml
TINY_CONFIGS = {"12m": 16, "46m": 32}
TINY_PHOTOS = ("face_recognition__examples_obama-240p.jpg",  # small files with one large face
               "face_recognition__examples_obama-720p.jpg")
SECTIONS = ("training", "builder", "anonymizer", "ddp")


def log(msg: str) -> None:
    """Progress on stderr: stdout holds the JSON only."""
    print(f"[gpu.py {time.monotonic() - START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant figures: tiny CPU figures stay positive instead of rounding to 0."""
    return float(f"{x:.{digits}g}")


# ---------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """What differs between a GPU run and `--tiny` on a CPU."""
    device: str
    tiny: bool
    resolution: int
    widths: dict[str, int]
    batches: list[int]
    warmup: int
    steps: int  # at most; fewer when they would take more than timed_s (but never fewer than 5)
    timed_s: float
    compile_backend: str | None
    peak_tflops: float
    frames: int
    generator: tuple[int, int]  # base width, resolution of the anonymizer's generator
    ddp_backend: str
    ddp_max_world: int

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def settings_from(args: argparse.Namespace) -> Settings:
    if args.tiny:
        torch.set_num_threads(1)  # tiny ops: threads only wait on each other on a busy machine
        return Settings(device="cpu", tiny=True, resolution=16, widths=TINY_CONFIGS, batches=args.batches or [4, 8],
                        warmup=args.warmup or 1, steps=args.steps or 2, timed_s=1.0,
                        compile_backend=None if args.compile_backend == "none" else args.compile_backend or "aot_eager",
                        peak_tflops=args.peak_tflops, frames=args.frames or 3,
                        generator=(16, 32), ddp_backend="gloo", ddp_max_world=2)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: no CUDA device visible; use --tiny for the CPU mode")
    return Settings(device="cuda", tiny=False, resolution=128, widths=CONFIGS, batches=args.batches or [64, 256],
                    warmup=args.warmup or 5, steps=args.steps or 30, timed_s=8.0,
                    compile_backend=None if args.compile_backend == "none" else args.compile_backend or "inductor",
                    peak_tflops=args.peak_tflops, frames=args.frames or 100, generator=(256, 128),
                    ddp_backend="nccl", ddp_max_world=torch.cuda.device_count())


def corpus_photos(s: Settings) -> list[Path]:
    """All corpus photos by name (two small one-face photos in tiny mode)."""
    folder = assets_dir() / "corpus" / "photos"
    if s.tiny:
        return [folder / name for name in TINY_PHOTOS]
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


# ---------------------------------------------------------------------------------------- budget
class BudgetExceeded(BaseException):
    """The overall time budget ran out in the middle of a section (a BaseException, like
    KeyboardInterrupt, so that library code catching Exception lets it through)."""


def _budget_exceeded(e: BaseException | None) -> bool:
    """Whether `e` is, or was raised from, BudgetExceeded (torch.compile wraps what it meets)."""
    while e is not None:
        if isinstance(e, BudgetExceeded):
            return True
        e = e.__cause__ or e.__context__
    return False


class Budget:
    """One deadline for the whole run: a section starts only if its estimated need fits in what is
    left, and an alarm at the deadline stops one that overruns, so the JSON always comes out."""

    def __init__(self, seconds: float):
        self.seconds, self.deadline = seconds, START + seconds
        self.interrupted = False

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, need_s: float, fn: Callable[[], Any]) -> Any:
        """`fn()`, or "skipped: budget ..." / "error: ..." in its place."""
        left = self.left()
        if left < max(need_s, 1):
            left = max(left, 0)
            log(f"{name}: skipped, {left:.0f} s left, needs ~{need_s:.0f} s")
            return f"skipped: budget ({left:.0f} s left of {self.seconds:.0f}, needs ~{need_s:.0f} s)"
        log(f"{name}: start ({left:.0f} s left)")
        t0 = time.monotonic()

        def alarm(signum, frame):
            raise BudgetExceeded()

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, left)
        try:
            out = fn()
            log(f"{name}: done in {time.monotonic() - t0:.1f} s")
            return out
        except torch.cuda.OutOfMemoryError:  # a result (this batch does not fit), not a failure
            log(f"{name}: out of GPU memory")
            return "out of memory"
        except BaseException as e:  # one failed section must not lose the others' figures
            if not _budget_exceeded(e):
                if not isinstance(e, Exception):
                    raise  # KeyboardInterrupt, SystemExit
                traceback.print_exc(file=sys.stderr)
                return f"error: {type(e).__name__}: {e}"[:500]
            self.interrupted = True
            log(f"{name}: stopped by the budget after {time.monotonic() - t0:.0f} s")
            return f"skipped: budget (stopped after {time.monotonic() - t0:.0f} s)"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            free_memory()


def free_memory() -> None:
    """Drop compiled graphs and cached GPU blocks so that each measurement starts clean."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- training
class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks fail inside
    autograd.grad (the gradient penalty); the global total needs no per-module split."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def step_flops(step: Callable[[int], None]) -> int | None:
    """FLOPs of one training step (critic step with the gradient-penalty double backward, generator
    step), counted by torch's FlopCounterMode: convolutions and matrix products, 2 per MAC.
    None (and a message) if the counter fails: the speed figures do not depend on it."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    try:
        with counter:
            step(0)
    except Exception:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        log("FLOP count failed: no fraction_of_peak")
        return None
    return counter.get_total_flops()


@functools.lru_cache(maxsize=None)
def photo_batch(n: int) -> dict[str, torch.Tensor]:
    """train_step's batch of `n` real crops, on the CPU, decoded once per size for all the runs."""
    return real_batch(n, torch.device("cpu"))


def timed_steps(s: Settings, warmup: list[float]) -> int:
    """`s.steps`, or fewer for slow steps (46M at batch 256): about `s.timed_s` seconds, at least 5."""
    return max(min(5, s.steps), min(s.steps, math.ceil(s.timed_s / min(warmup[-2:]))))


def train_run(s: Settings, width: int, batch_size: int, compiled: bool, count_flops: bool = False) -> dict:
    """img/s of the bare training step of the width-S model at `s.resolution` and `batch_size`.

    img/s = batch x timed steps / their total time (each step ends with a device sync: the
    non-finite checks read the losses back anyway). The warm-up steps hold the compilation and
    cuDNN's algorithm search; `compile_seconds` = warm-up time beyond that of as many timed steps.
    """
    device = torch.device(s.device)
    torch.backends.cudnn.benchmark = True  # as trainer.benchmark in the training configs
    module, start = build(s.resolution, batch_size, device, width)
    batch = {k: v.to(device) for k, v in photo_batch(batch_size).items()}
    if s.cuda:
        torch.cuda.reset_peak_memory_stats()
    step = bare_step(module, start, batch, device, s.compile_backend if compiled else None)
    flops = step_flops(step) if count_flops and not compiled else None  # an untimed warm-up step too
    warmup = step_seconds(step, s.warmup, device)
    times = step_seconds(step, timed_steps(s, warmup), device)
    sec = statistics.fmean(times)
    out = {"batch": batch_size, "compiled": compiled, "timed_steps": len(times), "img_per_s": sig(batch_size / sec),
           "sec_per_step": sig(sec), "min_sec_per_step": sig(min(times)), "warmup_seconds": sig(sum(warmup)),
           "peak_memory_gib": sig(torch.cuda.max_memory_allocated() / 2 ** 30) if s.cuda else None}
    if compiled:
        out["compile_backend"] = s.compile_backend
        out["compile_seconds"] = sig(max(sum(warmup) - len(warmup) * sec, 1e-3))
    if flops is not None:
        out["flops_per_image"] = flops / batch_size
    return out


def with_flop_rates(run: dict, flops_per_image: float | None, peak_tflops: float) -> dict:
    """Adds the achieved model TFLOP/s and its fraction of the assumed peak."""
    if not isinstance(run, dict) or not flops_per_image:
        return run
    tflops = flops_per_image * run["img_per_s"] / 1e12
    return {**run, "model_tflops": sig(tflops), "fraction_of_peak": sig(tflops / peak_tflops)}


def train_job(s: Settings, runs: dict, budget: Budget, name: str, batch_size: int, compiled: bool) -> None:
    """One training run into runs[name]["batch<b>"]["eager"|"compiled"]; FLOPs on the first eager run."""
    per_config = runs.setdefault(name, {})
    first = not per_config
    mode = "compiled" if compiled else "eager"
    need = 0 if s.tiny else (25 if not compiled else 100 if name == "12m" else 130)
    per_config.setdefault(f"batch{batch_size}", {})[mode] = budget.run(
        f"training {name} batch {batch_size} {mode}", need,
        lambda: train_run(s, s.widths[name], batch_size, compiled, count_flops=first and not compiled))


def training_summary(s: Settings, runs: dict) -> dict:
    """Parameters, FLOPs/image, flop rates and the goal check around the measured runs."""
    out = {"resolution": s.resolution, "phase": f"stabilize{s.resolution}",
           "precision": "bf16 autocast, channels_last, fused Adam" if s.cuda else "fp32 (cpu)",
           "warmup_steps": s.warmup, "max_timed_steps": s.steps,
           "note": "bare step of benchmarks/train_step.py (Lightning costs <= 1.1x on top); batch per GPU, "
                   "learning rate unchanged: a speed measurement, not a recipe"}
    best_12m = 0.0
    for name, width in s.widths.items():
        with torch.device("meta"):  # shapes only: counting parameters allocates nothing
            module, _ = build(s.resolution, 4, torch.device("cpu"), width)
        cfg = {"base_width": width,
               "generator_params": count_parameters(module.generator, s.resolution),
               "critic_params": count_parameters(module.discriminator, s.resolution)}
        per_batch = runs.get(name, {})
        flops = next((r.pop("flops_per_image") for modes in per_batch.values() for r in modes.values()
                      if isinstance(r, dict) and "flops_per_image" in r), None)
        if flops:
            cfg["flops_per_image"] = sig(flops)
        for key, modes in per_batch.items():
            cfg[key] = {mode: with_flop_rates(r, flops, s.peak_tflops) for mode, r in modes.items()}
            if name == "12m":
                best_12m = max([best_12m] + [r["img_per_s"] for r in modes.values() if isinstance(r, dict)])
        out[name] = cfg
    if best_12m:
        out["best_12m_img_per_s"] = best_12m
        out["goal_12m_img_per_s"] = GOAL_IMG_PER_S
        out["goal_met"] = best_12m >= GOAL_IMG_PER_S
        out["x_paper"] = sig(best_12m / PAPER_IMG_PER_S, 3)
    return out


# ---------------------------------------------------------------------------------------- builder
class _Timed:
    """A model object whose method `method` adds its wall time to `timings[key]`."""

    def __init__(self, model, method: str, timings: dict, key: str):
        self._model, self._method, self._timings, self._key = model, method, timings, key

    def __getattr__(self, name):
        attr = getattr(self._model, name)
        if name != self._method:
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._timings[self._key] = self._timings.get(self._key, 0.0) + time.perf_counter() - t0
        return timed


def _raw_shard(path: Path, photos: list[Path]) -> None:
    """A raw shard (FORMAT.md §1) holding `photos`, as data_prep writes it."""
    from fdf_core.tario import AtomicTarWriter, json_bytes
    with AtomicTarWriter(path) as tar:
        for i, p in enumerate(photos):
            key = f"{i:09d}"
            tar.add_sample(key, {p.suffix[1:].lower(): p.read_bytes(),
                                 "json": json_bytes({"key": key, "photo_id": str(i), "url": p.name})})


def builder_section(s: Settings) -> dict:
    """photos/s of one fdf-build process over one raw shard of the corpus photos (after a warm-up
    shard of one detector batch); detection and keypoint shares from timing the two models."""
    from fdf_builder.build import BuildConfig, build_shard
    from fdf_builder.face_models import load_face_models
    torch.backends.cudnn.benchmark = False  # fdf-build leaves it off: every photo size differs
    photos = corpus_photos(s)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = BuildConfig(input_dir=str(tmp / "raw"), output_dir=str(tmp / "fdf"), device=s.device,
                          batch_size=8, progress=False)
        _raw_shard(tmp / "raw" / "warmup.tar", photos[:cfg.batch_size])
        _raw_shard(tmp / "raw" / "00000.tar", photos)
        models = load_face_models(cfg)
        build_shard("warmup", cfg, models)
        timings: dict[str, float] = {}
        models.detector = _Timed(models.detector, "detect", timings, "detection")
        models.keypoints = _Timed(models.keypoints, "keypoints_for_faces", timings, "keypoints")
        t0 = time.perf_counter()
        stats = build_shard("00000", cfg, models)
        wall = time.perf_counter() - t0
    return {"photos": stats["photos"], "faces_detected": stats["faces_detected"], "faces_kept": stats["faces_kept"],
            "wall_seconds": sig(wall), "images_per_s": sig(stats["photos"] / wall),
            "faces_kept_per_s": sig(stats["faces_kept"] / wall),
            "detection_fraction": sig(timings.get("detection", 0) / wall),
            "keypoints_fraction": sig(timings.get("keypoints", 0) / wall),
            "detector": f"{cfg.detector} on {s.device}, batch {cfg.batch_size}, longer side <= {cfg.detect_max_size}",
            "keypoints": "MoveNet SinglePose Lightning int8 (ai-edge-litert) on the CPU, 1 thread, whatever the "
                         "device; only for faces whose FDF crop is >= 128 px",
            "processes": 1}


# ---------------------------------------------------------------------------------------- anonymizer
def anonymizer_section(s: Settings) -> dict:
    """benchmarks/anonymize.py's photo and video measurements on the device."""
    from benchmarks.anonymize import photo_throughput, video_throughput
    from eval.anonymizer import Anonymizer, AnonymizerConfig
    from training.networks import Generator, GeneratorAt
    torch.backends.cudnn.benchmark = False  # as the anonymize command: photo sizes differ
    width, res = s.generator
    generator = GeneratorAt(Generator(width, res).eval().requires_grad_(False), res)
    cfg = AnonymizerConfig(device=s.device, batch_size=16)
    with tempfile.TemporaryDirectory() as tmp:
        anonymizer = Anonymizer(cfg, generator=generator)
        photos = photo_throughput({"random": anonymizer}, corpus_photos(s), Path(tmp))["random"]
        video = video_throughput(anonymizer, s.frames, Path(tmp))
    paper = " (the paper's 12M)" if width == 256 else ""
    return {"generator": f"S={width}, {res}x{res}, random weights, fp32{paper}",
            "device": s.device, "batch_size": cfg.batch_size, "keypoints": "MoveNet on the CPU (1 thread)",
            "photos": photos, "video_720p": video}


# ---------------------------------------------------------------------------------------- ddp
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_worker(rank: int, world: int, port: int, settings: dict, out: str) -> None:
    """One rank: the DDP-wrapped bare step; rank 0 writes the slowest rank's mean step time."""
    s = Settings(**settings)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if s.cuda:
        torch.cuda.set_device(rank)
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(1)
    device = torch.device("cuda", rank) if s.cuda else torch.device("cpu")
    torch.distributed.init_process_group(s.ddp_backend, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # one initialization on every rank, as fdf-train's seed_everything (DDP
        batch_size = s.batches[0]  # broadcasts G and D from rank 0, but not the EMA copy)
        module, start = build(s.resolution, batch_size, device, s.widths["12m"])
        step = bare_step(module, start, real_batch(batch_size, device), device, ddp=True)
        count = torch.tensor(timed_steps(s, step_seconds(step, s.warmup, device)), device=device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)  # the same on every rank
        sec = torch.tensor(statistics.fmean(step_seconds(step, int(count), device)), dtype=torch.float64,
                           device=device)
        torch.distributed.all_reduce(sec, op=torch.distributed.ReduceOp.MAX)
        sums = torch.stack([p.detach().double().sum() for p in module.parameters()])  # G, D and EMA
        every = [torch.empty_like(sums) for _ in range(world)]
        torch.distributed.all_gather(every, sums)
        if rank == 0:  # ranks draw different flips and z: equal weights mean the gradients were reduced
            Path(out).write_text(json.dumps({"sec_per_step": sec.item(),
                                             "same_weights": all(torch.equal(every[0], t) for t in every)}))
    finally:
        torch.distributed.destroy_process_group()


def ddp_run(s: Settings, world: int) -> dict:
    """Global img/s with `world` ranks (1: in this process, else spawned ones), batch per rank fixed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = (world, _free_port(), asdict(s), str(out))
        if world == 1:
            ddp_worker(0, *args)
        else:
            import torch.multiprocessing as mp
            ctx = mp.start_processes(ddp_worker, args=args, nprocs=world, join=False, start_method="spawn")
            try:
                while not ctx.join():
                    pass
            finally:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
        ranks = json.loads(out.read_text())
    sec, batch = ranks["sec_per_step"], s.batches[0]
    return {"world_size": world, "sec_per_step": sig(sec), "img_per_s": sig(world * batch / sec),
            "weights_identical_across_ranks": ranks["same_weights"]}


def ddp_section(s: Settings, budget: Budget) -> dict | str:
    """Scaling of the 12M bare step from 1 to N ranks: img/s and efficiency = img/s / (N x 1-rank img/s)."""
    n = s.ddp_max_world
    if n < 2:
        return f"skipped: {n} GPU visible"
    worlds = sorted({w for w in (2 ** i for i in range(int(math.log2(n)) + 1))} | {n})
    out: dict[str, Any] = {"backend": s.ddp_backend, "config": "12m", "batch_per_rank": s.batches[0],
                           "compiled": False, "find_unused_parameters": True,
                           "note": "bare step, G and D each in DistributedDataParallel; weak scaling (global "
                                   "batch = ranks x batch_per_rank)", "world_sizes": {}}
    base = None
    for w in worlds:
        run = budget.run(f"ddp world {w}", 0 if s.tiny else 30 + 5 * w, lambda w=w: ddp_run(s, w))
        if isinstance(run, dict):
            base = base or (run["img_per_s"] if w == 1 else None)
            if base:
                run["efficiency"] = sig(run["img_per_s"] / (w * base), 3)
        out["world_sizes"][str(w)] = run
    return out


# ---------------------------------------------------------------------------------------- main
def environment(s: Settings) -> dict:
    env = {"mode": "tiny (cpu)" if s.tiny else "gpu", "torch": torch.__version__,
           "cpu_threads": torch.get_num_threads()}
    if s.cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), gpus_visible=torch.cuda.device_count(),
                   gpu_memory_gib=sig(props.total_memory / 2 ** 30), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env.update(device="cpu", gpus_visible=0)
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU mode: tiny networks, batches and resolution")
    p.add_argument("--budget_s", type=float, default=480, help="overall time budget, imports included")
    p.add_argument("--batches", "--batch", type=int, nargs="+", default=None,
                   help="per-GPU training batches (default 64 256; the first one is also DDP's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per training run (default 5)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per training run, at most (default 30; fewer past ~8 s, at least 5)")
    p.add_argument("--frames", type=int, default=None, help="frames of the 720p clip (default 100)")
    p.add_argument("--compile_backend", default=None,
                   help="torch.compile backend (default inductor; aot_eager in --tiny; none = no compiled runs)")
    p.add_argument("--peak_tflops", type=float, default=PEAK_TFLOPS,
                   help=f"the GPU's dense bf16 peak for fraction_of_peak (default {PEAK_TFLOPS}: H100/H200 SXM)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = p.parse_args(argv)
    s = settings_from(args)
    budget = Budget(args.budget_s)
    result: dict[str, Any] = {**environment(s), "budget_s": args.budget_s,
                              "assumptions": {
                                  "peak_tflops": s.peak_tflops,
                                  "peak": "dense bf16 tensor-core peak of an H100/H200 SXM unless --peak_tflops "
                                          "says otherwise (H100 PCIe: 756)",
                                  "flops": "FlopCounterMode over one eager training step (critic step with the "
                                           "gradient-penalty double backward, then generator step), per image; "
                                           "convolutions and matrix products only",
                                  "compile": (f"{s.compile_backend}: G whole, D except the gradient-penalty pass "
                                              "(AOTAutograd has no double backward); static shapes"
                                              if s.compile_backend else "off")}}
    if s.tiny:
        result["assumptions"]["tiny"] = (
            f"tiny networks (S={s.widths['12m']} and {s.widths['46m']} for the '12m' and '46m' keys), "
            f"{s.resolution}x{s.resolution}, batches {s.batches}, one thread; compiled ({s.compile_backend}) only "
            f"for '12m' at batch {s.batches[0]} (compiling takes about a minute on a CPU); DDP on gloo; two "
            "one-face photos: the figures check the code paths, not the speed")
    # Order = priority when the budget is short: eager training, builder, anonymizer, compiled 12M,
    # DDP, compiled 46M (the compiled runs spend most of their time compiling).
    runs: dict[str, dict] = {}
    train = "training" in args.sections
    names = list(s.widths)
    for name in names if train else []:
        for b in s.batches:
            train_job(s, runs, budget, name, b, compiled=False)
    for section, fn in (("builder", builder_section), ("anonymizer", anonymizer_section)):
        if section in args.sections:
            result[section] = budget.run(section, 0 if s.tiny else 60, lambda fn=fn: fn(s))
    compiled = (names[:1] if s.tiny else names) if train and s.compile_backend else []
    compiled_batches = s.batches[:1] if s.tiny else s.batches  # tiny: compiling takes a minute on a CPU
    for name in compiled[:1]:
        for b in compiled_batches:
            train_job(s, runs, budget, name, b, compiled=True)
    if "ddp" in args.sections:
        result["ddp"] = ddp_section(s, budget)
    for name in compiled[1:]:
        for b in compiled_batches:
            train_job(s, runs, budget, name, b, compiled=True)
    if train:
        result["training"] = training_summary(s, runs)
    order = ["training", "builder", "anonymizer", "ddp"]
    result = {k: v for k, v in result.items() if k not in order} | {k: result[k] for k in order if k in result}
    result["wall_seconds"] = sig(time.monotonic() - START)
    print(json.dumps(result), flush=True)
    failed = [k for k, v in flatten(result).items() if isinstance(v, str) and v.startswith("error:")]
    if budget.interrupted:  # a section cut off mid-way may leave compile workers or ranks behind
        os._exit(1 if failed else 0)
    return 1 if failed else 0


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of a nested JSON object."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): obj}


if __name__ == "__main__":
    sys.exit(main())
