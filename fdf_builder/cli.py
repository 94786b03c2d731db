"""The console script of fdf_builder (setup.cfg): `fdf-build`, raw image shards → FDF shards.

    fdf-build --input_dir raw/ --output_dir fdf/ --shards 0:64     (or python -m fdf_builder.cli ...)

Parses the options into `BuildConfig`, runs `fdf_builder.build.run` and prints what was built as
one JSON line (the index without its per-shard lists; index.json has them).
"""
from __future__ import annotations

from fdf_core.cli_util import parse_dataclass
from fdf_core.console import console_main, print_summary, run_command


def main(argv: list[str] | None = None) -> dict:
    from fdf_builder.build import BuildConfig, run
    index = run(parse_dataclass(BuildConfig, argv, prog="fdf-build",
                                description="Detect, annotate, crop and shard faces (FORMAT.md §2)."))
    print_summary({k: v for k, v in index.items() if k != "shards"})
    return index


fdf_build = console_main("fdf_builder.cli", "fdf-build")

if __name__ == "__main__":
    raise SystemExit(run_command([fdf_build]))
