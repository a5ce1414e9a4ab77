// Fused AdamW (as ops::adamw, torch's single-tensor path): f32 parameters or masters, f32 moments,
// gradient multiplied by grad_scale (clipping), decoupled weight decay. The step-dependent scalars
// are computed on the host exactly as the reference computes them. With a bf16 working copy, the
// same pass also writes the bf16 parameter of each updated master (mixed precision).
#include "common.cuh"

template <bool WORKING>
__device__ __forceinline__ void adamw_impl(float* __restrict__ param, __nv_bfloat16* __restrict__ working, const float* __restrict__ grad,
                                           float* __restrict__ m, float* __restrict__ v, unsigned long long n, float b1, float b2, float eps,
                                           float step_size, float bc2_sqrt, float decay_factor, float grad_scale) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        const float g = grad[i] * grad_scale;
        float p = param[i] * decay_factor;
        float mi = m[i], vi = v[i];
        mi += (g - mi) * (1.f - b1);
        vi = vi * b2 + g * g * (1.f - b2);
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        p -= step_size * (mi / denom);
        param[i] = p;
        if (WORKING) working[i] = __float2bfloat16_rn(p);
        m[i] = mi;
        v[i] = vi;
    }
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
