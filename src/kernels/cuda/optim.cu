// AdamW on the flat f32 LoRA parameters with gradient unscaling, global-norm clipping and
// the non-finite check in one pass (params.cuh: AdamWParams). The norm comes from sum_f32
// on the device, so a training step never waits for the host between backward and update;
// a non-finite norm skips the step and reports it through *status.
#include "common.cuh"

namespace {

__device__ __forceinline__ void adamw(const AdamWParams& p) {
    const double norm = sqrt(*p.norm_sq) * (double)p.grad_scale;
    const bool first = blockIdx.x == 0 && threadIdx.x == 0;
    if (!isfinite(norm)) {
        if (first) *p.status = 1;
        return;
    }
    if (first) *p.status = 0;
    const double clip = p.max_norm > 0.f ? fmin(1.0, (double)p.max_norm / (norm + 1e-6)) : 1.0;
    const float gscale = (float)((double)p.grad_scale * clip);
    const float decay = 1.0f - p.lr * p.weight_decay;
    const float one_m_b1 = 1.0f - p.beta1;
    const float one_m_b2 = 1.0f - p.beta2;
    const float step = p.lr / p.bc1;
    for (unsigned long long i = grid_start(); i < p.n; i += grid_stride()) {
        const float g = p.g[i] * gscale;
        float m = p.m[i];
        m = m + (g - m) * one_m_b1;
        const float v = p.beta2 * p.v[i] + one_m_b2 * (g * g);
        const float denom = sqrtf(v) / p.bc2_sqrt + p.eps;
        p.p[i] = p.p[i] * decay - step * (m / denom);
        p.m[i] = m;
        p.v[i] = v;
    }
}

}  // namespace

extern "C" __global__ void adamw_f32(const AdamWParams p) { adamw(p); }
FT_EXPORT(adamw_f32, AdamWParams)
