// Sum or sum of squares of an f32 vector into a double (params.cuh: SumParams): the global
// gradient norm for clipping, and the NaN check, without bringing the gradients to the host.
// Each block reduces its grid-stride share in double and adds it with one atomicAdd.
#include "common.cuh"

namespace {

__device__ __forceinline__ void sum_f32_impl(const SumParams& p) {
    __shared__ double red[32];
    require_warps_1d();
    double acc = 0.0;
    for (unsigned long long i = grid_start(); i < p.n; i += grid_stride()) {
        const double v = (double)p.x[i];
        acc += p.square ? v * v : v;
    }
    acc = block_sum(acc, red);
    if (threadIdx.x == 0) atomicAdd(p.out, acc);
}

}  // namespace

extern "C" __global__ void sum_f32(const SumParams p) { sum_f32_impl(p); }
FT_EXPORT(sum_f32, SumParams)
