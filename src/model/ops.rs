//! Differentiable building blocks with fused forwards.
//!
//! candle's fused kernels (`rms_norm`, `rope`, `softmax_last_dim`) have no backward, and its
//! matmul backward always computes the weight gradient, even for frozen weights (see
//! `shared/notes/candle-training.md`). Each op here runs the fast forward without a graph
//! and then [`attach`]es an explicit backward rule written with ordinary tensor ops: one
//! small custom op, instead of a fork of candle. The price is one copy of the output.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// `dx = rule(x, y, dy)`.
type Rule = Arc<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Custom op with inputs `(x, y)`: returns `y` and sends `rule(x, y, dy)` to `x`.
struct Attach {
    name: &'static str,
    rule: Rule,
}

impl CustomOp2 for Attach {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((y.try_clone(ly)?, ly.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        y: &CudaStorage,
        ly: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Ok((y.try_clone(ly)?, ly.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _y: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.rule)(x, res, grad)?), None))
    }
}

/// Makes `y` (computed from `x.detach()`) differentiable with respect to `x` through
/// `rule`. When `x` carries no graph, `y` is returned as is (no copy).
pub fn attach<F>(x: &Tensor, y: Tensor, name: &'static str, rule: F) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    if !x.track_op() {
        return Ok(y);
    }
    // The custom op clones y's storage as a whole, so y must start at offset 0 and be
    // contiguous.
    let y = y.detach();
    let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
        y
    } else {
        y.force_contiguous()?
    };
    x.apply_op2(
        &y,
        Attach {
            name,
            rule: Arc::new(rule),
        },
    )
}

/// `x @ w.T` for a frozen `w` (out, in): the backward computes only `dx = dy @ w`.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let y = super::skinny::matmul_t(&x.detach(), w)?;
    let w = w.clone();
    attach(x, y, "frozen-linear", move |_, _, g| {
        super::skinny::matmul(g, &w)
    })
}

/// RMSNorm over the last dim with a frozen weight, computed in f32 like transformers.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let y = candle_nn::ops::rms_norm(&x.detach(), w, eps as f32)?;
    let w = w.clone();
    attach(x, y, "rms-norm", move |x, _, g| {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let gw = g
            .to_dtype(DType::F32)?
            .broadcast_mul(&w.to_dtype(DType::F32)?)?;
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.powf(-0.5)?;
        let dot = (&gw * &x)?.mean_keepdim(D::Minus1)?;
        let dx = (gw.broadcast_mul(&r)? - x.broadcast_mul(&(r.powf(3.0)? * dot)?)?)?;
        dx.to_dtype(dtype)
    })
}

/// SwiGLU of the fused `gate_up` projection (tokens, 2·i): `silu(gate) * up` (tokens, i).
/// One op for both halves, so the backward writes `[d gate, d up]` side by side instead of
/// padding each half's gradient to full width.
pub fn swiglu(gu: &Tensor) -> Result<Tensor> {
    let i = gu.dim(D::Minus1)? / 2;
    let g = gu.detach();
    let y = if g.device().is_cpu() && g.dtype() == DType::F32 && g.rank() == 2 {
        g.contiguous()?.apply_op1_no_bwd(&SwigluCpu)?
    } else {
        (g.narrow(D::Minus1, 0, i)?.silu()? * g.narrow(D::Minus1, i, i)?)?
    };
    attach(gu, y, "swiglu", move |gu, _, dy| {
        let gate = gu.narrow(D::Minus1, 0, i)?;
        let up = gu.narrow(D::Minus1, i, i)?;
        let sig = candle_nn::ops::sigmoid(&gate)?;
        // silu'(x) = σ(x) · (1 + x · (1 − σ(x)))
        let dsilu = (&sig * ((&gate * (1.0 - &sig)?)? + 1.0)?)?;
        let d_gate = (dy * &up)?.mul(&dsilu)?;
        let d_up = (dy * (&gate * &sig)?)?;
        Tensor::cat(&[d_gate, d_up], D::Minus1)
    })
}

/// SwiGLU's forward on the CPU in one parallel pass over the rows (candle's `silu` and
/// `mul` on the two strided halves run single-threaded and allocate in between).
struct SwigluCpu;

impl candle_core::CustomOp1 for SwigluCpu {
    fn name(&self) -> &'static str {
        "swiglu-cpu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(v), Some((a, b))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("swiglu-cpu: contiguous f32 expected")
        };
        let (rows, width) = l.shape().dims2()?;
        Ok((
            CpuStorage::F32(swiglu_rows(&v[a..b], width / 2)),
            Shape::from((rows, width / 2)),
        ))
    }
}

/// `silu(gate) * up` for rows `[gate | up]` of width `2 i`, in parallel over the rows.
pub(super) fn swiglu_rows(gu: &[f32], i: usize) -> Vec<f32> {
    use rayon::prelude::*;
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

/// Rows of logits computed at a time by [`linear_cross_entropy`]: bounds the f32 logits
/// buffer (2048 × 32064 × 4 B ≈ 260 MB for Phi-3).
pub const CE_CHUNK: usize = 2048;

/// `(scale * Σ_i CE(h_i @ w.T, target_i), Σ_i CE)` for hidden states `h` (m, hidden), a frozen
/// output matrix `w` (vocab, hidden) and `targets` (m,) u32, in f32.
///
/// The logits never exist all at once: each chunk's softmax gradient is turned into
/// `dh` right away (the loss is the graph's end, so the upstream gradient is a scalar),
/// and the backward only scales the stored `dh`. With `need_grad` false nothing is kept.
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    scale: f64,
    need_grad: bool,
) -> Result<(Tensor, f64)> {
    let m = h.dim(0)?;
    let hd = h.detach();
    let need_grad = need_grad && h.track_op();
    let mut total = Tensor::zeros((), DType::F32, h.device())?;
    let mut dh = Vec::new();
    let mut start = 0;
    let fused = hd.device().is_cpu() && hd.dtype() == DType::F32 && w.dtype() == DType::F32;
    let (hd, w_c) = if fused {
        (hd.contiguous()?, w.contiguous()?)
    } else {
        (hd, w.clone())
    };
    let mut fused_total = 0f64;
    while start < m {
        let c = CE_CHUNK.min(m - start);
        let hc = hd.narrow(0, start, c)?;
        if fused {
            let t = targets.narrow(0, start, c)?.to_vec1::<u32>()?;
            let (sum, g) = ce_chunk_cpu(&hc, &w_c, &t, scale as f32, need_grad)?;
            fused_total += sum;
            dh.extend(g);
            start += c;
            continue;
        }
        let tc = targets.narrow(0, start, c)?.unsqueeze(1)?;
        let logits = hc.matmul(&w.t()?)?.to_dtype(DType::F32)?;
        let max = logits.max_keepdim(1)?;
        let shifted = logits.broadcast_sub(&max)?;
        let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
        let picked = shifted.gather(&tc, 1)?;
        total = (total + (&lse - &picked)?.sum_all()?)?;
        if need_grad {
            let mut p = shifted.broadcast_sub(&lse)?.exp()?;
            let minus_one = Tensor::full(-1f32, (c, 1), h.device())?;
            p = p.scatter_add(&tc, &minus_one, 1)?;
            let dl = (p * scale)?.to_dtype(w.dtype())?;
            dh.push(dl.matmul(w)?.to_dtype(h.dtype())?);
        }
        start += c;
    }
    let (raw, total) = if fused {
        (fused_total, Tensor::new(fused_total as f32, h.device())?)
    } else {
        (total.to_scalar::<f32>()? as f64, total)
    };
    let loss = (total * scale)?;
    if !need_grad {
        return Ok((loss, raw));
    }
    let dh = if dh.is_empty() {
        h.zeros_like()?
    } else {
        Tensor::cat(&dh, 0)?
    };
    let loss = attach(h, loss, "linear-cross-entropy", move |_, _, g| {
        dh.broadcast_mul(&g.to_dtype(dh.dtype())?)
    })?;
    Ok((loss, raw))
}

/// One chunk of [`linear_cross_entropy`] on the CPU in f32, fused: the logits come from
/// `gemm` into fresh memory, and each row becomes, in place, its softmax (one `exp` per
/// logit, vectorized) and then `scale · (p − onehot)`; `dh = that @ w`. Returns the CE sum
/// (accumulated in f64) and, with `need_grad`, `dh` (rows, hidden).
///
/// Why: the composed version made about eight passes over a (rows × vocab) f32 tensor
/// (2048 × 32064 × 4 B = 262 MB for Phi-3) with two `exp`s per logit.
fn ce_chunk_cpu(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    scale: f32,
    need_grad: bool,
) -> Result<(f64, Option<Tensor>)> {
    let ((c, hidden), (vocab, _)) = (h.dims2()?, w.dims2()?);
    let Some(rows) = super::skinny::with_cpu_f32(h, w, |hv, wv| {
        ce_chunk_rows(hv, wv, (c, hidden, vocab), targets, scale, need_grad)
    }) else {
        candle_core::bail!("linear-cross-entropy: contiguous f32 CPU tensors expected")
    };
    let (total, dh) = rows?;
    let dh = match dh {
        Some(d) => Some(Tensor::from_vec(d, (c, hidden), h.device())?),
        None => None,
    };
    Ok((total, dh))
}

/// [`ce_chunk_cpu`] on the raw rows: `h` (c, hidden), `w` (vocab, hidden).
pub(super) fn ce_chunk_rows(
    hv: &[f32],
    wv: &[f32],
    (c, hidden, vocab): (usize, usize, usize),
    targets: &[u32],
    scale: f32,
    need_grad: bool,
) -> Result<(f64, Option<Vec<f32>>)> {
    use rayon::prelude::*;
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!(
            "linear-cross-entropy: target id {t} is outside the vocabulary ({vocab})"
        )
    }
    let mut logits = super::skinny::gemm_xwt(hv, wv, c, hidden, vocab);
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
        Some(super::skinny::gemm_xw(&logits, wv, c, vocab, hidden)),
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    //! Each fused op's attached backward against candle's own differentiable composition.
    use super::*;
    use candle_core::{Device, Var};

    pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }

    pub(crate) fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// d(sum(f(x) * probe))/dx through `fast` and through `slow`.
    pub(crate) fn grads(
        x: &Tensor,
        fast: impl Fn(&Tensor) -> Result<Tensor>,
        slow: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> (Tensor, Tensor, Tensor, Tensor) {
        let probe = randn(fast(x).unwrap().dims(), 99);
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
            let v = Var::from_tensor(x).unwrap();
            let y = f(v.as_tensor()).unwrap();
            let g = (&y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (y.detach(), g.get(v.as_tensor()).unwrap().clone())
        };
        let (yf, gf) = run(&fast);
        let (ys, gs) = run(&slow);
        (yf, ys, gf, gs)
    }

    #[test]
    fn rms_norm_backward() {
        let x = randn(&[5, 16], 1);
        let w = randn(&[16], 2);
        let (yf, ys, gf, gs) = grads(
            &x,
            |x| rms_norm(x, &w, 1e-5),
            |x| candle_nn::ops::rms_norm_slow(x, &w, 1e-5),
        );
        assert!(max_diff(&yf, &ys) < 1e-5);
        assert!(max_diff(&gf, &gs) < 1e-5, "{}", max_diff(&gf, &gs));
    }

    #[test]
    fn swiglu_backward() {
        let x = randn(&[5, 12], 3);
        let (yf, ys, gf, gs) = grads(&x, swiglu, |x| {
            x.narrow(1, 0, 6)?.silu()? * x.narrow(1, 6, 6)?
        });
        assert!(max_diff(&yf, &ys) < 1e-6);
        assert!(max_diff(&gf, &gs) < 1e-5, "{}", max_diff(&gf, &gs));
    }

    #[test]
    fn frozen_linear_backward_and_no_weight_grad() {
        let x = randn(&[6, 5], 7);
        let w = Var::from_tensor(&randn(&[3, 5], 8)).unwrap();
        let (yf, ys, gf, gs) = grads(
            &x,
            |x| frozen_linear(x, w.as_tensor()),
            |x| x.matmul(&w.as_tensor().t()?),
        );
        assert!(max_diff(&yf, &ys) < 1e-6);
        assert!(max_diff(&gf, &gs) < 1e-6);
        // Even a Var weight gets no gradient through the frozen path.
        let xv = Var::from_tensor(&x).unwrap();
        let g = frozen_linear(xv.as_tensor(), w.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(w.as_tensor()).is_none());
    }

    #[test]
    fn cross_entropy_matches_log_softmax() {
        let h = randn(&[5, 8], 9);
        let w = randn(&[11, 8], 10);
        let t = Tensor::new(&[0u32, 3, 10, 4, 4], &Device::Cpu).unwrap();
        let slow = |h: &Tensor| -> Result<Tensor> {
            let logits = h.matmul(&w.t()?)?;
            let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            lsm.gather(&t.unsqueeze(1)?, 1)?.sum_all()? * -0.5
        };
        let (yf, ys, gf, gs) = grads(
            &h,
            |h| Ok(linear_cross_entropy(h, &w, &t, 0.5, true)?.0),
            slow,
        );
        assert!(max_diff(&yf, &ys) < 1e-5);
        assert!(max_diff(&gf, &gs) < 1e-6);
    }
}
