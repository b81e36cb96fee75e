// Helpers shared by ferrotune's CUDA kernels (src/kernels/cuda/*.cu): dtype conversions
// (f32 inside, T only at loads and stores), warp and block reductions, small integer helpers.
// Everything is in an anonymous namespace: each .cu file is its own program for NVRTC and
// its own translation unit for the host emulator, and nothing here becomes a symbol.
#pragma once

#include "params.cuh"

// Dynamic shared memory. The emulator defines its own version (a host compiler cannot bind
// an `extern __shared__` array of the kernel's choosing to the launch's buffer).
#ifndef FT_DYN_SMEM
#define FT_DYN_SMEM(T, name) extern __shared__ __align__(16) T name[]
#endif

// NVRTC has the CUDA math functions built in but not <math.h>'s macros.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// `#pragma unroll` for NVRTC; nothing for the host compiler (which would warn about it).
#ifdef FT_EMU
#define FT_UNROLL
#else
#define FT_UNROLL _Pragma("unroll")
#endif

namespace {

// Constants are enumerators: with -default-device NVRTC would give a namespace-scope
// constexpr variable device storage in every module.
enum : unsigned { kFullMask = 0xffffffffu };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even conversion from f32 to the activation type.
template <class T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ long long lmin(long long a, long long b) { return a < b ? a : b; }
__device__ __forceinline__ long long lmax(long long a, long long b) { return a > b ? a : b; }

// Sums / maxima over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
FT_UNROLL
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum(double v) {
FT_UNROLL
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
FT_UNROLL
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
    return v;
}

// Block-wide sum (blockDim.x a multiple of 32, 1-D blocks); every thread gets the result.
// `scratch` holds 32 values in shared memory; it may be reused right after the call.
template <class F>
__device__ __forceinline__ F block_sum(F v, F* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    F t = lane < nwarps ? scratch[lane] : F(0);
    t = warp_sum(t);
    __syncthreads();
    return t;
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : -INFINITY;
    t = warp_max(t);
    __syncthreads();
    return t;
}

// Kernels that assume their documented block shape check it (a wrong launch traps instead
// of computing garbage).
__device__ __forceinline__ void require_block(unsigned x) {
    if (blockDim.x != x || blockDim.y != 1 || blockDim.z != 1) __trap();
}
__device__ __forceinline__ void require_warps_1d() {
    if ((blockDim.x & 31) != 0 || blockDim.y != 1 || blockDim.z != 1) __trap();
}

// Flat index of this thread in a 1-D grid-stride loop, and the stride.
__device__ __forceinline__ unsigned long long grid_start() {
    return (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ unsigned long long grid_stride() {
    return (unsigned long long)gridDim.x * blockDim.x;
}

}  // namespace
