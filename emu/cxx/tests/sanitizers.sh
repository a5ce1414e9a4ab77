#!/usr/bin/env bash
# The emulated compute-sanitizer: builds the block runtime with llama-cpt kernels and the broken
# kernels of broken_kernels.cu under AddressSanitizer (memcheck: out-of-bounds global and shared
# memory; dynamic shared memory is allocated at exactly the launch's size) and ThreadSanitizer
# (racecheck: every CUDA thread is a TSan fiber; barriers, warp collectives and block boundaries
# are its only happens-before edges), then checks that
#   - correct kernels (rmsnorm, attention forward with mma, the pipelined one with cp.async and ldmatrix, a barrier-ordered exchange) run clean under both,
#   - ASan reports the off-by-one shared-memory write and the off-by-one global write,
#   - TSan reports the race of the kernel missing its __syncthreads, and of the one missing it after cp.async.wait_group,
#   - a missing barrier that thread order hides gives a wrong result in reverse and random order
#     (LLAMA_CPT_EMU_SCHEDULE), while the correct kernels give the right one in every order.
# Usage: sanitizers.sh [build dir] (default target/emu-sanitizers). Prints one line per check and
# exits non-zero if any check fails. Needs a C++ compiler with libasan and libtsan (CXX, default c++).
set -u
here=$(cd "$(dirname "$0")" && pwd)
cxx=$(cd "$here/.." && pwd)
root=$(cd "$cxx/../.." && pwd)
out=${1:-$root/target/emu-sanitizers}
mkdir -p "$out"
CXX=${CXX:-c++}
flags=(-std=c++17 -g -O1 -fno-strict-aliasing -fno-omit-frame-pointer -Wno-unknown-pragmas -I"$cxx/include" -I"$cxx" -I"$root/cuda" -I"$here")
failures=0

build() { # name, command...
    local name=$1
    shift
    if ! "$@" >"$out/$name.build.log" 2>&1; then
        echo "sanitizers: building $name failed ($out/$name.build.log):"
        tail -20 "$out/$name.build.log"
        exit 1
    fi
}

# ASan instruments everything; TSan only the kernels (the runtime's bookkeeping is ordered by the
# fiber switches, which TSan is told carry no synchronisation) with the runtime's annotations on.
build asan "$CXX" "${flags[@]}" -fsanitize=address "$cxx/runtime.cpp" "$cxx/mma.cpp" "$here/sanitizer_driver.cpp" -o "$out/driver-asan"
build tsan-runtime "$CXX" "${flags[@]}" -DLCPT_EMU_TSAN=1 -c "$cxx/runtime.cpp" -o "$out/runtime-tsan.o"
build tsan-mma "$CXX" "${flags[@]}" -c "$cxx/mma.cpp" -o "$out/mma-tsan.o"
build tsan "$CXX" "${flags[@]}" -fsanitize=thread "$here/sanitizer_driver.cpp" "$out/runtime-tsan.o" "$out/mma-tsan.o" -o "$out/driver-tsan"

# check NAME DRIVER MODE EXPECT: EXPECT is "clean" or the text the report must contain.
check() {
    local name=$1 driver=$2 mode=$3 expect=$4 log="$out/$1.log" rc
    ASAN_OPTIONS=detect_leaks=0 TSAN_OPTIONS=halt_on_error=0 "$out/$driver" "$mode" >"$log" 2>&1
    rc=$?
    if [ "$expect" = clean ]; then
        if [ $rc -eq 0 ] && ! grep -q "Sanitizer" "$log"; then
            echo "sanitizers: $name: ok (no report)"
            return
        fi
    elif [ $rc -ne 0 ] && grep -q "$expect" "$log"; then
        echo "sanitizers: $name: ok (reported: $(grep -m1 "$expect" "$log" | sed 's/^[=0-9]* *//'))"
        return
    fi
    echo "sanitizers: $name: FAILED (exit $rc, expected ${expect}); log $log:"
    tail -30 "$log"
    failures=$((failures + 1))
}

check asan-clean driver-asan clean clean
check asan-oob-shared driver-asan oob-shared "heap-buffer-overflow"
check asan-oob-global driver-asan oob-global "heap-buffer-overflow"
check tsan-clean driver-tsan clean clean
check tsan-race driver-tsan race "ThreadSanitizer: data race"
check tsan-cp-async-race driver-tsan cp-async-race "ThreadSanitizer: data race"

# Schedules (LLAMA_CPT_EMU_SCHEDULE, runtime.cpp): a race that thread order hides gives a wrong
# result in reverse and random order, and the correct kernels give the right one in every order.
# schedule NAME ORDER MODE EXPECT: EXPECT is "right" or the text the wrong result prints.
schedule() {
    local name=$1 order=$2 mode=$3 expect=$4 log="$out/$1.log" rc
    LLAMA_CPT_EMU_SCHEDULE=$order ASAN_OPTIONS=detect_leaks=0 "$out/driver-asan" "$mode" >"$log" 2>&1
    rc=$?
    if { [ "$expect" = right ] && [ $rc -eq 0 ]; } || { [ "$expect" != right ] && [ $rc -eq 1 ] && grep -q "$expect" "$log"; }; then
        echo "sanitizers: $name: ok ($(tail -n 1 "$log"))"
        return
    fi
    echo "sanitizers: $name: FAILED (exit $rc, expected ${expect}); log $log:"
    tail -30 "$log"
    failures=$((failures + 1))
}
schedule schedule-thread-order-hides thread-order hidden-race right
schedule schedule-reverse-shows reverse hidden-race "wrong result"
schedule schedule-random-shows random:7 hidden-race "wrong result"
schedule schedule-reverse-clean reverse clean right
schedule schedule-random-clean random:7 clean right
if [ $failures -ne 0 ]; then
    echo "sanitizers: $failures check(s) failed"
    exit 1
fi
echo "sanitizers: all 11 checks passed"
