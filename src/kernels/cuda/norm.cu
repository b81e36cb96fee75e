// RMSNorm of Phi-3's layers, forward and backward (params.cuh: RmsNormFwdParams /
// RmsNormBwdParams). cuBLAS has no norm, and candle's composed version makes five passes
// over the activations and keeps f32 temporaries; here one block per row reads the row
// once for the statistics and once for the output, rounding exactly where transformers'
// Phi3RMSNorm rounds. The backward is fused the same way and can add into an existing
// gradient (the residual branch), which saves a separate add kernel.
#include "common.cuh"

namespace {

template <class T>
__device__ __forceinline__ void rms_norm_fwd(const RmsNormFwdParams<T>& p) {
    __shared__ float red[32];
    require_warps_1d();
    const int width = p.width;
    for (int row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const T* __restrict__ x = p.x + (size_t)row * width;
        T* __restrict__ y = p.y + (size_t)row * width;
        float ss = 0.f;
        for (int c = threadIdx.x; c < width; c += blockDim.x) {
            const float v = to_f32(x[c]);
            ss += v * v;
        }
        ss = block_sum(ss, red);
        const float r = 1.0f / sqrtf(ss / (float)width + p.eps);
        for (int c = threadIdx.x; c < width; c += blockDim.x) {
            const float normed = to_f32(from_f32<T>(to_f32(x[c]) * r));
            y[c] = from_f32<T>(to_f32(p.w[c]) * normed);
        }
        if (threadIdx.x == 0 && p.rstd != nullptr) p.rstd[row] = r;
    }
}

template <class T>
__device__ __forceinline__ void rms_norm_bwd(const RmsNormBwdParams<T>& p) {
    __shared__ float red[32];
    require_warps_1d();
    const int width = p.width;
    for (int row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const T* __restrict__ x = p.x + (size_t)row * width;
        const T* __restrict__ dy = p.dy + (size_t)row * width;
        T* dx = p.dx + (size_t)row * width;
        float dot = 0.f;
        for (int c = threadIdx.x; c < width; c += blockDim.x)
            dot += to_f32(dy[c]) * to_f32(p.w[c]) * to_f32(x[c]);
        dot = block_sum(dot, red);
        const float r = p.rstd[row];
        const float k = r * r * r * (dot / (float)width);
        for (int c = threadIdx.x; c < width; c += blockDim.x) {
            const float gw = to_f32(dy[c]) * to_f32(p.w[c]);
            float v = r * gw - to_f32(x[c]) * k;
            if (p.accumulate) v += to_f32(dx[c]);
            dx[c] = from_f32<T>(v);
        }
    }
}

}  // namespace

extern "C" __global__ void rms_norm_fwd_f32(const RmsNormFwdParams<float> p) { rms_norm_fwd(p); }
FT_EXPORT(rms_norm_fwd_f32, RmsNormFwdParams<float>)
extern "C" __global__ void rms_norm_fwd_f16(const RmsNormFwdParams<__half> p) { rms_norm_fwd(p); }
FT_EXPORT(rms_norm_fwd_f16, RmsNormFwdParams<__half>)
extern "C" __global__ void rms_norm_fwd_bf16(const RmsNormFwdParams<__nv_bfloat16> p) { rms_norm_fwd(p); }
FT_EXPORT(rms_norm_fwd_bf16, RmsNormFwdParams<__nv_bfloat16>)

extern "C" __global__ void rms_norm_bwd_f32(const RmsNormBwdParams<float> p) { rms_norm_bwd(p); }
FT_EXPORT(rms_norm_bwd_f32, RmsNormBwdParams<float>)
extern "C" __global__ void rms_norm_bwd_f16(const RmsNormBwdParams<__half> p) { rms_norm_bwd(p); }
FT_EXPORT(rms_norm_bwd_f16, RmsNormBwdParams<__half>)
extern "C" __global__ void rms_norm_bwd_bf16(const RmsNormBwdParams<__nv_bfloat16> p) { rms_norm_bwd(p); }
FT_EXPORT(rms_norm_bwd_bf16, RmsNormBwdParams<__nv_bfloat16>)
