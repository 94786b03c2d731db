"""benchmarks/gpu.py in its CPU mode (--tiny): every section runs its real code path, so the script
is ready on the day a GPU is lent. Figures are checked for shape and sign only, never for speed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_BENCH = REPO / "benchmarks" / "gpu.py"
PEAK = 123.4  # a --peak_tflops unlike the built-in default, so a result that ignored the flag fails


def _run(*args: str, timeout: float) -> tuple[dict, subprocess.CompletedProcess]:
    proc = subprocess.run([sys.executable, str(GPU_BENCH), "--tiny", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout), proc  # stdout is exactly one JSON object


def _leaves(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}.{k}" if path else k)
    else:
        yield path, obj


RUN_KEYS = {"batch", "timed_steps", "img_per_s", "sec_per_step", "min_sec_per_step", "warmup_seconds",
            "peak_memory_gib", "model_tflops", "fraction_of_peak"}


@pytest.mark.slow  # several minutes on a busy 2-core machine: imports, a torch.compile, a spawned rank
def test_tiny_mode_runs_every_section_and_reports_positive_figures(assets):
    out, _ = _run("--budget_s", "840", "--peak_tflops", str(PEAK), timeout=880)
    assert out["mode"] == "tiny (cpu)"
    assert {"assumptions", "training", "builder", "anonymizer", "ddp", "wall_seconds"} <= out.keys()
    assert out["assumptions"]["peak_tflops"] == PEAK  # the flag, not the H100/H200 default, is what it used

    training = out["training"]
    for name in ("12m", "46m"):
        cfg = training[name]
        assert {"base_width", "generator_params", "critic_params", "flops_per_image"} <= cfg.keys()
        for batch in ("batch4", "batch8"):
            assert RUN_KEYS <= cfg[batch]["eager"].keys(), (name, batch)
    compiled = training["12m"]["batch4"]["compiled"]
    assert RUN_KEYS | {"compile_seconds", "compile_backend"} <= compiled.keys()
    assert compiled["compile_backend"] == "aot_eager"
    assert training["46m"]["flops_per_image"] > training["12m"]["flops_per_image"]
    assert {"best_12m_img_per_s", "goal_12m_img_per_s", "goal_met"} <= training.keys()

    builder = out["builder"]
    assert builder["photos"] == 2 and builder["faces_kept"] >= 1
    assert {"images_per_s", "detection_fraction", "keypoints_fraction"} <= builder.keys()
    anonymizer = out["anonymizer"]
    assert anonymizer["photos"]["images"] == 2 and anonymizer["photos"]["faces"] >= 2
    assert anonymizer["video_720p"]["frames"] == 3 and anonymizer["video_720p"]["size"] == "1280x720"
    assert "frames_per_s" in anonymizer["video_720p"] and "images_per_s" in anonymizer["photos"]

    ddp = out["ddp"]
    assert ddp["backend"] == "gloo" and set(ddp["world_sizes"]) == {"1", "2"}
    for run in ddp["world_sizes"].values():
        assert {"img_per_s", "sec_per_step", "efficiency"} <= run.keys()
        assert run["weights_identical_across_ranks"] is True  # the gradients were all-reduced

    runs = [r for cfg in (training["12m"], training["46m"]) for b in ("batch4", "batch8") for r in cfg[b].values()
            if isinstance(r, dict)]
    for run in runs:  # each fraction is the run's own TFLOPS over the peak it was given
        assert run["fraction_of_peak"] == pytest.approx(run["model_tflops"] / PEAK, rel=2e-3), run

    for path, value in _leaves(out):
        assert not (isinstance(value, str) and value.startswith(("error", "skipped", "out of memory"))), (path, value)
        if path.endswith("peak_memory_gib"):
            assert value is None, path  # no GPU memory to report on a CPU
        elif path == "gpus_visible":
            assert value == 0
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert value > 0, (path, value)


def test_budget_exhausted_still_prints_the_json():
    """With no time left every section says so, and the JSON still comes out whole."""
    out, proc = _run("--budget_s", "1", "--sections", "training", "builder", "anonymizer", timeout=300)
    assert out["builder"].startswith("skipped: budget") and out["anonymizer"].startswith("skipped: budget")
    runs = [v for k, v in _leaves(out["training"]) if k.endswith(("eager", "compiled"))]
    assert len(runs) == 5 and all(r.startswith("skipped: budget") for r in runs)
    assert "best_12m_img_per_s" not in out["training"]
    assert "skipped" in proc.stderr


def test_a_run_starts_from_the_state_a_previous_session_committed(tmp_path, monkeypatch):
    """benchmarks/learning.py's train stage copies `training/carry/<config stem>/` into an empty run
    folder (the machine keeps only the repository between sessions), and never over a run that has
    its own checkpoint."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import learning
    config = Path(learning.REPO) / "training" / "configs" / "utkface_cpu64_w32.yaml"
    carry = tmp_path / "carry"
    monkeypatch.setattr(learning, "CARRY", carry)
    run = learning.Run(tmp_path / "work", config)
    assert learning.seed_from_carry(run) is None  # nothing committed
    (carry / config.stem / "checkpoints").mkdir(parents=True)
    (carry / config.stem / "checkpoints" / "last.ckpt").write_bytes(b"state")
    (carry / config.stem / "mlflow.db").write_bytes(b"db")
    assert learning.seed_from_carry(run) == carry / config.stem
    assert (run.run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"state"
    assert (run.run_dir / "mlflow.db").read_bytes() == b"db"
    (run.run_dir / "checkpoints" / "last.ckpt").write_bytes(b"newer")
    assert learning.seed_from_carry(run) is None
    assert (run.run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"newer"


def test_a_carried_run_counts_its_training_time_not_the_days_between_sessions(tmp_path):
    """The model card's wall time: a run resumed next day spans a day, but trained for minutes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import learning
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("t"))
    day, start = 86_400_000, 1_700_000_000_000
    session = [start + 60_000 * i for i in range(11)]  # 10 minutes of steps a minute apart
    for step, t in enumerate(session + [s + day for s in session]):  # the same again the next day
        client.log_metric(run.info.run_id, "progress/kimg", step, timestamp=t, step=step)
    assert learning.training_seconds(client, client.get_run(run.info.run_id)) == pytest.approx(1200)


def test_the_release_command_runs_that_commits_code_and_model(tmp_path):
    """benchmarks/anonymize.py --versus_release: the anonymize command as the 32x32 release made it,
    its own code (not this checkout's) painting with the model it shipped."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import anonymize as bench
    from fdf_core.assets import assets_dir
    cmd, env = bench.release_command(bench.RELEASE_32, tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes((assets_dir() / "corpus" / "photos" / "face_recognition__examples_obama-240p.jpg").read_bytes())
    done = subprocess.run([*cmd, str(photos), str(tmp_path / "out"), "--progress", "false"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert "utkface32" in summary["generator"] and summary["faces"] == 1
    assert (tmp_path / "out" / "a.jpg").is_file()


def test_seams_benchmark_scores_the_softened_paste_against_the_unsoftened(tmp_path, assets, capsys):
    """benchmarks/seams.py on one corpus photo with faces of 150 px and more: one JSON object, and
    the default `--soften` brings the detail just outside the box edge down towards the photo's own."""
    import shutil
    name = "face_recognition__examples_knn_examples_test_obama_and_biden.jpg"
    shutil.copy(assets / "corpus" / "photos" / name, tmp_path / name)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import seams
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = seams.main(["--photos", str(tmp_path), "--soften", "[0, 0.3]"])
    assert json.loads(capsys.readouterr().out) == out
    assert out["photos"] == 1 and out["faces"] >= 2  # the two of about 170 px, and one lower in the photo
    plain, soft = out["settings"]["0.0"], out["settings"]["0.3"]
    assert plain["median_outside_change"] == 0.0 and soft["median_outside_change"] > 0
    assert plain["median_detail_ratio"] > 1.5 * plain["median_photo_detail_ratio"]
    assert abs(soft["median_detail_ratio"] - soft["median_photo_detail_ratio"]) < \
        abs(plain["median_detail_ratio"] - plain["median_photo_detail_ratio"])
