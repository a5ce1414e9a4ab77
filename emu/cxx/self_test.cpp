// Test kernels of the emulator's own unit tests (lcpt_emu_self_test, emu/src/kernels.rs). They are
// not in the kernel registry, so the CUDA backend cannot reach them.
#include <stdio.h>
#include <string.h>

#include "emu_abi.h"
#include "cuda_emu.h"

namespace {

// out[t] = value thread t+1 wrote before the barrier, over several rounds; without a working
// barrier a thread reads its neighbour's previous round (or the NaN fill of shared memory).
void barrier_kernel(float* out) {
    float* s = reinterpret_cast<float*>(lcpt_emu::current_block()->dynamic_smem);
    const unsigned t = threadIdx.x, n = blockDim.x;
    float acc = 0.f;
    for (int round = 0; round < 3; ++round) {
        s[t] = static_cast<float>(t * 10 + round);
        __syncthreads();
        acc += s[(t + 1) % n];
        __syncthreads();
    }
    out[t] = acc;
}

// out[4t + k] = __shfl_xor_sync(full, value of lane, 1 << k) for k < 3, then the warp sum of t.
void shuffle_kernel(float* out) {
    const unsigned t = threadIdx.x;
    const float v = static_cast<float>(t) + 0.5f;
    for (int k = 0; k < 3; ++k) out[4 * t + k] = __shfl_xor_sync(0xffffffffu, v, 1 << k);
    float sum = static_cast<float>(t);
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    out[4 * t + 3] = sum;
}

// Lanes 0..15 return; the others shuffle with a full mask: lanes 0..15 never arrive.
void missing_lane_kernel(float* out) {
    if ((threadIdx.x & 31) < 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// Lanes 0..15 wait at the barrier while lanes 16..31 wait at a full-warp shuffle: neither completes.
void deadlock_kernel(float* out) {
    if ((threadIdx.x & 31) < 16) {
        __syncthreads();
    } else {
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
    }
}

// ldmatrix: four 8×8 b16 matrices whose element (i, r, c) is (i << 8) | (r << 4) | c, row r of
// matrix i at the 16-byte slot (8i + r)·5 mod 32 of shared memory (so every lane's address
// matters). out (as u32) [variant][lane][4] for the variants x1, x2, x4, x1.trans, x2.trans,
// x4.trans; registers a variant does not load stay 0. Lanes whose address is not used pass null.
void ldmatrix_kernel(float* out) {
    uint16_t* s = reinterpret_cast<uint16_t*>(lcpt_emu::current_block()->dynamic_smem);
    const unsigned lane = threadIdx.x;
    for (unsigned e = lane; e < 32 * 8; e += 32) {
        const unsigned i = e / 64, r = e / 8 % 8, c = e % 8;
        s[((8 * i + r) * 5 % 32) * 8 + c] = static_cast<uint16_t>(i << 8 | r << 4 | c);
    }
    __syncthreads();
    uint32_t* o = reinterpret_cast<uint32_t*>(out);
    const void* row = s + ((lane * 5) % 32) * 8;  // lane 8i + r: row r of matrix i
    for (int v = 0; v < 6; ++v) {
        uint32_t r[4] = {0, 0, 0, 0};
        const int num = v % 3 == 0 ? 1 : v % 3 == 1 ? 2 : 4;
        const void* addr = lane < 8u * num ? row : nullptr;
        switch (v) {
            case 0: lcpt_emu::ldmatrix<1, false>(r, addr, "ldmatrix.x1"); break;
            case 1: lcpt_emu::ldmatrix<2, false>(r, addr, "ldmatrix.x2"); break;
            case 2: lcpt_emu::ldmatrix<4, false>(r, addr, "ldmatrix.x4"); break;
            case 3: lcpt_emu::ldmatrix<1, true>(r, addr, "ldmatrix.x1.trans"); break;
            case 4: lcpt_emu::ldmatrix<2, true>(r, addr, "ldmatrix.x2.trans"); break;
            default: lcpt_emu::ldmatrix<4, true>(r, addr, "ldmatrix.x4.trans"); break;
        }
        for (int k = 0; k < 4; ++k) o[(v * 32 + lane) * 4 + k] = r[k];
    }
}

// cp.async groups: thread t owns 16-byte slots 4t..4t+3 of shared memory (poisoned 0xff…) and
// copies 16 bytes of value 1, 2, 3 into slots 0, 1, 2 as three groups, then slot 3 (value 4,
// src-size 8: half zero-filled) without committing it. out (as u32) [t][step][slot] holds the
// first and last word of each slot, [t][step][slot][2], after wait_group 2, 1, 0, then commit +
// wait_group 0.
void cp_async_groups_kernel(float* out) {
    unsigned char* s = lcpt_emu::current_block()->dynamic_smem + threadIdx.x * 64;
    alignas(16) uint32_t src16[4][4];
    for (int k = 0; k < 4; ++k)
        for (int w = 0; w < 4; ++w) src16[k][w] = static_cast<uint32_t>(k + 1);
    uint32_t* o = reinterpret_cast<uint32_t*>(out) + threadIdx.x * 32;
    auto record = [&](int step) {
        for (int slot = 0; slot < 4; ++slot) {
            memcpy(&o[(step * 4 + slot) * 2], s + slot * 16, 4);
            memcpy(&o[(step * 4 + slot) * 2 + 1], s + slot * 16 + 12, 4);
        }
    };
    for (int k = 0; k < 3; ++k) {
        lcpt_emu::cp_async(s + k * 16, src16[k], 16, 16);
        lcpt_emu::cp_async_commit();
    }
    lcpt_emu::cp_async(s + 48, src16[3], 16, 8);
    lcpt_emu::cp_async_wait(2);
    record(0);
    lcpt_emu::cp_async_wait(1);
    record(1);
    lcpt_emu::cp_async_wait(0);
    record(2);
    lcpt_emu::cp_async_commit();
    lcpt_emu::cp_async_wait(0);
    record(3);
}

// A tile exchange through cp.async: thread t copies in[t] (16 bytes) into its slot, waits, and
// after a barrier reads its neighbour's slot: out[t] = in[(t + 1) % n]. The broken variants drop
// the barrier (the neighbour's copy has not landed: the poison is read) or wait for too few groups.
template <int VARIANT>  // 0 correct, 1 no barrier, 2 wait_group 1 with one group committed
void cp_async_exchange_kernel(float* out) {
    const unsigned t = threadIdx.x, n = blockDim.x;
    float* s = reinterpret_cast<float*>(lcpt_emu::current_block()->dynamic_smem);
    alignas(16) float v[4] = {static_cast<float>(t) + 0.5f, 0.f, 0.f, 0.f};
    lcpt_emu::cp_async(s + 4 * t, v, 16, 16);
    lcpt_emu::cp_async_commit();
    lcpt_emu::cp_async_wait(VARIANT == 2 ? 1 : 0);
    if (VARIANT != 1) __syncthreads();
    out[t] = s[4 * ((t + 1) % n)];
    lcpt_emu::cp_async_wait(0);
}

// Issues a copy and returns without waiting for it.
void cp_async_never_waited_kernel(float* out) {
    alignas(16) float v[4] = {1.f, 2.f, 3.f, 4.f};
    lcpt_emu::cp_async(lcpt_emu::current_block()->dynamic_smem + 16 * threadIdx.x, v, 16, 16);
    lcpt_emu::cp_async_commit();
    out[threadIdx.x] = 0.f;
}

// Every thread of every block (8 blocks, run on several host threads) adds 1 to out[0] and 0.5 to
// out[1 + t % 8]; block 0's thread 0 adds a subnormal to out[10] (flushed: stays 0) and takes
// out[11] from 1.5·2⁻¹²⁶ to a subnormal result, 2⁻¹²⁷ (flushed to 0).
void red_add_kernel(float* out) {
    lcpt_emu::red_add_f32(out, 1.f);
    lcpt_emu::red_add_f32(out + 1 + threadIdx.x % 8, 0.5f);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        lcpt_emu::red_add_f32(out + 10, 1e-40f);
        lcpt_emu::red_add_f32(out + 11, -1.17549435e-38f);
    }
}

}  // namespace

extern "C" int lcpt_emu_self_test(const char* which, unsigned threads, float* out, char* err, size_t errlen) {
    const dim3 grid{1, 1, 1}, block{threads, 1, 1};
    if (strcmp(which, "barrier") == 0)
        return lcpt_emu::launch<&barrier_kernel>(grid, block, threads * sizeof(float), err, errlen, "barrier_test", out);
    if (strcmp(which, "shuffle") == 0) return lcpt_emu::launch<&shuffle_kernel>(grid, block, 0, err, errlen, "shuffle_test", out);
    if (strcmp(which, "missing_lane") == 0) return lcpt_emu::launch<&missing_lane_kernel>(grid, block, 0, err, errlen, "missing_lane_test", out);
    if (strcmp(which, "deadlock") == 0) return lcpt_emu::launch<&deadlock_kernel>(grid, block, 0, err, errlen, "deadlock_test", out);
    if (strcmp(which, "ldmatrix") == 0) return lcpt_emu::launch<&ldmatrix_kernel>(grid, block, 512, err, errlen, "ldmatrix_test", out);
    if (strcmp(which, "cp_async_groups") == 0)
        return lcpt_emu::launch<&cp_async_groups_kernel>(grid, block, threads * 64, err, errlen, "cp_async_groups_test", out);
    if (strcmp(which, "cp_async_exchange") == 0)
        return lcpt_emu::launch<&cp_async_exchange_kernel<0>>(grid, block, threads * 16, err, errlen, "cp_async_exchange_test", out);
    if (strcmp(which, "cp_async_no_barrier") == 0)
        return lcpt_emu::launch<&cp_async_exchange_kernel<1>>(grid, block, threads * 16, err, errlen, "cp_async_no_barrier_test", out);
    if (strcmp(which, "cp_async_wait_too_few") == 0)
        return lcpt_emu::launch<&cp_async_exchange_kernel<2>>(grid, block, threads * 16, err, errlen, "cp_async_wait_too_few_test", out);
    if (strcmp(which, "cp_async_never_waited") == 0)
        return lcpt_emu::launch<&cp_async_never_waited_kernel>(grid, block, threads * 16, err, errlen, "cp_async_never_waited_test", out);
    if (strcmp(which, "red_add") == 0) return lcpt_emu::launch<&red_add_kernel>(dim3{8, 1, 1}, block, 0, err, errlen, "red_add_test", out);
    if (err && errlen) snprintf(err, errlen, "no self test named %s", which);
    return 1;
}
