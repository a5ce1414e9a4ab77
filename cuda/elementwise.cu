// Elementwise kernels on f32 buffers, and the bf16 <-> f32 casts. Grid-stride loops, 64-bit sizes.
#include "common.cuh"

extern "C" __global__ void add_f32(float* __restrict__ out, const float* __restrict__ a, const float* __restrict__ b, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

extern "C" __global__ void add_assign_f32(float* __restrict__ a, const float* __restrict__ b, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x)
        a[i] += b[i];
}

extern "C" __global__ void scale_f32(float* __restrict__ a, float s, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x)
        a[i] *= s;
}

extern "C" __global__ void fill_f32(float* __restrict__ a, float v, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x)
        a[i] = v;
}

// Round to nearest even, NaN stays NaN (as ops::convert::f32_to_bf16).
extern "C" __global__ void cast_f32_to_bf16(__nv_bfloat16* __restrict__ out, const float* __restrict__ in, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(in[i]);
}

extern "C" __global__ void cast_bf16_to_f32(float* __restrict__ out, const __nv_bfloat16* __restrict__ in, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = __bfloat162float(in[i]);
}
