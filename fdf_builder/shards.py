"""Shard naming, ranges and the photo-level train/val split shared by the builder and launchers."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from fdf_core.errors import ConfigError, MissingInputError

SHARD_RE = re.compile(r"^(\d{5})_stats\.json$")


def raw_shard_ids(input_dir: str | Path) -> list[str]:
    """Finished data_prep shards (those whose stats file exists), sorted."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise MissingInputError(f"--input_dir {input_dir}: no such raw shard folder (the --output_dir "
                                "of fdf-download)")
    return sorted(m.group(1) for p in input_dir.iterdir() if (m := SHARD_RE.match(p.name)))


def parse_range(spec: str | None, shard_ids: list[str]) -> list[str]:
    """Select shard ids by a "start:stop" range of shard numbers (stop exclusive), or all."""
    if not spec:
        return list(shard_ids)
    try:
        start_s, _, stop_s = spec.partition(":")
        start = int(start_s) if start_s else 0
        stop = int(stop_s) if stop_s else None
    except ValueError:
        raise ConfigError(f"--shards: expected 'start:stop' (e.g. '0:8'), got {spec!r}") from None
    return [s for s in shard_ids if int(s) >= start and (stop is None or int(s) < stop)]


def split_of(photo_id: str, val_fraction: float) -> str:
    """'val' or 'train' from a hash of the photo id: every face of one photo lands on one side."""
    bucket = int(hashlib.sha1(str(photo_id).encode()).hexdigest(), 16) % 10000
    return "val" if bucket < val_fraction * 10000 else "train"
