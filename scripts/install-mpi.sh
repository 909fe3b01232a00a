#!/usr/bin/env bash
# Installs an MPI without root into .mpi/ (project-local): PyPI's pinned mpich wheel (mpicc, mpi.h,
# libmpi, mpiexec), and Debian's libclang1-14 when missing (rsmpi's bindgen reads mpi.h with it;
# that part needs root or sudo). Then:
#   export PATH="$PWD/.mpi/bin:$PATH"
#   cargo build --release --features mpi
#   mpiexec -n 2 target/release/fnokern train ...
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.mpi}"
MPICH_VERSION=5.0.2
if [ -x "$DEST/bin/mpicc" ] && "$DEST/bin/mpichversion" 2>/dev/null | grep -q "$MPICH_VERSION"; then
  echo "mpich already installed: $DEST/bin"
else
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    echo "python3's venv is missing; installing python3-venv (Debian)"
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv; else sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv; fi
  fi
  python3 -m venv "$DEST"
  "$DEST/bin/pip" install --quiet --disable-pip-version-check "mpich==$MPICH_VERSION"
fi
if ! ldconfig -p | grep -Eq 'libclang-[0-9][0-9.]*\.so'; then
  echo "libclang is missing (rsmpi's bindgen needs it); installing libclang1-14 (Debian)"
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq libclang1-14 >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq libclang1-14)
  else
    sudo apt-get install -y -qq libclang1-14 >/dev/null 2>&1 || (sudo apt-get update -qq && sudo apt-get install -y -qq libclang1-14)
  fi
fi
"$DEST/bin/mpichversion" | head -1
