#!/usr/bin/env bash
# The kernels' SASS, per kernel and arch (tools/sass_report.py): registers, spills, instruction
# classes (HMMA, LDGSTS, LDSM, shared and global accesses by width, BAR, SHFL, MUFU, atomics) and
# the hot loop's instructions per HMMA. Fails if a pipelined attention kernel lost its
# LDGSTS/LDSM or a hot kernel spills. Reads the fatbin and ptxas report of the newest
# `cargo build --release --features cuda` (or the build output folder given).
#
# cuobjdump comes from PyPI (no 13.0 wheel exists; 13.2's reads 13.0 cubins) into
# .cuda-toolchain/sass-tools, apart from nvcc's folder (pip --target would replace it).
# Usage: tools/sass-report.sh [OUT_DIR] [> report.txt]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-}
if [ -z "$out" ]; then
    fatbin=$(ls -t target/release/build/llama-cpt-*/out/kernels.fatbin 2>/dev/null | head -1 || true)
    [ -n "$fatbin" ] || { echo "sass-report: no kernels.fatbin under target/release/build: run cargo build --release --features cuda first" >&2; exit 2; }
    out=$(dirname "$fatbin")
fi
[ -s "$out/kernels.fatbin" ] || { echo "sass-report: $out/kernels.fatbin is missing or empty (was nvcc found at build time?)" >&2; exit 2; }
tools_dir=.cuda-toolchain/sass-tools
cuobjdump=$tools_dir/nvidia/cu13/bin/cuobjdump
if [ ! -x "$cuobjdump" ]; then
    "${PYTHON:-python3}" -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target "$tools_dir" \
        nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.2.51 >&2
    chmod +x "$tools_dir"/nvidia/cu13/bin/*
fi
sass=$(mktemp)
trap 'rm -f "$sass"' EXIT
"$cuobjdump" -sass "$out/kernels.fatbin" >"$sass"
"${PYTHON:-python3}" tools/sass_report.py "$sass" "$out/ptxas-report.txt" --require
