// Fused AdamW (as ops::adamw, torch's single-tensor path): f32 parameters or masters, f32 moments,
// gradient multiplied by grad_scale (clipping), decoupled weight decay. The step-dependent scalars
// are computed on the host exactly as the reference computes them. With a bf16 working copy, the
// same pass also writes the bf16 parameter of each updated master (mixed precision).
#include "common.cuh"

// One element's update; returns the new parameter.
__device__ __forceinline__ float adamw_update(float p, float g, float& m, float& v, float b1, float b2, float eps, float step_size, float bc2_sqrt,
                                              float decay_factor, float grad_scale) {
    g *= grad_scale;
    p *= decay_factor;
    m += (g - m) * (1.f - b1);
    v = v * b2 + g * g * (1.f - b2);
    const float denom = sqrtf(v) / bc2_sqrt + eps;
    return p - step_size * (m / denom);
}

// 16-byte packs of 4 where param, grad and the moments are aligned (the bf16 copy then takes 8-byte
// stores), one element at a time otherwise.
template <bool WORKING>
__device__ __forceinline__ void adamw_impl(float* __restrict__ param, __nv_bfloat16* __restrict__ working, const float* __restrict__ grad,
                                           float* __restrict__ m, float* __restrict__ v, unsigned long long n, float b1, float b2, float eps,
                                           float step_size, float bc2_sqrt, float decay_factor, float grad_scale) {
    const bool packed = lcpt::aligned16(param) && lcpt::aligned16(grad) && lcpt::aligned16(m) && lcpt::aligned16(v) &&
                        (!WORKING || (reinterpret_cast<uintptr_t>(working) & 7) == 0);
    lcpt::grid_stride_packed<4>(
        n, packed,
        [&](unsigned long long i) {
            lcpt::Pack<float> p = lcpt::load_pack(param, i), mi = lcpt::load_pack(m, i), vi = lcpt::load_pack(v, i);
            const lcpt::Pack<float> g = lcpt::load_pack(grad, i);
#pragma unroll
            for (int k = 0; k < 4; ++k) p.v[k] = adamw_update(p.v[k], g.v[k], mi.v[k], vi.v[k], b1, b2, eps, step_size, bc2_sqrt, decay_factor, grad_scale);
            lcpt::store_pack(param, i, p);
            lcpt::store_pack(m, i, mi);
            lcpt::store_pack(v, i, vi);
            if (WORKING) {
                lcpt::check_vector_access(working + 4 * i, 8);
                reinterpret_cast<uint2*>(working)[i] = make_uint2(lcpt::pack_bf16x2(p.v[0], p.v[1]), lcpt::pack_bf16x2(p.v[2], p.v[3]));
            }
        },
        [&](unsigned long long i) {
            const float p = adamw_update(param[i], grad[i], m[i], v[i], b1, b2, eps, step_size, bc2_sqrt, decay_factor, grad_scale);
            param[i] = p;
            if (WORKING) working[i] = __float2bfloat16_rn(p);
        });
}

// The entry point: one launch for a list of tensors (blockIdx.y picks the tensor, blocks along x
// stride over its elements), so a model's few hundred parameters cost one launch, not hundreds; a
// single tensor is a list of one.
// The table is built by the host (src/cuda/mod.rs, `adamw_steps`) with this exact layout.
struct AdamWTensorDesc {
    float* param;             // f32 parameter or master
    __nv_bfloat16* working;   // its bf16 copy to write, or null
    const float* grad;
    float* m;
    float* v;
    unsigned long long n;
    float decay_factor;       // 1 − lr·weight_decay, or 1 without decay
    float pad;
};

extern "C" __global__ void adamw_multi(const AdamWTensorDesc* __restrict__ tensors, float b1, float b2, float eps, float step_size, float bc2_sqrt,
                                       float grad_scale) {
    const AdamWTensorDesc t = tensors[blockIdx.y];
    if (t.working)
        adamw_impl<true>(t.param, t.working, t.grad, t.m, t.v, t.n, b1, b2, eps, step_size, bc2_sqrt, t.decay_factor, grad_scale);
    else
        adamw_impl<false>(t.param, nullptr, t.grad, t.m, t.v, t.n, b1, b2, eps, step_size, bc2_sqrt, t.decay_factor, grad_scale);
}
