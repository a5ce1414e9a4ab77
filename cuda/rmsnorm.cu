// RMSNorm as in LLaMA (ops::rmsnorm): y = w · x / sqrt(mean(x²) + eps), statistics in f32.
// Forward: one block per row. Backward: dx one block per row; dw (accumulated) in two
// deterministic passes: per-chunk-of-rows partial sums [chunks, dim], then a reduction over the
// chunks in order.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) rmsnorm_fwd(float* __restrict__ y, float* __restrict__ rstd, const float* __restrict__ x,
                                                               const float* __restrict__ w, int dim, float eps, float inv_dim) {
    __shared__ float scratch[32];
    const unsigned long long row = blockIdx.x;
    const float* xr = x + row * dim;
    float* yr = y + row * dim;
    float ss = 0.f;
    const bool vec = (dim & 3) == 0;
    if (vec) {
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        for (int c = threadIdx.x; c < dim / 4; c += blockDim.x) {
            const float4 v = x4[c];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) ss += xr[c] * xr[c];
    }
    ss = lcpt::block_sum(ss, scratch);
    const float inv = 1.f / sqrtf(ss * inv_dim + eps);
    if (threadIdx.x == 0) rstd[row] = inv;
    if (vec) {
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        const float4* w4 = reinterpret_cast<const float4*>(w);
        float4* y4 = reinterpret_cast<float4*>(yr);
        for (int c = threadIdx.x; c < dim / 4; c += blockDim.x) {
            const float4 v = x4[c], g = w4[c];
            y4[c] = make_float4(g.x * (v.x * inv), g.y * (v.y * inv), g.z * (v.z * inv), g.w * (v.w * inv));
        }
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) yr[c] = w[c] * (xr[c] * inv);
    }
}

// dx = r·dy·w − x·r³·mean(dy·w·x), one block per row.
extern "C" __global__ void __launch_bounds__(256) rmsnorm_bwd_dx(float* __restrict__ dx, const float* __restrict__ dy, const float* __restrict__ x,
                                                                  const float* __restrict__ w, const float* __restrict__ rstd, int dim, float inv_dim) {
    __shared__ float scratch[32];
    const unsigned long long row = blockIdx.x;
    const float* xr = x + row * dim;
    const float* dyr = dy + row * dim;
    float* dxr = dx + row * dim;
    const bool vec = (dim & 3) == 0;
    float gx = 0.f;
    if (vec) {
        const float4 *x4 = reinterpret_cast<const float4*>(xr), *d4 = reinterpret_cast<const float4*>(dyr), *w4 = reinterpret_cast<const float4*>(w);
        for (int c = threadIdx.x; c < dim / 4; c += blockDim.x) {
            const float4 a = x4[c], d = d4[c], g = w4[c];
            gx += d.x * g.x * a.x + d.y * g.y * a.y + d.z * g.z * a.z + d.w * g.w * a.w;
        }
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) gx += dyr[c] * w[c] * xr[c];
    }
    gx = lcpt::block_sum(gx, scratch);
    const float r = rstd[row];
    const float k = r * r * r * gx * inv_dim;
    if (vec) {
        const float4 *x4 = reinterpret_cast<const float4*>(xr), *d4 = reinterpret_cast<const float4*>(dyr), *w4 = reinterpret_cast<const float4*>(w);
        float4* o4 = reinterpret_cast<float4*>(dxr);
        for (int c = threadIdx.x; c < dim / 4; c += blockDim.x) {
            const float4 a = x4[c], d = d4[c], g = w4[c];
            o4[c] = make_float4(r * d.x * g.x - a.x * k, r * d.y * g.y - a.y * k, r * d.z * g.z - a.z * k, r * d.w * g.w - a.w * k);
        }
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) dxr[c] = r * dyr[c] * w[c] - xr[c] * k;
    }
}

// partial[chunk, c] = Σ over rows [chunk·rows_per_chunk, …) of dy·x·r. grid (ceil(dim/blockDim), chunks).
extern "C" __global__ void __launch_bounds__(256) rmsnorm_bwd_dw_partial(float* __restrict__ partial, const float* __restrict__ dy,
                                                                          const float* __restrict__ x, const float* __restrict__ rstd,
                                                                          unsigned long long rows, int dim, int rows_per_chunk) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    const unsigned long long r0 = (unsigned long long)blockIdx.y * rows_per_chunk;
    unsigned long long r1 = r0 + rows_per_chunk;
    if (r1 > rows) r1 = rows;
    float acc = 0.f;
    for (unsigned long long r = r0; r < r1; ++r) acc += dy[r * dim + c] * x[r * dim + c] * rstd[r];
    partial[(unsigned long long)blockIdx.y * dim + c] = acc;
}

// dw[c] += Σ_chunk partial[chunk, c], chunks in order.
extern "C" __global__ void __launch_bounds__(256) rmsnorm_bwd_dw_reduce(float* __restrict__ dw, const float* __restrict__ partial, int chunks, int dim) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    float acc = 0.f;
    for (int k = 0; k < chunks; ++k) acc += partial[(unsigned long long)k * dim + c];
    dw[c] += acc;
}
