"""Schedule, data stream, and real training runs of the tiny config logged to MLflow."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from eval.anonymizer import load_generator_at
from training.export import main as export_main, measure_context
from training.cli import main
from training.datamodule import FDFDataModule, ShardStream, list_shards
from fdf_core.fid import RandomConvFeatures
from training.fid import generator_fid
from training.networks import GeneratorAt
from training.module import NonFiniteLossError
from training.networks import load_generator
from training.schedule import Schedule

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "training" / "configs" / "tiny_cpu.yaml")
# 4 steps of 8 images per phase: stabilize 8, fade 16, stabilize 16, fade 32, then 8 steps at 32.
FAST = ["--model.schedule.fade_kimg", "0.032", "--model.schedule.stabilize_kimg", "0.032",
        "--model.schedule.total_kimg", "0.192", "--checkpoint.every_kimg", "0.064",
        "--samples.every_kimg", "0.096"]


def test_paper_schedule():
    s = Schedule()
    assert [p.name for p in s.phases] == ["stabilize8", "fade16", "stabilize16", "fade32", "stabilize32",
                                          "fade64", "stabilize64", "fade128", "stabilize128"]
    assert s.phase_at(9_600_000).name == "stabilize128"  # 128x128 fully faded in at 9.6M images
    first = s.at_step(0)
    assert (first.phase.resolution, first.batch_size, first.alpha) == (8, 256, 1.0)
    step = next(k for k in range(s.total_steps) if s.at_step(k).phase.name == "fade16")
    nxt = s.at_step(step + 1)
    assert nxt.alpha == pytest.approx((nxt.images - 1_200_000) / 1_200_000)
    last = s.at_step(s.total_steps - 1)
    assert last.batch_size == 64 and last.images < 40_000_000 <= last.images + 64
    for n in (1, 3):
        assert sum(s.images_in_steps(5000, r, n) for r in range(n)) == s.images_before(5000)


def _stream(root: Path, schedule: Schedule, start: int, rank: int, world: int) -> ShardStream:
    shards, sizes = list_shards(root, "train")
    return ShardStream(shards, sizes, schedule, start, rank, world, seed=3, shuffle_buffer=8, keypoint_threshold=0.0)


def _batches(stream: ShardStream, workers: int) -> list[dict]:
    return list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers))


def test_stream_splits_ranks_and_workers_and_resumes_exactly(fdf_shards):
    # 96 faces, global batch 8 on 2 ranks x 2 workers: 12 steps read every face exactly once.
    schedule = Schedule(8, 8, 1.0, 1.0, 0.096, {8: 8})
    runs = {rank: _batches(_stream(fdf_shards, schedule, 0, rank, 2), 2) for rank in (0, 1)}
    for rank, batches in runs.items():
        assert [b["step"] for b in batches] == list(range(12))
        assert all(b["images"].shape == (4, 3, 32, 32) and b["keypoints"].shape == (4, 7, 2) for b in batches)
    keys = [k for batches in runs.values() for b in batches for k in b["keys"]]
    assert len(keys) == 96 and len(set(keys)) == 96
    resumed = _batches(_stream(fdf_shards, schedule, 5, 1, 2), 2)
    assert [b["step"] for b in resumed] == list(range(5, 12))
    for b, ref in zip(resumed, runs[1][5:]):
        assert b["keys"] == ref["keys"] and torch.equal(b["images"], ref["images"])


def test_stream_with_more_readers_than_shards(fdf_shards):
    # 3 ranks x 3 workers = 9 readers > 8 shards: readers take every 9th sample instead.
    stream = _stream(fdf_shards, Schedule(8, 8, 1.0, 1.0, 1.0, {8: 9}), 0, 0, 3)
    firsts = []
    for slot in range(9):
        count = stream._epoch_plan(0, slot, 9)[2]
        samples = stream.samples(slot, 9, 0)
        firsts += [next(samples)[1] for _ in range(count)]
        later = [next(samples)[1] for _ in range(15)]  # runs into the next epoch
        assert [s[1] for _, s in zip(range(5), stream.samples(slot, 9, count + 10))] == later[10:]
    assert len(firsts) == 96 and len(set(firsts)) == 96


def _datamodule(root: Path) -> FDFDataModule:
    dm = FDFDataModule(str(root))
    dm.setup("fit")
    return dm


def _mlflow_history(client: MlflowClient, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


def test_tiny_training_grows_twice_and_logs_to_mlflow(fdf_shards, tmp_path):
    run_dir = tmp_path / "run"
    main(["--config", TINY, "--data.root", str(fdf_shards), "--run_dir", str(run_dir), *FAST,
          "--fid.every_kimg", "0.096", "--fid.feature", "random_conv", "--fid.num_images", "16",
          "--fid.batch_size", "8"])

    final = run_dir / "checkpoints" / "final.ckpt"
    ckpt = torch.load(final, map_location="cpu", weights_only=True)
    assert ckpt["progress"] == {"step": 24, "images_shown": 192, "resolution": 32, "alpha": 1.0,
                                "phase": "stabilize32", "done": True}
    assert len(ckpt["optimizer_states"]) == 2 and ckpt["optimizer_states"][1]["state"]
    assert {"torch", "numpy", "python", "cuda"} <= set(ckpt["rng"])
    assert ckpt["FDFDataModule"]["step"] == 24
    assert ckpt["crop_rule"] == "fdf" and "context_margins" not in ckpt  # a build without options.json
    state = ckpt["state_dict"]
    assert any(k.startswith("generator_ema.") for k in state) and any(k.startswith("discriminator.") for k in state)
    ema_lags = [k for k in state
                if k.startswith("generator.") and not torch.equal(state[k], state["generator_ema." + k[10:]])]
    assert ema_lags, "the EMA generator must differ from the trained one"
    assert "base_width: 16" in (run_dir / "config.yaml").read_text()

    g = load_generator(str(final))
    assert torch.equal(g.to_rgb["32"].weight, state["generator_ema.to_rgb.32.weight"])
    # the export records the band of photo the training crops showed; the anonymizer's generator carries it
    model = export_main(["--checkpoint", str(final), "--output", str(tmp_path / "model.pt"), "--name", "tiny",
                         "--data", "test shards", "--license", "test", "--context_from", str(fdf_shards)])
    margins = measure_context(fdf_shards)
    assert len(margins) == 4 and margins[0] == margins[2] and all(m >= 0 for m in margins)
    exported = load_generator_at(model)
    assert exported.context_margins == margins and exported.resolution == 32

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    run = client.get_run(ckpt["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.network.base_width"] == "16"
    assert run.data.params["model.schedule.fade_kimg"] == "0.032"
    losses = _mlflow_history(client, run.info.run_id, "loss/d")
    assert [m.step for m in losses] == list(range(24)) and all(math.isfinite(m.value) for m in losses)
    assert len(_mlflow_history(client, run.info.run_id, "loss/gp")) == 24
    res = [m.value for m in _mlflow_history(client, run.info.run_id, "progress/resolution")]
    alpha = [m.value for m in _mlflow_history(client, run.info.run_id, "progress/alpha")]
    assert res == [8] * 4 + [16] * 8 + [32] * 12
    assert alpha[4:8] == pytest.approx([0, 0.25, 0.5, 0.75]) and alpha[12:16] == pytest.approx([0, 0.25, 0.5, 0.75])
    assert sorted(k for k in run.data.tags if k.startswith("phase/")) == [f"phase/{i:02d}" for i in range(5)]
    assert run.data.tags["resolution"] == "32"
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert len(samples) >= 5 and all(p.endswith(".png") for p in samples)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/final.ckpt"]
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # FID on the step axis of every other metric, with its kimg, resolution and phase beside it
    fid = _mlflow_history(client, run.info.run_id, "fid")
    assert [m.step for m in fid] == [12, 24] and all(math.isfinite(m.value) and m.value > 0 for m in fid)
    assert [m.value for m in _mlflow_history(client, run.info.run_id, "fid/kimg")] == pytest.approx([0.096, 0.192])
    assert [m.value for m in _mlflow_history(client, run.info.run_id, "fid/resolution")] == [32, 32]  # fade32 at 0.096
    assert [m.step for m in _mlflow_history(client, run.info.run_id, "fid/phase")] == [12, 24]
    assert [m.value for m in _mlflow_history(client, run.info.run_id, "fid/alpha")] == [0.0, 1.0]
    expected = generator_fid(GeneratorAt(g, 32), _datamodule(fdf_shards), 16, 8, RandomConvFeatures())
    assert fid[1].value == pytest.approx(expected, rel=1e-5)
    # one per (resolution, alpha): the start of fade32 (alpha 0: reals are 16x16 blown up) and 32x32
    assert len(list((run_dir / "fid_cache").glob("fid_real_*.pt"))) == 2


def test_a_training_checkpoint_records_how_its_faces_were_cut(fdf_shards, tmp_path):
    """A run on a build of "pad" crops: each checkpoint records the build's crop rule and the band of
    photo its crops showed, so the anonymizer handed the checkpoint itself (not an export) cuts faces
    as its training faces were cut. Before, it cut them the FDF way and painted smears (the pan
    clip with a width-64 checkpoint: flicker 5.3, 21 leaked face-frames)."""
    import shutil
    root = tmp_path / "pad_build"
    shutil.copytree(fdf_shards, root)
    (root / "options.json").write_text(json.dumps({"crop_rule": "pad", "resolution": 32}))
    run_dir = tmp_path / "run"
    main(["--config", TINY, "--data.root", str(root), "--run_dir", str(run_dir), *FAST,
          "--model.schedule.total_kimg", "0.016"])
    final = run_dir / "checkpoints" / "final.ckpt"
    margins = measure_context(root)
    saved = torch.load(final, map_location="cpu", weights_only=True)
    assert saved["crop_rule"] == "pad" and saved["context_margins"] == margins
    g = load_generator_at(final)
    assert g.crop_rule == "pad" and g.context_margins == margins
    model = export_main(["--checkpoint", str(final), "--output", str(tmp_path / "model.pt"), "--name", "tiny",
                         "--data", "test shards", "--license", "test"])
    assert load_generator_at(model).crop_rule == "pad"  # the export takes it from the checkpoint too


@pytest.mark.slow  # torch.compile builds its kernels (about a minute)
def test_bf16_channels_last_training_with_the_compiled_pixel_norm(fdf_shards, tmp_path):
    """The CPU configs' settings (bf16-mixed, channels_last, PixelNorm as one torch.compile kernel)
    train through every phase, FID and samples included, with finite losses at every step."""
    run_dir = tmp_path / "run"
    main(["--config", TINY, "--data.root", str(fdf_shards), "--run_dir", str(run_dir), *FAST,
          "--trainer.precision", "bf16-mixed", "--model.channels_last", "true", "--model.compile_pixel_norm", "true",
          "--fid.every_kimg", "0.096", "--fid.feature", "random_conv", "--fid.num_images", "16", "--fid.batch_size", "8"])
    ckpt = torch.load(run_dir / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["compile_pixel_norm"] is True and ckpt["progress"]["done"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("fdf-tiny").experiment_id])
    for key in ("loss/d", "loss/g"):
        logged = _mlflow_history(client, run.info.run_id, key)
        assert [m.step for m in logged] == list(range(24)) and all(math.isfinite(m.value) for m in logged)
    assert len(_mlflow_history(client, run.info.run_id, "fid")) == 2


def test_non_finite_loss_stops_the_run_with_the_step(fdf_shards, tmp_path):
    run_dir = tmp_path / "diverge"
    with pytest.raises(NonFiniteLossError, match=r"non-finite \w+ loss at step \d+ \(kimg") as err:
        main(["--config", TINY, "--data.root", str(fdf_shards), "--run_dir", str(run_dir), *FAST,
              "--model.optimizer.lr", "1e30"])
    step = int(str(err.value).split("at step ")[1].split()[0])
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("fdf-tiny").experiment_id])
    assert run.info.status == "FAILED"
    logged = _mlflow_history(client, run.info.run_id, "loss/d")
    assert [m.step for m in logged] == list(range(step))  # every finished step logged, the bad one not
    assert all(math.isfinite(m.value) for m in logged)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination",
         str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "wb"), cwd=tmp_path,
        start_new_session=True)  # its own process group: MLflow 3 starts uvicorn and job runners beside it
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)  # the server and every worker it started
    proc.wait(timeout=30)
    try:  # huey consumers outlive a SIGTERM
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow  # starts an MLflow server
def test_logs_to_a_running_mlflow_server(fdf_shards, tmp_path, mlflow_server):
    main(["--config", TINY, "--data.root", str(fdf_shards), "--run_dir", str(tmp_path / "run"), *FAST,
          "--model.schedule.total_kimg", "0.096", "--tracking-uri", mlflow_server, "--experiment_name", "served"])
    exp = _get(f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=served")["experiment"]
    req = urllib.request.Request(f"{mlflow_server}/api/2.0/mlflow/runs/search", method="POST",
                                 data=json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        (run,) = json.loads(r.read())["runs"]
    assert run["info"]["status"] == "FINISHED"
    q = urllib.parse.urlencode({"run_id": run["info"]["run_id"], "metric_key": "loss/d"})
    history = _get(f"{mlflow_server}/api/2.0/mlflow/metrics/get-history?{q}")["metrics"]
    assert sorted(m["step"] for m in history) == list(range(12))
    assert all(math.isfinite(m["value"]) for m in history)
    q = urllib.parse.urlencode({"run_id": run["info"]["run_id"], "path": "checkpoints"})
    files = _get(f"{mlflow_server}/api/2.0/mlflow/artifacts/list?{q}")["files"]
    assert [f["path"] for f in files] == ["checkpoints/final.ckpt"]
    assert not (tmp_path / "run" / "mlflow.db").exists()  # nothing went to the default local store


def test_a_run_resumed_at_a_transition_still_logs_it_and_no_other():
    """Resuming mid-phase must not log the phase again; resuming exactly where a phase begins
    (preemption saves after any step) must still log that phase's transition."""
    from types import SimpleNamespace
    from training.callbacks import PhaseLogger
    from training.schedule import Schedule
    s = Schedule(start_resolution=8, max_resolution=16, fade_kimg=0.016, stabilize_kimg=0.016, total_kimg=0.064,
                 batch_sizes={8: 4, 16: 4})
    phase_of = [s.phase_at(s.images_before(step)).index for step in range(s.total_steps)]
    first_step_of_fade = phase_of.index(1)
    resumed = PhaseLogger()
    resumed.on_train_start(None, SimpleNamespace(schedule=s, step=first_step_of_fade))
    assert resumed._phase == 0  # the next batch is in phase 1: logged
    resumed.on_train_start(None, SimpleNamespace(schedule=s, step=first_step_of_fade + 1))
    assert resumed._phase == 1  # the next batch is in phase 1 too: already logged
    fresh = PhaseLogger()
    fresh.on_train_start(None, SimpleNamespace(schedule=s, step=0))
    assert fresh._phase is None
