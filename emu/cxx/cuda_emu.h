// What llama-cpt's device code (cuda/*.cu, cuda/common.cuh) needs from CUDA, supplied for the host
// C++ compiler: every CUDA thread of a block is a fiber of emu/cxx/runtime.cpp, switching only at
// sync points (__syncthreads, warp collectives, mma). Compiled with -DLCPT_EMU_HOST and
// `-include cuda_emu.h` in front of the kernels (emu/build.rs), so the kernel sources stay as nvcc
// sees them. Only what the kernels use is here; a new intrinsic fails to compile rather than guess.
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <utility>

#define LCPT_EMU_HOST 1

// ---- qualifiers ---------------------------------------------------------------------------------
#ifdef LCPT_EMU_SCAN  // emu/build.rs's scan for entry points: markers it can find in the preprocessed text
#define __global__ __lcpt_entry__
#define __launch_bounds__(...) __lcpt_bounds__(__VA_ARGS__)
#else
#define __global__
#define __launch_bounds__(...)
#endif
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __restrict__ __restrict
#define __align__(n) alignas(n)
// Per-block static shared memory: one instance per OS thread, and an OS thread runs one block at a
// time (runtime.cpp), so the fibers of a block share it and concurrent blocks do not.
#define __shared__ static thread_local

// ---- vector types -------------------------------------------------------------------------------
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct uint3 { unsigned int x, y, z; };
typedef uint3 dim3;
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
static inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }

// ---- bf16 (cuda_bf16.h): round to nearest even; NaN becomes the canonical 0x7fff as cvt.rn.bf16.f32 does ----
struct alignas(2) __nv_bfloat16 { unsigned short __x; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{static_cast<unsigned short>(u >> 16)};
}
static inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
static inline float __bfloat162float(__nv_bfloat16 b) {
    const uint32_t u = static_cast<uint32_t>(b.__x) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)}; }
static inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{__bfloat162float(v.x), __bfloat162float(v.y)}; }

// ---- math and bit intrinsics --------------------------------------------------------------------
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
static inline int __float_as_int(float f) {
    int i;
    memcpy(&i, &f, 4);
    return i;
}
// The libm functions (expf, exp2f, logf, log2f, sqrtf, sincosf, fmaxf) are the host's: correctly
// rounded or within 1 ulp, inside the device's documented bounds (expf/exp2f/logf/log2f 2 ulp,
// sincosf 2 ulp, sqrtf 0 ulp).
#include <math.h>

// ---- the runtime (runtime.cpp) --------------------------------------------------------------
namespace lcpt_emu {

struct BlockState {
    uint3 block_idx, block_dim, grid_dim;
    unsigned char* dynamic_smem;
    unsigned dynamic_smem_bytes;
    mutable unsigned long long vector_accesses;  // counted by the block's threads, summed per launch (runtime.cpp)
};
// A thread's cp.async copies not yet waited for: the source is read when the copy is issued, the
// destination written only when a cp.async.wait_group completes its group (until then it keeps
// what it held: the poison of fresh shared memory or the previous tile).
struct AsyncCopy {
    unsigned char* dst;
    unsigned char data[16];
    unsigned bytes;
    unsigned long long group;  // the number of commit_groups before it was issued
};
struct AsyncCopies {
    AsyncCopy* items;
    unsigned count, capacity;
    unsigned long long committed;  // commit_groups so far
};
struct ThreadState {
    uint3 thread_idx;
    unsigned linear;  // x + y·bx + z·bx·by; lane = linear % 32
};
// Every fiber's stack lies in a region of FIBER_REGION bytes aligned to its size, whose first bytes
// hold a FiberHeader: the running CUDA thread finds its state from its stack pointer, without a
// thread_local lookup (a call into the dynamic loader per threadIdx in the dlopen'ed library).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) || defined(LCPT_EMU_ASAN) || defined(LCPT_EMU_TSAN)
constexpr size_t STACK_BYTES = 512 * 1024;  // sanitizer frames are several times larger
#else
constexpr size_t STACK_BYTES = 64 * 1024;
#endif
constexpr size_t FIBER_REGION = 2 * STACK_BYTES;  // [header page][guard page][stack] fits
struct FiberHeader {
    const ThreadState* thread;
    const BlockState* block;
    void* fiber;  // runtime.cpp's Fiber
    AsyncCopies* async;
};
static inline const FiberHeader* fiber_header() {
#if defined(__x86_64__)
    uintptr_t sp;
    asm("mov %%rsp, %0" : "=r"(sp));  // not volatile: a fiber never leaves its stack
#else
    const uintptr_t sp = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
#endif
    return reinterpret_cast<const FiberHeader*>(sp & ~(uintptr_t)(FIBER_REGION - 1));
}
static inline const BlockState* current_block() { return fiber_header()->block; }
static inline const ThreadState* current_thread() { return fiber_header()->thread; }
static inline AsyncCopies* current_async() { return fiber_header()->async; }

// Block-wide barrier (counts threads that already returned as arrived, as the hardware does).
void syncthreads();

// A warp collective: every lane named in `mask` (the calling lane among them) posts `lane_data`;
// when all of them have posted, `complete(datas, mask)` runs once with datas[lane] for each lane
// in the mask, then every lane continues. `what` names the intrinsic in errors; lanes of one warp
// meeting at different intrinsics is an error.
typedef void (*WarpCompleteFn)(void* const* datas, unsigned mask);
void warp_collective(unsigned mask, void* lane_data, WarpCompleteFn complete, const char* what);

// A launch error raised inside a kernel (bad mask, ...): aborts the launch with a message.
[[noreturn]] void kernel_error(const char* fmt, ...);

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 for the calling lane (mma.cpp).
void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

// Room for more cp.async copies of the calling thread (runtime.cpp).
void grow_async(AsyncCopies* q);

// `p .. p + bytes` inside the block's dynamic shared memory and aligned to `align`, else a launch
// error naming `what` (ldmatrix and cp.async reach only dynamic shared memory in this emulator).
static inline void check_smem(const void* p, unsigned bytes, unsigned align, const char* what) {
    const BlockState* b = current_block();
    const uintptr_t a = reinterpret_cast<uintptr_t>(p), lo = reinterpret_cast<uintptr_t>(b->dynamic_smem);
    if (a < lo || a + bytes > lo + b->dynamic_smem_bytes)
        kernel_error("thread %u: %s: shared address %p is outside the block's %u bytes of dynamic shared memory", current_thread()->linear, what, p,
                     b->dynamic_smem_bytes);
    if (a % align) kernel_error("thread %u: %s: shared address %p is not %u-byte aligned", current_thread()->linear, what, p, align);
}

// 16- and 8-byte global accesses made by the launches of the calling host thread (runtime.cpp):
// the tests see which path a memory-bound kernel took.
unsigned long long& vector_access_count();

// A vector access of global memory (counted): the device faults on an address not aligned to its
// width.
static inline void check_global_alignment(const void* p, unsigned bytes, const char* what) {
    // Atomic: the sanitizer build sees the block's fibers as threads.
    __atomic_fetch_add(&current_block()->vector_accesses, 1, __ATOMIC_RELAXED);
    if (reinterpret_cast<uintptr_t>(p) % bytes)
        kernel_error("thread %u: %s: address %p is not %u-byte aligned (misaligned address)", current_thread()->linear, what, p, bytes);
}

// red.global.add.f32 [p], v: an atomic f32 add from any thread of any block (blocks run on several
// host threads), subnormal inputs and results flushed to signed zero as the PTX ISA specifies for
// atom/red .add.f32.
static inline float flush_subnormal(float x) { return fabsf(x) < 1.17549435e-38f ? copysignf(0.f, x) : x; }
static inline void red_add_f32(float* p, float v) {
    if (reinterpret_cast<uintptr_t>(p) % 4) kernel_error("thread %u: red.add.f32: address %p is not 4-byte aligned", current_thread()->linear, p);
    uint32_t* w = reinterpret_cast<uint32_t*>(p);
    uint32_t old = __atomic_load_n(w, __ATOMIC_RELAXED);
    for (;;) {
        float f;
        memcpy(&f, &old, 4);
        f = flush_subnormal(flush_subnormal(f) + flush_subnormal(v));
        uint32_t next;
        memcpy(&next, &f, 4);
        if (__atomic_compare_exchange_n(w, &old, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return;
    }
}

// cp.async.cg.shared.global [dst], [src], bytes, src_bytes: src_bytes (<= bytes) read from src,
// the rest zero-filled; lands at the wait_group that completes its group.
static inline void cp_async(void* dst, const void* src, unsigned bytes, unsigned src_bytes) {
    if (bytes != 4 && bytes != 8 && bytes != 16) kernel_error("cp.async: %u bytes (4, 8 or 16)", bytes);
    if (src_bytes > bytes) kernel_error("cp.async: src-size %u exceeds cp-size %u", src_bytes, bytes);
    check_smem(dst, bytes, bytes, "cp.async");
    if (src_bytes && reinterpret_cast<uintptr_t>(src) % bytes)
        kernel_error("thread %u: cp.async: global address %p is not %u-byte aligned", current_thread()->linear, src, bytes);
    AsyncCopies* q = current_async();
    if (q->count == q->capacity) grow_async(q);
    AsyncCopy& c = q->items[q->count++];
    c.dst = static_cast<unsigned char*>(dst);
    memcpy(c.data, src, src_bytes);
    memset(c.data + src_bytes, 0, bytes - src_bytes);
    c.bytes = bytes;
    c.group = q->committed;
}
// cp.async.commit_group: the copies issued since the last commit become one group (possibly empty).
static inline void cp_async_commit() { ++current_async()->committed; }
// cp.async.wait_group n: every committed group but the n newest is complete; copies not yet
// committed stay pending. Lands the copies in issue order.
static inline void cp_async_wait(unsigned n) {
    AsyncCopies* q = current_async();
    unsigned keep = 0;
    for (unsigned i = 0; i < q->count; ++i) {
        AsyncCopy& c = q->items[i];
        if (c.group + n < q->committed)
            memcpy(c.dst, c.data, c.bytes);
        else
            q->items[keep++] = c;
    }
    q->count = keep;
}

// ldmatrix.sync.aligned.m8n8.xNUM{.trans}.shared.b16: lanes 8i..8i+7 give the addresses of rows
// 0..7 of matrix i (16 bytes each; the other lanes' addresses are not used); lane l receives in
// register i the elements (l / 4, 2(l % 4)) and (l / 4, 2(l % 4) + 1) of matrix i, or with .trans
// the elements (2(l % 4), l / 4) and (2(l % 4) + 1, l / 4), the lower-numbered in the low half.
struct LdmatrixLane {
    const unsigned char* row;
    uint32_t* r;
};
template <int NUM, bool TRANS>
void ldmatrix_complete(void* const* datas, unsigned mask) {
    (void)mask;  // always the full warp
    uint16_t m[NUM][8][8];
    for (int i = 0; i < NUM; ++i)
        for (int row = 0; row < 8; ++row) memcpy(m[i][row], static_cast<const LdmatrixLane*>(datas[8 * i + row])->row, 16);
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        uint32_t* r = static_cast<const LdmatrixLane*>(datas[lane])->r;
        for (int i = 0; i < NUM; ++i) {
            const uint16_t lo = TRANS ? m[i][2 * t][g] : m[i][g][2 * t], hi = TRANS ? m[i][2 * t + 1][g] : m[i][g][2 * t + 1];
            r[i] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
        }
    }
}
template <int NUM, bool TRANS>
void ldmatrix(uint32_t* r, const void* row_addr, const char* what) {
    if ((current_thread()->linear & 31) < 8 * NUM) check_smem(row_addr, 16, 16, what);
    LdmatrixLane me{static_cast<const unsigned char*>(row_addr), r};
    warp_collective(0xffffffffu, &me, &ldmatrix_complete<NUM, TRANS>, what);
}

template <typename T>
struct ShflLane {
    T value;
    int src_lane;
};
template <typename T>
void shfl_complete(void* const* datas, unsigned mask) {
    T values[32];
    for (unsigned m = mask; m; m &= m - 1) {
        const int l = __builtin_ctz(m);
        values[l] = static_cast<ShflLane<T>*>(datas[l])->value;
    }
    for (unsigned m = mask; m; m &= m - 1) {
        auto* me = static_cast<ShflLane<T>*>(datas[__builtin_ctz(m)]);
        // A source lane outside the mask (or the warp) reads the lane's own value, as the hardware does for out-of-range lanes.
        if (me->src_lane >= 0 && me->src_lane < 32 && (mask >> me->src_lane & 1)) me->value = values[me->src_lane];
    }
}
template <typename T>
T shfl(unsigned mask, T v, int src_lane, const char* what) {
    static_assert(std::is_trivially_copyable<T>::value, "shuffled values are copied bitwise");
    ShflLane<T> me{v, src_lane};
    warp_collective(mask, &me, &shfl_complete<T>, what);
    return me.value;
}

// Runs `kernel(args...)` as a grid on the calling thread (the C++ entry of the sanitizer driver and
// of lcpt_emu_launch's trampolines); returns 0 or a CUresult with the message in err.
typedef void (*BlockThreadFn)(void* params);
int run_grid(const char* name, BlockThreadFn fn, void* params, dim3 grid, dim3 block, unsigned dyn_smem, char* err, size_t errlen);

// Calls the kernel F with its arguments read from cuLaunchKernel's kernelParams, typed by F's own signature.
template <auto F>
struct Trampoline;
template <typename... A, void (*F)(A...)>
struct Trampoline<F> {
    template <size_t... I>
    static void call(void** params, std::index_sequence<I...>) {
        F(*static_cast<std::remove_reference_t<A>*>(params[I])...);
    }
    static void run(void* params) { call(static_cast<void**>(params), std::index_sequence_for<A...>{}); }
    // A typed host-side launch (tests, the sanitizer driver): arguments converted to the kernel's
    // own parameter types, passed as a kernelParams array.
    static int launch(dim3 grid, dim3 block, unsigned dyn_smem, char* err, size_t errlen, const char* name, std::remove_reference_t<A>... args) {
        void* params[sizeof...(A) + 1] = {static_cast<void*>(&args)..., nullptr};
        return run_grid(name, &run, params, grid, block, dyn_smem, err, errlen);
    }
    static constexpr int param_count = sizeof...(A);
    static constexpr size_t param_sizes[sizeof...(A) + 1] = {sizeof(A)..., 0};
};

template <auto F, typename... Args>
int launch(dim3 grid, dim3 block, unsigned dyn_smem, char* err, size_t errlen, const char* name, Args... args) {
    return Trampoline<F>::launch(grid, block, dyn_smem, err, errlen, name, args...);
}

}  // namespace lcpt_emu

#define threadIdx (lcpt_emu::current_thread()->thread_idx)
#define blockIdx (lcpt_emu::current_block()->block_idx)
#define blockDim (lcpt_emu::current_block()->block_dim)
#define gridDim (lcpt_emu::current_block()->grid_dim)
#define warpSize 32

static inline void __syncthreads() { lcpt_emu::syncthreads(); }
template <typename T>
static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const int lane = static_cast<int>(lcpt_emu::current_thread()->linear & 31);
    (void)width;
    return lcpt_emu::shfl(mask, v, lane ^ lane_mask, "__shfl_xor_sync");
}
