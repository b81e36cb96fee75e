// The contract between ferrotune's Rust GPU backend (src/kernels/cuda/*.rs) and its CUDA
// kernels (src/kernels/cuda/*.cu): every kernel is
//
//     extern "C" __global__ void <name>_<dtype>(const <Params> p)
//
// with ONE parameter struct passed by value, so the Rust side launches every kernel the
// same way (one #[repr(C)] mirror per struct in src/kernels/cuda/params.rs; the field
// order, types and padding here and there must stay identical: pointers are 8 bytes,
// `int` 4, `float` 4, `unsigned long long` 8; every struct is padded to 8 bytes).
//
// <dtype> is the activation type T: `f32` (float), `f16` (__half) or `bf16`
// (__nv_bfloat16). Activations are row-major `(rows, width)`; all arithmetic inside the
// kernels is f32 (accumulations, statistics), only loads and stores use T.
//
// Launches: every "one block per row" kernel also loops over rows with a grid stride, and
// every 1-D kernel over elements, so a grid smaller than documented is still correct; block
// reductions need blockDim.x to be a multiple of 32 (kernels trap on a block shape they
// cannot use).
//
// The same sources compile twice:
//   * by NVRTC (CUDA 12) into machine code for sm_70 .. sm_90 + PTX (build.rs, `cuda`
//     feature), loaded by name through the CUDA driver;
//   * by the host C++ compiler with `emu/cuda_emu.h` (the `gpu-emu` feature): every
//     kernel then runs on the CPU, block by block, its threads as fibers, so that the Rust
//     tests can run the GPU backend without a GPU. FT_EXPORT(name, Params) after each
//     kernel declares that host entry point (and expands to nothing under NVRTC).
#pragma once

#ifndef FT_EMU
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define FT_EXPORT(name, params)
#endif

// ---------------------------------------------------------------------------------------
// RMSNorm (kernels: rms_norm_fwd_<T>, rms_norm_bwd_<T>). Launch: one block of 256 threads
// per row (grid.x = rows).
//
// forward, as transformers' Phi3RMSNorm: r = 1 / sqrt(mean(x²) + eps) in f32 from x
// converted to f32; y = T(w · T(x · r)) (the normalised value is rounded to T before the
// product with the weight, as `weight * hidden.to(input_dtype)`; for T = float both
// roundings vanish). rstd[row] = r when rstd != nullptr.
template <class T>
struct RmsNormFwdParams {
    const T* x;      // (rows, width)
    const T* w;      // (width)
    T* y;            // (rows, width)
    float* rstd;     // (rows) or nullptr
    int rows;
    int width;
    float eps;
    int _pad;
};

// backward: with gw = dy · w (f32), dx = r · gw − x · r³ · mean(gw · x);
// dx is written (accumulate == 0) or added to (accumulate != 0: dx = T(dx + that)).
template <class T>
struct RmsNormBwdParams {
    const T* x;      // (rows, width), the forward's input
    const T* w;      // (width)
    const float* rstd;  // (rows), from the forward (or recomputed)
    const T* dy;     // (rows, width)
    T* dx;           // (rows, width)
    int rows;
    int width;
    int accumulate;
    int _pad;
};

// ---------------------------------------------------------------------------------------
// Rotary embedding in place (kernel: rope_<T>). Launch: grid.x = rows, 128 threads.
//
// Row `t` of `qkv` holds heads side by side, `head_dim` each; the first `heads` heads of
// every row (q heads then k heads) are rotated, the rest (v) left alone. Non-interleaved
// ("rotate half") form, as transformers: for i < half = head_dim / 2,
//     angle = float(inv_freq[tab[t] * half + i] * float(pos[t]))   (an f32 product)
//     c = cos(angle) * mscale, s = sign * sin(angle) * mscale      (precise sin/cos)
//     x1' = x1 · c − x2 · s,   x2' = x2 · c + x1 · s              (x1 = x[i], x2 = x[i + half])
// sign = +1 is the forward, sign = −1 its backward (the inverse rotation) applied to the
// gradient. `tab` picks one of several inverse-frequency tables per token (LongRoPE's
// short/long factors); with a single table every tab[t] is 0.
template <class T>
struct RopeParams {
    T* qkv;              // (rows, row_stride)
    const int* pos;      // (rows) absolute positions
    const int* tab;      // (rows) table index per row
    const float* inv_freq;  // (tables, head_dim / 2)
    int rows;
    int row_stride;      // elements between rows
    int heads;           // heads rotated per row (q heads + kv heads)
    int head_dim;        // even
    float mscale;        // LongRoPE attention factor (1 otherwise)
    float sign;          // +1 forward, -1 backward
};

// ---------------------------------------------------------------------------------------
// SwiGLU of the fused gate_up projection (kernels: swiglu_fwd_<T>, swiglu_bwd_<T>).
// Launch: 1-D, 256 threads per block, one thread per output element of the forward
// (rows · inter elements), grid.x = ceil(rows · inter / 256).
//
// gu row = [gate (inter) | up (inter)]; forward out = silu(gate) · up, silu(g) = g / (1 + e^-g).
// backward: σ = sigmoid(g); d_gate = dy · up · σ · (1 + g · (1 − σ)), d_up = dy · g · σ;
// dgu row = [d_gate | d_up] (written, not added).
template <class T>
struct SwigluParams {
    const T* gu;     // (rows, 2 · inter)
    const T* dy;     // (rows, inter)  (backward only; nullptr in the forward)
    T* out;          // forward: (rows, inter); backward: dgu (rows, 2 · inter)
    int rows;
    int inter;
};

// ---------------------------------------------------------------------------------------
// LoRA dropout from a counter-based hash (kernel: dropout_<T>). Launch: 1-D, 256 threads,
// grid.x = ceil(n / 256) (any grid works: grid-stride loop).
//
// Element i (flat index in the (rows, width) input, i = row · width + col) is kept iff
// uniform(key, i) >= p, and then multiplied by keep_scale (= 1 / (1 − p)); dropped
// elements become 0. The same function runs on the CPU (src/kernels/dropout.rs), so both
// devices draw the same mask; nothing is stored or uploaded:
//     z = key + (i + 1) · 0x9E3779B97F4A7C15          (all u64, wrapping)
//     z = (z ^ (z >> 30)) · 0xBF58476D1CE4E5B9
//     z = (z ^ (z >> 27)) · 0x94D049BB133111EB
//     z = z ^ (z >> 31)
//     uniform = float(z >> 40) · 2^-24                (exactly representable in f32)
template <class T>
struct DropoutParams {
    const T* x;
    T* y;                    // may equal x
    unsigned long long n;
    unsigned long long key;
    float p;
    float keep_scale;
};

// ---------------------------------------------------------------------------------------
// Element-wise and data-movement kernels. Launch: 1-D, 256 threads, grid-stride loops
// (any grid.x >= 1 is correct; the Rust side uses min(ceil(n / 256), 65535)).
//
// cast_<A>_to_<B> (A, B in f32, f16, bf16; A != B): dst[i] = B(src[i]), round to nearest
// even. Also cast_f32_to_f32 is NOT provided.
template <class A, class B>
struct CastParams {
    const A* src;
    B* dst;
    unsigned long long n;
    float scale;             // dst = B(float(src) · scale)
    int _pad;
};

// add_<T>: y[i] = T(float(y[i]) + alpha · float(x[i])).
template <class T>
struct AddParams {
    T* y;
    const T* x;
    unsigned long long n;
    float alpha;
    int _pad;
};

// gather_rows_<T>: dst[i, :] = src[idx[i], :] (embedding lookup, the rows that have a
// target). scatter_rows_<T>: dst[idx[i], :] = src[i, :] (dst's other rows untouched;
// idx has no duplicates). Launch: grid.x = rows, 128 threads.
template <class T>
struct RowsParams {
    const T* src;
    T* dst;
    const int* idx;   // (rows)
    int rows;
    int width;
};

// ---------------------------------------------------------------------------------------
// Cross-entropy of one chunk of rows (kernel: ce_rows_<T>). Launch: one block of 256
// threads per row.
//
// logits (rows, vocab) in T, computed by the caller's GEMM. Per row, in f32:
//   m = max_j x_j, s = Σ_j exp(x_j − m), loss = log(s) + m − x_t   (t = targets[row])
// losses[row] = loss. With need_grad != 0 the row is overwritten in place by the
// gradient of scale · loss:  x_j ← T(scale · (exp(x_j − m) / s − [j == t])).
// Every target is in [0, vocab) (the caller checks; rows without a target are not passed).
template <class T>
struct CeRowsParams {
    T* logits;             // (rows, vocab)
    const int* targets;    // (rows)
    float* losses;         // (rows)
    int rows;
    int vocab;
    float scale;
    int need_grad;
};

// ---------------------------------------------------------------------------------------
// Reductions over f32 vectors, in double, in a fixed order (deterministic, no atomics):
// *out += Σ x[i] (square == 0) or Σ x[i]² (square != 0); the caller zeroes *out when it
// starts a new sum. Two launches with the same parameters, whole warps per block:
//   sum_f32         grid.x == parts (else trap), grid-stride: partial[b] = block b's share;
//   sum_f32_finish  one block: *out += Σ_b partial[b].
struct SumParams {
    const float* x;
    double* out;
    double* partial;  // (parts) device scratch
    unsigned long long n;
    int square;
    int parts;
};

// ---------------------------------------------------------------------------------------
// AdamW on the flat f32 adapter parameters, with gradient unscaling, global-norm clipping
// and the non-finite check on the device (kernel: adamw_f32). Launch: 256 threads,
// grid-stride.
//
//   norm = sqrt(*norm_sq) · grad_scale     (norm_sq: Σ g² of the raw gradients, sum_f32)
//   if norm is not finite: nothing changes; thread 0 of block 0 writes *status = 1.
//   else (and thread 0 of block 0 writes *status = 0):
//     clip = max_norm > 0 ? min(1, max_norm / (norm + 1e-6)) : 1      (torch's clip_grad_norm_)
//     g' = g · grad_scale · clip
//     p = p · (1 − lr · weight_decay)
//     m = m + (g' − m) · (1 − beta1)
//     v = beta2 · v + (1 − beta2) · g'²
//     p = p − (lr / bc1) · m / (sqrt(v) / bc2_sqrt + eps)
// (torch.optim.AdamW's single-tensor arithmetic; bc1 = 1 − beta1^t, bc2_sqrt =
// sqrt(1 − beta2^t), computed on the host per step.) The grads are left as they were.
// norm and clip are computed in f64 (as train/optim.rs), then g' = g · f32(grad_scale · clip)
// and the rest of the update in f32.
struct AdamWParams {
    float* p;
    const float* g;
    float* m;
    float* v;
    const double* norm_sq;
    int* status;
    unsigned long long n;
    float lr;
    float beta1;
    float beta2;
    float eps;
    float weight_decay;
    float bc1;
    float bc2_sqrt;
    float grad_scale;
    float max_norm;
    int _pad;
};

// ---------------------------------------------------------------------------------------
// Attention: causal, over packed segments, GQA, sliding window (kernels below).
//
// A segment is one conversation: `len` query rows at absolute positions past .. past+len−1
// whose keys/values are rows 0 .. past+len−1 of its own K/V storage. Key j is visible from
// query position p iff j <= p and p − j < window (window = INT_MAX: no window). Query head h
// reads kv head h / (heads / kv_heads).
//
// Layouts (all row-major, strides in elements):
//   q    : query row r of segment s is row segs[s].q_row + r of `q`, head h at columns
//          h·head_dim .. (h+1)·head_dim, rows q_stride apart (in training `q` is the fused
//          qkv buffer after RoPE, q_stride = (heads + 2·kv_heads)·head_dim).
//   k, v : segs[s].k / segs[s].v point at key row 0 of the segment (training: into the
//          same qkv buffer at that segment's first row, columns heads·head_dim / (heads +
//          kv_heads)·head_dim; generation: the start of that sequence's KV cache), kv head
//          g at columns g·head_dim, rows kv_stride apart (segs[s].kv_stride).
//   out  : (rows, heads·head_dim) with rows out_stride apart, row = q_row + r.
//   lse  : (heads, lse_stride) f32, lse[h·lse_stride + q_row + r] = log Σ_j exp(score_j)
//          over the visible keys, scores = (q·k)·scale in f32.
template <class T>
struct AttnSeg {
    const T* k;
    const T* v;
    T* dk;          // where a kernel writes key rows (same layout as k, kv_stride): the
    T* dv;          // backward's d K / d V; kv_append's cache rows (= k / v); else nullptr
    int q_row;
    int len;
    int past;
    int kv_stride;
};

// Two implementations of every attention kernel, same contract and same grid:
//   attn_<k>_f16 / attn_<k>_bf16: tensor cores (WMMA); head_dim a multiple of 16, <= 128;
//     bf16 needs sm_80+ (built for sm_70/75 the bf16 kernels trap). FT_ATTN_TC_THREADS.
//   attn_<k>_simt_<T> (f32, f16, bf16) and attn_<k>_f32 (the same SIMT code): plain FMA
//     loops; any even head_dim <= 128. FT_ATTN_SIMT_THREADS.
// Grids (x = tiles of FT_ATTN_TILE rows; tiles past a segment's end do nothing):
//   attn_fwd, attn_bwd_dq : (ceil(max len / 64), heads, n_segs)
//   attn_bwd_dkdv         : (ceil(max (past + len) / 64), kv_heads, n_segs)
//   attn_bwd_dot          : (n_rows, 1, 1), FT_ATTN_DOT_THREADS (no separate tensor-core
//                           version: attn_bwd_dot_simt_<T> is the same kernel)
// Every grid index is also a grid-stride loop, so a smaller grid is still correct (cap y
// and z at 65535). A block with another shape than documented traps. No dynamic shared
// memory; static shared memory stays below 48 KB (no opt-in attribute needed).
#define FT_ATTN_TILE 64
#define FT_ATTN_TC_THREADS 128
#define FT_ATTN_SIMT_THREADS 256
#define FT_ATTN_DOT_THREADS 128
#define FT_ATTN_MAX_HEAD_DIM 128

// attn_fwd_<T> / attn_fwd_simt_<T>: out and lse as above.
// kv_append_<T> (same parameters; out, lse and scale unused): for every segment, rows
// q_row .. q_row + len − 1 of q's key and value columns (heads·head_dim, then
// (heads + kv_heads)·head_dim; kv_heads·head_dim each) copied to rows past .. past + len − 1
// of segs[s].dk / dv. Launch: grid (longest len, n_segs) (grid-stride in both), any 1-D block.
template <class T>
struct AttnFwdParams {
    const T* q;
    T* out;
    float* lse;
    const AttnSeg<T>* segs;   // (n_segs), device memory
    int q_stride;
    int out_stride;
    int lse_stride;
    int n_segs;
    int heads;
    int kv_heads;
    int head_dim;             // <= 128; the tensor-core kernels need a multiple of 16
    int window;
    float scale;              // 1 / sqrt(head_dim)
    int _pad;
};

// attn_bwd_dot_<T>: delta[h·lse_stride + row] = Σ_c dout[row, h·d + c] · out[row, h·d + c]
// (f32), for every query row of every segment. Launch: grid.x = total rows (the caller
// passes n_rows = q_row + len of the last segment, rows not in a segment are computed too:
// harmless), 128 threads (any multiple of 32).
//
// attn_bwd_dkdv_<T>: for every segment, kv head g and tile of keys, dk and dv (written,
// not added, into segs[s].dk / .dv; every key row 0 .. past+len−1, zeros where no query
// sees the key) summed over the query heads of the group and every query row that sees
// those keys, with P recomputed from q, k and lse:
//   P = exp(S − lse), dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − delta), dK = dSᵀ Q · scale.
// attn_bwd_dq_<T>: dq (written into `dq`, rows dq_stride apart, same row numbering as q)
//   dQ = dS K · scale, for every segment, query head and tile of query rows.
// Two kernels instead of atomics: every output element is written by one block, so the
// backward is deterministic (bit-identical reruns), at the price of computing P twice.
template <class T>
struct AttnBwdParams {
    const T* q;
    const T* out;
    const T* dout;
    const float* lse;
    float* delta;             // (heads, lse_stride), written by attn_bwd_dot
    T* dq;
    const AttnSeg<T>* segs;
    int q_stride;
    int out_stride;           // for out and dout
    int dq_stride;
    int lse_stride;
    int n_segs;
    int n_rows;               // attn_bwd_dot only
    int heads;
    int kv_heads;
    int head_dim;
    int window;
    float scale;
    int _pad;
};
