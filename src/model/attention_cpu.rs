//! Causal attention of one segment on the CPU (f32), fused: for each head and block of
//! query rows, scores against only the keys that block can see, the masked softmax, and
//! the product with the values, written straight into the `(tokens, heads · dim)` output.
//!
//! Why our own: the composed path (`q kᵀ` for all key positions, a softmax, `p v`)
//! computes the masked half of every causal score matrix, zero-fills and writes a
//! `(heads, len, len)` tensor, then copies the heads back into token rows. A profile of
//! prefill (512 tokens) spent about a third of its time there. The products still go
//! through the `gemm` crate (candle's CPU matmul), one block at a time.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Query rows per task: enough rows for `gemm`'s kernels, and enough tasks to share.
const BLOCK: usize = 64;

/// A strided `(heads, rows, dim)` f32 view: `data[h * head_stride + r * dim + c]`.
#[derive(Clone, Copy)]
pub struct HeadsView<'a> {
    pub data: &'a [f32],
    pub head_stride: usize,
}

/// One segment: `len` queries at positions `past..past + len`, seeing keys `0..past + len`
/// where key `j` is visible from query position `p` iff `j <= p` and `p - j < window`.
pub struct Segment<'a> {
    pub q: HeadsView<'a>,
    pub k: HeadsView<'a>,
    pub v: HeadsView<'a>,
    pub len: usize,
    pub past: usize,
    pub window: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
    pub scale: f32,
}

struct OutPtr(*mut f32);
// SAFETY: every task writes its own (rows, head) rectangle of the output; no two overlap.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Writes the segment's attention output into `out`, whose row `i` (query `i` of the
/// segment) starts at `i * row_stride`; head `h` takes columns `h·dim..(h+1)·dim`.
pub fn attend(seg: &Segment, out: &mut [f32], row_stride: usize) {
    let (d, len) = (seg.dim, seg.len);
    assert!(seg.heads.is_multiple_of(seg.kv_heads) && row_stride >= seg.heads * d);
    assert!(len == 0 || out.len() >= (len - 1) * row_stride + seg.heads * d);
    let rep = seg.heads / seg.kv_heads;
    let blocks = len.div_ceil(BLOCK);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let out_ptr = &out_ptr;
    (0..seg.heads * blocks).into_par_iter().for_each(|task| {
        let (h, b) = (task / blocks, task % blocks);
        let (r0, r1) = (b * BLOCK, ((b + 1) * BLOCK).min(len));
        let rows = r1 - r0;
        let g = h / rep;
        // keys any row of the block sees
        let first = |r: usize| (seg.past + r + 1).saturating_sub(seg.window);
        let (kb, ke) = (first(r0), seg.past + r1);
        let nk = ke - kb;
        // q rows scaled, as the composed path scales q (not the scores)
        let qsrc = &seg.q.data[h * seg.q.head_stride + r0 * d..][..rows * d];
        let qs: Vec<f32> = qsrc.iter().map(|&x| x * seg.scale).collect();
        let kptr = seg.k.data[g * seg.k.head_stride + kb * d..][..nk * d].as_ptr();
        let vptr = seg.v.data[g * seg.v.head_stride + kb * d..][..nk * d].as_ptr();
        let mut s = vec![0f32; rows * nk];
        // SAFETY: all pointers and strides stay inside the slices taken above.
        unsafe {
            // s (rows × nk) = qs (rows × d) · kᵀ (d × nk)
            gemm(
                rows,
                nk,
                d,
                s.as_mut_ptr(),
                1,
                nk as isize,
                false,
                qs.as_ptr(),
                1,
                d as isize,
                kptr,
                d as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
        for (i, srow) in s.chunks_mut(nk).enumerate() {
            let r = r0 + i;
            let (lo, hi) = (first(r) - kb, seg.past + r - kb); // visible: lo..=hi
            let vis = &mut srow[lo..=hi];
            let max = vis.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0f32;
            for x in vis.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            vis.iter_mut().for_each(|x| *x *= inv);
            srow[..lo].fill(0.0);
            srow[hi + 1..].fill(0.0);
        }
        // SAFETY: the destination rectangle (rows r0..r1, columns h·d..(h+1)·d) is this
        // task's alone and inside `out` (asserted above).
        unsafe {
            // out rows (rows × d) = p (rows × nk) · v (nk × d)
            gemm(
                rows,
                d,
                nk,
                out_ptr.0.add(r0 * row_stride + h * d),
                1,
                row_stride as isize,
                false,
                s.as_ptr(),
                1,
                nk as isize,
                vptr,
                1,
                d as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Straightforward attention over all keys with the mask rule, in f64.
    fn reference(seg: &Segment) -> Vec<f64> {
        let (d, rep) = (seg.dim, seg.heads / seg.kv_heads);
        let total = seg.past + seg.len;
        let mut out = vec![0f64; seg.len * seg.heads * d];
        for h in 0..seg.heads {
            let g = h / rep;
            for i in 0..seg.len {
                let p = seg.past + i;
                let q = &seg.q.data[h * seg.q.head_stride + i * d..][..d];
                let vis: Vec<usize> = (0..total)
                    .filter(|&j| j <= p && p - j < seg.window)
                    .collect();
                let scores: Vec<f64> = vis
                    .iter()
                    .map(|&j| {
                        let k = &seg.k.data[g * seg.k.head_stride + j * d..][..d];
                        q.iter()
                            .zip(k)
                            .map(|(&a, &b)| (a * seg.scale) as f64 * b as f64)
                            .sum()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for (w, &j) in e.iter().zip(&vis) {
                    let v = &seg.v.data[g * seg.v.head_stride + j * d..][..d];
                    for c in 0..d {
                        out[i * seg.heads * d + h * d + c] += w / z * v[c] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_plain_attention_with_past_window_gqa_and_strides() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // (len, past, window, heads, kv, dim, extra key rows in the strided k/v buffers)
        for &(len, past, window, heads, kv, dim, spare) in &[
            (1, 0, usize::MAX, 2, 2, 8, 0),
            (130, 0, usize::MAX, 4, 2, 16, 0),
            (70, 33, usize::MAX, 2, 1, 8, 5),
            (100, 20, 37, 3, 3, 8, 0),
            (1, 90, 16, 2, 1, 8, 3),
        ] {
            let total = past + len;
            let cap = total + spare;
            let mut rand =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
            let q = rand(heads * len * dim);
            let k = rand(kv * cap * dim);
            let v = rand(kv * cap * dim);
            let seg = Segment {
                q: HeadsView {
                    data: &q,
                    head_stride: len * dim,
                },
                k: HeadsView {
                    data: &k,
                    head_stride: cap * dim,
                },
                v: HeadsView {
                    data: &v,
                    head_stride: cap * dim,
                },
                len,
                past,
                window,
                heads,
                kv_heads: kv,
                dim,
                scale: 1.0 / (dim as f32).sqrt(),
            };
            let stride = heads * dim + 3;
            let mut out = vec![f32::NAN; len * stride];
            attend(&seg, &mut out, stride);
            let want = reference(&seg);
            for i in 0..len {
                for c in 0..heads * dim {
                    let (a, b) = (out[i * stride + c] as f64, want[i * heads * dim + c]);
                    assert!(
                        (a - b).abs() < 1e-5,
                        "len {len} past {past} row {i} col {c}: {a} vs {b}"
                    );
                }
                assert!(out[i * stride + heads * dim].is_nan(), "wrote past the row");
            }
        }
    }
}
