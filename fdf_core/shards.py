"""Shard names and the one `--shards` syntax of every command that works shard by shard.

fdf-download, fdf-ingest, fdf-build and `python -m slurm.build` select shards with the same string
(README, "The stages one by one"):

    N        exactly shard N
    A:B      shards A to B-1 (empty when B <= A)
    A:       shard A onwards
    :B       shards 0 to B-1
    0,3,5:8  a comma list of any of those
    (none)   every shard

A selection is matched against the shards the input has, so a range may run past the last one.
Anything else is a :class:`~fdf_core.errors.ConfigError` naming `--shards`.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from fdf_core.errors import ConfigError

SHARD_DIGITS = 5  # shard names and the first digits of every key (FORMAT.md §1)
SYNTAX = "N, A:B (A to B-1), A:, :B or a comma list of those, e.g. '0,3,5:8'"
EMPTY = "0:0"  # a selection of no shard (the planning job of slurm.build runs over it)

Ranges = tuple[tuple[int, "int | None"], ...]


def shard_name(index: int) -> str:
    return f"{index:0{SHARD_DIGITS}d}"


def _number(text: str, spec: str) -> int:
    if not text.strip().isdigit():
        raise ConfigError(f"--shards {spec!r}: {text.strip()!r} is not a shard number; expected {SYNTAX}")
    return int(text)


def parse_shards(spec: str | int | None) -> Ranges | None:
    """`((start, stop or None), ...)` of a `--shards` value, None for every shard."""
    if spec is None or str(spec).strip() == "":
        return None
    spec = str(spec)
    ranges = []
    for item in spec.split(","):
        start, sep, stop = item.partition(":")
        if not sep:
            n = _number(item, spec)
            ranges.append((n, n + 1))
        else:
            ranges.append((_number(start, spec) if start.strip() else 0,
                           _number(stop, spec) if stop.strip() else None))
    return tuple(ranges)


def select_shards(spec: str | int | None, available: Iterable[int]) -> list[int]:
    """The shard numbers of `available` (sorted, without repeats) that `spec` selects."""
    ranges = parse_shards(spec)
    return sorted(i for i in set(available)
                  if ranges is None or any(a <= i and (b is None or i < b) for a, b in ranges))


def format_shards(indices: Sequence[int]) -> str:
    """The shortest `--shards` value selecting exactly `indices` (runs become A:B; none: "0:0")."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and i == runs[-1][1]:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return ",".join(str(a) if b == a + 1 else f"{a}:{b}" for a, b in runs) or EMPTY


def split_shards(indices: Sequence[int], per_task: int) -> list[str]:
    """`--shards` values of consecutive groups of `per_task` of `indices` (one per array task)."""
    if per_task < 1:
        raise ConfigError(f"--shards_per_task must be >= 1, got {per_task}")
    indices = sorted(set(indices))
    return [format_shards(indices[k:k + per_task]) for k in range(0, len(indices), per_task)]
