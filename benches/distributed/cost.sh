#!/usr/bin/env bash
# The cost of distribution on one machine at the same global batch: the `cpu` preset at depth 8,
# one epoch of 512 patterns (64 micro-batches of 8), trained
#   A: by one process with 2 rayon threads and train.accumulate = 2, and
#   B: by 2 MPI ranks with 1 thread each and train.accumulate = 1,
# alternately, ROUNDS times (default 3). Both train the same weights (the script checks the final
# weights are equal, byte for byte); what differs is the time. Prints each run's wall time and,
# for B, rank 0's seconds in collectives (transfers, and waits for the slower rank).
# Needs a build with --features mpi and its mpiexec on PATH (scripts/install-mpi.sh).
# Usage: benches/distributed/cost.sh [OUT_DIR] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-runs/distributed-cost}"
ROUNDS="${2:-3}"
BIN=target/release/fnokern
[ -x "$BIN" ] || { echo "build first: cargo build --release --features mpi"; exit 1; }
command -v mpiexec >/dev/null || { echo "mpiexec is not on PATH (export PATH=\"\$PWD/.mpi/bin:\$PATH\")"; exit 1; }
COMMON=(--preset cpu --depth 8 --set train.epochs=1 --set train.train_patterns=512 --set train.test_patterns=16
        --set train.batch_size=8 --set train.evaluate=false --set 'train.eval_seeds=[]')
mkdir -p "$OUT"
wall() { python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print("%.2f %.2f %d" % (s["wall_seconds"], s.get("collective_seconds") or 0, s["steps"]))' "$1/summary.json"; }
echo "round config wall_s collective_s steps"
for r in $(seq 1 "$ROUNDS"); do
  rm -rf "$OUT/a$r" "$OUT/b$r"
  RAYON_NUM_THREADS=2 "$BIN" train "${COMMON[@]}" --set train.accumulate=2 --out "$OUT/a$r" >"$OUT/a$r.log" 2>&1
  echo "$r A(1x2) $(wall "$OUT/a$r")"
  RAYON_NUM_THREADS=1 mpiexec -n 2 "$BIN" train "${COMMON[@]}" --set train.accumulate=1 --out "$OUT/b$r" >"$OUT/b$r.log" 2>&1
  echo "$r B(2x1) $(wall "$OUT/b$r")"
  cmp -s "$OUT/a$r/weights.safetensors" "$OUT/b$r/weights.safetensors" && echo "$r weights equal" || echo "$r WEIGHTS DIFFER"
done
