#!/usr/bin/env bash
# The first run on a GPU host, from the bundle scripts/gpu-bundle.sh makes (no Rust needed there).
# Eight stages in this order, each capped by `timeout` and writing ${OUT:-.}/<N>-<stage>.txt as it
# goes (a stage that hangs or crashes loses nothing of the ones before it):
#   1-environment  nvidia-smi, the driver, cuBLAS and cuFFT libraries found, python3/torch (15 s)
#   2-info         fnokern info: GPU 0 opened, one allocation, copies, a kernel, cuBLAS, cuFFT (30 s)
#   3-kernels      tests/cuda: every kernel through its launcher against the CPU (60 s)
#   4-backend      tests/cuda_backend and tests/cuda_step: every op, a whole step, exact resume,
#                  the ledger against the plan, the fused kernels in the step (90 s)
#   5-bench        criterion, --warm-up-time 0.5 --measurement-time 1.5: the kernels against a
#                  device-to-device copy, then the depth-8 study step (90 s)
#   6-plan         fnokern plan --device cuda on configs/depth8-24gb.toml: pool peak vs plan (45 s)
#   7-train        fnokern train --depth 8 --device cuda for one epoch of 64 steps (90 s)
#   8-memcheck     compute-sanitizer --tool memcheck on tests/cuda, where it is installed (45 s)
# The caps add up to 7 min 45 s. A summary line per stage goes to standard output.
# Exit status: the number of stages that failed.
set -uo pipefail
cd "$(dirname "$0")"
OUT="${OUT:-.}"
mkdir -p "$OUT"
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

tests() { for t in "$@"; do "$t" --test-threads=1 || return 1; done; }
export -f tests

stage 1-environment 15 bash -c environment
stage 2-info 30 ./fnokern info
stage 3-kernels 60 tests/cuda --test-threads=1
stage 4-backend 90 bash -c 'tests tests/cuda_backend tests/cuda_step'
stage 5-bench 90 bash -c bench
stage 6-plan 45 ./fnokern plan --config configs/depth8-24gb.toml --mem-limit 24GiB --device cuda
stage 7-train 90 ./fnokern train --depth 8 --device cuda --out "$OUT/run-depth8" \
  --set train.epochs=1 --set train.train_patterns=1024 --set train.test_patterns=256
if command -v compute-sanitizer >/dev/null; then
  stage 8-memcheck 45 compute-sanitizer --tool memcheck --leak-check no tests/cuda --test-threads=1
else
  echo "compute-sanitizer is not installed here" > "$OUT/8-memcheck.txt"
  echo "8-memcheck: skipped (no compute-sanitizer)"
fi
echo "$failed stage(s) failed; outputs in $OUT"
exit "$failed"
