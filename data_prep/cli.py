"""The console scripts of data_prep (setup.cfg): `fdf-download` and `fdf-ingest`.

    fdf-download --metadata '[yfcc100m_dataset-0.gz]' --output_dir raw/     # YFCC100M → raw shards
    fdf-ingest --image_dir photos/ --output_dir raw/ --license_name ...     # a folder → raw shards
    python -m data_prep.cli fdf-download ...                                # the same, without the script

Each parses its options into the stage's config, runs the stage's `run` and prints the summary as
one JSON line; the work and its progress messages are the library's (data_prep.download,
data_prep.folder).
"""
from __future__ import annotations

from fdf_core.cli_util import parse_dataclass
from fdf_core.console import console_main, print_summary, run_command


def download_main(argv: list[str] | None = None) -> dict:
    from data_prep.download import DownloadConfig, run
    summary = run(parse_dataclass(DownloadConfig, argv, prog="fdf-download",
                                  description="Plan, fetch and verify YFCC100M photos into raw shards (FORMAT.md §1)."))
    print_summary(summary)
    return summary


def ingest_main(argv: list[str] | None = None) -> dict:
    from data_prep.folder import IngestConfig, run
    summary = run(parse_dataclass(IngestConfig, argv, prog="fdf-ingest",
                                  description="A local folder of photos → raw image shards (FORMAT.md §1)."))
    print_summary(summary)
    return summary


fdf_download = console_main("data_prep.cli:download_main", "fdf-download")
fdf_ingest = console_main("data_prep.cli:ingest_main", "fdf-ingest")

if __name__ == "__main__":
    raise SystemExit(run_command([fdf_download, fdf_ingest]))
