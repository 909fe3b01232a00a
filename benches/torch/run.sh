#!/usr/bin/env bash
# fnokern beside PyTorch eager on the same generator, weights and batch: a parity check (loss,
# output, every gradient) and step times in alternating rounds, for the `cpu` preset's and the
# `study` preset's depth-8 generators. Installs PyTorch, numpy and safetensors into
# benches/torch/.venv (once) and builds fnokern in release mode. A benchmark, not a CI test.
#
# Usage: benches/torch/run.sh [THREADS]   (default 2)
set -euo pipefail
cd "$(dirname "$0")/../.."
threads="${1:-2}"
venv=benches/torch/.venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch numpy safetensors neuraloperator matplotlib
fi
cargo build --release --quiet
"$venv/bin/python" benches/torch/compare.py --fnokern target/release/fnokern --preset cpu --depth 8 --threads "$threads" --steps 10
"$venv/bin/python" benches/torch/compare.py --fnokern target/release/fnokern --preset study --depth 8 --threads "$threads" --steps 3
