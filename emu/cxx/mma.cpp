// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, lane by lane, per the PTX ISA's fragment
// layouts for that shape (groupID g = lane / 4, threadID_in_group t = lane % 4; two bf16 per 32-bit
// register, the lower-numbered element in the low half):
//   A 16x16 row-major: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//   B 16x8 (col):      b0 = B[2t..2t+1][g],  b1 = B[2t+8..2t+9][g]
//   C, D 16x8 f32:     c[0], c[1] = C[g][2t], C[g][2t+1]; c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
// Arithmetic (the hardware's internal order and rounding are not specified): each product of two
// bf16 is exact in f32; the 16 products of an output are summed in f32 in k order starting from
// 0, and the sum is then added to the accumulator once: d = c + Σ_k a·b.
#include "cuda_emu.h"

namespace lcpt_emu {
namespace {

struct MmaLane {
    float* d;  // in: C, out: D
    const uint32_t* a;
    uint32_t b0, b1;
};

float lo_bf16(uint32_t r) { return __bfloat162float(__nv_bfloat16{static_cast<unsigned short>(r & 0xffffu)}); }
float hi_bf16(uint32_t r) { return __bfloat162float(__nv_bfloat16{static_cast<unsigned short>(r >> 16)}); }

void mma_complete(void* const* datas, unsigned mask) {
    (void)mask;  // always the full warp
    float A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const MmaLane* m = static_cast<const MmaLane*>(datas[lane]);
        const int g = lane >> 2, t = lane & 3;
        for (int r = 0; r < 4; ++r) {
            const int row = g + (r & 1) * 8, col = 2 * t + (r >> 1) * 8;
            A[row][col] = lo_bf16(m->a[r]);
            A[row][col + 1] = hi_bf16(m->a[r]);
        }
        B[2 * t][g] = lo_bf16(m->b0);
        B[2 * t + 1][g] = hi_bf16(m->b0);
        B[2 * t + 8][g] = lo_bf16(m->b1);
        B[2 * t + 9][g] = hi_bf16(m->b1);
        for (int e = 0; e < 4; ++e) C[g + (e >> 1) * 8][2 * t + (e & 1)] = m->d[e];
    }
    for (int lane = 0; lane < 32; ++lane) {
        const MmaLane* m = static_cast<const MmaLane*>(datas[lane]);
        const int g = lane >> 2, t = lane & 3;
        for (int e = 0; e < 4; ++e) {
            const int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
            float sum = 0.f;
            for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
            m->d[e] = C[row][col] + sum;
        }
    }
}

}  // namespace

void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    MmaLane me{d, a, b0, b1};
    // .sync.aligned: every lane of the warp executes the same mma.
    warp_collective(0xffffffffu, &me, &mma_complete, "mma.sync.m16n8k16");
}

}  // namespace lcpt_emu

// The one-lane entry the unit tests call (emu/src/kernels.rs): a warp of 32 fibers, each passing
// its own fragments, so the test exercises the same exchange the kernels do.
namespace {
struct MmaTestArgs {
    float* d;            // [32][4] in/out
    const uint32_t* a;   // [32][4]
    const uint32_t* b;   // [32][2]
};
void mma_test_kernel(MmaTestArgs args) {
    const unsigned lane = threadIdx.x;
    float d[4];
    uint32_t a[4];
    for (int e = 0; e < 4; ++e) {
        d[e] = args.d[lane * 4 + e];
        a[e] = args.a[lane * 4 + e];
    }
    lcpt_emu::mma_m16n8k16_bf16(d, a, args.b[lane * 2], args.b[lane * 2 + 1]);
    for (int e = 0; e < 4; ++e) args.d[lane * 4 + e] = d[e];
}
}  // namespace

extern "C" int lcpt_emu_test_mma(float* d, const uint32_t* a, const uint32_t* b, char* err, size_t errlen) {
    return lcpt_emu::launch<&mma_test_kernel>(dim3{1, 1, 1}, dim3{32, 1, 1}, 0, err, errlen, "mma_test", MmaTestArgs{d, a, b});
}
