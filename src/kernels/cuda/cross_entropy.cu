// Cross-entropy of a chunk of logit rows, loss and gradient in one kernel (params.cuh:
// CeRowsParams). The logits of a chunk are the only (rows, vocab) tensor of the head; this
// kernel reads each row once for its max and sum of exponentials (online: per-thread
// running max/sum merged across the block), then overwrites it in place with the gradient
// of scale · loss, so neither softmax probabilities nor a one-hot target are materialised.
#include "common.cuh"

namespace {

// (m, s) = (max, Σ exp(x − m)) of a set of logits; merging two sets. A NaN logit leaves m
// alone and makes s NaN, which every merge keeps (exp(−inf) = 0 and NaN · 0 = NaN).
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    if (mm == -INFINITY) {
        s += s2;
        return;
    }
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

template <class T>
__device__ __forceinline__ void ce_rows(const CeRowsParams<T>& p) {
    __shared__ float sm_m[32];
    __shared__ float sm_s[32];
    require_warps_1d();
    const int vocab = p.vocab;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int row = blockIdx.x; row < p.rows; row += gridDim.x) {
        T* x = p.logits + (size_t)row * vocab;
        const int target = p.targets[row];
        float x_t = 0.f;
        if (threadIdx.x == 0) x_t = to_f32(x[target]);  // before any thread overwrites it
        float m = -INFINITY, s = 0.f;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            const float v = to_f32(x[j]);
            if (v > m) {
                s = s * expf(m - v) + 1.0f;
                m = v;
            } else if (v != -INFINITY) {
                s += expf(v - m);  // a NaN logit makes s NaN
            }
        }
FT_UNROLL
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(kFullMask, m, o);
            const float s2 = __shfl_xor_sync(kFullMask, s, o);
            lse_merge(m, s, m2, s2);
        }
        if (lane == 0) {
            sm_m[warp] = m;
            sm_s[warp] = s;
        }
        __syncthreads();
        m = lane < nwarps ? sm_m[lane] : -INFINITY;
        s = lane < nwarps ? sm_s[lane] : 0.f;
FT_UNROLL
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(kFullMask, m, o);
            const float s2 = __shfl_xor_sync(kFullMask, s, o);
            lse_merge(m, s, m2, s2);
        }
        __syncthreads();  // sm_m / sm_s free for the next row; x_t read before the writes
        if (threadIdx.x == 0) p.losses[row] = logf(s) + m - x_t;
        if (p.need_grad) {
            for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
                const float prob = expf(to_f32(x[j]) - m) / s;
                x[j] = from_f32<T>(p.scale * (prob - (j == target ? 1.0f : 0.0f)));
            }
        }
    }
}

}  // namespace

extern "C" __global__ void ce_rows_f32(const CeRowsParams<float> p) { ce_rows(p); }
FT_EXPORT(ce_rows_f32, CeRowsParams<float>)
extern "C" __global__ void ce_rows_f16(const CeRowsParams<__half> p) { ce_rows(p); }
FT_EXPORT(ce_rows_f16, CeRowsParams<__half>)
extern "C" __global__ void ce_rows_bf16(const CeRowsParams<__nv_bfloat16> p) { ce_rows(p); }
FT_EXPORT(ce_rows_bf16, CeRowsParams<__nv_bfloat16>)
