"""The console scripts of eval (setup.cfg); each runs one library module's `run` and prints its summary.

    fdf-eval       FID of a checkpoint                       eval.evaluate
    fdf-plot-fid   FID against kimg of a run, as a PNG       eval.plots
    fdf-wider      the paper's WIDER FACE table              eval.wider_job
    fdf-wider-ap   WIDER FACE AP of detection files          eval.wider
    fdf-identity   identity removal per method               eval.identity
    anonymize      a photo, a video or a folder of both      eval.anonymize

`python -m eval.cli <script> [options]` is the same as the script. A script prints its summary as
one JSON line on stdout (`fdf-wider` its table first); progress and warnings go to stderr.
"""
from __future__ import annotations

from pathlib import Path

from fdf_core.cli_util import parse_dataclass
from fdf_core.console import console_main, print_summary, run_command
from fdf_core.errors import SkippedItemsError


def evaluate_main(argv: list[str] | None = None) -> dict:
    from eval.evaluate import EvaluateConfig, output_path, run
    cfg = parse_dataclass(EvaluateConfig, argv, prog="fdf-eval",
                          description="FID of a training checkpoint (EMA generator, z = 0, FDF val).")
    result = run(cfg)
    print_summary({k: result[k] for k in ("metric", "fid", "kimg", "resolution", "num_images", "seconds")}
                  | {"output": str(output_path(cfg))})
    return result


def plot_fid_main(argv: list[str] | None = None) -> dict:
    from eval.plots import PlotConfig, run
    result = run(parse_dataclass(PlotConfig, argv, prog="fdf-plot-fid", description="FID vs kimg PNG of a run."))
    print_summary({"output": str(result["output"]), "series": {k: len(v) for k, v in result["series"].items()}})
    return result


def wider_main(argv: list[str] | None = None) -> dict:
    from eval.wider_job import TABLE, WiderJobConfig, format_table, run
    cfg = parse_dataclass(WiderJobConfig, argv, prog="fdf-wider",
                          description="DeepPrivacy's WIDER FACE table: detector AP after anonymization.")
    result = run(cfg)
    print(format_table(result))
    print_summary({"table": str(Path(cfg.output_dir) / TABLE), "seconds": result["seconds"]})
    return result


def wider_ap_main(argv: list[str] | None = None) -> dict:
    from eval.wider import WiderEvalConfig, run
    summary = run(parse_dataclass(WiderEvalConfig, argv, prog="fdf-wider-ap",
                                  description="WIDER FACE val AP (official protocol) of detection files."))
    print_summary(summary)
    return summary


def identity_main(argv: list[str] | None = None) -> dict:
    from eval.identity import IdentityConfig, run
    result = run(parse_dataclass(IdentityConfig, argv, prog="fdf-identity",
                                 description="Identity removal per method with dlib's face recognizer: "
                                             "TPR at FAR 1e-3 on photo pairs and de-identification rate."))
    print_summary(result)
    return result


def anonymize_main(argv: list[str] | None = None) -> dict:
    """`run`, then exit status 5 (SkippedItemsError) if anything was skipped."""
    from eval.anonymize import AnonymizeConfig, run
    cfg = parse_dataclass(AnonymizeConfig, argv, prog="anonymize", positional=("input", "output"),
                          description="Anonymize the faces of a photo, a video, or a folder of both.")
    summary = run(cfg)
    print_summary(summary)
    if summary["skipped"]:
        first, n = summary["skipped"][0], len(summary["skipped"])
        raise SkippedItemsError(f"{n} of {n + summary['written']} files skipped, the other {summary['written']} "
                                f"written to {cfg.output}; first: {first['file']}: {first['reason']} (all in "
                                "the summary)", summary)
    return summary


fdf_eval = console_main("eval.cli:evaluate_main", "fdf-eval")
fdf_plot_fid = console_main("eval.cli:plot_fid_main", "fdf-plot-fid")
fdf_wider = console_main("eval.cli:wider_main", "fdf-wider")
fdf_wider_ap = console_main("eval.cli:wider_ap_main", "fdf-wider-ap")
fdf_identity = console_main("eval.cli:identity_main", "fdf-identity")
anonymize = console_main("eval.cli:anonymize_main", "anonymize")

if __name__ == "__main__":
    raise SystemExit(run_command([fdf_eval, fdf_plot_fid, fdf_wider, fdf_wider_ap, fdf_identity, anonymize]))
