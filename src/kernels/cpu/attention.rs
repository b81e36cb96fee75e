//! Causal attention of one segment on the CPU (f32), fused: for each head and block of
//! query rows, scores against only the keys that block can see, the masked softmax, and
//! the product with the values, written straight into the `(tokens, heads · dim)` output.
//!
//! Why our own: the composed path (`q kᵀ` for all key positions, a softmax, `p v`)
//! computes the masked half of every causal score matrix, zero-fills and writes a
//! `(heads, len, len)` tensor, then copies the heads back into token rows. A profile of
//! prefill (512 tokens) spent about a third of its time there. The products still go
//! through the `gemm` crate (candle's CPU matmul), one block at a time.

use rayon::prelude::*;

/// Query rows per task: enough rows for `gemm`'s kernels, and enough tasks to share.
const BLOCK: usize = 64;

/// A strided `(heads, rows, dim)` f32 view: `data[h * head_stride + r * row_stride + c]`
/// (head-major: `row_stride = dim`; the token rows of a fused `qkv` buffer: `head_stride =
/// dim`, `row_stride` = the row width).
#[derive(Clone, Copy)]
pub struct HeadsView<'a> {
    pub data: &'a [f32],
    pub head_stride: usize,
    pub row_stride: usize,
}

impl HeadsView<'_> {
    /// Row `r` of head `h` (`dim` values).
    fn row(&self, h: usize, r: usize, dim: usize) -> &[f32] {
        &self.data[h * self.head_stride + r * self.row_stride..][..dim]
    }

    /// Checks that rows `0..rows` of `heads` heads fit the data.
    fn check(&self, heads: usize, rows: usize, dim: usize) {
        if heads > 0 && rows > 0 {
            let last = (heads - 1) * self.head_stride + (rows - 1) * self.row_stride + dim;
            assert!(
                last <= self.data.len(),
                "attention view: {last} > {}",
                self.data.len()
            );
        }
    }
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
    seg.q.check(seg.heads, len, d);
    seg.k.check(seg.kv_heads, seg.past + len, d);
    seg.v.check(seg.kv_heads, seg.past + len, d);
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
        let qs = scaled_rows(&seg.q, h, r0..r1, d, seg.scale);
        let kptr = seg.k.row(g, kb, d).as_ptr();
        let vptr = seg.v.row(g, kb, d).as_ptr();
        let (ks, vs) = (seg.k.row_stride, seg.v.row_stride);
        let mut s = vec![0f32; rows * nk];
        // SAFETY: all pointers and strides stay inside the slices taken above; the
        // destination rectangle of the second product (rows r0..r1, columns h·d..(h+1)·d)
        // is this task's alone and inside `out` (asserted above).
        unsafe {
            // s (rows × nk) = qs (rows × d) · kᵀ (d × nk)
            mm(
                (rows, nk, d),
                s.as_mut_ptr(),
                (nk, 1),
                false,
                qs.as_ptr(),
                (d, 1),
                kptr,
                (1, ks),
                1.0,
            );
            masked_softmax_rows(seg, &mut s, nk, r0, kb);
            // out rows (rows × d) = p (rows × nk) · v (nk × d)
            let dst = out_ptr.0.add(r0 * row_stride + h * d);
            mm(
                (rows, d, nk),
                dst,
                (row_stride, 1),
                false,
                s.as_ptr(),
                (nk, 1),
                vptr,
                (vs, 1),
                1.0,
            );
        }
    });
}

/// Rows `rows` of head `h`, multiplied by `scale`, packed `(rows, dim)`.
fn scaled_rows(
    v: &HeadsView,
    h: usize,
    rows: std::ops::Range<usize>,
    d: usize,
    scale: f32,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * d);
    for r in rows {
        out.extend(v.row(h, r, d).iter().map(|&x| x * scale));
    }
    out
}

/// Rows `rows` of head `h`, packed `(rows, dim)`.
fn packed_rows(v: &HeadsView, h: usize, rows: std::ops::Range<usize>, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * d);
    for r in rows {
        out.extend_from_slice(v.row(h, r, d));
    }
    out
}

/// [`super::gemm::mm`] on the calling thread (the callers already run in parallel).
///
/// # Safety
/// As [`super::gemm::mm`].
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    shape: (usize, usize, usize),
    dst: *mut f32,
    dst_strides: (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    lhs_strides: (usize, usize),
    rhs: *const f32,
    rhs_strides: (usize, usize),
    beta: f32,
) {
    super::gemm::mm(
        shape,
        dst,
        dst_strides,
        accumulate,
        lhs,
        lhs_strides,
        rhs,
        rhs_strides,
        beta,
        1,
    )
}

/// Softmax of each row of `s` (rows × nk, keys `kb..`) over the keys row `r0 + i` sees;
/// the others become 0.
fn masked_softmax_rows(seg: &Segment, s: &mut [f32], nk: usize, r0: usize, kb: usize) {
    for (i, srow) in s.chunks_mut(nk).enumerate() {
        let r = r0 + i;
        let lo = (seg.past + r + 1).saturating_sub(seg.window) - kb;
        let hi = seg.past + r - kb;
        let vis = &mut srow[lo..=hi];
        let max = vis.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        vis.iter_mut().for_each(|x| *x -= max);
        super::vexp::exp_in_place(vis);
        let sum: f32 = vis.iter().sum();
        let inv = 1.0 / sum;
        vis.iter_mut().for_each(|x| *x *= inv);
        srow[..lo].fill(0.0);
        srow[hi + 1..].fill(0.0);
    }
}

/// Gradients of [`attend`] for the output gradient `dy` (heads, len, dim): `dq` (heads,
/// len, dim), `dk` and `dv` (kv heads, past + len, dim), all contiguous and added to (the
/// caller zeroes them). One task per kv head (it owns that head's `dk`/`dv` rows); each
/// block's probabilities are recomputed, not kept from the forward.
pub fn attend_backward(
    seg: &Segment,
    dy: HeadsView,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (d, len) = (seg.dim, seg.len);
    let total = seg.past + len;
    let rep = seg.heads / seg.kv_heads;
    assert!(dq.len() >= seg.heads * len * d && dk.len() >= seg.kv_heads * total * d);
    assert!(dv.len() >= seg.kv_heads * total * d);
    seg.q.check(seg.heads, len, d);
    seg.k.check(seg.kv_heads, total, d);
    seg.v.check(seg.kv_heads, total, d);
    dy.check(seg.heads, len, d);
    let dq_heads: Vec<&mut [f32]> = dq.chunks_mut(len * d).take(seg.heads).collect();
    let mut dq_groups: Vec<Vec<&mut [f32]>> = Vec::with_capacity(seg.kv_heads);
    let mut it = dq_heads.into_iter();
    for _ in 0..seg.kv_heads {
        dq_groups.push(it.by_ref().take(rep).collect());
    }
    dq_groups
        .into_par_iter()
        .zip(dk.par_chunks_mut(total * d))
        .zip(dv.par_chunks_mut(total * d))
        .enumerate()
        .for_each(|(g, ((dqs, dkg), dvg))| {
            let (ks, vs) = (seg.k.row_stride, seg.v.row_stride);
            for (j, dqh) in dqs.into_iter().enumerate() {
                let h = g * rep + j;
                for b in 0..len.div_ceil(BLOCK) {
                    let (r0, r1) = (b * BLOCK, ((b + 1) * BLOCK).min(len));
                    let rows = r1 - r0;
                    let kb = (seg.past + r0 + 1).saturating_sub(seg.window);
                    let nk = seg.past + r1 - kb;
                    let q = packed_rows(&seg.q, h, r0..r1, d);
                    let qs: Vec<f32> = q.iter().map(|&x| x * seg.scale).collect();
                    let dout = packed_rows(&dy, h, r0..r1, d);
                    let (kp, vp) = (seg.k.row(g, kb, d).as_ptr(), seg.v.row(g, kb, d).as_ptr());
                    let mut p = vec![0f32; rows * nk];
                    let mut dp = vec![0f32; rows * nk];
                    // SAFETY (all `mm` calls): shapes and strides below stay inside the
                    // slices taken above; `dkg`/`dvg`/`dqh` are this task's alone.
                    unsafe {
                        // p = softmax(qs kᵀ), dp = dO vᵀ
                        mm(
                            (rows, nk, d),
                            p.as_mut_ptr(),
                            (nk, 1),
                            false,
                            qs.as_ptr(),
                            (d, 1),
                            kp,
                            (1, ks),
                            1.0,
                        );
                        mm(
                            (rows, nk, d),
                            dp.as_mut_ptr(),
                            (nk, 1),
                            false,
                            dout.as_ptr(),
                            (d, 1),
                            vp,
                            (1, vs),
                            1.0,
                        );
                    }
                    masked_softmax_rows(seg, &mut p, nk, r0, kb);
                    // dS = P ⊙ (dP − Σ_j P dP), in place of dp
                    for (prow, drow) in p.chunks(nk).zip(dp.chunks_mut(nk)) {
                        let dot: f32 = prow.iter().zip(drow.iter()).map(|(a, b)| a * b).sum();
                        for (x, &pv) in drow.iter_mut().zip(prow) {
                            *x = pv * (*x - dot);
                        }
                    }
                    let ds = dp;
                    unsafe {
                        // dV[kb..] += Pᵀ dO ; dQ = dS K · s ; dK[kb..] += dSᵀ Q · s
                        mm(
                            (nk, d, rows),
                            dvg[kb * d..].as_mut_ptr(),
                            (d, 1),
                            true,
                            p.as_ptr(),
                            (1, nk),
                            dout.as_ptr(),
                            (d, 1),
                            1.0,
                        );
                        mm(
                            (rows, d, nk),
                            dqh[r0 * d..].as_mut_ptr(),
                            (d, 1),
                            true,
                            ds.as_ptr(),
                            (nk, 1),
                            kp,
                            (ks, 1),
                            seg.scale,
                        );
                        mm(
                            (nk, d, rows),
                            dkg[kb * d..].as_mut_ptr(),
                            (d, 1),
                            true,
                            ds.as_ptr(),
                            (1, nk),
                            q.as_ptr(),
                            (d, 1),
                            seg.scale,
                        );
                    }
                }
            }
        });
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
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
                let q = seg.q.row(h, i, d);
                let vis: Vec<usize> = (0..total)
                    .filter(|&j| j <= p && p - j < seg.window)
                    .collect();
                let scores: Vec<f64> = vis
                    .iter()
                    .map(|&j| {
                        let k = seg.k.row(g, j, d);
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
                    let v = seg.v.row(g, j, d);
                    for c in 0..d {
                        out[i * seg.heads * d + h * d + c] += w / z * v[c] as f64;
                    }
                }
            }
        }
        out
    }

    /// d(Σ out ⊙ dy) by the textbook formulas in f64: (dq, dk, dv).
    fn reference_grads(seg: &Segment, dy: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (d, rep, len) = (seg.dim, seg.heads / seg.kv_heads, seg.len);
        let total = seg.past + len;
        let (mut dq, mut dk, mut dv) = (
            vec![0f64; seg.heads * len * d],
            vec![0f64; seg.kv_heads * total * d],
            vec![0f64; seg.kv_heads * total * d],
        );
        let at = |v: &HeadsView, h: usize, r: usize, c: usize| {
            v.data[h * v.head_stride + r * v.row_stride + c] as f64
        };
        let sc = seg.scale as f64;
        for h in 0..seg.heads {
            let g = h / rep;
            for i in 0..len {
                let p = seg.past + i;
                let vis: Vec<usize> = (0..total)
                    .filter(|&j| j <= p && p - j < seg.window)
                    .collect();
                let s: Vec<f64> = vis
                    .iter()
                    .map(|&j| {
                        (0..d)
                            .map(|c| at(&seg.q, h, i, c) * sc * at(&seg.k, g, j, c))
                            .sum()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                let pr: Vec<f64> = e.iter().map(|x| x / z).collect();
                let go = |c: usize| dy[h * len * d + i * d + c] as f64;
                let dp: Vec<f64> = vis
                    .iter()
                    .map(|&j| (0..d).map(|c| go(c) * at(&seg.v, g, j, c)).sum())
                    .collect();
                let dot: f64 = pr.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (t, &j) in vis.iter().enumerate() {
                    let ds = pr[t] * (dp[t] - dot);
                    for c in 0..d {
                        dv[(g * total + j) * d + c] += pr[t] * go(c);
                        dq[(h * len + i) * d + c] += ds * at(&seg.k, g, j, c) * sc;
                        dk[(g * total + j) * d + c] += ds * at(&seg.q, h, i, c) * sc;
                    }
                }
            }
        }
        (dq, dk, dv)
    }

    #[test]
    fn backward_matches_the_formulas_with_past_window_and_gqa() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for &(len, past, window, heads, kv, dim) in &[
            (130, 0, usize::MAX, 4, 2, 16),
            (70, 0, 29, 2, 2, 8),
            (5, 12, usize::MAX, 3, 1, 8),
        ] {
            let total = past + len;
            let mut rand =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
            let (q, k, v, dy) = (
                rand(heads * len * dim),
                rand(kv * total * dim),
                rand(kv * total * dim),
                rand(heads * len * dim),
            );
            let seg = Segment {
                q: HeadsView {
                    data: &q,
                    head_stride: len * dim,
                    row_stride: dim,
                },
                k: HeadsView {
                    data: &k,
                    head_stride: total * dim,
                    row_stride: dim,
                },
                v: HeadsView {
                    data: &v,
                    head_stride: total * dim,
                    row_stride: dim,
                },
                len,
                past,
                window,
                heads,
                kv_heads: kv,
                dim,
                scale: 1.0 / (dim as f32).sqrt(),
            };
            let (mut dq, mut dk, mut dv) = (
                vec![0f32; q.len()],
                vec![0f32; k.len()],
                vec![0f32; v.len()],
            );
            attend_backward(
                &seg,
                HeadsView {
                    data: &dy,
                    head_stride: len * dim,
                    row_stride: dim,
                },
                &mut dq,
                &mut dk,
                &mut dv,
            );
            let (wq, wk, wv) = reference_grads(&seg, &dy);
            for (name, got, want) in [("dq", &dq, &wq), ("dk", &dk, &wk), ("dv", &dv, &wv)] {
                for (i, (&a, &b)) in got.iter().zip(want.iter()).enumerate() {
                    assert!(
                        (a as f64 - b).abs() < 2e-5,
                        "{name}[{i}] len {len} past {past}: {a} vs {b}"
                    );
                }
            }
        }
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
                    row_stride: dim,
                },
                k: HeadsView {
                    data: &k,
                    head_stride: cap * dim,
                    row_stride: dim,
                },
                v: HeadsView {
                    data: &v,
                    head_stride: cap * dim,
                    row_stride: dim,
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
