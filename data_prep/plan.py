"""Fixed input shards: filter the metadata once, give every kept record a stable key (FORMAT.md §1).

The plan is written once to `<out>/plan/<shard>.parquet` + `<out>/plan.json` (last, it marks the
plan complete) and reused on every rerun and by every array task, so keys never depend on which
task ran first or on metadata files changing later. Planning is deterministic: concurrent planners
write the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import licenses
from fdf_core.tario import atomic_write_bytes, atomic_write_json
from data_prep.yfcc import YfccRecord, iter_records
from fdf_core.errors import ConfigError, MissingInputError
from fdf_core.shards import shard_name, select_shards

PLAN_VERSION = 1
MAX_SHARD_SIZE = 10_000  # keys hold the index in 4 digits
MAX_SHARDS = 100_000  # and the shard in 5
PLAN_COLUMNS = ("key", "photo_id", "line_index", "source", "user_nsid", "author", "title",
                "page_url", "url", "license_name", "license_url", "license")
_SCHEMA = pa.schema([(c, pa.int64() if c == "line_index" else pa.string()) for c in PLAN_COLUMNS])


def shard_range(spec: str | None, num_shards: int) -> list[str]:
    """Names of the planned shards that a `--shards` value selects (fdf_core.shards)."""
    return [shard_name(i) for i in select_shards(spec, range(num_shards))]


def plan_options(metadata: Iterable[str], shard_size: int, allowed: Iterable[str],
                 on_bad_line: str) -> dict:
    """What decides the plan's content; a rerun must give the same."""
    return {"metadata": [str(Path(p).expanduser().resolve()) for p in metadata],
            "shard_size": shard_size, "allowed_licenses": sorted(licenses.allowed_codes(allowed)),
            "on_bad_line": on_bad_line, "version": PLAN_VERSION}


def _options_hash(options: dict) -> str:
    return hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]


def _selected(metadata: list[str], allowed: frozenset[str], on_bad_line: str,
              stats: Counter, bad_lines: list[str]) -> Iterator[tuple[str, YfccRecord, str]]:
    def skipped(message: str) -> None:
        stats["bad_lines"] += 1
        if len(bad_lines) < 20:
            bad_lines.append(message)

    for path in metadata:
        for rec in iter_records(path, on_bad_line, skipped):
            stats["lines"] += 1
            if rec.is_video:
                stats["videos"] += 1
                continue
            code = licenses.license_code(rec.license_name, rec.license_url)
            if code not in allowed:
                stats[f"license_rejected:{code or 'unknown'}"] += 1
                continue
            if not rec.url:
                stats["no_url"] += 1
                continue
            stats["kept"] += 1
            yield Path(path).name, rec, code


def _write_shard(plan_dir: Path, index: int, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(plan_dir / f"{shard_name(index)}.parquet", buf.getvalue())


def load_plan(output_dir: Path, options: dict) -> dict | None:
    """`<out>/plan.json` if the folder was planned with `options`; None if not planned yet.

    An existing plan made with other options is an error: its keys would silently change.
    """
    plan_file = output_dir / "plan.json"
    if not plan_file.exists():
        return None
    plan = json.loads(plan_file.read_text())
    if plan.get("options_hash") != _options_hash(options):
        diff = sorted(k for k in options if plan.get("options", {}).get(k) != options[k])
        raise ConfigError(f"{plan_file}: this output folder was planned with other options "
                          f"({', '.join(diff)} differ); use a new --output_dir or the same options")
    return plan


def write_plan(output_dir: Path, options: dict, rows: Iterable[dict], shard_size: int, stats: Counter,
               extra: dict | None = None) -> dict:
    """Key the records `rows` (PLAN_COLUMNS but `key`) in order, write them as plan shards of
    `shard_size`, then `plan.json` (last: the plan is complete). `stats` may still be counted by
    the `rows` generator while it is consumed; it is written once all rows are."""
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise ConfigError(f"--shard_size must be in 1..{MAX_SHARD_SIZE} (4-digit index in keys), "
                          f"got {shard_size}")
    plan_dir = output_dir / "plan"
    shard, num_shards, records = [], 0, 0
    for row in rows:
        shard.append({"key": f"{shard_name(num_shards)}{len(shard):04d}", **row})
        records += 1
        if len(shard) == shard_size:
            _write_shard(plan_dir, num_shards, shard)
            shard, num_shards = [], num_shards + 1
            if num_shards >= MAX_SHARDS:
                raise ConfigError(f"more than {MAX_SHARDS} shards: raise --shard_size")
    if shard:
        _write_shard(plan_dir, num_shards, shard)
        num_shards += 1
    plan = {"options": options, "options_hash": _options_hash(options), "num_shards": num_shards,
            "records": records, "stats": dict(sorted(stats.items())), **(extra or {})}
    atomic_write_json(output_dir / "plan.json", plan)
    return plan


def make_plan(output_dir: str | os.PathLike, metadata: list[str], shard_size: int,
              allowed_licenses: Iterable[str], on_bad_line: Literal["error", "skip"] = "error") -> dict:
    """Return `<out>/plan.json` of YFCC100M metadata, writing the plan first if there is none."""
    out = Path(output_dir)
    options = plan_options(metadata, shard_size, allowed_licenses, on_bad_line)
    plan = load_plan(out, options)
    if plan is not None:
        return plan
    if not metadata:
        raise ConfigError("--metadata: give at least one YFCC100M metadata file")
    for path in metadata:
        if not Path(path).is_file():
            raise MissingInputError(f"--metadata: file not found: {path}")
    stats, bad_lines = Counter(), []
    allowed = licenses.allowed_codes(allowed_licenses)
    rows = ({"photo_id": rec.photo_id, "line_index": rec.line_index, "source": source,
             "user_nsid": rec.user_nsid, "author": rec.author, "title": rec.title, "page_url": rec.page_url,
             "url": rec.url, "license_name": rec.license_name, "license_url": rec.license_url, "license": code}
            for source, rec, code in _selected(options["metadata"], allowed, on_bad_line, stats, bad_lines))
    return write_plan(out, options, rows, shard_size, stats, {"bad_lines": bad_lines})


def read_shard(output_dir: str | os.PathLike, shard: str) -> list[dict]:
    """The planned records of one shard, in key order."""
    return pq.read_table(Path(output_dir) / "plan" / f"{shard}.parquet").to_pylist()


def shard_length(output_dir: str | os.PathLike, shard: str) -> int:
    return pq.read_metadata(Path(output_dir) / "plan" / f"{shard}.parquet").num_rows
