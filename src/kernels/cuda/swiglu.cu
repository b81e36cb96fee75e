// SwiGLU of the fused gate_up projection, forward and backward (params.cuh: SwigluParams).
// The forward reads each [gate | up] row once and writes silu(gate) · up; composed from
// candle ops it is a split, a silu, a multiply and two temporaries. The backward writes
// d[gate | up] in one pass from gate, up and dy, with no saved activation.
#include "common.cuh"

namespace {

template <class T>
__device__ __forceinline__ void swiglu_fwd(const SwigluParams<T>& p) {
    const unsigned long long inter = (unsigned long long)p.inter;
    const unsigned long long n = (unsigned long long)p.rows * inter;
    for (unsigned long long i = grid_start(); i < n; i += grid_stride()) {
        const unsigned long long r = i / inter, c = i - r * inter;
        const T* gu = p.gu + r * 2 * inter;
        const float g = to_f32(gu[c]);
        const float u = to_f32(gu[inter + c]);
        p.out[i] = from_f32<T>(g / (1.0f + expf(-g)) * u);
    }
}

template <class T>
__device__ __forceinline__ void swiglu_bwd(const SwigluParams<T>& p) {
    const unsigned long long inter = (unsigned long long)p.inter;
    const unsigned long long n = (unsigned long long)p.rows * inter;
    for (unsigned long long i = grid_start(); i < n; i += grid_stride()) {
        const unsigned long long r = i / inter, c = i - r * inter;
        const T* gu = p.gu + r * 2 * inter;
        T* dgu = p.out + r * 2 * inter;
        const float g = to_f32(gu[c]);
        const float u = to_f32(gu[inter + c]);
        const float dy = to_f32(p.dy[i]);
        const float sg = 1.0f / (1.0f + expf(-g));
        dgu[c] = from_f32<T>(dy * u * sg * (1.0f + g * (1.0f - sg)));
        dgu[inter + c] = from_f32<T>(dy * g * sg);
    }
}

}  // namespace

extern "C" __global__ void swiglu_fwd_f32(const SwigluParams<float> p) { swiglu_fwd(p); }
FT_EXPORT(swiglu_fwd_f32, SwigluParams<float>)
extern "C" __global__ void swiglu_fwd_f16(const SwigluParams<__half> p) { swiglu_fwd(p); }
FT_EXPORT(swiglu_fwd_f16, SwigluParams<__half>)
extern "C" __global__ void swiglu_fwd_bf16(const SwigluParams<__nv_bfloat16> p) { swiglu_fwd(p); }
FT_EXPORT(swiglu_fwd_bf16, SwigluParams<__nv_bfloat16>)

extern "C" __global__ void swiglu_bwd_f32(const SwigluParams<float> p) { swiglu_bwd(p); }
FT_EXPORT(swiglu_bwd_f32, SwigluParams<float>)
extern "C" __global__ void swiglu_bwd_f16(const SwigluParams<__half> p) { swiglu_bwd(p); }
FT_EXPORT(swiglu_bwd_f16, SwigluParams<__half>)
extern "C" __global__ void swiglu_bwd_bf16(const SwigluParams<__nv_bfloat16> p) { swiglu_bwd(p); }
FT_EXPORT(swiglu_bwd_bf16, SwigluParams<__nv_bfloat16>)
