// Sum or sum of squares of an f32 vector into a double (params.cuh: SumParams): the global
// gradient norm for clipping, the loss, and the NaN check, without bringing the values to the
// host. Two launches instead of one atomicAdd per block: the order in which blocks finish
// varies from run to run, so atomics would make the last bits of the sum (and so the clipped
// update) differ between two runs of the same training; here sum_f32 writes each block's
// share to partial[block] and sum_f32_finish adds the shares in a fixed order, so a run is
// bit-for-bit repeatable on the same GPU (cuBLAS and the attention backward are
// deterministic too).
#include "common.cuh"

namespace {

__device__ __forceinline__ void sum_f32_impl(const SumParams& p) {
    __shared__ double red[32];
    require_warps_1d();
    if ((int)gridDim.x != p.parts) __trap();
    double acc = 0.0;
    for (unsigned long long i = grid_start(); i < p.n; i += grid_stride()) {
        const double v = (double)p.x[i];
        acc += p.square ? v * v : v;
    }
    acc = block_sum(acc, red);
    if (threadIdx.x == 0) p.partial[blockIdx.x] = acc;
}

__device__ __forceinline__ void sum_finish_impl(const SumParams& p) {
    __shared__ double red[32];
    require_warps_1d();
    if (gridDim.x != 1) __trap();
    double acc = 0.0;
    for (int i = threadIdx.x; i < p.parts; i += blockDim.x) acc += p.partial[i];
    acc = block_sum(acc, red);
    if (threadIdx.x == 0) *p.out += acc;
}

}  // namespace

extern "C" __global__ void sum_f32(const SumParams p) { sum_f32_impl(p); }
FT_EXPORT(sum_f32, SumParams)
extern "C" __global__ void sum_f32_finish(const SumParams p) { sum_finish_impl(p); }
FT_EXPORT(sum_f32_finish, SumParams)
