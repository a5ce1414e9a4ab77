// Shared helpers of the llama-cpt kernels. Every cuda/*.cu is compiled as one translation unit
// (build.rs), so helpers live here once, behind an include guard.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#define LCPT_IGNORE_INDEX (-100)

namespace lcpt {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats; the function ends with a barrier so scratch may be reused.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : 0.f;
    t = warp_sum(t);
    __syncthreads();
    return t;
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// D += A·B for one m16n8k16 tile: bf16 operands, fp32 accumulators (sm_80+). Inline PTX stays
// behind one-function seams like this one, each emulated by one function in emu/cxx/ for the host build.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef LCPT_EMU_HOST
    lcpt_emu::mma_m16n8k16_bf16(d, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// ---- sm_80 data movement: cp.async and ldmatrix (seams as the mma; emulated in cuda_emu.h) ----
// A shared-memory address as the 32-bit offset the .shared state space takes.
__device__ __forceinline__ unsigned smem_addr(const void* p) {
#ifdef LCPT_EMU_HOST
    return 0;
#else
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
#endif
}

// cp.async.cg.shared.global of 16 bytes, bypassing L1: `valid` false zero-fills the destination
// and reads nothing (src must still be a valid address). Lands only at a cp_async_wait that
// completes its group.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#ifdef LCPT_EMU_HOST
    lcpt_emu::cp_async(smem, gmem, 16, valid ? 16 : 0);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
#endif
}

// cp.async.commit_group: the copies issued since the last commit form one group.
__device__ __forceinline__ void cp_async_commit() {
#ifdef LCPT_EMU_HOST
    lcpt_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// cp.async.wait_group N: all but the N newest committed groups have landed (for this thread; a
// barrier makes them visible to the others).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef LCPT_EMU_HOST
    lcpt_emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane 8i+j gives the address of row j of 8×8
// matrix i; register i of lane l gets row l/4, columns 2(l%4), +1 of matrix i (.trans: the
// transposed matrix, i.e. rows 2(l%4), +1 of column l/4) — an mma fragment. (The emulator also
// has .x1 and .x2, lcpt_emu::ldmatrix<1|2, …>, for a kernel that needs them.)
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#ifdef LCPT_EMU_HOST
    lcpt_emu::ldmatrix<4, false>(r, smem_row, "ldmatrix.x4");
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem_row)));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#ifdef LCPT_EMU_HOST
    lcpt_emu::ldmatrix<4, true>(r, smem_row, "ldmatrix.x4.trans");
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem_row)));
#endif
}
// 2^x by ex2.approx.ftz.f32 (max relative error 2^-22; subnormal results flush to zero). The host
// build uses exp2f, which differs in the last bits.
__device__ __forceinline__ float exp2_approx(float x) {
#ifdef LCPT_EMU_HOST
    return exp2f(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
#endif
}

// *p += v atomically, returning nothing: RED.E.ADD.F32.FTZ.RN (the accumulations of the fused
// attention backward). Subnormal inputs and results flush to zero, as the ISA says for f32 atomic
// adds; the order of the adds is the hardware's, so sums differ in the last bits run to run.
// atomicAdd with its result unused, not inline PTX: the compiler then folds constant offsets into
// the instruction's address (an asm operand would take a register pair per address).
__device__ __forceinline__ void red_add_f32(float* p, float v) {
#ifdef LCPT_EMU_HOST
    lcpt_emu::red_add_f32(p, v);
#else
    atomicAdd(p, v);
#endif
}

// The block's dynamic shared memory (`extern __shared__`, sized by the launch) as T*; a seam so
// that the host build supplies a buffer of exactly the launch's size.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef LCPT_EMU_HOST
    return reinterpret_cast<T*>(lcpt_emu::current_block()->dynamic_smem);
#else
    extern __shared__ __align__(16) unsigned char lcpt_dynamic_smem[];
    return reinterpret_cast<T*>(lcpt_dynamic_smem);
#endif
}

}  // namespace lcpt

// ---- Storage types ----------------------------------------------------------------------------
// Activations and parameters are stored as `float` (f32 training) or `__nv_bfloat16` (mixed
// precision); every kernel computes in f32. Kernels are templates over the storage type T, and
// each entry point exists twice, `name_f32` and `name_bf16` (LCPT_BOTH_TYPES below). Statistics
// (rstd, lse, delta), gradient accumulators of parameters, moments and masters are always f32.
namespace lcpt {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Four consecutive elements starting at p[4·i] (16-byte aligned for f32, 8-byte for bf16).
__device__ __forceinline__ float4 load4(const float* p, size_t i) { return reinterpret_cast<const float4*>(p)[i]; }
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p, size_t i) {
    const uint2 u = reinterpret_cast<const uint2*>(p)[i];
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
    return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ void store4(float* p, size_t i, float4 v) { reinterpret_cast<float4*>(p)[i] = v; }
__device__ __forceinline__ void store4(__nv_bfloat16* p, size_t i, float4 v) {
    uint2 u;
    u.x = pack_bf16x2(v.x, v.y);
    u.y = pack_bf16x2(v.z, v.w);
    reinterpret_cast<uint2*>(p)[i] = u;
}

// ---- 16-byte packs: the memory-bound kernels' unit of global access (LDG.E.128 / STG.E.128) ----
// A pack is the elements of 16 bytes of storage, 4 f32 or 8 bf16, held as f32. A kernel takes the
// packed path only where every pointer it touches is 16-byte aligned (allocations are; views need
// not be) and the row length is a multiple of N, and falls back to one element per access otherwise.
template <typename T>
struct Pack {
    static constexpr int N = 16 / sizeof(T);
    float v[N];
};

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// The emulated device faults on a misaligned vector access as the GPU does (misaligned address).
__device__ __forceinline__ void check_vector_access(const void* p, unsigned bytes) {
#ifdef LCPT_EMU_HOST
    lcpt_emu::check_global_alignment(p, bytes, "16-byte pack access");
#else
    (void)p;
    (void)bytes;
#endif
}

// Pack i of p: elements [N·i, N·i + N); p 16-byte aligned.
template <typename T> __device__ __forceinline__ Pack<T> load_pack(const T* p, size_t i);
template <> __device__ __forceinline__ Pack<float> load_pack<float>(const float* p, size_t i) {
    check_vector_access(p + 4 * i, 16);
    const float4 f = reinterpret_cast<const float4*>(p)[i];
    return Pack<float>{{f.x, f.y, f.z, f.w}};
}
template <> __device__ __forceinline__ Pack<__nv_bfloat16> load_pack<__nv_bfloat16>(const __nv_bfloat16* p, size_t i) {
    check_vector_access(p + 8 * i, 16);
    const uint4 u = reinterpret_cast<const uint4*>(p)[i];
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
    Pack<__nv_bfloat16> out;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[k]));
        out.v[2 * k] = f.x;
        out.v[2 * k + 1] = f.y;
    }
    return out;
}
// Rounds to T (to nearest even for bf16, as from_f) and stores pack i of p.
__device__ __forceinline__ void store_pack(float* p, size_t i, const Pack<float>& x) {
    check_vector_access(p + 4 * i, 16);
    reinterpret_cast<float4*>(p)[i] = make_float4(x.v[0], x.v[1], x.v[2], x.v[3]);
}
__device__ __forceinline__ void store_pack(__nv_bfloat16* p, size_t i, const Pack<__nv_bfloat16>& x) {
    check_vector_access(p + 8 * i, 16);
    uint4 u;
    u.x = pack_bf16x2(x.v[0], x.v[1]);
    u.y = pack_bf16x2(x.v[2], x.v[3]);
    u.z = pack_bf16x2(x.v[4], x.v[5]);
    u.w = pack_bf16x2(x.v[6], x.v[7]);
    reinterpret_cast<uint4*>(p)[i] = u;
}

// The f32 side of a pack of N elements of another type (f32 statistics or gradients beside bf16
// data): floats [N·i, N·i + N) of p, N a multiple of 4, p 16-byte aligned.
template <int N>
__device__ __forceinline__ void load_f32s(float (&out)[N], const float* p, size_t i) {
#pragma unroll
    for (int k = 0; k < N; k += 4) {
        const Pack<float> q = load_pack(p, (N * i + k) / 4);
#pragma unroll
        for (int e = 0; e < 4; ++e) out[k + e] = q.v[e];
    }
}
template <int N>
__device__ __forceinline__ void store_f32s(float* p, size_t i, const float (&v)[N]) {
#pragma unroll
    for (int k = 0; k < N; k += 4) store_pack(p, (N * i + k) / 4, Pack<float>{{v[k], v[k + 1], v[k + 2], v[k + 3]}});
}

// A grid-stride loop over n elements in packs of N: pack(i) for each whole pack i when `packed`,
// then one(j) for each element left (all of them when not packed).
template <int N, typename PackFn, typename OneFn>
__device__ __forceinline__ void grid_stride_packed(unsigned long long n, bool packed, PackFn pack, OneFn one) {
    const unsigned long long first = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const unsigned long long packs = packed ? n / N : 0;
    for (unsigned long long i = first; i < packs; i += stride) pack(i);
    for (unsigned long long j = packs * N + first; j < n; j += stride) one(j);
}

// Two consecutive elements at p[0], p[1] (aligned to 2 elements).
__device__ __forceinline__ void store2(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
__device__ __forceinline__ void store2(__nv_bfloat16* p, float a, float b) { *reinterpret_cast<uint32_t*>(p) = pack_bf16x2(a, b); }

}  // namespace lcpt

// Defines the two entry points of a kernel template: NAME_f32 (T = float) and NAME_bf16
// (T = __nv_bfloat16). DEF(SUFFIX, T) must expand to one `extern "C" __global__` definition.
#define LCPT_BOTH_TYPES(DEF) DEF(f32, float) DEF(bf16, __nv_bfloat16)
