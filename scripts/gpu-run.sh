#!/usr/bin/env bash
# Runs on a GPU host from a bundle made by scripts/gpu-bundle.sh (no Rust needed): the device
# info, every test executable (the CUDA tests run for real here), the GPU benchmarks (kernels
# against the copy bandwidth, the depth-8 training step), the depth-8 memory plan measured on the
# GPU, and a short `fnokern train --depth 8 --device cuda`; everything goes to report.txt.
# Exit status: the number of failed test executables.
#
# Knobs (environment): EPOCHS (main job's epochs, default 2), SKIP_CPU_TESTS=1 (only the CUDA
# test executables), SKIP_BENCH=1, SKIP_TRAIN=1.
set -uo pipefail
cd "$(dirname "$0")"
export FNOKERN_ROOT="$PWD" FNOKERN_BIN="$PWD/fnokern"
# cuBLAS and cuFFT are loaded at run time: a CUDA toolkit's lib64, or the libraries a PyTorch
# install ships under site-packages/nvidia/*/lib.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import site, glob; print(" ".join(glob.glob(site.getsitepackages()[0] + "/nvidia/*/lib")))' 2>/dev/null); do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
REPORT=report.txt
: > "$REPORT"
say() { echo "$@" | tee -a "$REPORT"; }
say "== $(date -u) on $(hostname)"
say "== fnokern info"
./fnokern info 2>&1 | tee -a "$REPORT"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 | tee -a "$REPORT" || true
failed=0
for t in tests/*; do
  case "$(basename "$t")" in cuda*) ;; *) [ "${SKIP_CPU_TESTS:-0}" = 1 ] && continue ;; esac
  say "== test $(basename "$t")"
  if "$t" --test-threads=1 --nocapture >> "$REPORT" 2>&1; then say "   passed"; else say "   FAILED"; failed=$((failed + 1)); fi
done
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  say "== bench cuda_kernels"
  benches/cuda_kernels --bench --noplot 2>&1 | tee -a "$REPORT" | grep -E "time:|thrpt:|^cuda" || say "   bench failed"
  say "== bench train_step (GPU)"
  benches/train_step --bench --noplot train_step_gpu 2>&1 | tee -a "$REPORT" | grep -E "time:|thrpt:|^train" || say "   bench failed"
fi
say "== plan configs/depth8-24gb.toml, measured on the GPU"
./fnokern plan --config configs/depth8-24gb.toml --mem-limit 24GiB --device cuda 2>&1 | tee -a "$REPORT"
if [ "${SKIP_TRAIN:-0}" != 1 ]; then
  say "== fnokern train --depth 8 --device cuda --set train.epochs=${EPOCHS:-2}"
  rm -rf runs/depth8-gpu
  start=$SECONDS
  ./fnokern train --depth 8 --device cuda --set "train.epochs=${EPOCHS:-2}" --out runs/depth8-gpu 2>&1 | tee -a "$REPORT" | tail -25
  say "   took $((SECONDS - start)) s"
fi
say "== $failed test executable(s) failed; report in $PWD/$REPORT"
exit "$failed"
