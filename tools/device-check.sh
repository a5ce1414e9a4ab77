#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (run from the repository root there, with
# .device-bin/ carried; build it here first with tools/build-device-bundle.sh):
#   run(command="bash tools/device-check.sh", carry=[".device-bin"], timeout_s=600)
# 1. every CUDA test, ignored ones included (kernels vs the CPU reference, whole model);
# 2. the kernel timings (our kernels) and PyTorch on the same shapes, the card's measured copy
#    bandwidth and bf16 matmul rate, and one table last.
# Sized for one 10-minute call: tests ~2-4 min, benches ~2 min.
#
# Modes:
#   (none)     the device run above. Under the emulated device, put its libraries first with
#              LLAMA_CPT_EMU_LIB=DIR (CI: after tools/emu-check.sh, DIR=target/emu-lib); kernel
#              timings then run the smoke shapes (LLAMA_CPT_BENCH_SMOKE=1); no nvidia-smi needed.
#   --dry      here, without a GPU (CI runs this): builds the bundle, copies what a GPU machine
#              receives (tracked and untracked-not-ignored files, .device-bin; no .venv, no
#              target/) to a scratch folder, checks its size, and runs --no-gpu there.
#   --no-gpu   every step that needs no GPU: the bundle's binaries start, the library search
#              (with a self-test), the CPU tests of cuda_kernels (the side-by-side smoke among
#              them), kernels_bench, the PyTorch script in --smoke mode, and the table.
# The Python with torch: LLAMA_CPT_PYTHON, else python3 (the GPU image's).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=device
case "${1:-}" in
    "") ;;
    --dry) mode=dry ;;
    --no-gpu) mode=no-gpu ;;
    *) echo "usage: tools/device-check.sh [--dry | --no-gpu]" >&2; exit 2 ;;
esac
BIN=.device-bin
# What a device run may carry with the working tree, in all.
CARRY_LIMIT=$((64 * 1024 * 1024))

if [ "$mode" = dry ]; then
    set -e
    git rev-parse --is-inside-work-tree >/dev/null 2>&1 || { echo "--dry copies git's view of the working tree: run it in a git checkout" >&2; exit 2; }
    bash tools/build-device-bundle.sh
    # The run happens in another folder: a Python given by a relative path is made absolute.
    case "${LLAMA_CPT_PYTHON:-}" in
        "") if [ -x .venv/bin/python ]; then export LLAMA_CPT_PYTHON="$PWD/.venv/bin/python"; fi ;;
        /*) ;;
        */*) export LLAMA_CPT_PYTHON="$PWD/$LLAMA_CPT_PYTHON" ;;
    esac
    stage=$(mktemp -d /tmp/device-check-stage.XXXXXX)
    trap 'rm -rf "$stage"' EXIT
    # What the device tool sends: git's view of the working tree (tracked, and untracked files
    # that are not ignored), plus the carried bundle.
    git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done \
        | tar --null -T - -cf - | tar -xf - -C "$stage"
    cp -a "$BIN" "$stage/"
    sent=$(du -sb "$stage" | cut -f1)
    echo "what a device run receives: $((sent / 1024 / 1024)) MiB of at most $((CARRY_LIMIT / 1024 / 1024)) MiB"
    if [ "$sent" -ge "$CARRY_LIMIT" ]; then
        echo "the working tree and .device-bin are over the device tool's limit" >&2
        exit 1
    fi
    # No variable that points back here: the copy must find everything by itself. And where a
    # private mount namespace is allowed, the build folder's tools/, tests/ and target/ are
    # hidden under empty folders, so a path baked in at build time finds nothing, as on the GPU
    # machine (its Python, LLAMA_CPT_PYTHON, stays reachable).
    export OUT="${OUT:-/tmp/device-check-dry}"
    target=$(realpath "${CARGO_TARGET_DIR:-target}")
    export HIDE="$PWD/tools $PWD/tests $target"
    run=(env -u LLAMA_CPT_REPO -u CARGO_MANIFEST_DIR bash "$stage/tools/device-check.sh" --no-gpu)
    set +e
    if unshare -m --propagation private mount -t tmpfs probe "$stage/tools" 2>/dev/null; then
        echo "hidden from the run: $HIDE"
        unshare -m --propagation private bash -c 'for d in $HIDE; do mount -t tmpfs hidden "$d" || exit 2; done; exec "$@"' hide "${run[@]}"
    else
        echo "no private mount namespace here: the build folder stays visible to the run"
        "${run[@]}"
    fi
    exit $?
fi

OUT="${OUT:-/tmp/device-check-out}"
mkdir -p "$OUT"
PY="${LLAMA_CPT_PYTHON:-python3}"
# cuda_kernels' side-by-side test runs the PyTorch script with this Python too.
export LLAMA_CPT_PYTHON="$PY"
for f in cuda_kernels kernels_bench; do
    [ -x "$BIN/$f" ] || { echo "no $BIN/$f: run tools/build-device-bundle.sh and carry .device-bin" >&2; exit 2; }
done
"$PY" -c "import torch" || { echo "$PY cannot import torch: set LLAMA_CPT_PYTHON to a Python with torch" >&2; exit 2; }
if [ -n "${LLAMA_CPT_EMU_LIB:-}" ]; then
    [ -d "$LLAMA_CPT_EMU_LIB" ] || { echo "LLAMA_CPT_EMU_LIB=$LLAMA_CPT_EMU_LIB is not a folder" >&2; exit 2; }
    echo "emulated device: its libraries first ($LLAMA_CPT_EMU_LIB); kernel timings on the smoke shapes"
    # Emulated times mean nothing, and the full shapes would take hours on the host.
    export LLAMA_CPT_BENCH_SMOKE=1
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"
else
    echo "no nvidia-smi (no GPU, or the emulated device): no card facts" | tee "$OUT/gpu.txt"
fi

# Libraries. cudarc opens them at run time under the names it guesses (lib<name>.so, .so.13,
# .so.12 ... .so.9, .so.1): libcuda.so.1 comes with the driver, cuBLAS(Lt) .so.13 from the system
# or PyTorch's wheels; NCCL ships libnccl.so.2, a name never tried, so a folder of ours on the
# search path gets libnccl.so -> libnccl.so.2. Always searched, whatever ldconfig knows.

# The folders dlopen searches, in its order: LD_LIBRARY_PATH, then those in ld.so.cache.
search_dirs() {
    local d cache
    local path="${LD_LIBRARY_PATH:-}"
    for d in ${path//:/ }; do echo "$d"; done
    # Read whole, then parsed: `ldconfig -p | grep -q` can die of SIGPIPE (141) under pipefail.
    cache=$(ldconfig -p 2>/dev/null || true)
    sed -n 's|.* => \(.*\)/[^/]*$|\1|p' <<<"$cache" | awk '!seen[$0]++'
}

# link_unversioned LINKDIR NAME VERSION...: the first folder of the search path that holds
# NAME.so or NAME.so.VERSION decides; only a versioned library gets the NAME.so link in LINKDIR.
link_unversioned() {
    local linkdir=$1 name=$2 d v
    shift 2
    for d in $(search_dirs); do
        [ "$d" = "$linkdir" ] && continue
        if [ -e "$d/$name.so" ]; then
            echo "$name.so: $d/$name.so"
            return 0
        fi
        for v in "$@"; do
            if [ -e "$d/$name.so.$v" ]; then
                ln -sfn "$d/$name.so.$v" "$linkdir/$name.so"
                echo "$name.so: linked to $d/$name.so.$v"
                return 0
            fi
        done
    done
    echo "$name.so: not found"
    return 1
}

# The search and link logic on fake folders (a script error must show here, not on the GPU).
library_search_self_test() {
    local t
    t=$(mktemp -d)
    mkdir -p "$t/versioned" "$t/unversioned" "$t/links"
    touch "$t/versioned/libnccl.so.2" "$t/unversioned/libnccl.so"
    (LD_LIBRARY_PATH="$t/versioned:$t/unversioned" link_unversioned "$t/links" libnccl 2 >/dev/null)
    [ "$(readlink "$t/links/libnccl.so")" = "$t/versioned/libnccl.so.2" ] || { echo "library search self-test: no link to the first, versioned libnccl" >&2; rm -rf "$t"; return 1; }
    rm "$t/links/libnccl.so"
    (LD_LIBRARY_PATH="$t/links:$t/unversioned:$t/versioned" link_unversioned "$t/links" libnccl 2 >/dev/null)
    [ ! -e "$t/links/libnccl.so" ] || { echo "library search self-test: linked although an unversioned libnccl.so comes first" >&2; rm -rf "$t"; return 1; }
    (LD_LIBRARY_PATH="$t/links" link_unversioned "$t/links" libnotthere 1 >/dev/null) && { echo "library search self-test: found a library that is not there" >&2; rm -rf "$t"; return 1; }
    rm -rf "$t"
    echo "library search self-test: ok"
}

status=0
library_search_self_test || status=1
LIBDIR=$(mktemp -d /tmp/llama-cpt-libs.XXXXXX)
wheel_dirs=$("$PY" - <<'PYEOF'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
seen = set()
for r in roots:
    for pat in ("nvidia/*/lib", "nvidia/*/*/lib", "torch/lib"):
        for d in sorted(glob.glob(os.path.join(r, pat))):
            if d not in seen and any(glob.glob(os.path.join(d, p)) for p in ("libcublas*", "libnccl*", "libcudart*")):
                seen.add(d)
                print(d)
PYEOF
) || { echo "searching $PY's site-packages for CUDA libraries failed" >&2; status=1; }
rest="${LD_LIBRARY_PATH:-}"
for d in $wheel_dirs; do rest="${rest:+$rest:}$d"; done
# The emulator's folder wins, then our links, then the system's and the wheels' folders.
export LD_LIBRARY_PATH="${LLAMA_CPT_EMU_LIB:+$LLAMA_CPT_EMU_LIB:}$LIBDIR${rest:+:$rest}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
# Not fatal here: a missing library fails the tests that need it, by name.
link_unversioned "$LIBDIR" libnccl 2 || true
link_unversioned "$LIBDIR" libcublasLt 13 || true
link_unversioned "$LIBDIR" libcublas 13 || true

if [ "$mode" = no-gpu ]; then
    echo "== CUDA tests that need no GPU (the side-by-side smoke among them) =="
    timeout 300 "$BIN/cuda_kernels" --test-threads=1 2>&1 | tee "$OUT/tests.log" || status=1
else
    echo "== CUDA tests =="
    timeout 300 "$BIN/cuda_kernels" --include-ignored --test-threads=1 2>&1 | tee "$OUT/tests.log" || status=1
fi

echo "== kernel timings =="
rm -f "$OUT/ours.jsonl"
LLAMA_CPT_BENCH_JSON="$OUT/ours.jsonl" timeout 200 "$BIN/kernels_bench" 2>&1 | tee "$OUT/bench.log" || status=1
ours=()
if [ -s "$OUT/ours.jsonl" ]; then
    ours=(--ours "$OUT/ours.jsonl")
elif [ "$mode" = device ]; then
    # Without a device kernels_bench skips its CUDA cases and writes nothing.
    echo "kernels_bench wrote no timings ($OUT/ours.jsonl): no CUDA device?" >&2
    status=1
fi

echo "== PyTorch side by side =="
torch_mode=()
if [ "$mode" = no-gpu ]; then
    torch_mode=(--smoke)
elif ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    # The emulated device: our side runs under it, PyTorch has no CUDA.
    echo "PyTorch sees no CUDA device: its side runs --smoke (tiny shapes on the CPU, no ratio means anything)"
    torch_mode=(--smoke)
fi
so_far=ok
[ "$status" = 0 ] || so_far="FAILED, see $OUT/tests.log and $OUT/bench.log"
echo "device check so far: $so_far; the table comes last"
PYTHONUNBUFFERED=1 timeout 200 "$PY" tools/bench_torch_gpu.py "${torch_mode[@]}" "${ours[@]}" --json "$OUT/torch.json" 2>&1 | tee "$OUT/table.txt" || status=1
rm -rf "$LIBDIR"
exit $status
