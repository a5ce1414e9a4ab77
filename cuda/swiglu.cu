// SwiGLU: out = silu(gate)·up, silu(g) = g·σ(g); as ops::swiglu. 16-byte packs where aligned.
#include "common.cuh"

__device__ __forceinline__ float lcpt_sigmoid(float g) { return 1.f / (1.f + expf(-g)); }
__device__ __forceinline__ float swiglu_value(float g, float u) { return g * lcpt_sigmoid(g) * u; }
// (d out/d gate, d out/d up) · d.
__device__ __forceinline__ float2 swiglu_grads(float g, float u, float d) {
    const float s = lcpt_sigmoid(g);
    return make_float2(d * u * s * (1.f + g * (1.f - s)), d * (g * s));
}

template <typename T>
__device__ __forceinline__ void swiglu_fwd_impl(T* __restrict__ out, const T* __restrict__ gate, const T* __restrict__ up, unsigned long long n) {
    constexpr int N = lcpt::Pack<T>::N;
    lcpt::grid_stride_packed<N>(
        n, lcpt::aligned16(out) && lcpt::aligned16(gate) && lcpt::aligned16(up),
        [&](unsigned long long i) {
            const lcpt::Pack<T> g = lcpt::load_pack(gate, i), u = lcpt::load_pack(up, i);
            lcpt::Pack<T> o;
#pragma unroll
            for (int k = 0; k < N; ++k) o.v[k] = swiglu_value(g.v[k], u.v[k]);
            lcpt::store_pack(out, i, o);
        },
        [&](unsigned long long j) { out[j] = lcpt::from_f<T>(swiglu_value(lcpt::to_f(gate[j]), lcpt::to_f(up[j]))); });
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd_impl(T* __restrict__ dgate, T* __restrict__ dup, const T* __restrict__ dout, const T* __restrict__ gate,
                                                const T* __restrict__ up, unsigned long long n) {
    constexpr int N = lcpt::Pack<T>::N;
    lcpt::grid_stride_packed<N>(
        n, lcpt::aligned16(dgate) && lcpt::aligned16(dup) && lcpt::aligned16(dout) && lcpt::aligned16(gate) && lcpt::aligned16(up),
        [&](unsigned long long i) {
            const lcpt::Pack<T> g = lcpt::load_pack(gate, i), u = lcpt::load_pack(up, i), d = lcpt::load_pack(dout, i);
            lcpt::Pack<T> dg, du;
#pragma unroll
            for (int k = 0; k < N; ++k) {
                const float2 r = swiglu_grads(g.v[k], u.v[k], d.v[k]);
                dg.v[k] = r.x;
                du.v[k] = r.y;
            }
            lcpt::store_pack(dgate, i, dg);
            lcpt::store_pack(dup, i, du);
        },
        [&](unsigned long long j) {
            const float2 r = swiglu_grads(lcpt::to_f(gate[j]), lcpt::to_f(up[j]), lcpt::to_f(dout[j]));
            dgate[j] = lcpt::from_f<T>(r.x);
            dup[j] = lcpt::from_f<T>(r.y);
        });
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
