// SwiGLU: out = silu(gate)·up, silu(g) = g·σ(g); as ops::swiglu.
#include "common.cuh"

__device__ __forceinline__ float lcpt_sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

template <typename T>
__device__ __forceinline__ void swiglu_fwd_impl(T* __restrict__ out, const T* __restrict__ gate, const T* __restrict__ up, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        const float g = lcpt::to_f(gate[i]);
        out[i] = lcpt::from_f<T>(g * lcpt_sigmoid(g) * lcpt::to_f(up[i]));
    }
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd_impl(T* __restrict__ dgate, T* __restrict__ dup, const T* __restrict__ dout, const T* __restrict__ gate,
                                                const T* __restrict__ up, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        const float g = lcpt::to_f(gate[i]), u = lcpt::to_f(up[i]), d = lcpt::to_f(dout[i]);
        const float s = lcpt_sigmoid(g);
        dup[i] = lcpt::from_f<T>(d * (g * s));
        dgate[i] = lcpt::from_f<T>(d * u * s * (1.f + g * (1.f - s)));
    }
}

#define LCPT_SWIGLU_FWD(S, T) \
    extern "C" __global__ void swiglu_fwd_##S(T* out, const T* gate, const T* up, unsigned long long n) { swiglu_fwd_impl<T>(out, gate, up, n); }
#define LCPT_SWIGLU_BWD(S, T)                                                                                       \
    extern "C" __global__ void swiglu_bwd_##S(T* dgate, T* dup, const T* dout, const T* gate, const T* up,          \
                                              unsigned long long n) {                                               \
        swiglu_bwd_impl<T>(dgate, dup, dout, gate, up, n);                                                          \
    }
LCPT_BOTH_TYPES(LCPT_SWIGLU_FWD)
LCPT_BOTH_TYPES(LCPT_SWIGLU_BWD)
