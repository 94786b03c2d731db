"""Console scripts (setup.cfg). Each is `fdf_core.console.console_main`: the stage's `main(argv)`
under one error policy, returning the exit status that setuptools' wrapper passes to `sys.exit`
(0 success; the other codes in fdf_core.errors and the README, "Errors and exit codes")."""
from __future__ import annotations

from fdf_core.console import console_main

fdf_download = console_main("data_prep.cli", "fdf-download")
fdf_ingest = console_main("data_prep.folder", "fdf-ingest")
fdf_build = console_main("fdf_builder.cli", "fdf-build")
fdf_pipeline = console_main("slurm.pipeline", "fdf-pipeline")
fdf_train = console_main("training.cli", "fdf-train")
fdf_slurm_build = console_main("slurm.build", "fdf-slurm-build")
fdf_eval = console_main("eval.evaluate", "fdf-eval")
fdf_wider = console_main("eval.wider_job", "fdf-wider")
fdf_wider_ap = console_main("eval.wider", "fdf-wider-ap")
fdf_identity = console_main("eval.identity", "fdf-identity")
fdf_plot_fid = console_main("eval.plots", "fdf-plot-fid")
anonymize = console_main("eval.anonymize", "anonymize")
