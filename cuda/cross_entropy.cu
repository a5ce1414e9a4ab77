// Softmax cross-entropy over a large vocabulary (ops::cross_entropy), never materialising the
// probabilities: the forward makes one pass over each row with an online (max, sum) per thread and
// writes the row's log-sum-exp and loss; the backward recomputes softmax from lse in one pass.
// Rows whose target is -100 give loss 0 and gradient 0. One block per row. Logits and their
// gradient have the storage type T; lse and the per-row losses are f32. The softmax denominator is
// accumulated in f64 (each exp stays f32), the row's loss taken in f64: an f32 running sum loses
// accuracy as the vocabulary grows (as ops::cross_entropy explains); the pass is memory-bound, so the
// f64 adds cost nothing visible.
#include "common.cuh"

__device__ __forceinline__ void lcpt_online_add(float& m, double& s, float x) {
    if (x > m) {
        s = s * (double)expf(m - x) + 1.0;  // m = -inf: expf(-inf) = 0
        m = x;
    } else {
        s += (double)expf(x - m);
    }
}

__device__ __forceinline__ void lcpt_online_merge(float& m, double& s, float m2, double s2) {
    const float mx = fmaxf(m, m2);
    if (mx == -INFINITY) return;  // both empty
    s = (m == -INFINITY ? 0.0 : s * (double)expf(m - mx)) + (m2 == -INFINITY ? 0.0 : s2 * (double)expf(m2 - mx));
    m = mx;
}

// lse[row], loss[row] = lse − logits[target] (0 when ignored; NaN for a target outside the vocab).
template <typename T>
__device__ __forceinline__ void cross_entropy_fwd_impl(float* __restrict__ lse, float* __restrict__ loss, const T* __restrict__ logits,
                                                       const int* __restrict__ targets, int vocab) {
    __shared__ float sm[32];
    __shared__ double ss[32];
    const unsigned long long row = blockIdx.x;
    const T* x = logits + row * vocab;
    float m = -INFINITY;
    double s = 0.0;
    constexpr int N = lcpt::Pack<T>::N;
    if (vocab % N == 0 && lcpt::aligned16(logits)) {
        for (int c = threadIdx.x; c < vocab / N; c += blockDim.x) {
            const lcpt::Pack<T> v = lcpt::load_pack(x, c);
#pragma unroll
            for (int k = 0; k < N; ++k) lcpt_online_add(m, s, v.v[k]);
        }
    } else {
        for (int c = threadIdx.x; c < vocab; c += blockDim.x) lcpt_online_add(m, s, lcpt::to_f(x[c]));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const double s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lcpt_online_merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < nwarps ? sm[lane] : -INFINITY;
        s = lane < nwarps ? ss[lane] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
            const double s2 = __shfl_xor_sync(0xffffffffu, s, o);
            lcpt_online_merge(m, s, m2, s2);
        }
        if (lane == 0) {
            const double l = (double)m + log(s);
            lse[row] = (float)l;
            const int t = targets[row];
            float li = 0.f;
            if (t != LCPT_IGNORE_INDEX) li = (t >= 0 && t < vocab) ? (float)(l - (double)lcpt::to_f(x[t])) : __int_as_float(0x7fc00000);
            loss[row] = li;
        }
    }
}

// dlogits = scale·(softmax − onehot(target)) on counted rows, 0 on ignored ones; scale = dloss/n_valid.
template <typename T>
__device__ __forceinline__ void cross_entropy_bwd_impl(T* __restrict__ dlogits, const T* __restrict__ logits, const float* __restrict__ lse,
                                                       const int* __restrict__ targets, int vocab, float scale) {
    const unsigned long long row = blockIdx.x;
    const T* x = logits + row * vocab;
    T* d = dlogits + row * vocab;
    const int t = targets[row];
    constexpr int N = lcpt::Pack<T>::N;
    const bool packed = vocab % N == 0 && lcpt::aligned16(logits) && lcpt::aligned16(dlogits);
    if (t == LCPT_IGNORE_INDEX) {
        if (packed)
            for (int c = threadIdx.x; c < vocab / N; c += blockDim.x) lcpt::store_pack(d, c, lcpt::Pack<T>{});
        else
            for (int c = threadIdx.x; c < vocab; c += blockDim.x) d[c] = lcpt::from_f<T>(0.f);
        return;
    }
    const float l = lse[row];
    if (packed) {
        for (int c = threadIdx.x; c < vocab / N; c += blockDim.x) {
            const lcpt::Pack<T> v = lcpt::load_pack(x, c);
            lcpt::Pack<T> o;
#pragma unroll
            for (int k = 0; k < N; ++k) o.v[k] = expf(v.v[k] - l) * scale - (N * c + k == t ? scale : 0.f);
            lcpt::store_pack(d, c, o);
        }
    } else {
        for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
            float o = expf(lcpt::to_f(x[c]) - l) * scale;
            if (c == t) o -= scale;
            d[c] = lcpt::from_f<T>(o);
        }
    }
}

#define LCPT_CE_FWD(S, T)                                                                                                         \
    extern "C" __global__ void __launch_bounds__(512) cross_entropy_fwd_##S(float* lse, float* loss, const T* logits,            \
                                                                             const int* targets, int vocab) {                    \
        cross_entropy_fwd_impl<T>(lse, loss, logits, targets, vocab);                                                            \
    }
#define LCPT_CE_BWD(S, T)                                                                                                         \
    extern "C" __global__ void __launch_bounds__(512) cross_entropy_bwd_##S(T* dlogits, const T* logits, const float* lse,       \
                                                                             const int* targets, int vocab, float scale) {       \
        cross_entropy_bwd_impl<T>(dlogits, logits, lse, targets, vocab, scale);                                                  \
    }
LCPT_BOTH_TYPES(LCPT_CE_FWD)
LCPT_BOTH_TYPES(LCPT_CE_BWD)
