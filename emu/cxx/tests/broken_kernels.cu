// Deliberately broken kernels that prove the sanitizer builds work (sanitizers.sh). They are not
// in cuda/, so neither the production fatbin nor the emulator's kernel registry contains them.
#include "common.cuh"

// Off by one in dynamic shared memory (sized blockDim.x floats by the launch): the last thread
// writes one float past the end.
extern "C" __global__ void broken_oob_shared(float* out, const float* in) {
    float* s = lcpt::dynamic_smem<float>();
    s[threadIdx.x + 1] = in[threadIdx.x];
    __syncthreads();
    if (threadIdx.x > 0) out[threadIdx.x] = s[threadIdx.x];
}

// Off by one in global memory: `n` elements, the loop runs to n inclusive.
extern "C" __global__ void broken_oob_global(float* out, unsigned long long n) {
    for (unsigned long long i = threadIdx.x; i <= n; i += blockDim.x) out[i] = 1.f;
}

// A missing __syncthreads: each thread reads its neighbour's slot of shared memory that the
// neighbour writes without a barrier between the write and the read.
extern "C" __global__ void broken_race(float* out, const float* in) {
    __shared__ float s[256];
    s[threadIdx.x] = in[threadIdx.x];
    // __syncthreads() belongs here
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// The same kernel with its barrier: must run clean under both sanitizers.
extern "C" __global__ void fixed_race(float* out, const float* in) {
    __shared__ float s[256];
    s[threadIdx.x] = in[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// A missing __syncthreads that thread order hides: each thread reads the slot of the thread before
// it, which in thread order has always run first. Only another schedule (LLAMA_CPT_EMU_SCHEDULE)
// shows the wrong result.
extern "C" __global__ void hidden_race(float* out, const float* in) {
    __shared__ float s[256];
    s[threadIdx.x] = in[threadIdx.x];
    // __syncthreads() belongs here
    out[threadIdx.x] = s[(threadIdx.x + blockDim.x - 1) % blockDim.x];
}

// A missing __syncthreads after cp.async.wait_group: each thread's copy has landed, but its
// neighbour reads the slot with no barrier between (TSan: the landing write races the read).
extern "C" __global__ void broken_cp_async_race(float* out, const float* in) {
    float* s = lcpt::dynamic_smem<float>();
    lcpt::cp_async_16(s + 4 * threadIdx.x, in + 4 * (threadIdx.x % 64), true);
    lcpt::cp_async_commit();
    lcpt::cp_async_wait<0>();
    // __syncthreads() belongs here
    out[threadIdx.x] = s[4 * ((threadIdx.x + 1) % blockDim.x)];
}
