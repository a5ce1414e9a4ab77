// SwiGLU: out = silu(gate)·up, silu(g) = g·σ(g); as ops::swiglu.
#include "common.cuh"

__device__ __forceinline__ float lcpt_sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

extern "C" __global__ void swiglu_fwd(float* __restrict__ out, const float* __restrict__ gate, const float* __restrict__ up, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        const float g = gate[i];
        out[i] = g * lcpt_sigmoid(g) * up[i];
    }
}

extern "C" __global__ void swiglu_bwd(float* __restrict__ dgate, float* __restrict__ dup, const float* __restrict__ dout,
                                      const float* __restrict__ gate, const float* __restrict__ up, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        const float g = gate[i], u = up[i], d = dout[i];
        const float s = lcpt_sigmoid(g);
        dup[i] = d * (g * s);
        dgate[i] = d * u * s * (1.f + g * (1.f - s));
    }
}
