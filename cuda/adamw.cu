// Fused AdamW (as ops::adamw, torch's single-tensor path): f32 parameters ("master weights") and
// moments, gradient multiplied by grad_scale (clipping), decoupled weight decay. The step-dependent
// scalars are computed on the host exactly as the reference computes them.
#include "common.cuh"

extern "C" __global__ void adamw_step(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m, float* __restrict__ v,
                                      unsigned long long n, float b1, float b2, float eps, float step_size, float bc2_sqrt,
                                      float decay_factor, float grad_scale) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        const float g = grad[i] * grad_scale;
        float p = param[i] * decay_factor;
        float mi = m[i], vi = v[i];
        mi += (g - mi) * (1.f - b1);
        vi = vi * b2 + g * g * (1.f - b2);
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        p -= step_size * (mi / denom);
        param[i] = p;
        m[i] = mi;
        v[i] = vi;
    }
}
