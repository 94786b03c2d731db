"""Which raw shards the builder reads, and the photo-level train/val split."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from fdf_core.errors import MissingInputError
from fdf_core.shards import shard_name, select_shards

SHARD_RE = re.compile(r"^(\d{5})_stats\.json$")


def raw_shard_ids(input_dir: str | Path) -> list[str]:
    """Finished data_prep shards (those whose stats file exists), sorted."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise MissingInputError(f"--input_dir {input_dir}: no such raw shard folder (the --output_dir "
                                "of fdf-download)")
    return sorted(m.group(1) for p in input_dir.iterdir() if (m := SHARD_RE.match(p.name)))


def selected_raw_shards(spec: str | None, input_dir: str | Path) -> tuple[list[str], list[str]]:
    """(every finished raw shard, those a `--shards` value selects), as shard names."""
    available = raw_shard_ids(input_dir)
    return available, [shard_name(i) for i in select_shards(spec, map(int, available))]


def split_of(photo_id: str, val_fraction: float) -> str:
    """'val' or 'train' from a hash of the photo id: every face of one photo lands on one side."""
    bucket = int(hashlib.sha1(str(photo_id).encode()).hexdigest(), 16) % 10000
    return "val" if bucket < val_fraction * 10000 else "train"
