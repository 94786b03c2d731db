"""One `--shards` syntax (fdf_core.shards): the parser, and every command reading one string as the
same shards (fdf-download, fdf-ingest, fdf-build, slurm.build's array tasks)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from data_prep.sample import write_yfcc_metadata
from data_prep.yfcc import YfccRecord
from fdf_core.errors import ConfigError
from fdf_core.shards import format_shards, parse_shards, select_shards, split_shards

SHARDS = 7
SPEC = ":1,2:4,5,6:"  # every form at once: :B, A:B, N, A:
SELECTED = [0, 2, 3, 5, 6]


@pytest.mark.parametrize("spec,expected", [
    (None, list(range(SHARDS))), ("", list(range(SHARDS))), ("3", [3]), (3, [3]), ("2:5", [2, 3, 4]),
    ("5:", [5, 6]), (":2", [0, 1]), ("0,3,5:8", [0, 3, 5, 6]), ("4:2", []), ("0:0", []),
    ("6:99", [6]), ("9", []), (" 1 , 4 ", [1, 4]), ("1,1:3", [1, 2]), (SPEC, SELECTED),
])
def test_syntax(spec, expected):
    assert select_shards(spec, range(SHARDS)) == expected


@pytest.mark.parametrize("spec", ["x", "1-3", "-1", "1:2:3", "0,,2", "1.5", "a:"])
def test_bad_syntax_names_the_flag(spec):
    with pytest.raises(ConfigError, match=r"^--shards .*expected N, A:B"):
        parse_shards(spec)


def test_format_and_split_round_trip():
    for indices in ([], [4], [0, 1, 2, 5, 7, 8], SELECTED):
        assert select_shards(format_shards(indices), range(10)) == indices
    assert format_shards([0, 1, 2, 5, 7, 8]) == "0:3,5,7:9" and format_shards([]) == "0:0"
    tasks = split_shards(SELECTED, 2)
    assert tasks == ["0,2", "3,5", "6"]
    assert sorted(i for t in tasks for i in select_shards(t, range(SHARDS))) == SELECTED


def _stats(folder: Path, pattern: str) -> list[int]:
    return sorted(int(p.name[:5]) for p in folder.glob(pattern))


def test_every_command_reads_the_same_string_as_the_same_shards(assets, corpus_server, tmp_path, monkeypatch):
    from data_prep.cli import download_main as download, ingest_main as ingest
    from fdf_builder.cli import main as build
    from slurm import build as slurm_build
    from slurm.executor import PROFILES_DIR

    # fdf-download: one record per shard (404s: quick, and a failed record still finishes its shard)
    records = [YfccRecord(photo_id=str(100 + i), url=f"{corpus_server.url}/fault/status/404",
                          license_name="Attribution License", license_url="http://creativecommons.org/licenses/by/2.0/")
               for i in range(SHARDS)]
    meta = write_yfcc_metadata(tmp_path / "meta.tsv", records)
    download(["--metadata", f"[{meta}]", "--output_dir", str(tmp_path / "dl"), "--shard_size", "1",
              "--retries", "0", "--progress", "false", "--shards", SPEC])
    assert _stats(tmp_path / "dl", "*_stats.json") == SELECTED

    # fdf-ingest: one photo per shard
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(SHARDS):
        Image.new("RGB", (40, 40), (10 * i, 90, 160)).save(photos / f"p{i}.jpg")
    args = ["--image_dir", str(photos), "--output_dir", str(tmp_path / "raw"), "--shard_size", "1",
            "--license_name", "CC0", "--progress", "false"]
    ingest([*args, "--shards", SPEC])
    assert _stats(tmp_path / "raw", "*_stats.json") == SELECTED
    ingest(args)  # every raw shard, for the builder

    # fdf-build over the 7 raw shards
    build(["--input_dir", str(tmp_path / "raw"), "--output_dir", str(tmp_path / "fdf"), "--progress", "false",
           "--shards", SPEC])
    assert _stats(tmp_path / "fdf" / "stats", "*.json") == SELECTED

    # slurm.build: the shards of its array tasks (dry run: what would be submitted)
    submitted = []
    monkeypatch.setattr(slurm_build, "submit_array", lambda p, fn, items, **kw: submitted.extend(items) or [])
    for stage, stage_args in (("data_prep", ["--metadata", f"[{meta}]", "--output_dir", str(tmp_path / "dl"),
                                             "--shard_size", "1"]),
                              ("fdf_builder", ["--input_dir", str(tmp_path / "raw"), "--output_dir",
                                               str(tmp_path / "fdf")])):
        submitted.clear()
        slurm_build.main(["--cluster", str(PROFILES_DIR / "local.yaml"), "--shards_per_task", "2", "--dry_run", "true", stage, *stage_args,
                          "--shards", SPEC])
        assert sorted(i for c in submitted for i in select_shards(c.shards, range(SHARDS))) == SELECTED, stage
    assert json.loads((tmp_path / "dl" / "plan.json").read_text())["num_shards"] == SHARDS
