#!/usr/bin/env bash
# Builds the GPU-only bundle a GPU host without a Rust toolchain runs (default dist/gpu, packed as
# dist/gpu.tar.xz, at most 20 MiB; xz -9 finds the fatbin that every executable embeds once): the release binary, the CUDA test executables (tests/cuda,
# tests/cuda_backend, tests/cuda_step, tests/tf32), the CUDA benchmarks (benches/cuda_kernels,
# benches/train_step), the PyTorch twin and its comparison (benches/torch/compare.py, twin.py,
# safetensors_min.py), configs/ and run.sh (scripts/gpu-run.sh).
# On the GPU host: tar xJf gpu.tar.xz && OUT=results gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-dist/gpu}"
./scripts/install-nvcc.sh >/dev/null
export FNOKERN_REQUIRE_KERNELS=1
rm -rf "$OUT" "$OUT.tar.xz"
mkdir -p "$OUT/tests" "$OUT/benches/torch"
cargo build --release --bin fnokern
cp target/release/fnokern "$OUT/"
# cargo names each test and bench executable in its JSON messages; only the GPU ones are copied.
copy_executables() {
  python3 -c '
import json, shutil, sys
dest, kind, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"].get("test"):
        if m["target"]["kind"][0] == kind and m["target"]["name"] in names:
            shutil.copy(m["executable"], f"{dest}/{m['"'"'target'"'"']['"'"'name'"'"']}")
            print(f"  {dest}/{m['"'"'target'"'"']['"'"'name'"'"']}")
' "$1" "$2" "$3"
}
echo "test executables:"
cargo test --release --no-run --message-format=json --test cuda --test cuda_backend --test cuda_step --test tf32 2>/dev/null |
  copy_executables "$OUT/tests" test cuda,cuda_backend,cuda_step,tf32
echo "bench executables:"
cargo bench --no-run --message-format=json --bench cuda_kernels --bench train_step 2>/dev/null | copy_executables "$OUT/benches" bench cuda_kernels,train_step
strip --strip-all "$OUT/fnokern" "$OUT"/tests/* "$OUT"/benches/cuda_kernels "$OUT"/benches/train_step
cp benches/torch/compare.py benches/torch/twin.py benches/torch/safetensors_min.py "$OUT/benches/torch/"
cp -r configs "$OUT/"
cp scripts/gpu-run.sh "$OUT/run.sh"
chmod +x "$OUT/run.sh"
XZ_OPT=-9e tar cJf "$OUT.tar.xz" -C "$(dirname "$OUT")" "$(basename "$OUT")"
size=$(stat -c %s "$OUT.tar.xz")
echo "bundle: $OUT ($(du -sh "$OUT" | cut -f1)), packed as $OUT.tar.xz ($((size / 1024)) KiB)"
if [ "$size" -gt $((20 * 1024 * 1024)) ]; then
  echo "the packed bundle is over 20 MiB" >&2
  exit 1
fi
echo "on the GPU host: tar xJf $(basename "$OUT").tar.xz && OUT=results $(basename "$OUT")/run.sh"
