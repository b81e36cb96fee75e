// Element-wise and row-movement kernels (params.cuh: CastParams, AddParams, RowsParams).
// Each is one pass over memory that would otherwise take a candle op plus a contiguous copy:
// dtype casts with an optional scale folded in, y += alpha·x in place, and the row gathers /
// scatters of the embedding lookup and of the rows that carry a training target. (The KV
// cache appends are attention.cu's kv_append.)
#include "common.cuh"

namespace {

template <class A, class B>
__device__ __forceinline__ void cast(const CastParams<A, B>& p) {
    for (unsigned long long i = grid_start(); i < p.n; i += grid_stride())
        p.dst[i] = from_f32<B>(to_f32(p.src[i]) * p.scale);
}

template <class T>
__device__ __forceinline__ void add(const AddParams<T>& p) {
    for (unsigned long long i = grid_start(); i < p.n; i += grid_stride())
        p.y[i] = from_f32<T>(to_f32(p.y[i]) + p.alpha * to_f32(p.x[i]));
}

template <class T>
__device__ __forceinline__ void gather_rows(const RowsParams<T>& p) {
    for (int r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const T* __restrict__ s = p.src + (size_t)p.idx[r] * p.width;
        T* __restrict__ d = p.dst + (size_t)r * p.width;
        for (int c = threadIdx.x; c < p.width; c += blockDim.x) d[c] = s[c];
    }
}

template <class T>
__device__ __forceinline__ void scatter_rows(const RowsParams<T>& p) {
    for (int r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const T* __restrict__ s = p.src + (size_t)r * p.width;
        T* __restrict__ d = p.dst + (size_t)p.idx[r] * p.width;
        for (int c = threadIdx.x; c < p.width; c += blockDim.x) d[c] = s[c];
    }
}

// (FT_EXPORT takes one type name: no commas)
using CastF32F16 = CastParams<float, __half>;
using CastF32BF16 = CastParams<float, __nv_bfloat16>;
using CastF16F32 = CastParams<__half, float>;
using CastF16BF16 = CastParams<__half, __nv_bfloat16>;
using CastBF16F32 = CastParams<__nv_bfloat16, float>;
using CastBF16F16 = CastParams<__nv_bfloat16, __half>;

}  // namespace

// cast_<A>_to_<B>, every ordered pair of distinct dtypes
extern "C" __global__ void cast_f32_to_f16(const CastF32F16 p) { cast(p); }
FT_EXPORT(cast_f32_to_f16, CastF32F16)
extern "C" __global__ void cast_f32_to_bf16(const CastF32BF16 p) { cast(p); }
FT_EXPORT(cast_f32_to_bf16, CastF32BF16)
extern "C" __global__ void cast_f16_to_f32(const CastF16F32 p) { cast(p); }
FT_EXPORT(cast_f16_to_f32, CastF16F32)
extern "C" __global__ void cast_f16_to_bf16(const CastF16BF16 p) { cast(p); }
FT_EXPORT(cast_f16_to_bf16, CastF16BF16)
extern "C" __global__ void cast_bf16_to_f32(const CastBF16F32 p) { cast(p); }
FT_EXPORT(cast_bf16_to_f32, CastBF16F32)
extern "C" __global__ void cast_bf16_to_f16(const CastBF16F16 p) { cast(p); }
FT_EXPORT(cast_bf16_to_f16, CastBF16F16)

extern "C" __global__ void add_f32(const AddParams<float> p) { add(p); }
FT_EXPORT(add_f32, AddParams<float>)
extern "C" __global__ void add_f16(const AddParams<__half> p) { add(p); }
FT_EXPORT(add_f16, AddParams<__half>)
extern "C" __global__ void add_bf16(const AddParams<__nv_bfloat16> p) { add(p); }
FT_EXPORT(add_bf16, AddParams<__nv_bfloat16>)

extern "C" __global__ void gather_rows_f32(const RowsParams<float> p) { gather_rows(p); }
FT_EXPORT(gather_rows_f32, RowsParams<float>)
extern "C" __global__ void gather_rows_f16(const RowsParams<__half> p) { gather_rows(p); }
FT_EXPORT(gather_rows_f16, RowsParams<__half>)
extern "C" __global__ void gather_rows_bf16(const RowsParams<__nv_bfloat16> p) { gather_rows(p); }
FT_EXPORT(gather_rows_bf16, RowsParams<__nv_bfloat16>)

extern "C" __global__ void scatter_rows_f32(const RowsParams<float> p) { scatter_rows(p); }
FT_EXPORT(scatter_rows_f32, RowsParams<float>)
extern "C" __global__ void scatter_rows_f16(const RowsParams<__half> p) { scatter_rows(p); }
FT_EXPORT(scatter_rows_f16, RowsParams<__half>)
extern "C" __global__ void scatter_rows_bf16(const RowsParams<__nv_bfloat16> p) { scatter_rows(p); }
FT_EXPORT(scatter_rows_bf16, RowsParams<__nv_bfloat16>)
