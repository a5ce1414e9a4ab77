// Runs production kernels of cuda/*.cu and the broken kernels of broken_kernels.cu on the emulated
// block runtime, built with a sanitizer by sanitizers.sh. `clean` runs correct kernels and must
// exit 0 without a report; each other mode runs one broken kernel, which the sanitizer must report.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "cuda_emu.h"
#include "attention.cu"
#include "attention_fa2.cu"
#include "rmsnorm.cu"
#include "rope.cu"
#include "swiglu.cu"
#include "broken_kernels.cu"

namespace {

char err[1024];

void check(int rc, const char* what) {
    if (rc != 0) {
        fprintf(stderr, "%s: launch failed (%d): %s\n", what, rc, err);
        exit(2);
    }
}

std::vector<float> values(size_t n, unsigned seed) {
    std::vector<float> v(n);
    unsigned s = seed * 2654435761u + 1;
    for (auto& x : v) {
        s = s * 1664525u + 1013904223u;
        x = static_cast<float>(s >> 8) / static_cast<float>(1u << 24) * 2.f - 1.f;
    }
    return v;
}

int run_clean() {
    // rmsnorm: static __shared__, block_sum (warp shuffles and two barriers).
    const int rows = 3, dim = 96;
    std::vector<float> x = values(rows * dim, 1), w = values(dim, 2), y(rows * dim), rstd(rows);
    check(lcpt_emu::launch<&rmsnorm_fwd_f32>(dim3{rows, 1, 1}, dim3{64, 1, 1}, 0, err, sizeof err, "rmsnorm_fwd_f32", y.data(), rstd.data(),
                                             x.data(), w.data(), dim, 1e-5f, 1.f / dim),
          "rmsnorm_fwd_f32");
    for (int r = 0; r < rows; ++r) {
        double ss = 0;
        for (int c = 0; c < dim; ++c) ss += double(x[r * dim + c]) * x[r * dim + c];
        const double want = 1.0 / sqrt(ss / dim + 1e-5);
        if (fabs(rstd[r] - want) > 1e-4 * want) {
            fprintf(stderr, "rmsnorm_fwd_f32: rstd[%d] = %g, want %g\n", r, rstd[r], want);
            return 1;
        }
    }
    // attention forward, head_dim 64, bf16: dynamic shared memory at exactly the launch's size, mma.
    const int tokens = 80, heads = 2, kv_heads = 1, d = 64, ld = d + 8;
    auto to_bf16 = [](const std::vector<float>& v) {
        std::vector<__nv_bfloat16> b(v.size());
        for (size_t i = 0; i < v.size(); ++i) b[i] = __float2bfloat16_rn(v[i]);
        return b;
    };
    std::vector<__nv_bfloat16> q = to_bf16(values(tokens * heads * d, 3)), k = to_bf16(values(tokens * kv_heads * d, 4)),
                               v = to_bf16(values(tokens * kv_heads * d, 5)), out(tokens * heads * d);
    std::vector<float> lse(tokens * heads);
    std::vector<int4> tiles = {int4{0, tokens, 0, 0}, int4{0, tokens, 64, 0}};
    const unsigned smem = (64 * ld + 64 * ld + d * (64 + 8)) * 2;
    check(lcpt_emu::launch<&attn_fwd_d64_bf16>(dim3{2, heads, 1}, dim3{128, 1, 1}, smem, err, sizeof err, "attn_fwd_d64_bf16", out.data(), lse.data(),
                                               q.data(), k.data(), v.data(), tiles.data(), heads, kv_heads, 0.125f * 1.4426950408889634f),
          "attn_fwd_d64_bf16");
    for (float l : lse)
        if (!isfinite(l)) {
            fprintf(stderr, "attn_fwd_d64_bf16: non-finite lse\n");
            return 1;
        }
    // The pipelined forward (cp.async, ldmatrix, swizzled tiles) on the same inputs, at the launch's
    // exact shared memory; its output must agree with the first forward's.
    std::vector<__nv_bfloat16> out2(tokens * heads * d);
    std::vector<float> lse2(tokens * heads);
    std::vector<int4> tiles2 = {int4{0, tokens, 0, 0}};
    check(lcpt_emu::launch<&attn_fa2_fwd_d64_bf16>(dim3{1, heads, 1}, dim3{128, 1, 1}, (128 + 2 * 64) * d * 2, err, sizeof err, "attn_fa2_fwd_d64_bf16",
                                                   out2.data(), lse2.data(), q.data(), k.data(), v.data(), tiles2.data(), heads, kv_heads,
                                                   0.125f * 1.4426950408889634f),
          "attn_fa2_fwd_d64_bf16");
    for (size_t i = 0; i < lse.size(); ++i)
        if (!(fabsf(lse2[i] - lse[i]) <= 1e-4f * fabsf(lse[i]) + 1e-5f)) {
            fprintf(stderr, "attn_fa2_fwd_d64_bf16: lse[%zu] = %g, the first forward gives %g\n", i, lse2[i], lse[i]);
            return 1;
        }
    // The fused backward (five matmuls, dQ/dK/dV by atomic adds into f32 accumulators of exactly
    // their size), over the two 64-key tiles, one block per (key tile, query head).
    std::vector<__nv_bfloat16> d_out = to_bf16(values(tokens * heads * d, 12));
    std::vector<float> delta(tokens * heads, 0.f), dq(tokens * heads * d, 0.f), dk(tokens * kv_heads * d, 0.f), dv(tokens * kv_heads * d, 0.f);
    const unsigned fused_smem = ((2 * 64 + 2 * 32) * ld + 2 * d * (32 + 8)) * 2 + 2 * 32 * 4 + (d * (64 + 8) + 64 * (32 + 8)) * 2;
    check(lcpt_emu::launch<&attn_bwd_fused_d64_bf16>(dim3{2, heads, 1}, dim3{128, 1, 1}, fused_smem, err, sizeof err, "attn_bwd_fused_d64_bf16",
                                                     dk.data(), dv.data(), dq.data(), q.data(), k.data(), v.data(), d_out.data(), lse.data(),
                                                     delta.data(), tiles.data(), heads, kv_heads, 0.125f, 0.125f * 1.4426950408889634f),
          "attn_bwd_fused_d64_bf16");
    for (float x : dq)
        if (!isfinite(x)) {
            fprintf(stderr, "attn_bwd_fused_d64_bf16: non-finite dq\n");
            return 1;
        }
    // The racy kernel with its barrier.
    std::vector<float> in = values(256, 6), o(256);
    check(lcpt_emu::launch<&fixed_race>(dim3{2, 1, 1}, dim3{256, 1, 1}, 0, err, sizeof err, "fixed_race", o.data(), in.data()), "fixed_race");
    for (int t = 0; t < 256; ++t)
        if (o[t] != in[(t + 1) % 256]) {
            fprintf(stderr, "fixed_race: out[%d] = %g, want %g\n", t, o[t], in[(t + 1) % 256]);
            return 1;
        }
    // Memory-bound kernels in 16-byte packs with a tail (1,003 = 125 packs of 8 + 3), on buffers of
    // exactly their length: a pack read or written past the end is an ASan report.
    const unsigned long long n = 1003;
    std::vector<__nv_bfloat16> gate = to_bf16(values(n, 8)), up = to_bf16(values(n, 9)), dout = to_bf16(values(n, 10)), dgate(n), dup(n);
    check(lcpt_emu::launch<&swiglu_bwd_bf16>(dim3{2, 1, 1}, dim3{64, 1, 1}, 0, err, sizeof err, "swiglu_bwd_bf16", dgate.data(), dup.data(), dout.data(),
                                             gate.data(), up.data(), n),
          "swiglu_bwd_bf16");
    // RoPE in place on [3 tokens, 3 heads, 64], two heads per thread (the second group has one).
    std::vector<__nv_bfloat16> qr = to_bf16(values(3 * 3 * 64, 11));
    std::vector<unsigned> pos = {0, 5, 4095};
    std::vector<float> inv_freq(32);
    for (int i = 0; i < 32; ++i) inv_freq[i] = powf(10000.f, -(2.f * i) / 64.f);
    check(lcpt_emu::launch<&rope_fwd_bf16>(dim3{1, 1, 1}, dim3{32, 1, 1}, 0, err, sizeof err, "rope_fwd_bf16", qr.data(), qr.data(), pos.data(),
                                           inv_freq.data(), 3ull, 3, 64, 0, 2),
          "rope_fwd_bf16");
    printf("clean: rmsnorm_fwd_f32, attn_fwd_d64_bf16, attn_fa2_fwd_d64_bf16, attn_bwd_fused_d64_bf16, swiglu_bwd_bf16, rope_fwd_bf16, fixed_race ran without a report\n");
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    const char* mode = argc > 1 ? argv[1] : "";
    std::vector<float> in = values(256, 7), out(257);
    if (strcmp(mode, "clean") == 0) return run_clean();
    if (strcmp(mode, "oob-shared") == 0)
        check(lcpt_emu::launch<&broken_oob_shared>(dim3{1, 1, 1}, dim3{128, 1, 1}, 128 * sizeof(float), err, sizeof err, "broken_oob_shared",
                                                   out.data(), in.data()),
              mode);
    else if (strcmp(mode, "oob-global") == 0) {
        float* buf = static_cast<float*>(malloc(100 * sizeof(float)));  // a device allocation of 100 floats
        check(lcpt_emu::launch<&broken_oob_global>(dim3{1, 1, 1}, dim3{64, 1, 1}, 0, err, sizeof err, "broken_oob_global", buf, 100ull), mode);
        free(buf);
    } else if (strcmp(mode, "hidden-race") == 0) {
        // Thread 0 reads the last thread's slot, which it cannot have written yet in any order that
        // runs thread 0 first: only threads 1… are checked, which thread order gets right.
        check(lcpt_emu::launch<&hidden_race>(dim3{1, 1, 1}, dim3{128, 1, 1}, 0, err, sizeof err, "hidden_race", out.data(), in.data()), mode);
        for (int t = 1; t < 128; ++t)
            if (out[t] != in[t - 1]) {
                printf("hidden-race: wrong result: out[%d] = %g, want %g (the race shows in this schedule)\n", t, out[t], in[t - 1]);
                return 1;
            }
    } else if (strcmp(mode, "cp-async-race") == 0) {
        check(lcpt_emu::launch<&broken_cp_async_race>(dim3{1, 1, 1}, dim3{64, 1, 1}, 64 * 16, err, sizeof err, "broken_cp_async_race", out.data(),
                                                      in.data()),
              mode);
    } else if (strcmp(mode, "race") == 0)
        check(lcpt_emu::launch<&broken_race>(dim3{1, 1, 1}, dim3{64, 1, 1}, 0, err, sizeof err, "broken_race", out.data(), in.data()), mode);
    else {
        fprintf(stderr, "usage: %s clean|oob-shared|oob-global|race|hidden-race|cp-async-race\n", argv[0]);
        return 2;
    }
    printf("%s: ran to the end without a sanitizer report\n", mode);
    return 0;
}
