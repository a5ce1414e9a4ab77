// Elementwise kernels (f32 or bf16 storage, f32 arithmetic), and the bf16 <-> f32 casts.
// Grid-stride loops, 64-bit sizes, in 16-byte packs where every pointer is aligned (common.cuh).
#include "common.cuh"

// out = a + b; out may be a (add_assign), so neither is __restrict__.
template <typename T>
__device__ __forceinline__ void add_impl(T* out, const T* a, const T* __restrict__ b, unsigned long long n) {
    constexpr int N = lcpt::Pack<T>::N;
    lcpt::grid_stride_packed<N>(
        n, lcpt::aligned16(out) && lcpt::aligned16(a) && lcpt::aligned16(b),
        [&](unsigned long long i) {
            lcpt::Pack<T> x = lcpt::load_pack(a, i);
            const lcpt::Pack<T> y = lcpt::load_pack(b, i);
#pragma unroll
            for (int k = 0; k < N; ++k) x.v[k] += y.v[k];
            lcpt::store_pack(out, i, x);
        },
        [&](unsigned long long j) { out[j] = lcpt::from_f<T>(lcpt::to_f(a[j]) + lcpt::to_f(b[j])); });
}
template <typename T>
__device__ __forceinline__ void scale_impl(T* __restrict__ a, float s, unsigned long long n) {
    constexpr int N = lcpt::Pack<T>::N;
    lcpt::grid_stride_packed<N>(
        n, lcpt::aligned16(a),
        [&](unsigned long long i) {
            lcpt::Pack<T> x = lcpt::load_pack(a, i);
#pragma unroll
            for (int k = 0; k < N; ++k) x.v[k] *= s;
            lcpt::store_pack(a, i, x);
        },
        [&](unsigned long long j) { a[j] = lcpt::from_f<T>(lcpt::to_f(a[j]) * s); });
}

#define LCPT_ADD(S, T) \
    extern "C" __global__ void add_##S(T* out, const T* a, const T* b, unsigned long long n) { add_impl<T>(out, a, b, n); }
#define LCPT_ADD_ASSIGN(S, T) \
    extern "C" __global__ void add_assign_##S(T* a, const T* b, unsigned long long n) { add_impl<T>(a, a, b, n); }
#define LCPT_SCALE(S, T) \
    extern "C" __global__ void scale_##S(T* a, float s, unsigned long long n) { scale_impl<T>(a, s, n); }
LCPT_BOTH_TYPES(LCPT_ADD)
LCPT_BOTH_TYPES(LCPT_ADD_ASSIGN)
LCPT_BOTH_TYPES(LCPT_SCALE)

// Round to nearest even, NaN stays NaN (as ops::convert::f32_to_bf16). Packs of 8: two 16-byte
// f32 reads to one 16-byte bf16 write.
extern "C" __global__ void cast_f32_to_bf16(__nv_bfloat16* __restrict__ out, const float* __restrict__ in, unsigned long long n) {
    lcpt::grid_stride_packed<8>(
        n, lcpt::aligned16(out) && lcpt::aligned16(in),
        [&](unsigned long long i) {
            const lcpt::Pack<float> lo = lcpt::load_pack(in, 2 * i), hi = lcpt::load_pack(in, 2 * i + 1);
            lcpt::Pack<__nv_bfloat16> x;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                x.v[k] = lo.v[k];
                x.v[k + 4] = hi.v[k];
            }
            lcpt::store_pack(out, i, x);
        },
        [&](unsigned long long j) { out[j] = __float2bfloat16_rn(in[j]); });
}

extern "C" __global__ void cast_bf16_to_f32(float* __restrict__ out, const __nv_bfloat16* __restrict__ in, unsigned long long n) {
    lcpt::grid_stride_packed<8>(
        n, lcpt::aligned16(out) && lcpt::aligned16(in),
        [&](unsigned long long i) {
            const lcpt::Pack<__nv_bfloat16> x = lcpt::load_pack(in, i);
            lcpt::Pack<float> lo, hi;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                lo.v[k] = x.v[k];
                hi.v[k] = x.v[k + 4];
            }
            lcpt::store_pack(out, 2 * i, lo);
            lcpt::store_pack(out, 2 * i + 1, hi);
        },
        [&](unsigned long long j) { out[j] = __bfloat162float(in[j]); });
}
