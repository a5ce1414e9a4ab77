// RMSNorm as in LLaMA (ops::rmsnorm): y = w · x / sqrt(mean(x²) + eps), statistics in f32.
// x, w, y, dy, dx have the storage type T; rstd and dw are f32.
// Forward: one block per row. Backward: dx one block per row; dw (accumulated) in two
// deterministic passes: per-chunk-of-rows partial sums [chunks, dim], then a reduction over the
// chunks in order.
#include "common.cuh"

// The second half of a norm, shared by the plain and the fused forward: `ss` is this thread's part
// of Σx² over the row; writes rstd and y = w · x · rstd.
template <typename T>
__device__ __forceinline__ void normalize_row(T* __restrict__ yr, float* __restrict__ rstd, const T* __restrict__ xr, const T* __restrict__ w, float ss,
                                              int dim, float eps, float inv_dim, float* scratch) {
    ss = lcpt::block_sum(ss, scratch);
    const float inv = 1.f / sqrtf(ss * inv_dim + eps);
    if (threadIdx.x == 0) *rstd = inv;
    if ((dim & 3) == 0) {
        for (int c = threadIdx.x; c < dim / 4; c += blockDim.x) {
            const float4 v = lcpt::load4(xr, c), g = lcpt::load4(w, c);
            lcpt::store4(yr, c, make_float4(g.x * (v.x * inv), g.y * (v.y * inv), g.z * (v.z * inv), g.w * (v.w * inv)));
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
    const bool vec = (dim & 3) == 0;
    if (vec) {
        for (int c = threadIdx.x; c < dim / 4; c += blockDim.x) {
            const float4 v = lcpt::load4(xr, c);
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
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
    const bool vec = (dim & 3) == 0;
    float gx = 0.f;
    if (vec) {
        for (int c = threadIdx.x; c < dim / 4; c += blockDim.x) {
            const float4 a = lcpt::load4(xr, c), d = lcpt::load4(dyr, c), g = lcpt::load4(w, c);
            gx += d.x * g.x * a.x + d.y * g.y * a.y + d.z * g.z * a.z + d.w * g.w * a.w;
        }
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) gx += lcpt::to_f(dyr[c]) * lcpt::to_f(w[c]) * lcpt::to_f(xr[c]);
    }
    gx = lcpt::block_sum(gx, scratch);
    const float r = rstd[row];
    const float k = r * r * r * gx * inv_dim;
    if (vec) {
        for (int c = threadIdx.x; c < dim / 4; c += blockDim.x) {
            const float4 a = lcpt::load4(xr, c), d = lcpt::load4(dyr, c), g = lcpt::load4(w, c);
            lcpt::store4(dxr, c, make_float4(r * d.x * g.x - a.x * k, r * d.y * g.y - a.y * k, r * d.z * g.z - a.z * k, r * d.w * g.w - a.w * k));
        }
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) dxr[c] = lcpt::from_f<T>(r * lcpt::to_f(dyr[c]) * lcpt::to_f(w[c]) - lcpt::to_f(xr[c]) * k);
    }
}

// partial[chunk, c] = Σ over rows [chunk·rows_per_chunk, …) of dy·x·r. grid (ceil(dim/blockDim), chunks).
template <typename T>
__device__ __forceinline__ void rmsnorm_bwd_dw_partial_impl(float* __restrict__ partial, const T* __restrict__ dy, const T* __restrict__ x,
                                                            const float* __restrict__ rstd, unsigned long long rows, int dim, int rows_per_chunk) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    const unsigned long long r0 = (unsigned long long)blockIdx.y * rows_per_chunk;
    unsigned long long r1 = r0 + rows_per_chunk;
    if (r1 > rows) r1 = rows;
    float acc = 0.f;
    for (unsigned long long r = r0; r < r1; ++r) acc += lcpt::to_f(dy[r * dim + c]) * lcpt::to_f(x[r * dim + c]) * rstd[r];
    partial[(unsigned long long)blockIdx.y * dim + c] = acc;
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

// dw[c] += Σ_chunk partial[chunk, c], chunks in order (dw is f32 in both precisions).
extern "C" __global__ void __launch_bounds__(256) rmsnorm_bwd_dw_reduce(float* __restrict__ dw, const float* __restrict__ partial, int chunks, int dim) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    float acc = 0.f;
    for (int k = 0; k < chunks; ++k) acc += partial[(unsigned long long)k * dim + c];
    dw[c] += acc;
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
    const bool vec = (dim & 3) == 0;
    if (vec) {
        for (int c = threadIdx.x; c < dim / 4; c += blockDim.x) {
            const float4 a = lcpt::load4(xr, c), b = lcpt::load4(rr, c);
            lcpt::store4(hr, c, make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w));
            const float4 v = lcpt::load4(hr, c);  // as stored (rounded in bf16)
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
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
