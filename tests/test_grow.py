"""Growing a finished run to a higher resolution (training.grow, `fdf-train --grow_from`): a real
tiny run trained to 16x16, grown to 32x32, and trained on; and the mismatches it must refuse."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from fdf_core.errors import ConfigError
from training.cli import main
from training.grow import grow_checkpoint
from training.schedule import Schedule
from training.train import make_cli

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "training" / "configs" / "tiny_cpu.yaml")
# 4 steps of 8 images per phase: the 16x16 run stabilizes 8, fades 16 in and stabilizes it for 8
# steps (64 images); the 32x32 run repeats that (stabilize_kimg_at 16: 0.064) and fades 32 in.
PHASES = ["--model.schedule.fade_kimg", "0.032", "--model.schedule.stabilize_kimg", "0.032",
          "--checkpoint.every_kimg", "0.064", "--samples.every_kimg", "1", "--data.num_workers", "0"]
LOW = ["--model.schedule.max_resolution", "16", "--model.schedule.total_kimg", "0.128"]
HIGH = ["--model.schedule.stabilize_kimg_at", "{16: 0.064}", "--model.schedule.total_kimg", "0.192"]


def _args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", TINY, "--data.root", str(root), "--run_dir", str(run_dir), *PHASES, *extra]


@pytest.fixture(scope="module")
def low_run(fdf_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("grow") / "low"
    main(_args(fdf_shards, run_dir, *LOW))
    return run_dir / "checkpoints" / "final.ckpt"


def test_stabilize_kimg_at_lengthens_one_level_only():
    plain = Schedule(8, 32, 1.0, 1.0, 10.0, {8: 8, 16: 8, 32: 8})
    longer = Schedule(8, 32, 1.0, 1.0, 10.0, {8: 8, 16: 8, 32: 8}, stabilize_kimg_at={16: 4.0})
    assert [p.name for p in longer.phases] == [p.name for p in plain.phases]
    assert longer.phase_at(2_000).name == plain.phase_at(2_000).name == "stabilize16"
    assert longer.phase_at(3_500).name == "stabilize16" and plain.phase_at(3_500).name == "fade32"
    assert longer.phase_at(6_000).name == "fade32"
    for bad in ({32: 1.0}, {16: 0.0}, {64: 1.0}):  # the last level runs to total_kimg; no such level
        with pytest.raises(ConfigError, match="stabilize_kimg_at"):
            Schedule(8, 32, 1.0, 1.0, 10.0, {8: 8, 16: 8, 32: 8}, stabilize_kimg_at=bad)


def test_a_16x16_run_grows_to_32x32_and_trains_on(fdf_shards, low_run, tmp_path):
    low = torch.load(low_run, map_location="cpu", weights_only=True)
    assert low["progress"]["resolution"] == 16 and low["progress"]["done"] and low["progress"]["step"] == 16

    # the grown checkpoint, as fdf-train writes it before training
    cli = make_cli(_args(fdf_shards, tmp_path / "look", *HIGH))
    grown_path = tmp_path / "grown.ckpt"
    grown_from = grow_checkpoint(low_run, cli.model, grown_path)
    grown = torch.load(grown_path, map_location="cpu", weights_only=True)
    old, new = low["state_dict"], grown["state_dict"]
    assert all(torch.equal(new[k], v) for k, v in old.items())  # every trained tensor, EMA included
    added = sorted(set(new) - set(old))
    assert added and all(".32." in k for k in added)  # only the 32x32 layers are new
    assert grown_from["new_tensors"] == len(added) and grown_from["step"] == 16
    assert grown["progress"] == {"step": 16, "images_shown": 128, "resolution": 32, "alpha": 0.0,
                                 "phase": "fade32", "done": False}
    assert "mlflow_run_id" not in grown and grown["hyper_parameters"]["schedule"]["max_resolution"] == 32
    # Adam's moments follow their parameters by name; the new layers start without any
    for opt, module, prefix in ((0, cli.model.generator, "generator"), (1, cli.model.discriminator, "discriminator")):
        names = [n for n, _ in module.named_parameters()]
        old_names = [n for n in names if f"{prefix}.{n}" in old]
        moved = grown["optimizer_states"][opt]["state"]
        assert len(grown["optimizer_states"][opt]["param_groups"][0]["params"]) == len(names)
        for old_index, name in enumerate(old_names):
            assert torch.equal(moved[names.index(name)]["exp_avg"], low["optimizer_states"][opt]["state"][old_index]["exp_avg"])
        assert not any(i in moved for i, n in enumerate(names) if n not in old_names)

    # fdf-train --grow_from: starts from that state, fades 32x32 in and finishes the schedule
    run_dir = tmp_path / "high"
    main(_args(fdf_shards, run_dir, *HIGH, "--grow_from", str(low_run)))
    final = torch.load(run_dir / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    assert final["progress"] == {"step": 24, "images_shown": 192, "resolution": 32, "alpha": 1.0,
                                 "phase": "stabilize32", "done": True}
    assert final["grown_from"]["checkpoint"] == str(low_run.resolve())
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    losses = sorted(m.step for m in client.get_metric_history(final["mlflow_run_id"], "loss/d"))
    assert losses == list(range(16, 24))  # it trained the 32x32 steps only, none of the 16x16 ones again
    changed = [k for k in old if k.startswith("generator.") and not torch.equal(final["state_dict"][k], old[k])]
    assert changed  # the lower levels train on with the new one
    # the same command again resumes from the run's own checkpoint: nothing to do, nothing grown again
    main(_args(fdf_shards, run_dir, *HIGH, "--grow_from", str(low_run)))


def test_grow_refuses_what_would_not_continue_the_run(fdf_shards, low_run, tmp_path):
    def grow(*extra: str) -> None:
        cli = make_cli(_args(fdf_shards, tmp_path / "x", *extra))
        grow_checkpoint(low_run, cli.model, tmp_path / "x.ckpt")

    with pytest.raises(ConfigError, match=r"stabilize_kimg_at \{16: 0.064\}"):  # says what to set
        grow("--model.schedule.total_kimg", "0.192")
    with pytest.raises(ConfigError, match="base_width"):
        grow(*HIGH, "--model.network.base_width", "8")
    with pytest.raises(ConfigError, match="max_resolution must be higher"):
        grow(*LOW)
    with pytest.raises(ConfigError, match="raise schedule.total_kimg"):
        grow("--model.schedule.stabilize_kimg_at", "{16: 0.064}", "--model.schedule.total_kimg", "0.064")
    (tmp_path / "x.ckpt").write_bytes(b"kept")
    with pytest.raises(ConfigError, match="exists"):
        grow(*HIGH)
    assert (tmp_path / "x.ckpt").read_bytes() == b"kept"


def test_the_export_of_a_grown_run_carries_the_run_it_grew_from(fdf_shards, low_run, tmp_path, monkeypatch):
    """benchmarks/learning.py on a grown run: the model card adds the lower run's training time and
    says where it grew from, and the export carries the lower run's EMA generator (`lower`), which
    the anonymizer paints smaller faces with."""
    import sys
    import yaml
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import learning
    from eval.anonymizer import load_generator_at, painters_of
    work = tmp_path / "work"
    work.mkdir()
    (work / "fdf").symlink_to(fdf_shards)
    main(_args(fdf_shards, work / "train32_w16", *HIGH, "--grow_from", str(low_run)))
    config = tmp_path / "grown.yaml"
    config.write_text(yaml.safe_dump({"model": {"network": {"base_width": 16},
                                                "schedule": {"max_resolution": 32, "total_kimg": 0.192}}}))
    run = learning.Run(work, config)
    card = run.card()
    grown = card["grown_from"]
    assert grown["max_resolution"] == 16 and grown["images_shown"] == 128 and grown["wall_seconds"] > 0
    assert card["wall_time_hours"] * 3600 >= grown["wall_seconds"] - 18 and "Grown (training.grow)" in card["notes"]
    out = learning.export(run)
    assert out["lower"] == [str(low_run.resolve())]
    painters = painters_of(load_generator_at(out["model"]))
    assert list(painters) == [16, 32]
    low = load_generator_at(low_run)
    assert all(torch.equal(a, b) for a, b in zip(painters[16].generator.state_dict().values(),
                                                 low.generator.state_dict().values()))
    assert "learning" in sys.modules


def test_the_other_ranks_wait_for_rank_zeros_grown_checkpoint(tmp_path):
    """Before fit() there is no process group to wait on: ranks other than zero poll for the file."""
    import threading
    from fdf_core.errors import MissingInputError
    from training.grow import wait_for_file
    path = tmp_path / "last.ckpt"
    threading.Timer(0.5, path.write_bytes, [b"grown"]).start()
    wait_for_file(path, 30.0)
    assert path.read_bytes() == b"grown"
    with pytest.raises(MissingInputError, match="did not write the grown checkpoint in 1 s"):
        wait_for_file(tmp_path / "never.ckpt", 1.0)
