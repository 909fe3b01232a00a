#!/usr/bin/env bash
# Builds the GPU-only bundle a GPU host without a Rust toolchain runs (default dist/gpu, packed as
# dist/gpu.tar.gz, at most 20 MiB): the release binary, the CUDA test executables (tests/cuda,
# tests/cuda_backend, tests/cuda_step), the CUDA benchmarks (benches/cuda_kernels,
# benches/train_step), configs/ and run.sh (scripts/gpu-run.sh).
# On the GPU host: tar xzf gpu.tar.gz && OUT=results gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-dist/gpu}"
./scripts/install-nvcc.sh >/dev/null
export FNOKERN_REQUIRE_KERNELS=1
rm -rf "$OUT" "$OUT.tar.gz"
mkdir -p "$OUT/tests" "$OUT/benches"
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
cargo test --release --no-run --message-format=json --test cuda --test cuda_backend --test cuda_step 2>/dev/null | copy_executables "$OUT/tests" test cuda,cuda_backend,cuda_step
echo "bench executables:"
cargo bench --no-run --message-format=json --bench cuda_kernels --bench train_step 2>/dev/null | copy_executables "$OUT/benches" bench cuda_kernels,train_step
strip --strip-all "$OUT/fnokern" "$OUT"/tests/* "$OUT"/benches/*
cp -r configs "$OUT/"
cp scripts/gpu-run.sh "$OUT/run.sh"
chmod +x "$OUT/run.sh"
tar czf "$OUT.tar.gz" -C "$(dirname "$OUT")" "$(basename "$OUT")"
size=$(stat -c %s "$OUT.tar.gz")
echo "bundle: $OUT ($(du -sh "$OUT" | cut -f1)), packed as $OUT.tar.gz ($((size / 1024)) KiB)"
if [ "$size" -gt $((20 * 1024 * 1024)) ]; then
  echo "the packed bundle is over 20 MiB" >&2
  exit 1
fi
echo "on the GPU host: tar xzf $(basename "$OUT").tar.gz && OUT=results $(basename "$OUT")/run.sh"
