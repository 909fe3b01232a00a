#!/usr/bin/env bash
# Builds everything a GPU host without a Rust toolchain needs into one folder (default dist/gpu):
# the release binary, every test and benchmark executable, configs/, and run.sh (scripts/gpu-run.sh).
# Copy the folder to the GPU host and run ./run.sh there: it writes report.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-dist/gpu}"
./scripts/install-nvcc.sh >/dev/null
export FNOKERN_REQUIRE_KERNELS=1
rm -rf "$OUT"
mkdir -p "$OUT/tests" "$OUT/benches"
cargo build --release --bin fnokern
cp target/release/fnokern "$OUT/"
# cargo names each test and bench executable in its JSON messages.
copy_executables() {
  python3 -c '
import json, shutil, sys
dest = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"].get("test"):
        kind = m["target"]["kind"][0]
        if kind == sys.argv[2] or (kind == "lib" and sys.argv[2] == "test"):
            name = m["target"]["name"] + ("-lib" if kind == "lib" else "")
            shutil.copy(m["executable"], f"{dest}/{name}")
            print(f"  {dest}/{name}")
' "$1" "$2"
}
echo "test executables:"
cargo test --release --no-run --message-format=json 2>/dev/null | copy_executables "$OUT/tests" test
echo "bench executables:"
cargo bench --no-run --message-format=json 2>/dev/null | copy_executables "$OUT/benches" bench
# Debug info makes the bundle ~1 GB; without it, it fits a 64 MiB transfer.
strip --strip-debug "$OUT/fnokern" "$OUT"/tests/* "$OUT"/benches/*
cp -r configs "$OUT/"
cp scripts/gpu-run.sh "$OUT/run.sh"
chmod +x "$OUT/run.sh"
tar czf "$OUT.tar.gz" -C "$(dirname "$OUT")" "$(basename "$OUT")"
echo "bundle: $OUT ($(du -sh "$OUT" | cut -f1)), packed as $OUT.tar.gz ($(du -sh "$OUT.tar.gz" | cut -f1))"
echo "on the GPU host: tar xzf $(basename "$OUT").tar.gz && $(basename "$OUT")/run.sh"
