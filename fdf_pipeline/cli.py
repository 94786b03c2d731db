"""The console script of the main job (setup.cfg): `fdf-pipeline` (fdf_pipeline.pipeline).

    fdf-pipeline                                   (or python -m fdf_pipeline.cli)
    fdf-pipeline --workdir runs/demo --stages '[build, train]'

Prints the summary of every stage as one JSON line; exits 5 when the anonymize stage skipped files.
"""
from __future__ import annotations

from pathlib import Path

from fdf_core.cli_util import parse_dataclass
from fdf_core.console import console_main, print_summary, run_command
from fdf_core.errors import SkippedItemsError


def main(argv: list[str] | None = None) -> dict:
    """`run`, then exit status 5 (SkippedItemsError) if the anonymize stage skipped files."""
    from fdf_pipeline.pipeline import PipelineConfig, run
    cfg = parse_dataclass(PipelineConfig, argv, prog="fdf-pipeline",
                          description="Run the fdf stages end to end (see README).")
    summary = run(cfg)
    print_summary(summary)
    skipped = summary.get("anonymize", {}).get("skipped") or []
    if skipped:
        raise SkippedItemsError(f"anonymize stage: {len(skipped)} files skipped, first: {skipped[0]['file']}: "
                                f"{skipped[0]['reason']} (all in {Path(cfg.workdir) / 'pipeline_summary.json'})",
                                summary)
    return summary


fdf_pipeline = console_main("fdf_pipeline.cli", "fdf-pipeline")

if __name__ == "__main__":
    raise SystemExit(run_command([fdf_pipeline]))
