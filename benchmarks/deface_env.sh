#!/usr/bin/env bash
# The comparison tool's own environment for benchmarks/video.py: deface 1.5.0 (MIT, ships its
# CenterFace ONNX model, runs offline) in `.venv-deface/` (or $DEFACE_VENV), never in the project's
# environment. onnxruntime is installed too: deface's default backend ("auto") then uses it, its
# fastest CPU path, so the speed comparison is against deface at its best. Idempotent.
#   bash benchmarks/deface_env.sh && .venv-deface/bin/deface --version
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
VENV=${DEFACE_VENV:-.venv-deface}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "deface==1.5.0" onnxruntime
"$VENV/bin/deface" --version >/dev/null && echo "deface_env.sh: ok ($VENV, deface $("$VENV/bin/deface" --version))"
