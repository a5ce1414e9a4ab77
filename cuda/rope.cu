// Rotary position embedding, "rotate half" layout (as ops::rope): for i < d/2 the pair
// (x[i], x[i + d/2]) is rotated by pos·θ^(−2i/d). The inverse frequencies come from the host,
// computed exactly as the reference computes them (f32 powf), since an ulp there is a visible
// angle error at large positions; angle = pos · inv_freq in f32 and the accurate sincosf.
#include "common.cuh"

// y = rope(x) (or its inverse), x and y [tokens, heads, head_dim]; y may alias x.
// One thread per (token, head, i < head_dim/2).
template <typename T>
__device__ __forceinline__ void rope_impl(T* y, const T* x, const unsigned int* __restrict__ positions, const float* __restrict__ inv_freqs,
                                          unsigned long long tokens, int heads, int head_dim, int inverse) {
    const int half = head_dim / 2;
    const unsigned long long total = tokens * heads * half;
    for (unsigned long long idx = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; idx < total;
         idx += (unsigned long long)gridDim.x * blockDim.x) {
        const int i = idx % half;
        const unsigned long long th = idx / half;  // token * heads + head
        const unsigned long long t = th / heads;
        const float angle = (float)positions[t] * inv_freqs[i];
        float s, c;
        sincosf(angle, &s, &c);
        if (inverse) s = -s;
        const unsigned long long base = th * head_dim;
        const float a = lcpt::to_f(x[base + i]), b = lcpt::to_f(x[base + i + half]);
        y[base + i] = lcpt::from_f<T>(a * c - b * s);
        y[base + i + half] = lcpt::from_f<T>(b * c + a * s);
    }
}

#define LCPT_ROPE(S, T)                                                                                                      \
    extern "C" __global__ void rope_fwd_##S(T* y, const T* x, const unsigned int* positions, const float* inv_freqs,        \
                                            unsigned long long tokens, int heads, int head_dim, int inverse) {             \
        rope_impl<T>(y, x, positions, inv_freqs, tokens, heads, head_dim, inverse);                                        \
    }
LCPT_BOTH_TYPES(LCPT_ROPE)
