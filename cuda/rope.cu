// Rotary position embedding, "rotate half" layout (as ops::rope): for i < d/2 the pair
// (x[i], x[i + d/2]) is rotated by pos·θ^(−2i/d). The inverse frequencies come from the host,
// computed exactly as the reference computes them (f32 powf), since an ulp there is a visible
// angle error at large positions; angle = pos · inv_freq in f32 and the accurate sincosf.
#include "common.cuh"

// One thread per (token, group of heads_per_thread heads, run of W pair indices): the W angles'
// sin/cos are computed once and applied to every head of the group (sincosf costs more than the
// bytes it moves). W = a pack (16-byte accesses of both halves) or 1 (any alignment).
template <typename T, int W>
__device__ __forceinline__ void rope_runs(T* y, const T* x, const unsigned int* __restrict__ positions, const float* __restrict__ inv_freqs,
                                          unsigned long long tokens, int heads, int head_dim, int inverse, int heads_per_thread) {
    const int half = head_dim / 2, runs = half / W;
    const int groups = (heads + heads_per_thread - 1) / heads_per_thread;
    const unsigned long long total = tokens * groups * runs;
    for (unsigned long long idx = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; idx < total;
         idx += (unsigned long long)gridDim.x * blockDim.x) {
        const int run = idx % runs;
        const unsigned long long tg = idx / runs;  // token * groups + group
        const unsigned long long t = tg / groups;
        const int h0 = (int)(tg % groups) * heads_per_thread, h1 = min(heads, h0 + heads_per_thread);
        float s[W], c[W];
#pragma unroll
        for (int k = 0; k < W; ++k) {
            sincosf((float)positions[t] * inv_freqs[run * W + k], &s[k], &c[k]);
            if (inverse) s[k] = -s[k];
        }
        for (int h = h0; h < h1; ++h) {
            const unsigned long long base = (t * heads + h) * head_dim;
            if constexpr (W == 1) {
                const float a = lcpt::to_f(x[base + run]), b = lcpt::to_f(x[base + run + half]);
                y[base + run] = lcpt::from_f<T>(a * c[0] - b * s[0]);
                y[base + run + half] = lcpt::from_f<T>(b * c[0] + a * s[0]);
            } else {
                const lcpt::Pack<T> a = lcpt::load_pack(x + base, run), b = lcpt::load_pack(x + base, run + runs);
                lcpt::Pack<T> lo, hi;
#pragma unroll
                for (int k = 0; k < W; ++k) {
                    lo.v[k] = a.v[k] * c[k] - b.v[k] * s[k];
                    hi.v[k] = b.v[k] * c[k] + a.v[k] * s[k];
                }
                lcpt::store_pack(y + base, run, lo);
                lcpt::store_pack(y + base, run + runs, hi);
            }
        }
    }
}

// y = rope(x) (or its inverse), x and y [tokens, heads, head_dim]; y may alias x (each thread
// reads its elements before it writes them).
template <typename T>
__device__ __forceinline__ void rope_impl(T* y, const T* x, const unsigned int* __restrict__ positions, const float* __restrict__ inv_freqs,
                                          unsigned long long tokens, int heads, int head_dim, int inverse, int heads_per_thread) {
    constexpr int N = lcpt::Pack<T>::N;
    if ((head_dim / 2) % N == 0 && lcpt::aligned16(x) && lcpt::aligned16(y))
        rope_runs<T, N>(y, x, positions, inv_freqs, tokens, heads, head_dim, inverse, heads_per_thread);
    else
        rope_runs<T, 1>(y, x, positions, inv_freqs, tokens, heads, head_dim, inverse, heads_per_thread);
}

#define LCPT_ROPE(S, T)                                                                                                      \
    extern "C" __global__ void rope_fwd_##S(T* y, const T* x, const unsigned int* positions, const float* inv_freqs,        \
                                            unsigned long long tokens, int heads, int head_dim, int inverse,               \
                                            int heads_per_thread) {                                                        \
        rope_impl<T>(y, x, positions, inv_freqs, tokens, heads, head_dim, inverse, heads_per_thread);                      \
    }
LCPT_BOTH_TYPES(LCPT_ROPE)
