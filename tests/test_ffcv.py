"""Training from `train.beton` with FFCV (training.ffcv_stream): order, content, DDP split, bad files.

The kill-and-resume proof is in tests/test_resume.py (the ffcv case); the export in test_build.py.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fdf_core.errors import EXIT_INPUT, InputError, MissingInputError
from fdf_core.tario import iter_samples
from training.ffcv_stream import (FFCVStream, chunk_positions, chunks, open_beton, rank_slice,
                                  sample_indices)
from training.schedule import Schedule

REPO = Path(__file__).resolve().parents[1]
# 4 phases of 2 to 6 steps with batch sizes 8, 16, 8: phase and chunk boundaries inside epochs of 96
SCHEDULE = Schedule(start_resolution=8, max_resolution=32, fade_kimg=0.048, stabilize_kimg=0.048,
                    total_kimg=0.4, batch_sizes={8: 8, 16: 16, 32: 8})


def _global_order(schedule: Schedule, start: int, world: int, n: int, seed: int = 0,
                  chunk_images: int = 1 << 20) -> dict[int, list[np.ndarray]]:
    """{step: [rank 0's samples, rank 1's, ...]} from `start` on, as FFCVStream lays them out."""
    out: dict[int, list[np.ndarray]] = {}
    for first, steps, batch in chunks(schedule, start, world, chunk_images):
        order = sample_indices(chunk_positions(schedule, first, steps, world), seed, n)
        for rank in range(world):
            mine = rank_slice(order, rank, world)
            for k in range(steps):
                out.setdefault(first + k, []).append(mine[k * batch:(k + 1) * batch])
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_order_is_a_function_of_seed_and_step(world):
    n, sched = 40, SCHEDULE
    full = _global_order(sched, 0, world, n)
    assert sorted(full) == list(range(sched.total_steps))
    stream = np.concatenate([np.concatenate(full[k]) for k in sorted(full)])
    assert len(stream) == sched.total_images
    for e in range(len(stream) // n):  # every whole epoch is a permutation, and epochs differ
        assert sorted(stream[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])
    for k in full:  # equal per-rank slices of the step's global batch
        assert {len(r) for r in full[k]} == {sched.at_step(k).batch_size // world}
    # resumed at any step, with other chunk cuts: the same samples per step and rank
    for start in (1, 5, 9, sched.total_steps - 1):
        tail = _global_order(sched, start, world, n, chunk_images=24)
        assert sorted(tail) == list(range(start, sched.total_steps))
        for k in tail:
            assert all(np.array_equal(a, b) for a, b in zip(tail[k], full[k])), (start, k)
    assert not np.array_equal(np.concatenate(_global_order(sched, 0, world, n, seed=1)[0]),
                              np.concatenate(full[0]))


def _tar_samples(root: Path) -> list[dict]:
    return [m for t in sorted((root / "train").glob("*.tar")) for _, m in iter_samples(t)]


@pytest.mark.slow  # FFCV code generation
def test_stream_serves_the_shards_samples_per_step(fdf_beton):
    """Each batch: the planned samples, with the tar's boxes and keypoints exactly and its pixels up
    to FFCV's decoder (turbojpeg with TJFLAG_FASTDCT, PIL's is exact: mean |diff| measured 2.0)."""
    samples = _tar_samples(fdf_beton)
    beton = open_beton(fdf_beton / "train.beton")
    assert beton.num_samples == len(samples) and beton.resolution == 32
    threshold = 0.5
    plan = _global_order(SCHEDULE, 3, 1, len(samples))
    batches = list(FFCVStream(beton, SCHEDULE, 3, 0, 1, 0, 2, threshold, chunk_images=40))
    assert [b["step"] for b in batches] == list(range(3, SCHEDULE.total_steps))
    diffs = []
    for b in batches:
        idx = b["indices"].numpy()
        assert np.array_equal(idx, plan[b["step"]][0])
        assert b["images"].shape == (SCHEDULE.at_step(b["step"]).batch_size, 3, 32, 32)
        assert b["images"].dtype == torch.uint8 and b["images"].is_contiguous()
        metas = [json.loads(samples[i]["json"]) for i in idx]
        assert torch.equal(b["bbox"], torch.tensor([m["bbox"] for m in metas]))
        kps = torch.tensor([m["keypoints"] for m in metas])
        want = torch.where((kps[..., 2:] < threshold), torch.tensor(-1.0), kps[..., :2])
        assert torch.equal(b["keypoints"], want)
        tar = np.stack([np.asarray(Image.open(io.BytesIO(samples[i]["jpg"])).convert("RGB")) for i in idx])
        diffs.append(np.abs(b["images"].permute(0, 2, 3, 1).numpy().astype(int) - tar).mean())
    assert max(diffs) < 4, diffs


def _ddp_rank(rank: int, world: int, port: int, beton_dir: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    beton = open_beton(Path(beton_dir) / "train.beton")
    got = {b["step"]: b["indices"].numpy() for b in FFCVStream(beton, SCHEDULE, 0, rank, world, 0, 1, 0.0)}
    np.savez(f"{out}/rank{rank}.npz", **{str(k): v for k, v in got.items()})
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes
def test_ddp_ranks_read_their_own_part_in_ffcv_distributed_mode(fdf_beton, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_rank, args=(2, port, str(fdf_beton), str(tmp_path)), nprocs=2)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    plan = _global_order(SCHEDULE, 0, 2, open_beton(fdf_beton / "train.beton").num_samples)
    for step in range(SCHEDULE.total_steps):
        mine = [r[str(step)] for r in ranks]
        assert all(np.array_equal(m, p) for m, p in zip(mine, plan[step])), step
        assert len(mine[0]) == len(mine[1]) == SCHEDULE.at_step(step).batch_size // 2


def _corrupt_jpeg(src: Path, dst: Path, sample: int) -> None:
    """`dst`: `src` with the first bytes of sample `sample`'s JPEG overwritten."""
    from ffcv.reader import Reader
    reader = Reader(str(src))
    data = bytearray(src.read_bytes())
    ptr = int(reader.metadata[f"f{list(reader.handlers).index('image')}"][sample]["data_ptr"])
    data[ptr:ptr + 8] = b"garbage!"
    dst.write_bytes(bytes(data))


@pytest.mark.slow  # FFCV code generation
@pytest.mark.timeout(300)  # a hang (ffcv's own loader waits forever here) fails instead of blocking
def test_corrupt_jpeg_is_an_error_naming_file_and_sample(fdf_beton, tmp_path):
    bad = tmp_path / "train.beton"
    _corrupt_jpeg(fdf_beton / "train.beton", bad, sample=5)
    beton = open_beton(bad)  # the header is intact: only reading finds it
    with pytest.raises(InputError, match=rf"{bad}: the JPEG of sample 5 does not decode"):
        for _ in FFCVStream(beton, SCHEDULE, 0, 0, 1, 0, 2, 0.0):
            pass


@pytest.mark.parametrize("damage", ["empty", "short header", "truncated", "random bytes", "missing"])
def test_damaged_beton_is_refused_when_opened(fdf_beton, tmp_path, damage):
    good = (fdf_beton / "train.beton").read_bytes()
    rng = np.random.default_rng(0)
    content = {"empty": b"", "short header": good[:10], "truncated": good[:len(good) // 2],
               "random bytes": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "missing": None}[damage]
    path = tmp_path / "train.beton"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MissingInputError if content is None else InputError, match=str(path)) as e:
        open_beton(path)
    assert "\n" not in str(e.value)


@pytest.mark.slow  # an fdf-train process
@pytest.mark.timeout(600)
def test_fdf_train_on_a_corrupt_beton_exits_3_with_one_line(fdf_beton, tmp_path):
    root = tmp_path / "fdf"
    root.mkdir()
    for split in ("train", "val"):
        os.symlink(fdf_beton / split, root / split)
    (root / "sizes.json").write_bytes((fdf_beton / "sizes.json").read_bytes())
    _corrupt_jpeg(fdf_beton / "train.beton", root / "train.beton", sample=0)
    tiny = str(REPO / "training" / "configs" / "tiny_cpu.yaml")
    done = subprocess.run([sys.executable, "-m", "training.cli", "--config", tiny,
                           "--data.root", str(root), "--data.format", "ffcv", "--run_dir", str(tmp_path / "run"),
                           "--trainer.enable_progress_bar", "false"],
                          cwd=REPO, capture_output=True, text=True, timeout=540)
    assert done.returncode == EXIT_INPUT, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "does not decode" in line]
    assert len(errors) == 1 and str(root / "train.beton") in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("required", [True, False])
def test_missing_ffcv_fails_the_session_when_required(tmp_path, required):
    """CI sets FDF_REQUIRE_FFCV (.ci/run): without the extra the session stops instead of skipping."""
    shadow = tmp_path / "ffcv"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('ffcv hidden by the test')\n")
    env = {k: v for k, v in os.environ.items() if k != "FDF_REQUIRE_FFCV"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])
    if required:
        env["FDF_REQUIRE_FFCV"] = "1"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_ffcv.py::test_damaged_beton_is_refused_when_opened"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if required:
        assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout[-2000:]
        assert "FDF_REQUIRE_FFCV is set but the ffcv extra does not import" in done.stdout + done.stderr
    else:
        assert done.returncode == 0 and "5 skipped" in done.stdout, done.stdout[-2000:]
