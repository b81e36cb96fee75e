// Rotary position embedding in place on the fused qkv rows (params.cuh: RopeParams).
// candle's rope kernels want contiguous (b, h, t, d) tensors and one table for the whole
// batch; ferrotune's packed rows restart positions per conversation and LongRoPE picks a
// table per token, so this kernel reads a position and a table index per row and rotates
// the q and k heads of the strided qkv buffer where they are (no copies). The same kernel
// with sign = -1 is the backward (the inverse rotation of the gradient).
#include "common.cuh"

namespace {

template <class T>
__device__ __forceinline__ void rope(const RopeParams<T>& p) {
    const int half = p.head_dim / 2;
    const int n = p.heads * half;
    for (int row = blockIdx.x; row < p.rows; row += gridDim.x) {
        T* x = p.qkv + (size_t)row * p.row_stride;
        const float pos = (float)p.pos[row];
        const float* __restrict__ inv_freq = p.inv_freq + (size_t)p.tab[row] * half;
        for (int k = threadIdx.x; k < n; k += blockDim.x) {
            const int h = k / half;
            const int i = k - h * half;
            const float angle = inv_freq[i] * pos;
            const float c = cosf(angle) * p.mscale;
            const float s = p.sign * sinf(angle) * p.mscale;
            T* xh = x + (size_t)h * p.head_dim;
            const float x1 = to_f32(xh[i]);
            const float x2 = to_f32(xh[i + half]);
            xh[i] = from_f32<T>(x1 * c - x2 * s);
            xh[i + half] = from_f32<T>(x2 * c + x1 * s);
        }
    }
}

}  // namespace

extern "C" __global__ void rope_f32(const RopeParams<float> p) { rope(p); }
FT_EXPORT(rope_f32, RopeParams<float>)
extern "C" __global__ void rope_f16(const RopeParams<__half> p) { rope(p); }
FT_EXPORT(rope_f16, RopeParams<__half>)
extern "C" __global__ void rope_bf16(const RopeParams<__nv_bfloat16> p) { rope(p); }
FT_EXPORT(rope_bf16, RopeParams<__nv_bfloat16>)
