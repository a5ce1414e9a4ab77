// Σ x² with f64 accumulation, for the global gradient norm. Each block writes one partial sum
// (a fixed grid, so a fixed order); the host adds the partials in order: deterministic. 16-byte
// packs where aligned.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void sum_squares_impl(double* __restrict__ partial, const T* __restrict__ x, unsigned long long n) {
    __shared__ double scratch[32];
    double acc = 0.0;
    constexpr int N = lcpt::Pack<T>::N;
    lcpt::grid_stride_packed<N>(
        n, lcpt::aligned16(x),
        [&](unsigned long long i) {
            const lcpt::Pack<T> p = lcpt::load_pack(x, i);
#pragma unroll
            for (int k = 0; k < N; ++k) acc += (double)p.v[k] * p.v[k];
        },
        [&](unsigned long long i) {
            const double v = lcpt::to_f(x[i]);
            acc += v * v;
        });
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    acc = lcpt::warp_sum_d(acc);
    if (lane == 0) scratch[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        double t = lane < nwarps ? scratch[lane] : 0.0;
        t = lcpt::warp_sum_d(t);
        if (lane == 0) partial[blockIdx.x] = t;
    }
}

#define LCPT_SUMSQ(S, T) \
    extern "C" __global__ void sum_squares_partial_##S(double* partial, const T* x, unsigned long long n) { sum_squares_impl<T>(partial, x, n); }
LCPT_BOTH_TYPES(LCPT_SUMSQ)
