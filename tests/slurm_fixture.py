"""The real two-node loopback SLURM cluster as a session fixture.

Registered for every test module by `pytest_plugins` in conftest.py: request `slurm_cluster`.

Starts `slurm/cluster/start.sh` when the cluster does not answer and stops it at the end only if it
started it. Without SLURM binaries the tests skip, unless FDF_REQUIRE_SLURM is set (CI): then a
missing cluster is a failure.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_DIR = Path(os.environ.get("FDF_SLURM_DIR", "/tmp/fdf-slurm"))


def _answers(conf: Path) -> bool:
    pid = RUN_DIR / "slurmctld.pid"  # no controller: skip sinfo's ~10 s of retries
    if not conf.is_file() or not pid.is_file() or not Path(f"/proc/{pid.read_text().strip()}").exists():
        return False
    out = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t"], capture_output=True,
                         text=True, timeout=30, env={**os.environ, "SLURM_CONF": str(conf)})
    nodes = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    return out.returncode == 0 and all(nodes.get(n, "down").rstrip("*~#") in
                                       ("idle", "mix", "alloc", "comp") for n in ("n1", "n2"))


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """SLURM_CONF of the running loopback cluster (also exported into os.environ)."""
    binaries = ("sbatch", "srun", "squeue", "slurmctld", "slurmd", "munged")
    missing = [b for b in binaries if not shutil.which(b)]
    if missing:
        reason = (f"SLURM not installed (missing {', '.join(missing)}): "
                  "run `bash slurm/cluster/start.sh --install`")
        if os.environ.get("FDF_REQUIRE_SLURM"):
            pytest.fail(f"FDF_REQUIRE_SLURM is set but {reason}")
        pytest.skip(reason)
    conf = RUN_DIR / "slurm.conf"
    started = False
    if not _answers(conf):
        proc = subprocess.run(["bash", str(REPO / "slurm/cluster/start.sh")], capture_output=True,
                              text=True, timeout=180)
        if proc.returncode != 0:
            pytest.fail(f"slurm/cluster/start.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        started = True
    # Jobs inherit this environment: the cluster's config, and the checkout on the import path.
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PYTHONPATH")}
    os.environ["SLURM_CONF"] = str(conf)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), saved["PYTHONPATH"]]))
    yield str(conf)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if started:
        subprocess.run(["bash", str(REPO / "slurm/cluster/stop.sh")], capture_output=True, timeout=60)
