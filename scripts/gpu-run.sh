#!/usr/bin/env bash
# Runs on a GPU host from a bundle made by scripts/gpu-bundle.sh (no Rust needed): the device
# info, every test executable (the CUDA kernel tests run for real here), every benchmark, the
# depth-8 memory plan, and writes everything to report.txt. Exit status: the number of failed
# test executables.
set -uo pipefail
cd "$(dirname "$0")"
export FNOKERN_ROOT="$PWD" FNOKERN_BIN="$PWD/fnokern"
REPORT=report.txt
: > "$REPORT"
say() { echo "$@" | tee -a "$REPORT"; }
say "== $(date -u) on $(hostname)"
say "== fnokern info"
./fnokern info 2>&1 | tee -a "$REPORT"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 | tee -a "$REPORT" || true
failed=0
for t in tests/*; do
  say "== test $(basename "$t")"
  if "$t" --test-threads=1 --nocapture >> "$REPORT" 2>&1; then say "   passed"; else say "   FAILED"; failed=$((failed + 1)); fi
done
for b in benches/*; do
  say "== bench $(basename "$b")"
  "$b" --bench --noplot >> "$REPORT" 2>&1 || say "   bench failed"
done
say "== plan configs/depth8-24gb.toml"
./fnokern plan --config configs/depth8-24gb.toml --mem-limit 24GiB 2>&1 | tee -a "$REPORT"
say "== $failed test executable(s) failed; report in $PWD/$REPORT"
exit "$failed"
