// Causal self-attention with grouped-query heads and per-document masking, FlashAttention-2 style
// (the algorithm of ops::attention): tiled, online softmax, logsumexp saved for the backward, never
// an S×S matrix in memory.
//
// Layouts (row-major; f32 or bf16 in device memory, the storage type T of the entry point's
// suffix _f32/_bf16; lse and delta always f32): q, out, dout, dq [tokens, heads, D]; k, v, dk, dv
// [tokens, kv_heads, D]; lse, delta [tokens, heads]. Query head h reads key/value head
// h / (heads / kv_heads) in place (no repeated K/V).
//
// Documents: the host cuts every document into tiles that never cross a document boundary and
// passes them as int4 {doc_start, doc_end, tile_start, 0}; block x = one tile, block y = one head.
//
// Tensor-core kernels (head_dim 64 and 128): 4 warps, 16 rows each; tiles are converted to bf16
// on their way into shared memory and multiplied with mma.sync m16n8k16 (bf16 in, f32 accumulate);
// the softmax, its statistics and all accumulators are f32. The probabilities are rounded to bf16
// for the P·V product (as FlashAttention does).
//   forward      attn_fwd_d{64,128}       grid (query tiles of 64, heads)
//   backward     attn_delta               D_i = dO_i·O_i (f32)
//                attn_bwd_fused_d{64,128} grid (key tiles of 64, heads): dK, dV and dQ in one pass
//                                         (five matmuls), added into f32 accumulators with red.add
//     or, deterministic (AttnKernel::Tiled / Deterministic), seven matmuls without atomics:
//                attn_bwd_dq_d{64,128}    grid (query tiles of 64, heads): dQ
//                attn_bwd_dkdv_d{64,128}  grid (key tiles of 64, kv_heads): dK, dV over every query
//                                         head of the group
// Every other head_dim (even, <= 256) runs the simple kernels attn_*_simple (f32 arithmetic): one warp per
// (token, head), correct but slow.
#include "common.cuh"

namespace lcpt_attn {

typedef __nv_bfloat16 bf16;
constexpr int BM = 64;     // query rows per block (forward, dQ)
constexpr int BN = 64;     // keys per tile (forward, dQ) and per block (dK/dV)
constexpr int BMQ = 32;    // query rows per step of the dK/dV kernel
constexpr int THREADS = 128;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// Rows [row0, row0 + R) of head h of a [tokens, nh, D] tensor into shared bf16 [R][LD]; rows
// at or past `limit` are zero.
template <int R, int D, int LD, typename T>
__device__ __forceinline__ void load_rows(bf16* dst, const T* __restrict__ src, int row0, int limit, int nh, int h) {
    constexpr int C4 = D / 4;
    for (int idx = threadIdx.x; idx < R * C4; idx += THREADS) {
        const int r = idx / C4, c = (idx % C4) * 4;
        const int t = row0 + r;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (t < limit) v = lcpt::load4(src + ((size_t)t * nh + h) * D + c, 0);
        uint2 p;
        p.x = lcpt::pack_bf16x2(v.x, v.y);
        p.y = lcpt::pack_bf16x2(v.z, v.w);
        *reinterpret_cast<uint2*>(dst + r * LD + c) = p;
    }
}

// The same rows, transposed: dst[c][r], [D][LDT].
template <int R, int D, int LDT, typename T>
__device__ __forceinline__ void load_rows_t(bf16* dst, const T* __restrict__ src, int row0, int limit, int nh, int h) {
    constexpr int C4 = D / 4;
    for (int idx = threadIdx.x; idx < R * C4; idx += THREADS) {
        const int r = idx % R, c = (idx / R) * 4;  // consecutive threads: consecutive rows
        const int t = row0 + r;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (t < limit) v = lcpt::load4(src + ((size_t)t * nh + h) * D + c, 0);
        dst[(c + 0) * LDT + r] = __float2bfloat16_rn(v.x);
        dst[(c + 1) * LDT + r] = __float2bfloat16_rn(v.y);
        dst[(c + 2) * LDT + r] = __float2bfloat16_rn(v.z);
        dst[(c + 3) * LDT + r] = __float2bfloat16_rn(v.w);
    }
}

__device__ __forceinline__ uint32_t ld32(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// A fragment (16×16, rows r0.., cols c0..) of a row-major bf16 tile with leading dimension ld.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16* base, int ld, int r0, int c0, int g, int tig) {
    a[0] = ld32(base + (r0 + g) * ld + c0 + tig * 2);
    a[1] = ld32(base + (r0 + g + 8) * ld + c0 + tig * 2);
    a[2] = ld32(base + (r0 + g) * ld + c0 + 8 + tig * 2);
    a[3] = ld32(base + (r0 + g + 8) * ld + c0 + 8 + tig * 2);
}

// A fragment from two accumulator tiles (16×8 each, f32) side by side: the FA2 register reuse.
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
    a[0] = lcpt::pack_bf16x2(lo[0], lo[1]);
    a[1] = lcpt::pack_bf16x2(lo[2], lo[3]);
    a[2] = lcpt::pack_bf16x2(hi[0], hi[1]);
    a[3] = lcpt::pack_bf16x2(hi[2], hi[3]);
}

template <int D, typename T>
__device__ __forceinline__ void fwd_body(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ q, const T* __restrict__ k,
                                         const T* __restrict__ v, const int4* __restrict__ tiles, int heads, int kv_heads, float scale_log2) {
    constexpr int LD = D + 8, LDT = BN + 8;
    bf16* Qs = lcpt::dynamic_smem<bf16>();
    bf16* Ks = Qs + BM * LD;
    bf16* Vt = Ks + BN * LD;
    const int4 tile = tiles[blockIdx.x];
    const int s0 = tile.x, s1 = tile.y, i0 = tile.z;
    const int h = blockIdx.y, kvh = h / (heads / kv_heads);
    const int i1 = min(i0 + BM, s1);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    const int row_a = i0 + warp * 16 + g, row_b = row_a + 8;

    load_rows<BM, D, LD>(Qs, q, i0, i1, heads, h);
    __syncthreads();
    uint32_t qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a(qf[kk], Qs, LD, warp * 16, kk * 16, g, tig);

    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    for (int j0 = s0; j0 < i1; j0 += BN) {
        __syncthreads();
        load_rows<BN, D, LD>(Ks, k, j0, i1, kv_heads, kvh);
        load_rows_t<BN, D, LDT>(Vt, v, j0, i1, kv_heads, kvh);
        __syncthreads();
        float s[BN / 8][4];
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const bf16* kr = Ks + (nt * 8 + g) * LD + kk * 16 + tig * 2;
                lcpt::mma_bf16_16816(s[nt], qf[kk], ld32(kr), ld32(kr + 8));
            }
        }
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = e < 2 ? row_a : row_b;
                const int j = j0 + nt * 8 + tig * 2 + (e & 1);
                const float val = (j <= row && row < s1) ? s[nt][e] * scale_log2 : -INFINITY;
                s[nt][e] = val;
                mx[e >> 1] = fmaxf(mx[e >> 1], val);
            }
        float mu[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float m_new = fmaxf(m[r], mx[r]);
            mu[r] = m_new == -INFINITY ? 0.f : m_new;
            const float alpha = exp2f(m[r] - mu[r]);
            m[r] = m_new;
            l[r] *= alpha;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                o[dt][2 * r] *= alpha;
                o[dt][2 * r + 1] *= alpha;
            }
        }
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(s[nt][e] - mu[e >> 1]);
                s[nt][e] = p;
                l[e >> 1] += p;
            }
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[4];
            acc_to_a(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                const bf16* vr = Vt + (dt * 8 + g) * LDT + kk * 16 + tig * 2;
                lcpt::mma_bf16_16816(o[dt], a, ld32(vr), ld32(vr + 8));
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        const int row = r ? row_b : row_a;
        if (row < s1) {
            const float inv = 1.f / l[r];
            T* orow = out + ((size_t)row * heads + h) * D + tig * 2;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) lcpt::store2(orow + dt * 8, o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
            if (tig == 0) lse[(size_t)row * heads + h] = (m[r] + log2f(l[r])) * LN2;
        }
    }
}

template <int D, typename T>
__device__ __forceinline__ void bwd_dq_body(T* __restrict__ dq, const T* __restrict__ q, const T* __restrict__ k,
                                            const T* __restrict__ v, const T* __restrict__ dout, const float* __restrict__ lse,
                                            const float* __restrict__ delta, const int4* __restrict__ tiles, int heads, int kv_heads, float scale,
                                            float scale_log2) {
    constexpr int LD = D + 8, LDT = BN + 8;
    bf16* Qs = lcpt::dynamic_smem<bf16>();
    bf16* dOs = Qs + BM * LD;
    bf16* Ks = dOs + BM * LD;
    bf16* Vs = Ks + BN * LD;
    bf16* Kt = Vs + BN * LD;
    const int4 tile = tiles[blockIdx.x];
    const int s0 = tile.x, s1 = tile.y, i0 = tile.z;
    const int h = blockIdx.y, kvh = h / (heads / kv_heads);
    const int i1 = min(i0 + BM, s1);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    const int row_a = i0 + warp * 16 + g, row_b = row_a + 8;
    float lse2[2], dl[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = r ? row_b : row_a;
        lse2[r] = row < s1 ? lse[(size_t)row * heads + h] * LOG2E : INFINITY;
        dl[r] = row < s1 ? delta[(size_t)row * heads + h] : 0.f;
    }
    load_rows<BM, D, LD>(Qs, q, i0, i1, heads, h);
    load_rows<BM, D, LD>(dOs, dout, i0, i1, heads, h);
    float acc[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;

    for (int j0 = s0; j0 < i1; j0 += BN) {
        __syncthreads();
        load_rows<BN, D, LD>(Ks, k, j0, i1, kv_heads, kvh);
        load_rows<BN, D, LD>(Vs, v, j0, i1, kv_heads, kvh);
        load_rows_t<BN, D, LDT>(Kt, k, j0, i1, kv_heads, kvh);
        __syncthreads();
        float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[4], b[4];
            load_a(a, Qs, LD, warp * 16, kk * 16, g, tig);
            load_a(b, dOs, LD, warp * 16, kk * 16, g, tig);
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                const bf16* kr = Ks + (nt * 8 + g) * LD + kk * 16 + tig * 2;
                const bf16* vr = Vs + (nt * 8 + g) * LD + kk * 16 + tig * 2;
                lcpt::mma_bf16_16816(s[nt], a, ld32(kr), ld32(kr + 8));
                lcpt::mma_bf16_16816(dp[nt], b, ld32(vr), ld32(vr + 8));
            }
        }
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = e < 2 ? row_a : row_b;
                const int j = j0 + nt * 8 + tig * 2 + (e & 1);
                const float p = (j <= row && row < s1) ? exp2f(s[nt][e] * scale_log2 - lse2[e >> 1]) : 0.f;
                s[nt][e] = p * (dp[nt][e] - dl[e >> 1]) * scale;  // dS
            }
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[4];
            acc_to_a(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                const bf16* kr = Kt + (dt * 8 + g) * LDT + kk * 16 + tig * 2;
                lcpt::mma_bf16_16816(acc[dt], a, ld32(kr), ld32(kr + 8));
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = r ? row_b : row_a;
        if (row < s1) {
            T* dst = dq + ((size_t)row * heads + h) * D + tig * 2;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) lcpt::store2(dst + dt * 8, acc[dt][2 * r], acc[dt][2 * r + 1]);
        }
    }
}

// dK and dV of one key tile over every query tile, grid (key tiles, kv_heads): each block sums
// over the query heads of its group and stores dK, dV (O = T). FUSED_DQ, the five-matmul backward,
// grid (key tiles, heads): a block takes one query head (so a large group does not leave a few
// blocks with all the work), forms dQ += dS·K for each query tile in the same pass, through dS in
// shared memory, and adds dQ, dK and dV into f32 accumulators (O = float; dq_acc [tokens, heads,
// D], dk/dv [tokens, kv_heads, D], zeroed) with red.add. Without it attn_bwd_dq recomputes S and
// dP for dQ: seven matmuls, no atomics, the same bits every run.
template <int D, typename T, typename O, bool FUSED_DQ>
__device__ __forceinline__ void bwd_dkdv_body(O* __restrict__ dk, O* __restrict__ dv, float* __restrict__ dq_acc, const T* __restrict__ q,
                                              const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
                                              const float* __restrict__ lse, const float* __restrict__ delta, const int4* __restrict__ tiles,
                                              int heads, int kv_heads, float scale, float scale_log2) {
    constexpr int LD = D + 8, LDTQ = BMQ + 8, LDTK = BN + 8, LDTS = BMQ + 8;
    static_assert(BMQ == 32 && THREADS == 128, "the dQ step splits a 32-row query tile over 4 warps as 2 row halves x 2 column halves");
    bf16* Ks = lcpt::dynamic_smem<bf16>();
    bf16* Vs = Ks + BN * LD;
    bf16* Qs = Vs + BN * LD;
    bf16* dOs = Qs + BMQ * LD;
    bf16* Qt = dOs + BMQ * LD;
    bf16* dOt = Qt + D * LDTQ;
    float* lse_s = reinterpret_cast<float*>(dOt + D * LDTQ);
    float* dl_s = lse_s + BMQ;
    bf16* Kt = reinterpret_cast<bf16*>(dl_s + BMQ);  // FUSED_DQ: Kᵀ [D][LDTK] and dSᵀ [BN][LDTS]
    bf16* dSt = Kt + D * LDTK;
    const int4 tile = tiles[blockIdx.x];
    const int s0 = tile.x, s1 = tile.y, j0 = tile.z;
    (void)s0;
    const int group = heads / kv_heads, kvh = FUSED_DQ ? blockIdx.y / group : blockIdx.y;
    const int h_first = FUSED_DQ ? blockIdx.y : kvh * group, h_end = FUSED_DQ ? h_first + 1 : h_first + group;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    const int key_a = j0 + warp * 16 + g, key_b = key_a + 8;

    load_rows<BN, D, LD>(Ks, k, j0, s1, kv_heads, kvh);
    load_rows<BN, D, LD>(Vs, v, j0, s1, kv_heads, kvh);
    if (FUSED_DQ) load_rows_t<BN, D, LDTK>(Kt, k, j0, s1, kv_heads, kvh);
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[dt][e] = dva[dt][e] = 0.f;

    for (int h = h_first; h < h_end; ++h) {
        for (int q0 = j0; q0 < s1; q0 += BMQ) {
            __syncthreads();
            load_rows<BMQ, D, LD>(Qs, q, q0, s1, heads, h);
            load_rows<BMQ, D, LD>(dOs, dout, q0, s1, heads, h);
            load_rows_t<BMQ, D, LDTQ>(Qt, q, q0, s1, heads, h);
            load_rows_t<BMQ, D, LDTQ>(dOt, dout, q0, s1, heads, h);
            if (threadIdx.x < BMQ) {
                const int row = q0 + threadIdx.x;
                lse_s[threadIdx.x] = row < s1 ? lse[(size_t)row * heads + h] * LOG2E : INFINITY;
                dl_s[threadIdx.x] = row < s1 ? delta[(size_t)row * heads + h] : 0.f;
            }
            __syncthreads();
            // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for this warp's 16 keys × BMQ queries.
            float st[BMQ / 8][4], dpt[BMQ / 8][4];
#pragma unroll
            for (int nt = 0; nt < BMQ / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                uint32_t a[4], b[4];
                load_a(a, Ks, LD, warp * 16, kk * 16, g, tig);
                load_a(b, Vs, LD, warp * 16, kk * 16, g, tig);
#pragma unroll
                for (int nt = 0; nt < BMQ / 8; ++nt) {
                    const bf16* qr = Qs + (nt * 8 + g) * LD + kk * 16 + tig * 2;
                    const bf16* dr = dOs + (nt * 8 + g) * LD + kk * 16 + tig * 2;
                    lcpt::mma_bf16_16816(st[nt], a, ld32(qr), ld32(qr + 8));
                    lcpt::mma_bf16_16816(dpt[nt], b, ld32(dr), ld32(dr + 8));
                }
            }
#pragma unroll
            for (int nt = 0; nt < BMQ / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = e < 2 ? key_a : key_b;
                    const int qi = nt * 8 + tig * 2 + (e & 1);
                    const int row = q0 + qi;
                    const float p = (key <= row && row < s1) ? exp2f(st[nt][e] * scale_log2 - lse_s[qi]) : 0.f;
                    st[nt][e] = p;
                    dpt[nt][e] = p * (dpt[nt][e] - dl_s[qi]) * scale;  // dSᵀ
                }
            if (FUSED_DQ) {
                // dSᵀ as it is held, [key][query] bf16: a lane's two adjacent queries in one store.
#pragma unroll
                for (int nt = 0; nt < BMQ / 8; ++nt) {
                    bf16* row = dSt + (warp * 16 + g) * LDTS + nt * 8 + tig * 2;
                    *reinterpret_cast<uint32_t*>(row) = lcpt::pack_bf16x2(dpt[nt][0], dpt[nt][1]);
                    *reinterpret_cast<uint32_t*>(row + 8 * LDTS) = lcpt::pack_bf16x2(dpt[nt][2], dpt[nt][3]);
                }
            }
#pragma unroll
            for (int kk = 0; kk < BMQ / 16; ++kk) {
                uint32_t ap[4], as[4];
                acc_to_a(ap, st[2 * kk], st[2 * kk + 1]);
                acc_to_a(as, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    const bf16* dr = dOt + (dt * 8 + g) * LDTQ + kk * 16 + tig * 2;
                    const bf16* qr = Qt + (dt * 8 + g) * LDTQ + kk * 16 + tig * 2;
                    lcpt::mma_bf16_16816(dva[dt], ap, ld32(dr), ld32(dr + 8));
                    lcpt::mma_bf16_16816(dka[dt], as, ld32(qr), ld32(qr + 8));
                }
            }
            if (FUSED_DQ) {
                // dQ[q0 + 16·(warp & 1) + …][(warp >> 1)·D/2 + …] += dS·K over this tile's keys (after
                // dK/dV, so that P and dS no longer hold registers).
                __syncthreads();
                const int r0 = (warp & 1) * 16, c0 = (warp >> 1) * (D / 2);
                // dS fragments (16 queries × 16 keys) from dSᵀ by ldmatrix.x4.trans, again for each
                // column tile: at head_dim 128 four of them held across the loop would spill.
                // Lanes 8i..8i+7 address key rows of matrix i: i = 0, 1 keys +0, i = 2, 3 keys +8;
                // i = 1, 3 queries +8.
                const bf16* ds_row = dSt + ((lane & 7) + ((lane >> 4) & 1) * 8) * LDTS + r0 + ((lane >> 3) & 1) * 8;
                const int row_a = q0 + r0 + g, row_b = row_a + 8;
#pragma unroll
                for (int dt = 0; dt < D / 16; ++dt) {
                    float acc[4] = {0.f, 0.f, 0.f, 0.f};
                    const int col = c0 + dt * 8;
#pragma unroll
                    for (int kk = 0; kk < BN / 16; ++kk) {
                        uint32_t a[4];
                        lcpt::ldmatrix_x4_trans(a, ds_row + kk * 16 * LDTS);
                        const bf16* kr = Kt + (col + g) * LDTK + kk * 16 + tig * 2;
                        lcpt::mma_bf16_16816(acc, a, ld32(kr), ld32(kr + 8));
                    }
                    if (row_a < s1) {
                        float* dst = dq_acc + ((size_t)row_a * heads + h) * D + col + tig * 2;
                        lcpt::red_add_f32(dst, acc[0]);
                        lcpt::red_add_f32(dst + 1, acc[1]);
                    }
                    if (row_b < s1) {
                        float* dst = dq_acc + ((size_t)row_b * heads + h) * D + col + tig * 2;
                        lcpt::red_add_f32(dst, acc[2]);
                        lcpt::red_add_f32(dst + 1, acc[3]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = r ? key_b : key_a;
        if (key < s1) {
            O* dkr = dk + ((size_t)key * kv_heads + kvh) * D + tig * 2;
            O* dvr = dv + ((size_t)key * kv_heads + kvh) * D + tig * 2;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                if constexpr (FUSED_DQ) {
                    lcpt::red_add_f32(dkr + dt * 8, dka[dt][2 * r]);
                    lcpt::red_add_f32(dkr + dt * 8 + 1, dka[dt][2 * r + 1]);
                    lcpt::red_add_f32(dvr + dt * 8, dva[dt][2 * r]);
                    lcpt::red_add_f32(dvr + dt * 8 + 1, dva[dt][2 * r + 1]);
                } else {
                    lcpt::store2(dkr + dt * 8, dka[dt][2 * r], dka[dt][2 * r + 1]);
                    lcpt::store2(dvr + dt * 8, dva[dt][2 * r], dva[dt][2 * r + 1]);
                }
            }
        }
    }
}

// ---- simple f32 kernels (any even head_dim <= 256): one warp per (token, head) ----
constexpr int MAXC = 8;  // head_dim / 32, rounded up

}  // namespace lcpt_attn

using namespace lcpt_attn;

#define LCPT_ATTN_INSTANCES(D, S, T)                                                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS) attn_fwd_d##D##_##S(T* out, float* lse, const T* q, const T* k, const T* v,    \
                                                                               const int4* tiles, int heads, int kv_heads,               \
                                                                               float scale_log2) {                                       \
        fwd_body<D, T>(out, lse, q, k, v, tiles, heads, kv_heads, scale_log2);                                                            \
    }                                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS) attn_bwd_dq_d##D##_##S(T* dq, const T* q, const T* k, const T* v, const T* dout, \
                                                                                  const float* lse, const float* delta,                  \
                                                                                  const int4* tiles, int heads, int kv_heads,            \
                                                                                  float scale, float scale_log2) {                       \
        bwd_dq_body<D, T>(dq, q, k, v, dout, lse, delta, tiles, heads, kv_heads, scale, scale_log2);                                      \
    }                                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS) attn_bwd_dkdv_d##D##_##S(T* dk, T* dv, const T* q, const T* k, const T* v,      \
                                                                                    const T* dout, const float* lse, const float* delta, \
                                                                                    const int4* tiles, int heads, int kv_heads,          \
                                                                                    float scale, float scale_log2) {                     \
        bwd_dkdv_body<D, T, T, false>(dk, dv, nullptr, q, k, v, dout, lse, delta, tiles, heads, kv_heads, scale, scale_log2);                \
    }                                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS) attn_bwd_fused_d##D##_##S(float* dk, float* dv, float* dq_acc, const T* q,      \
                                                                                     const T* k,                                         \
                                                                                     const T* v, const T* dout, const float* lse,        \
                                                                                     const float* delta, const int4* tiles, int heads,   \
                                                                                     int kv_heads, float scale, float scale_log2) {      \
        bwd_dkdv_body<D, T, float, true>(dk, dv, dq_acc, q, k, v, dout, lse, delta, tiles, heads, kv_heads, scale, scale_log2);                  \
    }

#define LCPT_ATTN_D64(S, T) LCPT_ATTN_INSTANCES(64, S, T)
#define LCPT_ATTN_D128(S, T) LCPT_ATTN_INSTANCES(128, S, T)
LCPT_BOTH_TYPES(LCPT_ATTN_D64)
LCPT_BOTH_TYPES(LCPT_ATTN_D128)

// delta[r] = dout[r]·out[r] for r in [0, rows) (rows = tokens·heads), one warp per row.
template <typename T>
__device__ __forceinline__ void attn_delta_impl(float* __restrict__ delta, const T* __restrict__ dout, const T* __restrict__ out,
                                      unsigned long long rows, int d) {
    const unsigned long long r = (blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    float acc = 0.f;
    for (int c = lane; c < d; c += 32) acc += lcpt::to_f(dout[r * d + c]) * lcpt::to_f(out[r * d + c]);
    acc = lcpt::warp_sum(acc);
    if (lane == 0) delta[r] = acc;
}

// doc_start[t] / doc_end[t]: the document of token t.
template <typename T>
__device__ __forceinline__ void attn_fwd_simple_impl(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ q, const T* __restrict__ k,
                                           const T* __restrict__ v, const int* __restrict__ doc_start, unsigned long long tokens, int heads,
                                           int kv_heads, int d, float scale) {
    const unsigned long long w = (blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= tokens * heads) return;
    const unsigned long long i = w / heads;
    const int h = w % heads, kvh = h / (heads / kv_heads);
    float qr[MAXC], acc[MAXC];
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
        const int x = lane + 32 * c;
        qr[c] = x < d ? lcpt::to_f(q[(i * heads + h) * d + x]) : 0.f;
        acc[c] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (unsigned long long j = doc_start[i]; j <= i; ++j) {
        const T* kj = k + (j * kv_heads + kvh) * d;
        const T* vj = v + (j * kv_heads + kvh) * d;
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < MAXC; ++c) {
            const int x = lane + 32 * c;
            if (x < d) s += qr[c] * lcpt::to_f(kj[x]);
        }
        s = lcpt::warp_sum(s) * scale;
        const float m_new = fmaxf(m, s);
        const float alpha = expf(m - m_new), p = expf(s - m_new);
        l = l * alpha + p;
#pragma unroll
        for (int c = 0; c < MAXC; ++c) {
            const int x = lane + 32 * c;
            acc[c] = acc[c] * alpha + (x < d ? p * lcpt::to_f(vj[x]) : 0.f);
        }
        m = m_new;
    }
    const float inv = 1.f / l;
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
        const int x = lane + 32 * c;
        if (x < d) out[(i * heads + h) * d + x] = lcpt::from_f<T>(acc[c] * inv);
    }
    if (lane == 0) lse[i * heads + h] = m + logf(l);
}

template <typename T>
__device__ __forceinline__ void attn_bwd_dq_simple_impl(T* __restrict__ dq, const T* __restrict__ q, const T* __restrict__ k,
                                              const T* __restrict__ v, const T* __restrict__ dout, const float* __restrict__ lse,
                                              const float* __restrict__ delta, const int* __restrict__ doc_start, unsigned long long tokens,
                                              int heads, int kv_heads, int d, float scale) {
    const unsigned long long w = (blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= tokens * heads) return;
    const unsigned long long i = w / heads;
    const int h = w % heads, kvh = h / (heads / kv_heads);
    float qr[MAXC], dor[MAXC], acc[MAXC];
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
        const int x = lane + 32 * c;
        qr[c] = x < d ? lcpt::to_f(q[(i * heads + h) * d + x]) : 0.f;
        dor[c] = x < d ? lcpt::to_f(dout[(i * heads + h) * d + x]) : 0.f;
        acc[c] = 0.f;
    }
    const float li = lse[i * heads + h], di = delta[i * heads + h];
    for (unsigned long long j = doc_start[i]; j <= i; ++j) {
        const T* kj = k + (j * kv_heads + kvh) * d;
        const T* vj = v + (j * kv_heads + kvh) * d;
        float s = 0.f, dp = 0.f;
#pragma unroll
        for (int c = 0; c < MAXC; ++c) {
            const int x = lane + 32 * c;
            if (x < d) {
                s += qr[c] * lcpt::to_f(kj[x]);
                dp += dor[c] * lcpt::to_f(vj[x]);
            }
        }
        s = lcpt::warp_sum(s);
        dp = lcpt::warp_sum(dp);
        const float p = expf(s * scale - li);
        const float ds = p * (dp - di) * scale;
#pragma unroll
        for (int c = 0; c < MAXC; ++c) {
            const int x = lane + 32 * c;
            if (x < d) acc[c] += ds * lcpt::to_f(kj[x]);
        }
    }
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
        const int x = lane + 32 * c;
        if (x < d) dq[(i * heads + h) * d + x] = lcpt::from_f<T>(acc[c]);
    }
}

// One warp per (key token j, kv head): sums over the group's query heads and the queries j.. of
// j's document.
template <typename T>
__device__ __forceinline__ void attn_bwd_dkdv_simple_impl(T* __restrict__ dk, T* __restrict__ dv, const T* __restrict__ q,
                                                const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
                                                const float* __restrict__ lse, const float* __restrict__ delta, const int* __restrict__ doc_end,
                                                unsigned long long tokens, int heads, int kv_heads, int d, float scale) {
    const unsigned long long w = (blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= tokens * kv_heads) return;
    const unsigned long long j = w / kv_heads;
    const int kvh = w % kv_heads, group = heads / kv_heads;
    float kr[MAXC], vr[MAXC], dka[MAXC], dva[MAXC];
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
        const int x = lane + 32 * c;
        kr[c] = x < d ? lcpt::to_f(k[(j * kv_heads + kvh) * d + x]) : 0.f;
        vr[c] = x < d ? lcpt::to_f(v[(j * kv_heads + kvh) * d + x]) : 0.f;
        dka[c] = dva[c] = 0.f;
    }
    const unsigned long long end = doc_end[j];
    for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
        for (unsigned long long i = j; i < end; ++i) {
            const T* qi = q + (i * heads + h) * d;
            const T* doi = dout + (i * heads + h) * d;
            float s = 0.f, dp = 0.f;
#pragma unroll
            for (int c = 0; c < MAXC; ++c) {
                const int x = lane + 32 * c;
                if (x < d) {
                    s += lcpt::to_f(qi[x]) * kr[c];
                    dp += lcpt::to_f(doi[x]) * vr[c];
                }
            }
            s = lcpt::warp_sum(s);
            dp = lcpt::warp_sum(dp);
            const float p = expf(s * scale - lse[i * heads + h]);
            const float ds = p * (dp - delta[i * heads + h]) * scale;
#pragma unroll
            for (int c = 0; c < MAXC; ++c) {
                const int x = lane + 32 * c;
                if (x < d) {
                    dva[c] += p * lcpt::to_f(doi[x]);
                    dka[c] += ds * lcpt::to_f(qi[x]);
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
        const int x = lane + 32 * c;
        if (x < d) {
            dk[(j * kv_heads + kvh) * d + x] = lcpt::from_f<T>(dka[c]);
            dv[(j * kv_heads + kvh) * d + x] = lcpt::from_f<T>(dva[c]);
        }
    }
}

#define LCPT_ATTN_SIMPLE(S, T)                                                                                                       \
    extern "C" __global__ void attn_delta_##S(float* delta, const T* dout, const T* out, unsigned long long rows, int d) {          \
        attn_delta_impl<T>(delta, dout, out, rows, d);                                                                              \
    }                                                                                                                                \
    extern "C" __global__ void attn_fwd_simple_##S(T* out, float* lse, const T* q, const T* k, const T* v, const int* doc_start,    \
                                                   unsigned long long tokens, int heads, int kv_heads, int d, float scale) {       \
        attn_fwd_simple_impl<T>(out, lse, q, k, v, doc_start, tokens, heads, kv_heads, d, scale);                                   \
    }                                                                                                                                \
    extern "C" __global__ void attn_bwd_dq_simple_##S(T* dq, const T* q, const T* k, const T* v, const T* dout, const float* lse,   \
                                                      const float* delta, const int* doc_start, unsigned long long tokens,        \
                                                      int heads, int kv_heads, int d, float scale) {                              \
        attn_bwd_dq_simple_impl<T>(dq, q, k, v, dout, lse, delta, doc_start, tokens, heads, kv_heads, d, scale);                     \
    }                                                                                                                                \
    extern "C" __global__ void attn_bwd_dkdv_simple_##S(T* dk, T* dv, const T* q, const T* k, const T* v, const T* dout,            \
                                                        const float* lse, const float* delta, const int* doc_end,                 \
                                                        unsigned long long tokens, int heads, int kv_heads, int d, float scale) { \
        attn_bwd_dkdv_simple_impl<T>(dk, dv, q, k, v, dout, lse, delta, doc_end, tokens, heads, kv_heads, d, scale);                 \
    }
LCPT_BOTH_TYPES(LCPT_ATTN_SIMPLE)
