//! The CPU's row passes: RMSNorm, SwiGLU, RoPE and the fused cross-entropy chunk, each one
//! parallel pass over the rows (f32, as transformers computes them).

use rayon::prelude::*;

/// Rows per parallel task in the element-wise passes.
const ROWS_PER_TASK: usize = 16;

/// RMSNorm of the rows of `x` (n, width): `(x · r · w, r)` with `r = 1/sqrt(mean(x²) + eps)`
/// per row, in f32 as transformers computes it.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let width = w.len();
    let mut y = vec![0f32; x.len()];
    let mut r = vec![0f32; x.len() / width];
    y.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(r.par_chunks_mut(ROWS_PER_TASK))
        .zip(x.par_chunks(width * ROWS_PER_TASK))
        .for_each(|((y, r), x)| {
            for ((y, r), x) in y.chunks_mut(width).zip(r.iter_mut()).zip(x.chunks(width)) {
                *r = 1.0 / (dot(x, x) / width as f32 + eps).sqrt();
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = w * (x * *r);
                }
            }
        });
    (y, r)
}

/// Adds RMSNorm's input gradient to `dx`: for `gw = dy · w`,
/// `dx += r · gw − x · r³ · mean(gw · x)`.
pub(crate) fn rms_norm_backward_add(x: &[f32], r: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32]) {
    let width = w.len();
    dx.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(r.par_chunks(ROWS_PER_TASK))
        .zip(x.par_chunks(width * ROWS_PER_TASK))
        .zip(dy.par_chunks(width * ROWS_PER_TASK))
        .for_each(|(((dx, r), x), dy)| {
            let mut gw = vec![0f32; width];
            for (((dx, &r), x), dy) in dx
                .chunks_mut(width)
                .zip(r)
                .zip(x.chunks(width))
                .zip(dy.chunks(width))
            {
                for ((g, &d), &w) in gw.iter_mut().zip(dy).zip(w) {
                    *g = d * w;
                }
                let c = r * r * r * dot(&gw, x) / width as f32;
                for ((dx, &g), &x) in dx.iter_mut().zip(&gw).zip(x) {
                    *dx += r * g - x * c;
                }
            }
        });
}

/// `Σ a·b` with 16 partial sums (vectorizes; also a little more accurate than one).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `silu(gate) * up` for rows `[gate | up]` of width `2 i`, in parallel over the rows.
pub(crate) fn swiglu_rows(gu: &[f32], i: usize) -> Vec<f32> {
    let mut out = vec![0f32; gu.len() / 2];
    out.par_chunks_mut(i)
        .zip(gu.par_chunks(2 * i))
        .for_each(|(o, x)| {
            let (gate, up) = x.split_at(i);
            for (o, &g) in o.iter_mut().zip(gate) {
                *o = -g;
            }
            super::vexp::exp_in_place(o);
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                *o = g / (1.0 + *o) * u;
            }
        });
    out
}

/// SwiGLU's input gradient `[d gate | d up]` (n, 2i) for `gu` (n, 2i) and `dy` (n, i):
/// with `σ = sigmoid(gate)`, `d gate = dy · up · σ · (1 + gate · (1 − σ))`,
/// `d up = dy · gate · σ`.
pub(crate) fn swiglu_backward(gu: &[f32], dy: &[f32], i: usize) -> Vec<f32> {
    let mut dgu = vec![0f32; gu.len()];
    dgu.par_chunks_mut(2 * i)
        .zip(gu.par_chunks(2 * i))
        .zip(dy.par_chunks(i))
        .for_each(|((d, x), dy)| {
            let (gate, up) = x.split_at(i);
            let (dg, du) = d.split_at_mut(i);
            for (s, &g) in dg.iter_mut().zip(gate) {
                *s = -g;
            }
            super::vexp::exp_in_place(dg);
            for ((((dg, du), &g), &u), &y) in dg.iter_mut().zip(du).zip(gate).zip(up).zip(dy) {
                let sig = 1.0 / (1.0 + *dg);
                *du = y * g * sig;
                *dg = y * u * sig * (1.0 + g * (1.0 - sig));
            }
        });
    dgu
}

/// Rotates heads `0..heads` of every row of `x` (rows, row_stride) in place with the
/// per-row tables `cos`, `sin` (rows, dim / 2): `x1' = x1·c − x2·s, x2' = x2·c + x1·s`
/// (the rotate-half form; `inverse` negates `s`, which undoes it).
pub(crate) fn rope_rows(
    x: &mut [f32],
    row_stride: usize,
    heads: usize,
    dim: usize,
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) {
    let half = dim / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(row_stride)
        .zip(cos.par_chunks(half).zip(sin.par_chunks(half)))
        .for_each(|(row, (c, s))| {
            for h in 0..heads {
                let (x1, x2) = row[h * dim..(h + 1) * dim].split_at_mut(half);
                for i in 0..half {
                    let (a, b, si) = (x1[i], x2[i], sign * s[i]);
                    x1[i] = a * c[i] - b * si;
                    x2[i] = b * c[i] + a * si;
                }
            }
        });
}

/// Rows of logits computed at a time by [`ce_chunk_rows`]' callers: bounds the f32 logits
/// buffer (2048 × 32064 × 4 B ≈ 260 MB for Phi-3).
pub const CE_CHUNK: usize = 2048;

/// One chunk of the cross-entropy on the CPU in f32, fused: the logits come from `gemm` into
/// fresh memory, and each row becomes, in place, its softmax (one `exp` per logit,
/// vectorized) and then `scale · (p − onehot)`; `dh = that @ w`. Returns the CE sum
/// (accumulated in f64) and, with `need_grad`, `dh` (rows, hidden). `h` (c, hidden), `w`
/// (vocab, hidden).
///
/// Why: the composed version made about eight passes over a (rows × vocab) f32 tensor
/// (2048 × 32064 × 4 B = 262 MB for Phi-3) with two `exp`s per logit.
pub(crate) fn ce_chunk_rows(
    hv: &[f32],
    wv: &[f32],
    (c, hidden, vocab): (usize, usize, usize),
    targets: &[u32],
    scale: f32,
    need_grad: bool,
) -> crate::error::Result<(f64, Option<Vec<f32>>)> {
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(crate::error::Error::InvalidArgument(format!(
            "target id {t} is outside the vocabulary ({vocab})"
        )));
    }
    let mut logits = super::gemm::gemm_xwt(hv, wv, c, hidden, vocab);
    let losses: Vec<f64> = logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let t = t as usize;
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            row.iter_mut().for_each(|x| *x -= max);
            let picked = row[t];
            super::vexp::exp_in_place(row);
            let sum: f64 = row.iter().map(|&e| e as f64).sum();
            if need_grad {
                let k = scale / sum as f32;
                row.iter_mut().for_each(|x| *x *= k);
                row[t] -= scale;
            }
            sum.ln() - picked as f64
        })
        .collect();
    let total = losses.iter().sum();
    if !need_grad {
        return Ok((total, None));
    }
    Ok((
        total,
        Some(super::gemm::gemm_xw(&logits, wv, c, vocab, hidden)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_and_its_backward_match_f64() {
        let (n, w) = (5, 37);
        let x: Vec<f32> = (0..n * w)
            .map(|i| ((i * 7919) % 23) as f32 / 7.0 - 1.5)
            .collect();
        let wt: Vec<f32> = (0..w).map(|i| 0.5 + i as f32 / 40.0).collect();
        let dy: Vec<f32> = (0..n * w)
            .map(|i| ((i * 31) % 11) as f32 / 5.0 - 1.0)
            .collect();
        let eps = 1e-5f32;
        let (y, r) = rms_norm(&x, &wt, eps);
        let mut dx = vec![0.25f32; n * w];
        rms_norm_backward_add(&x, &r, &wt, &dy, &mut dx);
        // f64 reference, the gradient by central differences of Σ dy · y
        let f = |xs: &[f64]| -> Vec<f64> {
            xs.chunks(w)
                .flat_map(|row| {
                    let ms = row.iter().map(|v| v * v).sum::<f64>() / w as f64;
                    let r = 1.0 / (ms + eps as f64).sqrt();
                    row.iter()
                        .zip(&wt)
                        .map(move |(v, &k)| v * r * k as f64)
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for (a, b) in y.iter().zip(f(&x64)) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
        let obj = |xs: &[f64]| -> f64 { f(xs).iter().zip(&dy).map(|(a, &b)| a * b as f64).sum() };
        for i in 0..n * w {
            let (mut p, mut m) = (x64.clone(), x64.clone());
            p[i] += 1e-5;
            m[i] -= 1e-5;
            let want = (obj(&p) - obj(&m)) / 2e-5 + 0.25;
            assert!(
                (dx[i] as f64 - want).abs() < 1e-4,
                "{i}: {} vs {want}",
                dx[i]
            );
        }
    }

    #[test]
    fn swiglu_backward_matches_differences() {
        let (n, i) = (3, 20);
        let gu: Vec<f32> = (0..n * 2 * i)
            .map(|k| ((k * 13) % 17) as f32 / 3.0 - 2.5)
            .collect();
        let dy: Vec<f32> = (0..n * i)
            .map(|k| ((k * 7) % 9) as f32 / 4.0 - 1.0)
            .collect();
        let d = swiglu_backward(&gu, &dy, i);
        let f = |g: f64, u: f64| g / (1.0 + (-g).exp()) * u;
        for row in 0..n {
            for c in 0..i {
                let (g, u) = (gu[row * 2 * i + c] as f64, gu[row * 2 * i + i + c] as f64);
                let y = dy[row * i + c] as f64;
                let dg = (f(g + 1e-6, u) - f(g - 1e-6, u)) / 2e-6 * y;
                let du = f(g, 1.0) * y;
                assert!((d[row * 2 * i + c] as f64 - dg).abs() < 1e-4);
                assert!((d[row * 2 * i + i + c] as f64 - du).abs() < 1e-5);
            }
        }
    }
}
