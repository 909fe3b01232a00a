#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 nvcc from PyPI into .cuda/ (project-local, no root, no GPU needed).
# build.rs finds it at .cuda/nvidia/cu13/bin/nvcc. Every piece is pinned: an unpinned one drags
# the rest to a newer CUDA whose PTX a 13.0 driver rejects (shared/DESIGN.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.cuda}"
NVCC="$DEST/nvidia/cu13/bin/nvcc"
if [ -x "$NVCC" ] && "$NVCC" --version | grep -q "release 13.0"; then
  echo "nvcc already installed: $NVCC"
  exit 0
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "python3 -m pip is missing; installing python3-pip (Debian)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq python3-pip; else sudo apt-get update -qq && sudo apt-get install -y -qq python3-pip; fi
fi
python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target "$DEST" \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88
"$NVCC" --version | tail -2
