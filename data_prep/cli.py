"""`fdf-download`: YFCC100M metadata → raw image shards (options: `fdf-download --help`)."""
from __future__ import annotations

from fdf_core.cli_util import parse_dataclass
from data_prep.download import DownloadConfig, run


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_dataclass(DownloadConfig, argv, prog="fdf-download",
                          description="Plan, fetch and verify YFCC100M photos into raw shards "
                                      "(FORMAT.md §1).")
    return run(cfg)


if __name__ == "__main__":
    from fdf_core.console import run_main
    raise SystemExit(run_main(main, "fdf-download"))
