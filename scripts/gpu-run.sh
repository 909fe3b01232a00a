#!/usr/bin/env bash
# The first run on a GPU host, from the bundle scripts/gpu-bundle.sh makes (no Rust needed there).
# Ten stages in this order, each capped by `timeout` and writing $OUT/<N>-<stage>.txt as it goes
# (a stage that hangs or crashes loses nothing of the ones before it); the numbers come first:
#   1-environment  nvidia-smi, the driver, cuBLAS and cuFFT libraries found, python3/torch (10 s)
#   2-info         fnokern info: GPU 0 opened, one allocation, copies, a kernel, cuBLAS, cuFFT (20 s)
#   3-step         fnokern bench-step: the depth-8 study step on the GPU, FP32 with the implicit-GEMM
#                  convolutions, FP32 with im2col + cuBLAS (train.gpu_conv), then TF32 (60 s)
#   4-torch        benches/torch/compare.py --device cuda: parity with the PyTorch twin, then the
#                  same step timed in rounds alternating fnokern and PyTorch eager (90 s)
#   5-kernels      tests/cuda: every kernel through its launcher against the CPU (45 s)
#   6-backend      tests/cuda_backend, tests/cuda_step, tests/tf32: every op, a whole step, exact
#                  resume, the ledger against the plan, TF32 against the CPU (75 s)
#   7-bench        criterion, --warm-up-time 0.5 --measurement-time 1.5: the kernels against a
#                  device-to-device copy, then the study step (45 s)
#   8-plan         fnokern plan --device cuda on configs/depth8-24gb.toml: pool peak vs plan (30 s)
#   9-train        fnokern train --depth 8 --device cuda, one epoch of 64 steps, data simulation and
#                  evaluation included (120 s); the run writes outside $OUT ($WORK) and only its
#                  metrics, summary, config and plots are copied back
#   10-memcheck    compute-sanitizer --tool memcheck on tests/cuda, where it is installed (45 s)
# The caps add up to 9 min. A summary line per stage goes to standard output; the last
# line is the size of everything under $OUT. Exit status: the number of stages that failed.
# OUT (default: results) and WORK (default: a fresh directory under /tmp) are taken relative to
# the directory run.sh is called from.
set -uo pipefail
OUT=$(realpath -m "${OUT:-results}")
WORK=$(realpath -m "${WORK:-$(mktemp -d /tmp/fnokern-gpu.XXXXXX)}")
mkdir -p "$OUT" "$WORK"
cd "$(dirname "$0")"
export FNOKERN_BIN="$PWD/fnokern" FNOKERN_ROOT="$PWD"
# The tests use the real driver here, never the stand-in.
export FNOKERN_CUDA_TESTS=gpu
# The driver (container hosts keep it in /usr/local/nvidia/lib64), then cuBLAS and cuFFT: a CUDA
# toolkit's lib64, or what a PyTorch install ships under site-packages/nvidia/*/lib.
libs=(/usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
while IFS= read -r d; do libs+=("$d"); done < <(python3 -c 'import site, glob
for s in site.getsitepackages() + [site.getusersitepackages()]:
    print("\n".join(glob.glob(s + "/nvidia/*/lib")))' 2>/dev/null)
for d in "${libs[@]}"; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export PATH="/usr/local/cuda/bin:$PATH"

failed=0
stage() {
  local name=$1 cap=$2; shift 2
  local file="$OUT/$name.txt" start=$SECONDS rc
  echo "== $name (cap ${cap} s): $*" > "$file"
  timeout --kill-after=5 "$cap" "$@" >> "$file" 2>&1
  rc=$?
  echo "== exit $rc after $((SECONDS - start)) s" >> "$file"
  [ "$rc" = 0 ] || failed=$((failed + 1))
  echo "$name: exit $rc after $((SECONDS - start)) s"
}

environment() {
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  for l in libcuda.so libcublas.so libcufft.so; do
    found=$(for d in ${LD_LIBRARY_PATH//:/ }; do ls "$d"/$l* 2>/dev/null; done | head -3)
    echo "$l: ${found:-not found}"
  done
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' || true
  command -v compute-sanitizer || echo "compute-sanitizer: not found"
}
export -f environment

bench() {
  local short=(--warm-up-time 0.5 --measurement-time 1.5 --noplot)
  benches/cuda_kernels --bench "${short[@]}" && benches/train_step --bench "${short[@]}" train_step_gpu
}
export -f bench

step() {
  ./fnokern bench-step --preset study --depth 8 --device cuda --steps 20 &&
    ./fnokern bench-step --preset study --depth 8 --device cuda --steps 20 --set 'train.gpu_conv="columns"' &&
    ./fnokern bench-step --preset study --depth 8 --device cuda --steps 20 --set train.tf32=true
}
export -f step

tests() { for t in "$@"; do "$t" --test-threads=1 || return 1; done; }
export -f tests

# One epoch of the main job; the run's checkpoints and weights (gigabytes at depth 8) stay in
# $WORK, and what tells how it went comes back.
train() {
  local run="$WORK/run-depth8"
  # Its own cap, inside the stage's: a run stopped by SIGTERM checkpoints and writes its summary,
  # and the copy below still runs.
  timeout --kill-after=10 105 ./fnokern train --depth 8 --device cuda --out "$run" \
    --set train.epochs=1 --set train.train_patterns=1024 --set train.test_patterns=256
  local rc=$?
  mkdir -p "$OUT/9-train"
  (cd "$run" 2>/dev/null && for f in config.toml summary.json metrics.csv metrics.jsonl *.png; do
    [ -f "$f" ] && cp "$f" "$OUT/9-train/"
  done)
  ls -la "$run" 2>/dev/null
  return $rc
}
export -f train
export OUT WORK

stage 1-environment 10 bash -c environment
stage 2-info 20 ./fnokern info
stage 3-step 60 bash -c step
if command -v python3 >/dev/null && python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  stage 4-torch 90 python3 benches/torch/compare.py --fnokern ./fnokern --preset study --depth 8 --device cuda --rounds 3 --steps 10
else
  echo "no python3 with a CUDA build of torch here" > "$OUT/4-torch.txt"
  echo "4-torch: skipped (no python3 with CUDA torch)"
fi
stage 5-kernels 45 tests/cuda --test-threads=1
stage 6-backend 75 bash -c 'tests tests/cuda_backend tests/cuda_step tests/tf32'
stage 7-bench 45 bash -c bench
stage 8-plan 30 ./fnokern plan --config configs/depth8-24gb.toml --mem-limit 24GiB --device cuda
stage 9-train 120 bash -c train
if command -v compute-sanitizer >/dev/null; then
  stage 10-memcheck 45 compute-sanitizer --tool memcheck --leak-check no tests/cuda --test-threads=1
else
  echo "compute-sanitizer is not installed here" > "$OUT/10-memcheck.txt"
  echo "10-memcheck: skipped (no compute-sanitizer)"
fi
echo "$failed stage(s) failed; outputs in $OUT ($(du -sh "$OUT" | cut -f1)); the training run's files in $WORK"
exit "$failed"
