#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (run from the repository root there, with
# .device-bin/ carried; build it here first with tools/build-device-bundle.sh):
#   run(command="bash tools/device-check.sh", carry=[".device-bin"], timeout_s=600)
# 1. every CUDA test, ignored ones included (kernels vs the CPU reference, whole model);
# 2. the kernel timings (our kernels) and PyTorch on the same shapes, the card's measured copy
#    bandwidth and bf16 matmul rate, and one table last.
# Sized for one 10-minute call: tests ~2-4 min, benches ~2 min.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/device-check-out}"
mkdir -p "$OUT"
BIN=.device-bin
[ -x "$BIN/cuda_kernels" ] || { echo "no $BIN/cuda_kernels: run tools/build-device-bundle.sh and carry .device-bin" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"

# Libraries: libcuda comes with the driver; cuBLASLt from the system or PyTorch's wheels; a
# libnccl.so name for loaders that ask for the unversioned one.
LIBDIR=/tmp/llama-cpt-libs
mkdir -p "$LIBDIR"
PY=python3
if ! ldconfig -p 2>/dev/null | grep -q 'libcublasLt.so'; then
    for d in $($PY - <<'PYEOF' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
seen = set()
for r in roots:
    for pat in ("nvidia/*/lib", "nvidia/*/*/lib", "torch/lib"):
        for d in glob.glob(os.path.join(r, pat)):
            if d not in seen and (glob.glob(d + "/libcublas*") or glob.glob(d + "/libnccl*") or glob.glob(d + "/libcudart*")):
                seen.add(d); print(d)
PYEOF
    ); do LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:$d"; done
fi
for d in ${LD_LIBRARY_PATH//:/ }; do
    if [ -e "$d/libnccl.so.2" ] && [ ! -e "$d/libnccl.so" ] && [ ! -e "$LIBDIR/libnccl.so" ]; then ln -s "$d/libnccl.so.2" "$LIBDIR/libnccl.so"; fi
    if [ -e "$d/libcublasLt.so.13" ] && [ ! -e "$d/libcublasLt.so" ] && [ ! -e "$LIBDIR/libcublasLt.so" ]; then ln -s "$d/libcublasLt.so.13" "$LIBDIR/libcublasLt.so"; fi
    if [ -e "$d/libcublas.so.13" ] && [ ! -e "$d/libcublas.so" ] && [ ! -e "$LIBDIR/libcublas.so" ]; then ln -s "$d/libcublas.so.13" "$LIBDIR/libcublas.so"; fi
done
export LD_LIBRARY_PATH="$LIBDIR:${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

echo "== CUDA tests =="
status=0
timeout 300 "$BIN/cuda_kernels" --include-ignored --test-threads=1 2>&1 | tee "$OUT/tests.log" || status=1

echo "== kernel timings =="
LLAMA_CPT_BENCH_JSON="$OUT/ours.jsonl" timeout 150 "$BIN/kernels_bench" 2>&1 | tee "$OUT/bench.log" || status=1

echo "== PyTorch side by side =="
PYTHONUNBUFFERED=1 timeout 150 $PY tools/bench_torch_gpu.py --ours "$OUT/ours.jsonl" --json "$OUT/torch.json" 2>&1 | tee "$OUT/table.txt" || status=1
exit $status
