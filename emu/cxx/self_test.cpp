// Test kernels of the emulator's own unit tests (lcpt_emu_self_test, emu/src/kernels.rs). They are
// not in the kernel registry, so the CUDA backend cannot reach them.
#include <stdio.h>
#include <string.h>

#include "emu_abi.h"
#include "cuda_emu.h"

namespace {

// out[t] = value thread t+1 wrote before the barrier, over several rounds; without a working
// barrier a thread reads its neighbour's previous round (or the NaN fill of shared memory).
void barrier_kernel(float* out) {
    float* s = reinterpret_cast<float*>(lcpt_emu::current_block()->dynamic_smem);
    const unsigned t = threadIdx.x, n = blockDim.x;
    float acc = 0.f;
    for (int round = 0; round < 3; ++round) {
        s[t] = static_cast<float>(t * 10 + round);
        __syncthreads();
        acc += s[(t + 1) % n];
        __syncthreads();
    }
    out[t] = acc;
}

// out[4t + k] = __shfl_xor_sync(full, value of lane, 1 << k) for k < 3, then the warp sum of t.
void shuffle_kernel(float* out) {
    const unsigned t = threadIdx.x;
    const float v = static_cast<float>(t) + 0.5f;
    for (int k = 0; k < 3; ++k) out[4 * t + k] = __shfl_xor_sync(0xffffffffu, v, 1 << k);
    float sum = static_cast<float>(t);
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    out[4 * t + 3] = sum;
}

// Lanes 0..15 return; the others shuffle with a full mask: lanes 0..15 never arrive.
void missing_lane_kernel(float* out) {
    if ((threadIdx.x & 31) < 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// Lanes 0..15 wait at the barrier while lanes 16..31 wait at a full-warp shuffle: neither completes.
void deadlock_kernel(float* out) {
    if ((threadIdx.x & 31) < 16) {
        __syncthreads();
    } else {
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
    }
}

}  // namespace

extern "C" int lcpt_emu_self_test(const char* which, unsigned threads, float* out, char* err, size_t errlen) {
    const dim3 grid{1, 1, 1}, block{threads, 1, 1};
    if (strcmp(which, "barrier") == 0)
        return lcpt_emu::launch<&barrier_kernel>(grid, block, threads * sizeof(float), err, errlen, "barrier_test", out);
    if (strcmp(which, "shuffle") == 0) return lcpt_emu::launch<&shuffle_kernel>(grid, block, 0, err, errlen, "shuffle_test", out);
    if (strcmp(which, "missing_lane") == 0) return lcpt_emu::launch<&missing_lane_kernel>(grid, block, 0, err, errlen, "missing_lane_test", out);
    if (strcmp(which, "deadlock") == 0) return lcpt_emu::launch<&deadlock_kernel>(grid, block, 0, err, errlen, "deadlock_test", out);
    if (err && errlen) snprintf(err, errlen, "no self test named %s", which);
    return 1;
}
