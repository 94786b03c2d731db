"""`fdf-build`: raw image shards → FDF webdataset shards (options: `fdf-build --help`)."""
from __future__ import annotations

from fdf_builder.build import BuildConfig, run
from fdf_core.cli_util import parse_dataclass


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_dataclass(BuildConfig, argv, prog="fdf-build",
                          description="Detect, annotate, crop and shard faces (FORMAT.md §2).")
    return run(cfg)


if __name__ == "__main__":
    from fdf_core.console import run_main
    raise SystemExit(run_main(main, "fdf-build"))
