// Attention forward in FlashAttention-2's structure, for bf16 storage and head_dim 64 and 128
// (the algorithm of ops::attention; cuda/attention.cu's tensor-core forward is its reference):
// - a block owns 128 query rows of one head: 4 warps × 32 rows at head_dim 64 (≈230 registers,
//   2 blocks per SM), 8 warps × 16 rows at 128 (≈190 registers, 1 block per SM): 8 warps per SM
//   either way. 32 rows per warp at 128 would hold 128 f32 accumulators of O and 64 of S per
//   thread, past 255 registers; at 128 registers per thread (2 blocks of 8 warps) ptxas spills;
// - Q, K and V tiles reach shared memory by 16-byte cp.async copies, never through registers:
//   K of the next tile is in flight while P·V runs, V of this tile while Q·Kᵀ runs (FA2's
//   interleaved double buffering), one commit group each;
// - shared tiles are [rows][D] bf16 with the 16-byte chunks of row r XOR-swizzled by r % 8: the
//   8 rows an ldmatrix reads and the 8 chunks a quarter-warp's cp.async writes fall in distinct
//   bank groups, with no padding;
// - Q and K fragments by ldmatrix.x4, V by ldmatrix.x4.trans; Q's fragments are held in
//   registers for the whole block; P stays in registers, re-packed as the A operand of P·V;
// - online softmax in f32 with exp2 and the scale folded into one FMA; only the tiles that cross
//   the diagonal evaluate the causal mask; rows past the document end are computed (from zero-filled
//   Q) and not written;
// - the output is staged in shared memory (Q's tile) and written by 16-byte stores.
// Layouts as cuda/attention.cu: q, out [tokens, heads, D]; k, v [tokens, kv_heads, D]; lse
// [tokens, heads] f32; tiles int4 {doc_start, doc_end, tile_start, 0} of FA2_BM rows.
#include "common.cuh"

namespace lcpt_fa2 {

typedef __nv_bfloat16 bf16;
constexpr int BM = 128;  // query rows per block
constexpr int BN = 64;   // keys per tile
constexpr float LN2 = 0.6931471805599453f;

template <int D>
struct FwdConfig;
template <>
struct FwdConfig<64> {
    static constexpr int WARPS = 4, MT = 2, MIN_BLOCKS = 2;  // MT: 16-row mma tiles per warp
};
template <>
struct FwdConfig<128> {
    static constexpr int WARPS = 8, MT = 1, MIN_BLOCKS = 1;
};

// Element offset of (row, 16-byte chunk) in a swizzled [rows][D] bf16 tile.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
    return row * D + ((chunk ^ (row & 7)) << 3);
}

// Issues the cp.async copies of rows [row0, row0 + R) of head h of a [tokens, nh, D] bf16 tensor
// into the swizzled tile dst; rows at or past `limit` are zero-filled. Each thread copies one
// fixed chunk of every (THREADS / chunks)-th row: one 64-bit address computation per tile.
template <int R, int D, int THREADS>
__device__ __forceinline__ void copy_rows_async(bf16* dst, const bf16* __restrict__ src, int row0, int limit, int nh, int h) {
    constexpr int CHUNKS = D / 8, STEP = THREADS / CHUNKS;
    static_assert(THREADS % CHUNKS == 0 && R % STEP == 0, "whole rows per pass");
    static_assert(STEP % 8 == 0, "a thread's swizzle (row % 8) is the same in every pass");
    const int c = threadIdx.x % CHUNKS, r = threadIdx.x / CHUNKS;
    const bf16* g = src + ((size_t)(row0 + r) * nh + h) * D + c * 8;
    const size_t g_step = (size_t)STEP * nh * D;
    bf16* s = dst + swz<D>(r, c);
#pragma unroll
    for (int it = 0; it < R / STEP; ++it) {
        const bool ok = row0 + r + it * STEP < limit;
        lcpt::cp_async_16(s + it * STEP * D, ok ? g + it * g_step : src, ok);
    }
}

template <int D>
__device__ __forceinline__ void fwd_body(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q,
                                         const bf16* __restrict__ k, const bf16* __restrict__ v, const int4* __restrict__ tiles,
                                         int heads, int kv_heads, float scale_log2) {
    constexpr int WARPS = FwdConfig<D>::WARPS, MT = FwdConfig<D>::MT, THREADS = WARPS * 32;
    static_assert(WARPS * MT * 16 == BM, "the warps cover the query tile");
    static_assert(BM % BN == 0, "key tiles start on the query tile's edges, so two of them cross its diagonal");
    static_assert(D % 16 == 0 && D >= 64, "the swizzle needs 8 chunks per row");
    bf16* Qs = lcpt::dynamic_smem<bf16>();
    bf16* Ks = Qs + BM * D;
    bf16* Vs = Ks + BN * D;
    const int4 tile = tiles[blockIdx.x];
    const int s0 = tile.x, s1 = tile.y, i0 = tile.z;
    const int h = blockIdx.y, kvh = h / (heads / kv_heads);
    const int i1 = min(i0 + BM, s1);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    const int warp_row = warp * MT * 16;  // first row of this warp in the tile
    // ldmatrix: lane l gives row l % 8 of matrix l / 8; the XOR of its chunk with (row % 8) and
    // the matrix's chunk bit is fixed per lane.
    const int lr = lane & 7, lm = lane >> 3;

    copy_rows_async<BM, D, THREADS>(Qs, q, i0, i1, heads, h);
    copy_rows_async<BN, D, THREADS>(Ks, k, s0, i1, kv_heads, kvh);
    lcpt::cp_async_commit();

    uint32_t qf[MT][D / 16][4];
    float o[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.f;

    for (int j0 = s0; j0 < i1; j0 += BN) {
        lcpt::cp_async_wait<0>();  // K of this tile (and Q at the first)
        __syncthreads();           // ... visible to all; every warp is done with V of the last tile
        copy_rows_async<BN, D, THREADS>(Vs, v, j0, i1, kv_heads, kvh);
        lcpt::cp_async_commit();
        if (j0 == s0) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk)
                    lcpt::ldmatrix_x4(qf[mt][kk], Qs + swz<D>(warp_row + mt * 16 + lr + (lm & 1) * 8, kk * 2 + (lm >> 1)));
        }
        // S = Q·Kᵀ: one ldmatrix.x4 gives the B fragments of two 8-key tiles.
        float s[MT][BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                uint32_t b[4];
                lcpt::ldmatrix_x4(b, Ks + swz<D>(np * 16 + lr + (lm >> 1) * 8, kk * 2 + (lm & 1)));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    lcpt::mma_bf16_16816(s[mt][2 * np], qf[mt][kk], b[0], b[1]);
                    lcpt::mma_bf16_16816(s[mt][2 * np + 1], qf[mt][kk], b[2], b[3]);
                }
            }
        }
        // The causal mask, only where the key tile crosses the query tile's diagonal (keys past
        // the tile's end, zero-filled, lie there too).
        if (j0 + BN - 1 > i0) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = i0 + warp_row + mt * 16 + g + (e >> 1) * 8;
                        const int j = j0 + nt * 8 + tig * 2 + (e & 1);
                        if (j > row) s[mt][nt][e] = -INFINITY;
                    }
        }
        // Online softmax; m is the row maximum of the unscaled scores.
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = m[mt][r];
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                // A row with no key yet (never for a row of the document) keeps a finite offset.
                const float off = mx == -INFINITY ? 0.f : mx * scale_log2;
                const float alpha = lcpt::exp2_approx(m[mt][r] * scale_log2 - off);
                m[mt][r] = mx;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                    for (int e = 2 * r; e < 2 * r + 2; ++e) {
                        const float p = lcpt::exp2_approx(fmaf(s[mt][nt][e], scale_log2, -off));
                        s[mt][nt][e] = p;
                        sum += p;
                    }
                l[mt][r] = l[mt][r] * alpha + sum;
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) o[mt][dt][2 * r] *= alpha, o[mt][dt][2 * r + 1] *= alpha;
            }
        lcpt::cp_async_wait<0>();  // V of this tile
        __syncthreads();           // ... visible to all; every warp is done with K
        if (j0 + BN < i1) {
            copy_rows_async<BN, D, THREADS>(Ks, k, j0 + BN, i1, kv_heads, kvh);
            lcpt::cp_async_commit();
        }
        // O += P·V: P (bf16) from the S accumulators, V's B fragments by ldmatrix.x4.trans.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                a[mt][0] = lcpt::pack_bf16x2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                a[mt][1] = lcpt::pack_bf16x2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                a[mt][2] = lcpt::pack_bf16x2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                a[mt][3] = lcpt::pack_bf16x2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                uint32_t b[4];
                lcpt::ldmatrix_x4_trans(b, Vs + swz<D>(kk * 16 + lr + (lm & 1) * 8, dp * 2 + (lm >> 1)));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    lcpt::mma_bf16_16816(o[mt][2 * dp], a[mt], b[0], b[1]);
                    lcpt::mma_bf16_16816(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
                }
            }
        }
    }

    // Epilogue: O / l as bf16 into this warp's own rows of Q's tile (read by this warp only),
    // then 16-byte stores of the rows inside the document.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float sum = l[mt][r];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const float inv = sum > 0.f ? 1.f / sum : 0.f;
            const int tr = warp_row + mt * 16 + g + r * 8, row = i0 + tr;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt)
                *reinterpret_cast<uint32_t*>(Qs + swz<D>(tr, dt) + tig * 2) = lcpt::pack_bf16x2(o[mt][dt][2 * r] * inv, o[mt][dt][2 * r + 1] * inv);
            if (tig == 0 && row < s1) lse[(size_t)row * heads + h] = (m[mt][r] * scale_log2 + log2f(sum)) * LN2;
        }
    __syncthreads();
    constexpr int CHUNKS = D / 8, STEP = THREADS / CHUNKS;
    const int c = threadIdx.x % CHUNKS, r0 = threadIdx.x / CHUNKS;
    bf16* dst = out + ((size_t)(i0 + r0) * heads + h) * D + c * 8;
    const size_t dst_step = (size_t)STEP * heads * D;
#pragma unroll
    for (int it = 0; it < BM / STEP; ++it)
        if (i0 + r0 + it * STEP < s1)
            *reinterpret_cast<uint4*>(dst + it * dst_step) = *reinterpret_cast<const uint4*>(Qs + swz<D>(r0 + it * STEP, c));
}

}  // namespace lcpt_fa2

#define LCPT_FA2_FWD(D)                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(lcpt_fa2::FwdConfig<D>::WARPS * 32, lcpt_fa2::FwdConfig<D>::MIN_BLOCKS)                                                   \
        attn_fa2_fwd_d##D##_bf16(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, \
                                 const int4* tiles, int heads, int kv_heads, float scale_log2) {                                           \
        lcpt_fa2::fwd_body<D>(out, lse, q, k, v, tiles, heads, kv_heads, scale_log2);                                                      \
    }
LCPT_FA2_FWD(64)
LCPT_FA2_FWD(128)
