// RMSNorm as in LLaMA (ops::rmsnorm): y = w · x / sqrt(mean(x²) + eps), statistics in f32.
// x, w, y, dy, dx have the storage type T; rstd and dw are f32.
// Forward: one block per row. Backward: dx one block per row; dw (accumulated) in two
// deterministic passes: per-chunk-of-rows partial sums [chunks, dim], then a reduction over the
// chunks in order.
#include "common.cuh"

// Rows of `dim` elements starting at these pointers are read and written in 16-byte packs of n:
// dim a multiple of n and every row start aligned (the bases aligned; rows then are too).
template <typename... P>
__device__ __forceinline__ bool packed_rows(int dim, int n, const P*... rows) {
    return dim % n == 0 && (lcpt::aligned16(rows) && ...);
}

// The second half of a norm, shared by the plain and the fused forward: `ss` is this thread's part
// of Σx² over the row; writes rstd and y = w · x · rstd.
template <typename T>
__device__ __forceinline__ void normalize_row(T* __restrict__ yr, float* __restrict__ rstd, const T* __restrict__ xr, const T* __restrict__ w, float ss,
                                              int dim, float eps, float inv_dim, float* scratch) {
    ss = lcpt::block_sum(ss, scratch);
    const float inv = 1.f / sqrtf(ss * inv_dim + eps);
    if (threadIdx.x == 0) *rstd = inv;
    constexpr int N = lcpt::Pack<T>::N;
    if (packed_rows(dim, N, xr, w, yr)) {
        for (int c = threadIdx.x; c < dim / N; c += blockDim.x) {
            const lcpt::Pack<T> v = lcpt::load_pack(xr, c), g = lcpt::load_pack(w, c);
            lcpt::Pack<T> o;
#pragma unroll
            for (int k = 0; k < N; ++k) o.v[k] = g.v[k] * (v.v[k] * inv);
            lcpt::store_pack(yr, c, o);
        }
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) yr[c] = lcpt::from_f<T>(lcpt::to_f(w[c]) * (lcpt::to_f(xr[c]) * inv));
    }
}

template <typename T>
__device__ __forceinline__ void rmsnorm_fwd_impl(T* __restrict__ y, float* __restrict__ rstd, const T* __restrict__ x, const T* __restrict__ w, int dim,
                                                 float eps, float inv_dim) {
    __shared__ float scratch[32];
    const unsigned long long row = blockIdx.x;
    const T* xr = x + row * dim;
    T* yr = y + row * dim;
    float ss = 0.f;
    constexpr int N = lcpt::Pack<T>::N;
    if (packed_rows(dim, N, x, y)) {
        for (int c = threadIdx.x; c < dim / N; c += blockDim.x) {
            const lcpt::Pack<T> v = lcpt::load_pack(xr, c);
#pragma unroll
            for (int k = 0; k < N; ++k) ss += v.v[k] * v.v[k];
        }
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) {
            const float v = lcpt::to_f(xr[c]);
            ss += v * v;
        }
    }
    normalize_row<T>(yr, rstd + row, xr, w, ss, dim, eps, inv_dim, scratch);
}

// dx = r·dy·w − x·r³·mean(dy·w·x), one block per row.
template <typename T>
__device__ __forceinline__ void rmsnorm_bwd_dx_impl(T* __restrict__ dx, const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                                    const float* __restrict__ rstd, int dim, float inv_dim) {
    __shared__ float scratch[32];
    const unsigned long long row = blockIdx.x;
    const T* xr = x + row * dim;
    const T* dyr = dy + row * dim;
    T* dxr = dx + row * dim;
    constexpr int N = lcpt::Pack<T>::N;
    const bool packed = packed_rows(dim, N, dx, dy, x, w);
    float gx = 0.f;
    if (packed) {
        for (int c = threadIdx.x; c < dim / N; c += blockDim.x) {
            const lcpt::Pack<T> a = lcpt::load_pack(xr, c), d = lcpt::load_pack(dyr, c), g = lcpt::load_pack(w, c);
#pragma unroll
            for (int k = 0; k < N; ++k) gx += d.v[k] * g.v[k] * a.v[k];
        }
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) gx += lcpt::to_f(dyr[c]) * lcpt::to_f(w[c]) * lcpt::to_f(xr[c]);
    }
    gx = lcpt::block_sum(gx, scratch);
    const float r = rstd[row];
    const float k = r * r * r * gx * inv_dim;
    if (packed) {
        for (int c = threadIdx.x; c < dim / N; c += blockDim.x) {
            const lcpt::Pack<T> a = lcpt::load_pack(xr, c), d = lcpt::load_pack(dyr, c), g = lcpt::load_pack(w, c);
            lcpt::Pack<T> o;
#pragma unroll
            for (int e = 0; e < N; ++e) o.v[e] = r * d.v[e] * g.v[e] - a.v[e] * k;
            lcpt::store_pack(dxr, c, o);
        }
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) dxr[c] = lcpt::from_f<T>(r * lcpt::to_f(dyr[c]) * lcpt::to_f(w[c]) - lcpt::to_f(xr[c]) * k);
    }
}

// partial[chunk, c] = Σ over rows [chunk·rows_per_chunk, …) of dy·x·r. grid (any, chunks): the
// threads along x stride over the row's packs of N columns (or single columns where not packed).
template <typename T>
__device__ __forceinline__ void rmsnorm_bwd_dw_partial_impl(float* __restrict__ partial, const T* __restrict__ dy, const T* __restrict__ x,
                                                            const float* __restrict__ rstd, unsigned long long rows, int dim, int rows_per_chunk) {
    constexpr int N = lcpt::Pack<T>::N;
    const unsigned long long r0 = (unsigned long long)blockIdx.y * rows_per_chunk;
    const unsigned long long r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
    float* out = partial + (unsigned long long)blockIdx.y * dim;
    const bool packed = packed_rows(dim, N, dy, x, partial);
    const int units = packed ? dim / N : dim;
    for (int u = blockIdx.x * blockDim.x + threadIdx.x; u < units; u += gridDim.x * blockDim.x) {
        if (packed) {
            float acc[N] = {};
            for (unsigned long long r = r0; r < r1; ++r) {
                const lcpt::Pack<T> d = lcpt::load_pack(dy + r * dim, u), v = lcpt::load_pack(x + r * dim, u);
                const float rs = rstd[r];
#pragma unroll
                for (int k = 0; k < N; ++k) acc[k] += d.v[k] * v.v[k] * rs;
            }
            lcpt::store_f32s(out, u, acc);
        } else {
            float acc = 0.f;
            for (unsigned long long r = r0; r < r1; ++r) acc += lcpt::to_f(dy[r * dim + u]) * lcpt::to_f(x[r * dim + u]) * rstd[r];
            out[u] = acc;
        }
    }
}

#define LCPT_RMS_FWD(S, T)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) rmsnorm_fwd_##S(T* y, float* rstd, const T* x, const T* w, int dim,  \
                                                                       float eps, float inv_dim) {                          \
        rmsnorm_fwd_impl<T>(y, rstd, x, w, dim, eps, inv_dim);                                                             \
    }
#define LCPT_RMS_BWD_DX(S, T)                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) rmsnorm_bwd_dx_##S(T* dx, const T* dy, const T* x, const T* w,          \
                                                                          const float* rstd, int dim, float inv_dim) {         \
        rmsnorm_bwd_dx_impl<T>(dx, dy, x, w, rstd, dim, inv_dim);                                                              \
    }
#define LCPT_RMS_BWD_DW(S, T)                                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) rmsnorm_bwd_dw_partial_##S(float* partial, const T* dy, const T* x,           \
                                                                                  const float* rstd, unsigned long long rows,       \
                                                                                  int dim, int rows_per_chunk) {                    \
        rmsnorm_bwd_dw_partial_impl<T>(partial, dy, x, rstd, rows, dim, rows_per_chunk);                                             \
    }
LCPT_BOTH_TYPES(LCPT_RMS_FWD)
LCPT_BOTH_TYPES(LCPT_RMS_BWD_DX)
LCPT_BOTH_TYPES(LCPT_RMS_BWD_DW)

// dw[c] += Σ_chunk partial[chunk, c], chunks in order (dw is f32 in both precisions); threads
// stride over packs of 4 columns (or single columns).
extern "C" __global__ void __launch_bounds__(256) rmsnorm_bwd_dw_reduce(float* __restrict__ dw, const float* __restrict__ partial, int chunks, int dim) {
    const bool packed = packed_rows(dim, 4, dw, partial);
    const int units = packed ? dim / 4 : dim;
    for (int u = blockIdx.x * blockDim.x + threadIdx.x; u < units; u += gridDim.x * blockDim.x) {
        if (packed) {
            lcpt::Pack<float> acc = {};
            for (int k = 0; k < chunks; ++k) {
                const lcpt::Pack<float> p = lcpt::load_pack(partial + (unsigned long long)k * dim, u);
#pragma unroll
                for (int e = 0; e < 4; ++e) acc.v[e] += p.v[e];
            }
            lcpt::Pack<float> d = lcpt::load_pack(dw, u);
#pragma unroll
            for (int e = 0; e < 4; ++e) d.v[e] += acc.v[e];
            lcpt::store_pack(dw, u, d);
        } else {
            float acc = 0.f;
            for (int k = 0; k < chunks; ++k) acc += partial[(unsigned long long)k * dim + u];
            dw[u] += acc;
        }
    }
}

// Fused residual add + RMSNorm (forward): h = x + r, y = w · h / sqrt(mean(h²) + eps), one block
// per row. h is written first and read back by the same thread (so in bf16 the norm sees the
// rounded h, exactly as the unfused add then rmsnorm would): 2 reads + 2 writes of a row instead
// of 3 reads + 2 writes.
template <typename T>
__device__ __forceinline__ void add_rmsnorm_fwd_impl(T* __restrict__ h, T* __restrict__ y, float* __restrict__ rstd, const T* __restrict__ x,
                                                     const T* __restrict__ r, const T* __restrict__ w, int dim, float eps, float inv_dim) {
    __shared__ float scratch[32];
    const unsigned long long row = blockIdx.x;
    const T* xr = x + row * dim;
    const T* rr = r + row * dim;
    T* hr = h + row * dim;
    T* yr = y + row * dim;
    float ss = 0.f;
    constexpr int N = lcpt::Pack<T>::N;
    if (packed_rows(dim, N, x, r, h, y)) {
        for (int c = threadIdx.x; c < dim / N; c += blockDim.x) {
            lcpt::Pack<T> a = lcpt::load_pack(xr, c);
            const lcpt::Pack<T> b = lcpt::load_pack(rr, c);
#pragma unroll
            for (int k = 0; k < N; ++k) a.v[k] += b.v[k];
            lcpt::store_pack(hr, c, a);
            const lcpt::Pack<T> v = lcpt::load_pack(hr, c);  // as stored (rounded in bf16)
#pragma unroll
            for (int k = 0; k < N; ++k) ss += v.v[k] * v.v[k];
        }
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) {
            hr[c] = lcpt::from_f<T>(lcpt::to_f(xr[c]) + lcpt::to_f(rr[c]));
            const float v = lcpt::to_f(hr[c]);
            ss += v * v;
        }
    }
    normalize_row<T>(yr, rstd + row, hr, w, ss, dim, eps, inv_dim, scratch);
}

#define LCPT_ADD_RMS_FWD(S, T)                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) add_rmsnorm_fwd_##S(T* h, T* y, float* rstd, const T* x, const T* r,        \
                                                                           const T* w, int dim, float eps, float inv_dim) {       \
        add_rmsnorm_fwd_impl<T>(h, y, rstd, x, r, w, dim, eps, inv_dim);                                                          \
    }
LCPT_BOTH_TYPES(LCPT_ADD_RMS_FWD)
