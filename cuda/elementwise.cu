// Elementwise kernels (f32 or bf16 storage, f32 arithmetic), and the bf16 <-> f32 casts.
// Grid-stride loops, 64-bit sizes.
#include "common.cuh"

#define LCPT_GRID_STRIDE(i, n) \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < (n); i += (unsigned long long)gridDim.x * blockDim.x)

template <typename T>
__device__ __forceinline__ void add_impl(T* __restrict__ out, const T* __restrict__ a, const T* __restrict__ b, unsigned long long n) {
    LCPT_GRID_STRIDE(i, n) out[i] = lcpt::from_f<T>(lcpt::to_f(a[i]) + lcpt::to_f(b[i]));
}
template <typename T>
__device__ __forceinline__ void add_assign_impl(T* __restrict__ a, const T* __restrict__ b, unsigned long long n) {
    LCPT_GRID_STRIDE(i, n) a[i] = lcpt::from_f<T>(lcpt::to_f(a[i]) + lcpt::to_f(b[i]));
}
template <typename T>
__device__ __forceinline__ void scale_impl(T* __restrict__ a, float s, unsigned long long n) {
    LCPT_GRID_STRIDE(i, n) a[i] = lcpt::from_f<T>(lcpt::to_f(a[i]) * s);
}
template <typename T>
__device__ __forceinline__ void fill_impl(T* __restrict__ a, float v, unsigned long long n) {
    const T x = lcpt::from_f<T>(v);
    LCPT_GRID_STRIDE(i, n) a[i] = x;
}

#define LCPT_ADD(S, T) \
    extern "C" __global__ void add_##S(T* out, const T* a, const T* b, unsigned long long n) { add_impl<T>(out, a, b, n); }
#define LCPT_ADD_ASSIGN(S, T) \
    extern "C" __global__ void add_assign_##S(T* a, const T* b, unsigned long long n) { add_assign_impl<T>(a, b, n); }
#define LCPT_SCALE(S, T) \
    extern "C" __global__ void scale_##S(T* a, float s, unsigned long long n) { scale_impl<T>(a, s, n); }
#define LCPT_FILL(S, T) \
    extern "C" __global__ void fill_##S(T* a, float v, unsigned long long n) { fill_impl<T>(a, v, n); }
LCPT_BOTH_TYPES(LCPT_ADD)
LCPT_BOTH_TYPES(LCPT_ADD_ASSIGN)
LCPT_BOTH_TYPES(LCPT_SCALE)
LCPT_BOTH_TYPES(LCPT_FILL)

// Round to nearest even, NaN stays NaN (as ops::convert::f32_to_bf16).
extern "C" __global__ void cast_f32_to_bf16(__nv_bfloat16* __restrict__ out, const float* __restrict__ in, unsigned long long n) {
    LCPT_GRID_STRIDE(i, n) out[i] = __float2bfloat16_rn(in[i]);
}

extern "C" __global__ void cast_bf16_to_f32(float* __restrict__ out, const __nv_bfloat16* __restrict__ in, unsigned long long n) {
    LCPT_GRID_STRIDE(i, n) out[i] = __bfloat162float(in[i]);
}
