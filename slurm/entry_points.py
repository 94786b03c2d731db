"""Console scripts. Each stage's `main(argv)` returns its summary for Python callers; the script
must not hand that to `sys.exit` (setuptools' wrapper does), which would print it and exit 1."""
from __future__ import annotations

import importlib
from typing import Callable


def _script(module: str) -> Callable[[], None]:
    def entry() -> None:
        importlib.import_module(module).main()  # imported on use: `--help` stays fast
    entry.__doc__ = f"`{module}.main()`, exit status 0 on success."
    return entry


fdf_download = _script("data_prep.cli")
fdf_ingest = _script("data_prep.folder")
fdf_build = _script("fdf_builder.cli")
fdf_pipeline = _script("slurm.pipeline")
fdf_train = _script("training.cli")
fdf_slurm_build = _script("slurm.build")
fdf_eval = _script("eval.evaluate")
fdf_wider = _script("eval.wider_job")
fdf_wider_ap = _script("eval.wider")
fdf_identity = _script("eval.identity")
fdf_plot_fid = _script("eval.plots")
anonymize = _script("eval.anonymize")
