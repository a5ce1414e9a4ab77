#!/usr/bin/env bash
# Builds the CUDA test and bench binaries here (the GPU machine has no Rust and no network) and
# copies them into .device-bin/ (git-ignored), which a device run carries:
#   run(command="bash tools/device-check.sh", carry=[".device-bin"], timeout_s=600)
# The project's feature set and target folder (CI's), so after CI's build this only copies.
# tools/device-check.sh --dry runs this, then the bundle from a copy of what the device receives.
set -euo pipefail
cd "$(dirname "$0")/.."
FEATURES=cuda,mpi
BUNDLE=.device-bin
tools/install-cuda-toolchain.sh >/dev/null
# Written next to the bundle, renamed over it when complete.
new="$BUNDLE.new"
rm -rf "$new" && mkdir -p "$new"
trap 'rm -rf "$new"' EXIT
# --message-format=json names the exact executable cargo built for a target.
# built_executable TARGET CARGO-ARGS...: prints the path of TARGET's executable.
built_executable() {
    local target=$1 json
    shift
    json=$(cargo build --release --features "$FEATURES" "$@" --message-format=json)
    grep '"reason":"compiler-artifact"' <<<"$json" | grep "\"name\":\"$target\"" \
        | grep -o '"executable":"[^"]*"' | sed 's/"executable":"//; s/"$//' | tail -1
}
exe=$(built_executable cuda_kernels --test cuda_kernels)
[ -n "$exe" ] || { echo "cargo named no executable for the test cuda_kernels" >&2; exit 1; }
cp "$exe" "$new/cuda_kernels"
exe=$(built_executable kernels --bench kernels)
[ -n "$exe" ] || { echo "cargo named no executable for the bench kernels" >&2; exit 1; }
cp "$exe" "$new/kernels_bench"
# Debug info is not needed there; it is most of the size.
strip --strip-debug "$new/cuda_kernels" "$new/kernels_bench"
# The GPU machine is a bare image: the CUDA libraries are opened at run time (cudarc's dynamic
# loading), so a binary that needs anything beyond the C runtime at load time (libmpi, say) would
# not start there.
for f in cuda_kernels kernels_bench; do
    needed=$(readelf -d "$new/$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
    beyond=$(grep -Ev '^(libc|libm|libgcc_s|libpthread|libdl|librt|ld-linux-x86-64)\.so' <<<"$needed" || true)
    if [ -n "$beyond" ]; then
        echo "$BUNDLE/$f needs $(tr '\n' ' ' <<<"$beyond")at load time: a GPU machine may not have it" >&2
        exit 1
    fi
done
report=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/build/llama-cpt-*/out/ptxas-report.txt 2>/dev/null | head -1 || true)
if [ -n "$report" ]; then cp "$report" "$new/ptxas-report.txt"; fi
total=$(du -sb "$new" | cut -f1)
# Leaves room for the working tree within the 64 MiB a device run carries (tools/device-check.sh
# --dry measures the two together).
if [ "$total" -ge $((60 * 1024 * 1024)) ]; then
    echo "bundle is $((total / 1024 / 1024)) MiB, over 60 MiB: the device run carries at most 64 MiB with the working tree" >&2
    exit 1
fi
rm -rf "$BUNDLE" && mv "$new" "$BUNDLE"
ls -la "$BUNDLE"
echo "bundle: $((total / 1024 / 1024)) MiB ($FEATURES)"
