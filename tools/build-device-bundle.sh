#!/usr/bin/env bash
# Builds the CUDA test and bench binaries here (the GPU machine has no Rust and no network) and
# copies them into .device-bin/ (git-ignored), which a device run carries:
#   run(command="bash tools/device-check.sh", carry=[".device-bin"])
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-cuda}"
tools/install-cuda-toolchain.sh >/dev/null
rm -rf .device-bin && mkdir -p .device-bin
# --message-format=json names the exact executables cargo built.
exes() { grep -o '"executable":"[^"]*"' | sed 's/"executable":"//; s/"$//'; }
cargo test --release --features cuda --no-run --test cuda_kernels --message-format=json 2>/dev/null | exes | while read -r f; do cp "$f" .device-bin/cuda_kernels; done
cargo bench --features cuda --no-run --bench kernels --message-format=json 2>/dev/null | exes | while read -r f; do cp "$f" .device-bin/kernels_bench; done
for f in cuda_kernels kernels_bench; do
    [ -x ".device-bin/$f" ] || { echo "missing .device-bin/$f (build failed?)" >&2; exit 1; }
done
# Debug info is not needed there; it is most of the size.
strip --strip-debug .device-bin/* 2>/dev/null || true
report=$(ls -t "$CARGO_TARGET_DIR"/release/build/llama-cpt-*/out/ptxas-report.txt 2>/dev/null | head -1 || true)
[ -n "$report" ] && cp "$report" .device-bin/ptxas-report.txt
total=$(du -sb .device-bin | cut -f1)
ls -la .device-bin
echo "bundle: $((total / 1024 / 1024)) MiB"
if [ "$total" -ge $((60 * 1024 * 1024)) ]; then
    echo "bundle is over 60 MiB: the device run carries at most 64 MiB with the working tree" >&2
    exit 1
fi
