// Causal self-attention over packed segments, forward and backward (params.cuh: AttnSeg,
// AttnFwdParams, AttnBwdParams).
//
// Why a kernel of our own: candle has no fused attention, so the GPU path materialised
// (heads, L, L) scores per conversation twice per step. These kernels are flash-style: a
// block holds a tile of 64 queries (or keys) and walks the tiles of keys (or queries) that
// it can see, with scores and probabilities only in shared memory and registers; the
// forward keeps a running max and sum per row (online softmax) and saves the log-sum-exp,
// from which the backward recomputes the probabilities. Tiles outside the causal triangle,
// or entirely before the sliding window, are skipped. Packed conversations come in through
// the segment table (no padding between them), GQA maps query head h to kv head
// h / (heads / kv_heads), and `past` lets queries continue a cached sequence (generation).
//
// Two implementations of each kernel, same contract:
//   attn_<k>_{f16,bf16}   tensor cores through nvcuda::wmma (16x16x16, f32 accumulation;
//                         bf16 needs sm_80: on older GPUs the bf16 kernels trap); head_dim
//                         a multiple of 16, at most 128. 128 threads = 4 warps, a warp owns
//                         16 rows of the tile. Score/probability tiles pass through shared
//                         memory between the two products, so nothing depends on the
//                         (unspecified) fragment layout.
//   attn_<k>_simt_<T>     plain f32 FMA loops, 256 threads = 64 rows x 4 threads (a thread
//                         owns every 4th column of its row); any even head_dim <= 128. The
//                         fallback (and the f32 kernels: attn_<k>_f32 is this code).
// Launch (see params.cuh, FT_ATTN_*): grid = (tiles of 64 of the longest segment's queries
// -- keys for attn_bwd_dkdv --, heads -- kv_heads for attn_bwd_dkdv --, segments); every
// index is also a grid-stride loop, so a smaller grid is still correct. No dynamic shared
// memory; static shared memory < 48 KB per block:
//   tensor cores  fwd / dq: K and V tiles of 64 keys (32 when head_dim > 112) staged as T,
//                 a 16 x keys f32 score tile per warp: 45,312 / 45,056 bytes.
//                 dkdv: K and V of the block's 64 keys, Q and dO tiles of 32 queries (16
//                 when head_dim > 96), a 16 x queries f32 tile per warp: 45,312 bytes.
//   SIMT          fwd / dq: K and V tiles of 32 keys in f32: 32,768 bytes; dkdv: Q and dO
//                 tiles of 32 queries in f32: 33,024 bytes.
//   attn_bwd_dot  128 threads (a warp per head), no shared memory.
// kv_append (generation) writes a batch's new keys and values into the KV caches through the
// same segment table, one launch for all sequences (a copy per sequence and layer was half of
// a batched decoding step's launches).
//
// The backward is deterministic (no atomics): attn_bwd_dot computes delta = rowsum(dO ∘ O),
// attn_bwd_dkdv owns a tile of keys of one kv head and loops over the group's query heads
// and the query tiles that see those keys, attn_bwd_dq owns a tile of queries.
#include "common.cuh"

#ifndef FT_EMU
#include <mma.h>
#endif

namespace {

enum : int {
    kTile = FT_ATTN_TILE,                // query tile (fwd, dq), key tile (dkdv)
    kSimtThreads = FT_ATTN_SIMT_THREADS,  // 64 rows x 4 threads
    kTcThreads = FT_ATTN_TC_THREADS,      // 4 warps x 16 rows
    kMaxD = FT_ATTN_MAX_HEAD_DIM,
    kSlots = kMaxD / 4,  // columns per thread in the SIMT kernels
    kSimtKeys = 32,      // key tile of the SIMT fwd / dq (f32 in shared memory)
    kSimtQueries = 32,   // query tile of the SIMT dkdv
};
static_assert(kTile == 64 && kSimtThreads == 4 * kTile && kTcThreads == 2 * kTile && kMaxD == 128,
              "the kernels below are written for these values");

__device__ __forceinline__ bool key_visible(int key, int qpos, int window) {
    return key <= qpos && qpos - key < window;
}
// First key visible from query position qpos.
__device__ __forceinline__ int first_key(int qpos, int window) {
    return qpos >= window ? qpos - window + 1 : 0;
}

__device__ __forceinline__ void check_attn(int head_dim, int heads, int kv_heads, int window,
                                           bool tc) {
    if (head_dim <= 0 || head_dim > kMaxD || (head_dim & 1) || (tc && (head_dim & 15)) ||
        kv_heads <= 0 || heads % kv_heads != 0 || window < 1)
        __trap();
}

// ---------------------------------------------------------------------------------------
// SIMT kernels

template <class T>
__device__ __forceinline__ void load_slots(float (&dst)[kSlots], const T* row, int t4, int D,
                                           bool valid) {
    FT_UNROLL
    for (int i = 0; i < kSlots; ++i) {
        const int c = t4 + 4 * i;
        dst[i] = (valid && c < D) ? to_f32(row[c]) : 0.f;
    }
}

// Σ over the row's 4 threads of a[i] · b[c(i)].
__device__ __forceinline__ float dot4(const float (&a)[kSlots], const float* b, int t4, int D) {
    float d = 0.f;
    FT_UNROLL
    for (int i = 0; i < kSlots; ++i) {
        const int c = t4 + 4 * i;
        if (c < D) d += a[i] * b[c];
    }
    d += __shfl_xor_sync(kFullMask, d, 1);
    d += __shfl_xor_sync(kFullMask, d, 2);
    return d;
}

// Key/value rows [k0, k0 + rows) of kv head g into f32 shared tiles (zero past kv_total).
template <class T>
__device__ __forceinline__ void stage_kv_f32(float (*ks)[kMaxD], float (*vs)[kMaxD],
                                             const AttnSeg<T>& sg, int k0, int rows, int kv_total,
                                             int g, int D) {
    for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
        const int j = idx / D, c = idx - j * D;
        const int key = k0 + j;
        float kv = 0.f, vv = 0.f;
        if (key < kv_total) {
            const size_t off = (size_t)key * sg.kv_stride + (size_t)g * D + c;
            kv = to_f32(sg.k[off]);
            vv = to_f32(sg.v[off]);
        }
        ks[j][c] = kv;
        vs[j][c] = vv;
    }
}

template <class T>
__device__ __forceinline__ void attn_fwd_simt(const AttnFwdParams<T>& p) {
    __shared__ float ks[kSimtKeys][kMaxD];
    __shared__ float vs[kSimtKeys][kMaxD];
    require_block(kSimtThreads);
    check_attn(p.head_dim, p.heads, p.kv_heads, p.window, false);
    const int D = p.head_dim;
    const int r = threadIdx.x >> 2, t4 = threadIdx.x & 3;
    const int group = p.heads / p.kv_heads;
    for (int s = blockIdx.z; s < p.n_segs; s += gridDim.z) {
        const AttnSeg<T> sg = p.segs[s];
        const int kv_total = sg.past + sg.len;
        for (int h = blockIdx.y; h < p.heads; h += gridDim.y) {
            const int g = h / group;
            for (int q0 = blockIdx.x * kTile; q0 < sg.len; q0 += gridDim.x * kTile) {
                const int qi = q0 + r;
                const bool valid = qi < sg.len;
                const int qpos = sg.past + qi;
                float qv[kSlots], o[kSlots];
                load_slots(qv, p.q + (size_t)(sg.q_row + (valid ? qi : 0)) * p.q_stride + (size_t)h * D,
                           t4, D, valid);
                FT_UNROLL
                for (int i = 0; i < kSlots; ++i) o[i] = 0.f;
                float m = -INFINITY, l = 0.f;
                const int nq = imin(kTile, sg.len - q0);
                const int key_lo = first_key(sg.past + q0, p.window);
                const int key_hi = sg.past + q0 + nq - 1;
                for (int k0 = key_lo / kSimtKeys * kSimtKeys; k0 <= key_hi; k0 += kSimtKeys) {
                    stage_kv_f32(ks, vs, sg, k0, kSimtKeys, kv_total, g, D);
                    __syncthreads();
                    // online softmax one key at a time: O and l are rescaled only when
                    // the row's max grows
                    for (int j = 0; j < kSimtKeys; ++j) {
                        const float d = dot4(qv, ks[j], t4, D);
                        const int key = k0 + j;
                        if (!(valid && key < kv_total && key_visible(key, qpos, p.window))) continue;
                        const float sj = d * p.scale;
                        if (sj > m) {
                            const float alpha = expf(m - sj);
                            l *= alpha;
                            FT_UNROLL
                            for (int i = 0; i < kSlots; ++i) o[i] *= alpha;
                            m = sj;
                        }
                        const float pj = expf(sj - m);
                        l += pj;
                        FT_UNROLL
                        for (int i = 0; i < kSlots; ++i) {
                            const int c = t4 + 4 * i;
                            if (c < D) o[i] += pj * vs[j][c];
                        }
                    }
                    __syncthreads();
                }
                if (valid) {
                    const float inv = 1.0f / l;
                    T* orow = p.out + (size_t)(sg.q_row + qi) * p.out_stride + (size_t)h * D;
                    FT_UNROLL
                    for (int i = 0; i < kSlots; ++i) {
                        const int c = t4 + 4 * i;
                        if (c < D) orow[c] = from_f32<T>(o[i] * inv);
                    }
                    if (t4 == 0) p.lse[(size_t)h * p.lse_stride + sg.q_row + qi] = m + logf(l);
                }
            }
        }
    }
}

template <class T>
__device__ __forceinline__ void attn_bwd_dq_simt(const AttnBwdParams<T>& p) {
    __shared__ float ks[kSimtKeys][kMaxD];
    __shared__ float vs[kSimtKeys][kMaxD];
    require_block(kSimtThreads);
    check_attn(p.head_dim, p.heads, p.kv_heads, p.window, false);
    const int D = p.head_dim;
    const int r = threadIdx.x >> 2, t4 = threadIdx.x & 3;
    const int group = p.heads / p.kv_heads;
    for (int s = blockIdx.z; s < p.n_segs; s += gridDim.z) {
        const AttnSeg<T> sg = p.segs[s];
        const int kv_total = sg.past + sg.len;
        for (int h = blockIdx.y; h < p.heads; h += gridDim.y) {
            const int g = h / group;
            for (int q0 = blockIdx.x * kTile; q0 < sg.len; q0 += gridDim.x * kTile) {
                const int qi = q0 + r;
                const bool valid = qi < sg.len;
                const int qpos = sg.past + qi;
                const size_t row = (size_t)sg.q_row + (valid ? qi : 0);
                float qv[kSlots], dov[kSlots], dq[kSlots];
                load_slots(qv, p.q + row * p.q_stride + (size_t)h * D, t4, D, valid);
                load_slots(dov, p.dout + row * p.out_stride + (size_t)h * D, t4, D, valid);
                FT_UNROLL
                for (int i = 0; i < kSlots; ++i) dq[i] = 0.f;
                const float lse = valid ? p.lse[(size_t)h * p.lse_stride + row] : 0.f;
                const float delta = valid ? p.delta[(size_t)h * p.lse_stride + row] : 0.f;
                const int nq = imin(kTile, sg.len - q0);
                const int key_lo = first_key(sg.past + q0, p.window);
                const int key_hi = sg.past + q0 + nq - 1;
                for (int k0 = key_lo / kSimtKeys * kSimtKeys; k0 <= key_hi; k0 += kSimtKeys) {
                    stage_kv_f32(ks, vs, sg, k0, kSimtKeys, kv_total, g, D);
                    __syncthreads();
                    for (int j = 0; j < kSimtKeys; ++j) {
                        const float sdot = dot4(qv, ks[j], t4, D);
                        const float dp = dot4(dov, vs[j], t4, D);
                        const int key = k0 + j;
                        const bool vis = valid && key < kv_total && key_visible(key, qpos, p.window);
                        const float pj = vis ? expf(sdot * p.scale - lse) : 0.f;
                        const float ds = pj * (dp - delta);
                        FT_UNROLL
                        for (int i = 0; i < kSlots; ++i) {
                            const int c = t4 + 4 * i;
                            if (c < D) dq[i] += ds * ks[j][c];
                        }
                    }
                    __syncthreads();
                }
                if (valid) {
                    T* drow = p.dq + row * p.dq_stride + (size_t)h * D;
                    FT_UNROLL
                    for (int i = 0; i < kSlots; ++i) {
                        const int c = t4 + 4 * i;
                        if (c < D) drow[c] = from_f32<T>(dq[i] * p.scale);
                    }
                }
            }
        }
    }
}

template <class T>
__device__ __forceinline__ void attn_bwd_dkdv_simt(const AttnBwdParams<T>& p) {
    __shared__ float qs[kSimtQueries][kMaxD];
    __shared__ float dos[kSimtQueries][kMaxD];
    __shared__ float lse_s[kSimtQueries];
    __shared__ float delta_s[kSimtQueries];
    require_block(kSimtThreads);
    check_attn(p.head_dim, p.heads, p.kv_heads, p.window, false);
    const int D = p.head_dim;
    const int kr = threadIdx.x >> 2, t4 = threadIdx.x & 3;
    const int group = p.heads / p.kv_heads;
    for (int s = blockIdx.z; s < p.n_segs; s += gridDim.z) {
        const AttnSeg<T> sg = p.segs[s];
        const int kv_total = sg.past + sg.len;
        for (int g = blockIdx.y; g < p.kv_heads; g += gridDim.y) {
            for (int k0 = blockIdx.x * kTile; k0 < kv_total; k0 += gridDim.x * kTile) {
                const int key = k0 + kr;
                const bool kvalid = key < kv_total;
                const size_t koff = (size_t)(kvalid ? key : 0) * sg.kv_stride + (size_t)g * D;
                float kv[kSlots], vv[kSlots], dk[kSlots], dv[kSlots];
                load_slots(kv, sg.k + koff, t4, D, kvalid);
                load_slots(vv, sg.v + koff, t4, D, kvalid);
                FT_UNROLL
                for (int i = 0; i < kSlots; ++i) dk[i] = dv[i] = 0.f;
                // query rows that see at least one key of [k0, k_hi]
                const int k_hi = imin(k0 + kTile, kv_total) - 1;
                const long long r_lo = lmax((long long)k0 - sg.past, 0);
                const long long r_hi = lmin((long long)sg.len - 1, (long long)k_hi + p.window - 1 - sg.past);
                for (int hq = 0; hq < group && r_lo <= r_hi; ++hq) {
                    const int h = g * group + hq;
                    for (int qs0 = (int)(r_lo / kSimtQueries * kSimtQueries); qs0 <= r_hi; qs0 += kSimtQueries) {
                        for (int idx = threadIdx.x; idx < kSimtQueries * D; idx += blockDim.x) {
                            const int i = idx / D, c = idx - i * D;
                            const int qi = qs0 + i;
                            float qx = 0.f, dx = 0.f;
                            if (qi < sg.len) {
                                const size_t row = (size_t)sg.q_row + qi;
                                qx = to_f32(p.q[row * p.q_stride + (size_t)h * D + c]);
                                dx = to_f32(p.dout[row * p.out_stride + (size_t)h * D + c]);
                            }
                            qs[i][c] = qx;
                            dos[i][c] = dx;
                        }
                        if (threadIdx.x < kSimtQueries) {
                            const int qi = qs0 + threadIdx.x;
                            const size_t at = (size_t)h * p.lse_stride + sg.q_row + qi;
                            lse_s[threadIdx.x] = qi < sg.len ? p.lse[at] : 0.f;
                            delta_s[threadIdx.x] = qi < sg.len ? p.delta[at] : 0.f;
                        }
                        __syncthreads();
                        for (int i = 0; i < kSimtQueries; ++i) {
                            const int qi = qs0 + i;
                            const float sdot = dot4(kv, qs[i], t4, D);
                            const float dp = dot4(vv, dos[i], t4, D);
                            const bool vis = kvalid && qi < sg.len && key_visible(key, sg.past + qi, p.window);
                            const float pj = vis ? expf(sdot * p.scale - lse_s[i]) : 0.f;
                            const float ds = pj * (dp - delta_s[i]);
                            FT_UNROLL
                            for (int j = 0; j < kSlots; ++j) {
                                const int c = t4 + 4 * j;
                                if (c < D) {
                                    dv[j] += pj * dos[i][c];
                                    dk[j] += ds * qs[i][c];
                                }
                            }
                        }
                        __syncthreads();
                    }
                }
                if (kvalid) {
                    T* dkrow = sg.dk + koff;
                    T* dvrow = sg.dv + koff;
                    FT_UNROLL
                    for (int i = 0; i < kSlots; ++i) {
                        const int c = t4 + 4 * i;
                        if (c < D) {
                            dkrow[c] = from_f32<T>(dk[i] * p.scale);
                            dvrow[c] = from_f32<T>(dv[i]);
                        }
                    }
                }
            }
        }
    }
}

// Generation: the key and value columns of every segment's query rows appended to the
// segment's KV cache (rows past .. past + len − 1 of segs[s].dk / dv, which are the cache's
// k / v), all segments of a batch in one launch. One block per (row, segment), any 1-D
// block: a row is 2 · kv_heads · head_dim contiguous elements of `q` (the fused qkv buffer).
template <class T>
__device__ __forceinline__ void kv_append(const AttnFwdParams<T>& p) {
    const int W = p.kv_heads * p.head_dim;
    const size_t k_col = (size_t)p.heads * p.head_dim;
    for (int s = blockIdx.y; s < p.n_segs; s += gridDim.y) {
        const AttnSeg<T> sg = p.segs[s];
        for (int r = blockIdx.x; r < sg.len; r += gridDim.x) {
            const T* __restrict__ src = p.q + (size_t)(sg.q_row + r) * p.q_stride + k_col;
            T* __restrict__ dk = sg.dk + (size_t)(sg.past + r) * sg.kv_stride;
            T* __restrict__ dv = sg.dv + (size_t)(sg.past + r) * sg.kv_stride;
            for (int c = threadIdx.x; c < W; c += blockDim.x) {
                dk[c] = src[c];
                dv[c] = src[W + c];
            }
        }
    }
}

// delta[h, row] = Σ_c dout · out: one warp per head, any 1-D block of whole warps.
template <class T>
__device__ __forceinline__ void attn_bwd_dot(const AttnBwdParams<T>& p) {
    require_warps_1d();
    const int D = p.head_dim;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
        for (int h = warp; h < p.heads; h += nwarps) {
            const size_t off = (size_t)row * p.out_stride + (size_t)h * D;
            float acc = 0.f;
            for (int c = lane; c < D; c += 32) acc += to_f32(p.dout[off + c]) * to_f32(p.out[off + c]);
            acc = warp_sum(acc);
            if (lane == 0) p.delta[(size_t)h * p.lse_stride + row] = acc;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tensor-core kernels (T = __half or __nv_bfloat16)

namespace wm = nvcuda::wmma;
template <class T>
using FragA = wm::fragment<wm::matrix_a, 16, 16, 16, T, wm::row_major>;
template <class T>
using FragBcol = wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::col_major>;
template <class T>
using FragBrow = wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::row_major>;
using FragC = wm::fragment<wm::accumulator, 16, 16, 16, float>;

// Tile sizes by head_dim, chosen so that static shared memory stays below 48 KB.
__host__ __device__ constexpr int tc_keys(int d) { return d <= 112 ? 64 : 32; }     // fwd, dq
__host__ __device__ constexpr int tc_queries(int d) { return d <= 96 ? 32 : 16; }  // dkdv
// fwd: K, V (keys x d, 2-byte T), S/P per warp (16 x keys f32), a row factor per row.
__host__ __device__ constexpr int fwd_smem(int d) { return 4 * tc_keys(d) * d + 256 * tc_keys(d) + 256; }
// dq: K, V, S/dP per warp.
__host__ __device__ constexpr int dq_smem(int d) { return 4 * tc_keys(d) * d + 256 * tc_keys(d); }
// dkdv: K, V (64 x d), Q, dO (queries x d), S/dP per warp (16 x queries f32), lse, delta.
__host__ __device__ constexpr int dkdv_smem(int d) {
    return 256 * d + 4 * tc_queries(d) * d + 256 * tc_queries(d) + 8 * tc_queries(d);
}
template <int (*F)(int)>
__host__ __device__ constexpr int max_over_head_dims() {
    int m = 0;
    for (int d = 16; d <= kMaxD; d += 16) m = F(d) > m ? F(d) : m;
    return m;
}
enum : int {
    kFwdSmem = max_over_head_dims<fwd_smem>(),
    kDqSmem = max_over_head_dims<dq_smem>(),
    kDkdvSmem = max_over_head_dims<dkdv_smem>(),
};
static_assert(kFwdSmem <= 48 * 1024 && kDqSmem <= 48 * 1024 && kDkdvSmem <= 48 * 1024,
              "static shared memory above 48 KB needs an opt-in");

// 16 bytes from src to dst (both 16-byte aligned).
__device__ __forceinline__ void copy16(void* dst, const void* src) {
#ifdef FT_EMU
    std::memcpy(dst, src, 16);
#else
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}
__device__ __forceinline__ void zero16(void* dst) {
#ifdef FT_EMU
    std::memset(dst, 0, 16);
#else
    *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
#endif
}

// Rows [0, rows) of a tile (D columns, row-major, D a multiple of 16) from `src` (row 0,
// rows `stride` elements apart); rows >= nvalid are zero. 16-byte copies when aligned.
template <class T>
__device__ __forceinline__ void stage_tile(T* dst, const T* src, size_t stride, int nvalid, int rows,
                                           int D) {
    if ((reinterpret_cast<unsigned long long>(src) & 15) == 0 && (stride * sizeof(T)) % 16 == 0) {
        const int nv = D * (int)sizeof(T) / 16;
        for (int idx = threadIdx.x; idx < rows * nv; idx += blockDim.x) {
            const int r = idx / nv, v = idx - r * nv;
            T* d = dst + (size_t)r * D + v * (16 / sizeof(T));
            if (r < nvalid) copy16(d, src + (size_t)r * stride + v * (16 / sizeof(T)));
            else zero16(d);
        }
    } else {
        const T zero = from_f32<T>(0.f);
        for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
            const int r = idx / D, c = idx - r * D;
            dst[idx] = r < nvalid ? src[(size_t)r * stride + c] : zero;
        }
    }
}

// Multiplies row r of the accumulator tile by rs[r], through the warp's 16x16 f32 scratch.
__device__ __forceinline__ void scale_rows(FragC& f, float* scratch, int ldm, const float* rs, int lane) {
    wm::store_matrix_sync(scratch, f, ldm, wm::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) scratch[(e >> 4) * ldm + (e & 15)] *= rs[e >> 4];
    __syncwarp();
    wm::load_matrix_sync(f, scratch, ldm, wm::mem_row_major);
    __syncwarp();
}

// Writes rows [0, rows_valid) of the accumulator tile, times mult (and rs[r] if given), as T.
template <class T>
__device__ __forceinline__ void write_tile(const FragC& f, float* scratch, int ldm, const float* rs,
                                           float mult, T* dst, size_t stride, int rows_valid, int lane) {
    wm::store_matrix_sync(scratch, f, ldm, wm::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
        const int r = e >> 4, c = e & 15;
        if (r < rows_valid) {
            const float v = scratch[r * ldm + c] * mult * (rs ? rs[r] : 1.0f);
            dst[(size_t)r * stride + c] = from_f32<T>(v);
        }
    }
    __syncwarp();
}

template <class T>
__device__ __forceinline__ void attn_fwd_tc(const AttnFwdParams<T>& p) {
    __shared__ __align__(128) unsigned char smem[kFwdSmem];
    require_block(kTcThreads);
    check_attn(p.head_dim, p.heads, p.kv_heads, p.window, true);
    const int D = p.head_dim, nd = D / 16;
    const int BN = tc_keys(D), nb = BN / 16, half_n = BN / 2;
    T* Ks = reinterpret_cast<T*>(smem);  // also the Q tile while its fragments load
    T* Vs = Ks + BN * D;
    float* R = reinterpret_cast<float*>(smem + 4 * BN * D);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* Rw = R + warp * 16 * BN;             // this warp's S (16 x BN f32, ldm BN)
    T* Pw = reinterpret_cast<T*>(Rw);           // P in place of S (ldm 2·BN)
    float* scratch = Rw + half_n;               // 16x16 f32 beside P (ldm BN)
    float* row_f = R + 4 * 16 * BN + warp * 16; // per-row factor for the O tiles
    const int rr = lane >> 1, hf = lane & 1;    // the lane's row, and half of the keys
    const int group = p.heads / p.kv_heads;
    for (int s = blockIdx.z; s < p.n_segs; s += gridDim.z) {
        const AttnSeg<T> sg = p.segs[s];
        const int kv_total = sg.past + sg.len;
        for (int h = blockIdx.y; h < p.heads; h += gridDim.y) {
            const int g = h / group;
            for (int q0 = blockIdx.x * kTile; q0 < sg.len; q0 += gridDim.x * kTile) {
                const int nq = imin(kTile, sg.len - q0);
                stage_tile(Ks, p.q + (size_t)(sg.q_row + q0) * p.q_stride + (size_t)h * D, p.q_stride, nq, kTile, D);
                __syncthreads();
                FragA<T> qf[kMaxD / 16];
                FT_UNROLL
                for (int c = 0; c < kMaxD / 16; ++c)
                    if (c < nd) wm::load_matrix_sync(qf[c], Ks + warp * 16 * D + c * 16, D);
                __syncthreads();
                FragC of[kMaxD / 16];
                FT_UNROLL
                for (int c = 0; c < kMaxD / 16; ++c)
                    if (c < nd) wm::fill_fragment(of[c], 0.f);
                const int my_q = q0 + warp * 16 + rr;
                const bool valid = my_q < sg.len;
                const int qpos = sg.past + my_q;
                float m_run = -INFINITY, l_run = 0.f;
                const int key_lo = first_key(sg.past + q0, p.window);
                const int key_hi = sg.past + q0 + nq - 1;
                for (int k0 = key_lo / BN * BN; k0 <= key_hi; k0 += BN) {
                    const int nk = imin(BN, kv_total - k0);
                    const size_t koff = (size_t)k0 * sg.kv_stride + (size_t)g * D;
                    stage_tile(Ks, sg.k + koff, sg.kv_stride, nk, BN, D);
                    stage_tile(Vs, sg.v + koff, sg.kv_stride, nk, BN, D);
                    __syncthreads();
                    // S = Q Kᵀ for the warp's 16 rows
                    FT_UNROLL
                    for (int j = 0; j < 4; ++j) {
                        if (j >= nb) break;
                        FragC acc;
                        wm::fill_fragment(acc, 0.f);
                        FT_UNROLL
                        for (int c = 0; c < kMaxD / 16; ++c) {
                            if (c >= nd) break;
                            FragBcol<T> kb;
                            wm::load_matrix_sync(kb, Ks + j * 16 * D + c * 16, D);
                            wm::mma_sync(acc, qf[c], kb, acc);
                        }
                        wm::store_matrix_sync(Rw + j * 16, acc, BN, wm::mem_row_major);
                    }
                    __syncwarp();
                    // online softmax: this lane has half of row rr
                    float sv[32];
                    float mt = -INFINITY;
                    FT_UNROLL
                    for (int jj = 0; jj < 32; ++jj) {
                        if (jj < half_n) {
                            const int key = k0 + hf * half_n + jj;
                            const bool vis = valid && key < kv_total && key_visible(key, qpos, p.window);
                            sv[jj] = vis ? Rw[rr * BN + hf * half_n + jj] * p.scale : -INFINITY;
                            mt = fmaxf(mt, sv[jj]);
                        }
                    }
                    mt = fmaxf(mt, __shfl_xor_sync(kFullMask, mt, 1));
                    const float m_new = fmaxf(m_run, mt);
                    float alpha = 1.f, psum = 0.f;
                    FT_UNROLL
                    for (int jj = 0; jj < 32; ++jj) {
                        if (jj < half_n) {
                            sv[jj] = m_new == -INFINITY ? 0.f : __expf(sv[jj] - m_new);
                            psum += sv[jj];
                        }
                    }
                    if (m_new != -INFINITY) alpha = __expf(m_run - m_new);
                    psum += __shfl_xor_sync(kFullMask, psum, 1);
                    l_run = l_run * alpha + psum;
                    m_run = m_new;
                    __syncwarp();  // every lane has read S before P overwrites it
                    FT_UNROLL
                    for (int jj = 0; jj < 32; ++jj)
                        if (jj < half_n) Pw[rr * 2 * BN + hf * half_n + jj] = from_f32<T>(sv[jj]);
                    if (hf == 0) row_f[rr] = alpha;
                    __syncwarp();
                    if (!__all_sync(kFullMask, alpha == 1.f)) {
                        FT_UNROLL
                        for (int c = 0; c < kMaxD / 16; ++c)
                            if (c < nd) scale_rows(of[c], scratch, BN, row_f, lane);
                    }
                    // O += P V
                    FT_UNROLL
                    for (int kk = 0; kk < 4; ++kk) {
                        if (kk >= nb) break;
                        FragA<T> pa;
                        wm::load_matrix_sync(pa, Pw + kk * 16, 2 * BN);
                        FT_UNROLL
                        for (int c = 0; c < kMaxD / 16; ++c) {
                            if (c >= nd) break;
                            FragBrow<T> vb;
                            wm::load_matrix_sync(vb, Vs + kk * 16 * D + c * 16, D);
                            wm::mma_sync(of[c], pa, vb, of[c]);
                        }
                    }
                    __syncthreads();  // K, V and P are read before the next tile
                }
                if (hf == 0) row_f[rr] = l_run > 0.f ? 1.0f / l_run : 0.f;
                if (hf == 0 && valid) p.lse[(size_t)h * p.lse_stride + sg.q_row + my_q] = m_run + logf(l_run);
                __syncwarp();
                const int row0 = q0 + warp * 16;
                T* out0 = p.out + (size_t)(sg.q_row + row0) * p.out_stride + (size_t)h * D;
                FT_UNROLL
                for (int c = 0; c < kMaxD / 16; ++c)
                    if (c < nd) write_tile(of[c], scratch, BN, row_f, 1.0f, out0 + c * 16, p.out_stride, sg.len - row0, lane);
                __syncthreads();
            }
        }
    }
}

template <class T>
__device__ __forceinline__ void attn_bwd_dq_tc(const AttnBwdParams<T>& p) {
    __shared__ __align__(128) unsigned char smem[kDqSmem];
    require_block(kTcThreads);
    check_attn(p.head_dim, p.heads, p.kv_heads, p.window, true);
    const int D = p.head_dim, nd = D / 16;
    const int BN = tc_keys(D), nb = BN / 16, half_n = BN / 2;
    T* Ks = reinterpret_cast<T*>(smem);  // also the Q and dO tiles while their fragments load
    T* Vs = Ks + BN * D;
    float* R = reinterpret_cast<float*>(smem + 4 * BN * D);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* Rw = R + warp * 16 * BN;    // S, then dP (16 x BN f32, ldm BN)
    T* Pw = reinterpret_cast<T*>(Rw);  // dS in place (ldm 2·BN)
    const int rr = lane >> 1, hf = lane & 1;
    const int group = p.heads / p.kv_heads;
    for (int s = blockIdx.z; s < p.n_segs; s += gridDim.z) {
        const AttnSeg<T> sg = p.segs[s];
        const int kv_total = sg.past + sg.len;
        for (int h = blockIdx.y; h < p.heads; h += gridDim.y) {
            const int g = h / group;
            for (int q0 = blockIdx.x * kTile; q0 < sg.len; q0 += gridDim.x * kTile) {
                const int nq = imin(kTile, sg.len - q0);
                FragA<T> qf[kMaxD / 16], dof[kMaxD / 16];
                stage_tile(Ks, p.q + (size_t)(sg.q_row + q0) * p.q_stride + (size_t)h * D, p.q_stride, nq, kTile, D);
                __syncthreads();
                FT_UNROLL
                for (int c = 0; c < kMaxD / 16; ++c)
                    if (c < nd) wm::load_matrix_sync(qf[c], Ks + warp * 16 * D + c * 16, D);
                __syncthreads();
                stage_tile(Ks, p.dout + (size_t)(sg.q_row + q0) * p.out_stride + (size_t)h * D, p.out_stride, nq, kTile, D);
                __syncthreads();
                FT_UNROLL
                for (int c = 0; c < kMaxD / 16; ++c)
                    if (c < nd) wm::load_matrix_sync(dof[c], Ks + warp * 16 * D + c * 16, D);
                __syncthreads();
                FragC dqf[kMaxD / 16];
                FT_UNROLL
                for (int c = 0; c < kMaxD / 16; ++c)
                    if (c < nd) wm::fill_fragment(dqf[c], 0.f);
                const int my_q = q0 + warp * 16 + rr;
                const bool valid = my_q < sg.len;
                const int qpos = sg.past + my_q;
                const size_t at = (size_t)h * p.lse_stride + sg.q_row + my_q;
                const float lse = valid ? p.lse[at] : 0.f;
                const float delta = valid ? p.delta[at] : 0.f;
                const int key_lo = first_key(sg.past + q0, p.window);
                const int key_hi = sg.past + q0 + nq - 1;
                for (int k0 = key_lo / BN * BN; k0 <= key_hi; k0 += BN) {
                    const int nk = imin(BN, kv_total - k0);
                    const size_t koff = (size_t)k0 * sg.kv_stride + (size_t)g * D;
                    stage_tile(Ks, sg.k + koff, sg.kv_stride, nk, BN, D);
                    stage_tile(Vs, sg.v + koff, sg.kv_stride, nk, BN, D);
                    __syncthreads();
                    // S = Q Kᵀ
                    FT_UNROLL
                    for (int j = 0; j < 4; ++j) {
                        if (j >= nb) break;
                        FragC acc;
                        wm::fill_fragment(acc, 0.f);
                        FT_UNROLL
                        for (int c = 0; c < kMaxD / 16; ++c) {
                            if (c >= nd) break;
                            FragBcol<T> kb;
                            wm::load_matrix_sync(kb, Ks + j * 16 * D + c * 16, D);
                            wm::mma_sync(acc, qf[c], kb, acc);
                        }
                        wm::store_matrix_sync(Rw + j * 16, acc, BN, wm::mem_row_major);
                    }
                    __syncwarp();
                    float pv[32];
                    FT_UNROLL
                    for (int jj = 0; jj < 32; ++jj) {
                        if (jj < half_n) {
                            const int key = k0 + hf * half_n + jj;
                            const bool vis = valid && key < kv_total && key_visible(key, qpos, p.window);
                            pv[jj] = vis ? __expf(Rw[rr * BN + hf * half_n + jj] * p.scale - lse) : 0.f;
                        }
                    }
                    __syncwarp();
                    // dP = dO Vᵀ
                    FT_UNROLL
                    for (int j = 0; j < 4; ++j) {
                        if (j >= nb) break;
                        FragC acc;
                        wm::fill_fragment(acc, 0.f);
                        FT_UNROLL
                        for (int c = 0; c < kMaxD / 16; ++c) {
                            if (c >= nd) break;
                            FragBcol<T> vb;
                            wm::load_matrix_sync(vb, Vs + j * 16 * D + c * 16, D);
                            wm::mma_sync(acc, dof[c], vb, acc);
                        }
                        wm::store_matrix_sync(Rw + j * 16, acc, BN, wm::mem_row_major);
                    }
                    __syncwarp();
                    FT_UNROLL
                    for (int jj = 0; jj < 32; ++jj)
                        if (jj < half_n) pv[jj] *= Rw[rr * BN + hf * half_n + jj] - delta;  // dS
                    __syncwarp();
                    FT_UNROLL
                    for (int jj = 0; jj < 32; ++jj)
                        if (jj < half_n) Pw[rr * 2 * BN + hf * half_n + jj] = from_f32<T>(pv[jj]);
                    __syncwarp();
                    // dQ += dS K
                    FT_UNROLL
                    for (int kk = 0; kk < 4; ++kk) {
                        if (kk >= nb) break;
                        FragA<T> a;
                        wm::load_matrix_sync(a, Pw + kk * 16, 2 * BN);
                        FT_UNROLL
                        for (int c = 0; c < kMaxD / 16; ++c) {
                            if (c >= nd) break;
                            FragBrow<T> kb;
                            wm::load_matrix_sync(kb, Ks + kk * 16 * D + c * 16, D);
                            wm::mma_sync(dqf[c], a, kb, dqf[c]);
                        }
                    }
                    __syncthreads();
                }
                const int row0 = q0 + warp * 16;
                T* dq0 = p.dq + (size_t)(sg.q_row + row0) * p.dq_stride + (size_t)h * D;
                FT_UNROLL
                for (int c = 0; c < kMaxD / 16; ++c)
                    if (c < nd) write_tile(dqf[c], Rw, BN, nullptr, p.scale, dq0 + c * 16, p.dq_stride, sg.len - row0, lane);
                __syncthreads();
            }
        }
    }
}

template <class T>
__device__ __forceinline__ void attn_bwd_dkdv_tc(const AttnBwdParams<T>& p) {
    __shared__ __align__(128) unsigned char smem[kDkdvSmem];
    require_block(kTcThreads);
    check_attn(p.head_dim, p.heads, p.kv_heads, p.window, true);
    const int D = p.head_dim, nd = D / 16;
    const int BM = tc_queries(D), nm = BM / 16, half_m = BM / 2;
    T* Ks = reinterpret_cast<T*>(smem);  // 64 keys x D
    T* Vs = Ks + kTile * D;
    T* Qs = Vs + kTile * D;              // BM queries x D
    T* dOs = Qs + BM * D;
    float* R = reinterpret_cast<float*>(dOs + BM * D);
    float* lse_s = R + 4 * 16 * BM;
    float* delta_s = lse_s + BM;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* Rw = R + warp * 16 * BM;    // Sᵀ, then dPᵀ (16 keys x BM f32, ldm BM)
    T* Pw = reinterpret_cast<T*>(Rw);  // Pᵀ, then dSᵀ, in place (ldm 2·BM)
    const int rr = lane >> 1, hf = lane & 1;  // the lane's key row, and half of the queries
    const int group = p.heads / p.kv_heads;
    for (int s = blockIdx.z; s < p.n_segs; s += gridDim.z) {
        const AttnSeg<T> sg = p.segs[s];
        const int kv_total = sg.past + sg.len;
        for (int g = blockIdx.y; g < p.kv_heads; g += gridDim.y) {
            for (int k0 = blockIdx.x * kTile; k0 < kv_total; k0 += gridDim.x * kTile) {
                const int nk = imin(kTile, kv_total - k0);
                const size_t koff = (size_t)k0 * sg.kv_stride + (size_t)g * D;
                stage_tile(Ks, sg.k + koff, sg.kv_stride, nk, kTile, D);
                stage_tile(Vs, sg.v + koff, sg.kv_stride, nk, kTile, D);
                FragC dkf[kMaxD / 16], dvf[kMaxD / 16];
                FT_UNROLL
                for (int c = 0; c < kMaxD / 16; ++c) {
                    if (c < nd) {
                        wm::fill_fragment(dkf[c], 0.f);
                        wm::fill_fragment(dvf[c], 0.f);
                    }
                }
                const int key = k0 + warp * 16 + rr;
                const bool kvalid = key < kv_total;
                const int k_hi = k0 + nk - 1;
                const long long r_lo = lmax((long long)k0 - sg.past, 0);
                const long long r_hi = lmin((long long)sg.len - 1, (long long)k_hi + p.window - 1 - sg.past);
                for (int hq = 0; hq < group && r_lo <= r_hi; ++hq) {
                    const int h = g * group + hq;
                    for (int qs0 = (int)(r_lo / BM * BM); qs0 <= r_hi; qs0 += BM) {
                        const int nqv = imin(BM, sg.len - qs0);
                        const size_t row0 = (size_t)sg.q_row + qs0;
                        stage_tile(Qs, p.q + row0 * p.q_stride + (size_t)h * D, p.q_stride, nqv, BM, D);
                        stage_tile(dOs, p.dout + row0 * p.out_stride + (size_t)h * D, p.out_stride, nqv, BM, D);
                        if ((int)threadIdx.x < BM) {
                            const bool ok = (int)threadIdx.x < nqv;
                            const size_t at = (size_t)h * p.lse_stride + row0 + threadIdx.x;
                            lse_s[threadIdx.x] = ok ? p.lse[at] : 0.f;
                            delta_s[threadIdx.x] = ok ? p.delta[at] : 0.f;
                        }
                        __syncthreads();
                        // Sᵀ = K Qᵀ for the warp's 16 keys
                        FT_UNROLL
                        for (int j = 0; j < 2; ++j) {
                            if (j >= nm) break;
                            FragC acc;
                            wm::fill_fragment(acc, 0.f);
                            FT_UNROLL
                            for (int c = 0; c < kMaxD / 16; ++c) {
                                if (c >= nd) break;
                                FragA<T> a;
                                FragBcol<T> b;
                                wm::load_matrix_sync(a, Ks + warp * 16 * D + c * 16, D);
                                wm::load_matrix_sync(b, Qs + j * 16 * D + c * 16, D);
                                wm::mma_sync(acc, a, b, acc);
                            }
                            wm::store_matrix_sync(Rw + j * 16, acc, BM, wm::mem_row_major);
                        }
                        __syncwarp();
                        float pv[16];
                        FT_UNROLL
                        for (int jj = 0; jj < 16; ++jj) {
                            if (jj < half_m) {
                                const int i = hf * half_m + jj;
                                const int qi = qs0 + i;
                                const bool vis = kvalid && qi < sg.len && key_visible(key, sg.past + qi, p.window);
                                pv[jj] = vis ? __expf(Rw[rr * BM + i] * p.scale - lse_s[i]) : 0.f;
                            }
                        }
                        __syncwarp();
                        FT_UNROLL
                        for (int jj = 0; jj < 16; ++jj)
                            if (jj < half_m) Pw[rr * 2 * BM + hf * half_m + jj] = from_f32<T>(pv[jj]);
                        __syncwarp();
                        // dV += Pᵀ dO
                        FT_UNROLL
                        for (int kk = 0; kk < 2; ++kk) {
                            if (kk >= nm) break;
                            FragA<T> a;
                            wm::load_matrix_sync(a, Pw + kk * 16, 2 * BM);
                            FT_UNROLL
                            for (int c = 0; c < kMaxD / 16; ++c) {
                                if (c >= nd) break;
                                FragBrow<T> b;
                                wm::load_matrix_sync(b, dOs + kk * 16 * D + c * 16, D);
                                wm::mma_sync(dvf[c], a, b, dvf[c]);
                            }
                        }
                        __syncwarp();
                        // dPᵀ = V dOᵀ
                        FT_UNROLL
                        for (int j = 0; j < 2; ++j) {
                            if (j >= nm) break;
                            FragC acc;
                            wm::fill_fragment(acc, 0.f);
                            FT_UNROLL
                            for (int c = 0; c < kMaxD / 16; ++c) {
                                if (c >= nd) break;
                                FragA<T> a;
                                FragBcol<T> b;
                                wm::load_matrix_sync(a, Vs + warp * 16 * D + c * 16, D);
                                wm::load_matrix_sync(b, dOs + j * 16 * D + c * 16, D);
                                wm::mma_sync(acc, a, b, acc);
                            }
                            wm::store_matrix_sync(Rw + j * 16, acc, BM, wm::mem_row_major);
                        }
                        __syncwarp();
                        FT_UNROLL
                        for (int jj = 0; jj < 16; ++jj) {
                            if (jj < half_m) {
                                const int i = hf * half_m + jj;
                                pv[jj] *= Rw[rr * BM + i] - delta_s[i];  // dSᵀ
                            }
                        }
                        __syncwarp();
                        FT_UNROLL
                        for (int jj = 0; jj < 16; ++jj)
                            if (jj < half_m) Pw[rr * 2 * BM + hf * half_m + jj] = from_f32<T>(pv[jj]);
                        __syncwarp();
                        // dK += dSᵀ Q
                        FT_UNROLL
                        for (int kk = 0; kk < 2; ++kk) {
                            if (kk >= nm) break;
                            FragA<T> a;
                            wm::load_matrix_sync(a, Pw + kk * 16, 2 * BM);
                            FT_UNROLL
                            for (int c = 0; c < kMaxD / 16; ++c) {
                                if (c >= nd) break;
                                FragBrow<T> b;
                                wm::load_matrix_sync(b, Qs + kk * 16 * D + c * 16, D);
                                wm::mma_sync(dkf[c], a, b, dkf[c]);
                            }
                        }
                        __syncthreads();  // Q, dO, lse, delta are read before the next tile
                    }
                }
                const int key0 = k0 + warp * 16;
                const size_t off0 = (size_t)key0 * sg.kv_stride + (size_t)g * D;
                FT_UNROLL
                for (int c = 0; c < kMaxD / 16; ++c) {
                    if (c < nd) {
                        write_tile(dkf[c], Rw, BM, nullptr, p.scale, sg.dk + off0 + c * 16, sg.kv_stride, kv_total - key0, lane);
                        write_tile(dvf[c], Rw, BM, nullptr, 1.0f, sg.dv + off0 + c * 16, sg.kv_stride, kv_total - key0, lane);
                    }
                }
                __syncthreads();  // K, V are free for the next tile
            }
        }
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Entry points. attn_<k>_f32 are the SIMT kernels; the f16 ones use tensor cores on sm_70+,
// the bf16 ones on sm_80+ (compiled for older GPUs they trap).
#if defined(FT_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define FT_BF16_TC(call) call
#else
#define FT_BF16_TC(call) __trap()
#endif

extern "C" __global__ void kv_append_f32(const AttnFwdParams<float> p) { kv_append(p); }
FT_EXPORT(kv_append_f32, AttnFwdParams<float>)
extern "C" __global__ void kv_append_f16(const AttnFwdParams<__half> p) { kv_append(p); }
FT_EXPORT(kv_append_f16, AttnFwdParams<__half>)
extern "C" __global__ void kv_append_bf16(const AttnFwdParams<__nv_bfloat16> p) { kv_append(p); }
FT_EXPORT(kv_append_bf16, AttnFwdParams<__nv_bfloat16>)

extern "C" __global__ void __launch_bounds__(FT_ATTN_SIMT_THREADS) attn_fwd_f32(const AttnFwdParams<float> p) { attn_fwd_simt(p); }
FT_EXPORT(attn_fwd_f32, AttnFwdParams<float>)
extern "C" __global__ void __launch_bounds__(FT_ATTN_TC_THREADS) attn_fwd_f16(const AttnFwdParams<__half> p) { attn_fwd_tc(p); }
FT_EXPORT(attn_fwd_f16, AttnFwdParams<__half>)
extern "C" __global__ void __launch_bounds__(FT_ATTN_TC_THREADS) attn_fwd_bf16(const AttnFwdParams<__nv_bfloat16> p) { FT_BF16_TC(attn_fwd_tc(p)); }
FT_EXPORT(attn_fwd_bf16, AttnFwdParams<__nv_bfloat16>)
extern "C" __global__ void __launch_bounds__(FT_ATTN_SIMT_THREADS) attn_fwd_simt_f32(const AttnFwdParams<float> p) { attn_fwd_simt(p); }
FT_EXPORT(attn_fwd_simt_f32, AttnFwdParams<float>)
extern "C" __global__ void __launch_bounds__(FT_ATTN_SIMT_THREADS) attn_fwd_simt_f16(const AttnFwdParams<__half> p) { attn_fwd_simt(p); }
FT_EXPORT(attn_fwd_simt_f16, AttnFwdParams<__half>)
extern "C" __global__ void __launch_bounds__(FT_ATTN_SIMT_THREADS) attn_fwd_simt_bf16(const AttnFwdParams<__nv_bfloat16> p) { attn_fwd_simt(p); }
FT_EXPORT(attn_fwd_simt_bf16, AttnFwdParams<__nv_bfloat16>)

extern "C" __global__ void attn_bwd_dot_f32(const AttnBwdParams<float> p) { attn_bwd_dot(p); }
FT_EXPORT(attn_bwd_dot_f32, AttnBwdParams<float>)
extern "C" __global__ void attn_bwd_dot_f16(const AttnBwdParams<__half> p) { attn_bwd_dot(p); }
FT_EXPORT(attn_bwd_dot_f16, AttnBwdParams<__half>)
extern "C" __global__ void attn_bwd_dot_bf16(const AttnBwdParams<__nv_bfloat16> p) { attn_bwd_dot(p); }
FT_EXPORT(attn_bwd_dot_bf16, AttnBwdParams<__nv_bfloat16>)
extern "C" __global__ void attn_bwd_dot_simt_f32(const AttnBwdParams<float> p) { attn_bwd_dot(p); }
FT_EXPORT(attn_bwd_dot_simt_f32, AttnBwdParams<float>)
extern "C" __global__ void attn_bwd_dot_simt_f16(const AttnBwdParams<__half> p) { attn_bwd_dot(p); }
FT_EXPORT(attn_bwd_dot_simt_f16, AttnBwdParams<__half>)
extern "C" __global__ void attn_bwd_dot_simt_bf16(const AttnBwdParams<__nv_bfloat16> p) { attn_bwd_dot(p); }
FT_EXPORT(attn_bwd_dot_simt_bf16, AttnBwdParams<__nv_bfloat16>)

extern "C" __global__ void __launch_bounds__(FT_ATTN_SIMT_THREADS) attn_bwd_dkdv_f32(const AttnBwdParams<float> p) { attn_bwd_dkdv_simt(p); }
FT_EXPORT(attn_bwd_dkdv_f32, AttnBwdParams<float>)
extern "C" __global__ void __launch_bounds__(FT_ATTN_TC_THREADS) attn_bwd_dkdv_f16(const AttnBwdParams<__half> p) { attn_bwd_dkdv_tc(p); }
FT_EXPORT(attn_bwd_dkdv_f16, AttnBwdParams<__half>)
extern "C" __global__ void __launch_bounds__(FT_ATTN_TC_THREADS) attn_bwd_dkdv_bf16(const AttnBwdParams<__nv_bfloat16> p) { FT_BF16_TC(attn_bwd_dkdv_tc(p)); }
FT_EXPORT(attn_bwd_dkdv_bf16, AttnBwdParams<__nv_bfloat16>)
extern "C" __global__ void __launch_bounds__(FT_ATTN_SIMT_THREADS) attn_bwd_dkdv_simt_f32(const AttnBwdParams<float> p) { attn_bwd_dkdv_simt(p); }
FT_EXPORT(attn_bwd_dkdv_simt_f32, AttnBwdParams<float>)
extern "C" __global__ void __launch_bounds__(FT_ATTN_SIMT_THREADS) attn_bwd_dkdv_simt_f16(const AttnBwdParams<__half> p) { attn_bwd_dkdv_simt(p); }
FT_EXPORT(attn_bwd_dkdv_simt_f16, AttnBwdParams<__half>)
extern "C" __global__ void __launch_bounds__(FT_ATTN_SIMT_THREADS) attn_bwd_dkdv_simt_bf16(const AttnBwdParams<__nv_bfloat16> p) { attn_bwd_dkdv_simt(p); }
FT_EXPORT(attn_bwd_dkdv_simt_bf16, AttnBwdParams<__nv_bfloat16>)

extern "C" __global__ void __launch_bounds__(FT_ATTN_SIMT_THREADS) attn_bwd_dq_f32(const AttnBwdParams<float> p) { attn_bwd_dq_simt(p); }
FT_EXPORT(attn_bwd_dq_f32, AttnBwdParams<float>)
extern "C" __global__ void __launch_bounds__(FT_ATTN_TC_THREADS) attn_bwd_dq_f16(const AttnBwdParams<__half> p) { attn_bwd_dq_tc(p); }
FT_EXPORT(attn_bwd_dq_f16, AttnBwdParams<__half>)
extern "C" __global__ void __launch_bounds__(FT_ATTN_TC_THREADS) attn_bwd_dq_bf16(const AttnBwdParams<__nv_bfloat16> p) { FT_BF16_TC(attn_bwd_dq_tc(p)); }
FT_EXPORT(attn_bwd_dq_bf16, AttnBwdParams<__nv_bfloat16>)
extern "C" __global__ void __launch_bounds__(FT_ATTN_SIMT_THREADS) attn_bwd_dq_simt_f32(const AttnBwdParams<float> p) { attn_bwd_dq_simt(p); }
FT_EXPORT(attn_bwd_dq_simt_f32, AttnBwdParams<float>)
extern "C" __global__ void __launch_bounds__(FT_ATTN_SIMT_THREADS) attn_bwd_dq_simt_f16(const AttnBwdParams<__half> p) { attn_bwd_dq_simt(p); }
FT_EXPORT(attn_bwd_dq_simt_f16, AttnBwdParams<__half>)
extern "C" __global__ void __launch_bounds__(FT_ATTN_SIMT_THREADS) attn_bwd_dq_simt_bf16(const AttnBwdParams<__nv_bfloat16> p) { attn_bwd_dq_simt(p); }
FT_EXPORT(attn_bwd_dq_simt_bf16, AttnBwdParams<__nv_bfloat16>)
