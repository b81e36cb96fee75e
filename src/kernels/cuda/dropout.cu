// LoRA dropout from a counter-based hash (params.cuh: DropoutParams). The mask is a pure
// function of (key, element index), the same on the CPU (src/kernels/dropout.rs) and here,
// so no mask is drawn on the host, stored or uploaded, and the backward regenerates it.
// Check values for a twin: key = 0x0123456789ABCDEF, p = 0.25, elements 0..7 draw
//     uniform 0.08389616 0.83379090 0.18580192 0.63604885 0.00488734 0.08099884 0.72260064 0.53590894
//     kept    0          1          0          1          0          0          1          1
#include "common.cuh"

namespace {

__device__ __forceinline__ float dropout_uniform(unsigned long long key, unsigned long long i) {
    unsigned long long z = key + (i + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    return (float)(z >> 40) * 0x1p-24f;
}

template <class T>
__device__ __forceinline__ void dropout(const DropoutParams<T>& p) {
    for (unsigned long long i = grid_start(); i < p.n; i += grid_stride()) {
        const bool keep = dropout_uniform(p.key, i) >= p.p;
        p.y[i] = from_f32<T>(keep ? to_f32(p.x[i]) * p.keep_scale : 0.0f);
    }
}

}  // namespace

extern "C" __global__ void dropout_f32(const DropoutParams<float> p) { dropout(p); }
FT_EXPORT(dropout_f32, DropoutParams<float>)
extern "C" __global__ void dropout_f16(const DropoutParams<__half> p) { dropout(p); }
FT_EXPORT(dropout_f16, DropoutParams<__half>)
extern "C" __global__ void dropout_bf16(const DropoutParams<__nv_bfloat16> p) { dropout(p); }
FT_EXPORT(dropout_bf16, DropoutParams<__nv_bfloat16>)
