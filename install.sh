#!/usr/bin/env bash
# Installs fdf and everything its jobs and tests use, on a fresh Debian machine (idempotent).
#   bash install.sh            system packages + `pip install -e .[test,ffcv]` + retinaface-pytorch
# Debian packages: libturbojpeg/OpenCV/pkg-config to build ffcv; SLURM + munge for the cluster tests.
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive

apt_pkgs=(pkg-config libturbojpeg0-dev libopencv-dev slurmctld slurmd slurm-client munge)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "install.sh: apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m pip install -q -e ".[test,ffcv]"
# retinaface-pytorch 0.0.8 pins torch 1.9 / torchvision 0.10 in its metadata; it works with current ones.
python3 -m pip install -q --no-deps "retinaface-pytorch==0.0.8"
python3 -c "import torch, torchvision, retinaface, pytorch_lightning, webdataset, mlflow, submitit" \
  && echo "install.sh: ok (torch $(python3 -c 'import torch; print(torch.__version__)'))"
