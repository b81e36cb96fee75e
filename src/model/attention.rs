//! Self-attention of a flat batch of segments, as one differentiable op of the fused
//! `qkv` projection.
//!
//! Why one op: the segments (conversations) of a packed batch are slices of the flat
//! `(tokens, ·)` activations. Taking those slices inside candle's graph makes every slice's
//! backward pad its gradient back to full size with zeros and add it up — for q, k and v of
//! every segment of every layer (a profile of CPU training: ~30 % of a step in zero-filling
//! and page faults for it). Here the forward runs without a graph (also with the KV caches
//! of generation), and the backward rule recomputes each segment's probabilities and
//! writes the segments' gradients side by side: no padding, and no probabilities kept
//! between forward and backward.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Result, Tensor, D};

use super::ops;
use super::phi3::SeqCache;

/// Shapes and constants of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub q: usize,
    pub kv: usize,
    pub dim: usize,
    /// The activations' dtype (scores and probabilities are computed in f32).
    pub dtype: DType,
}

impl Heads {
    fn scale(&self) -> f64 {
        1.0 / (self.dim as f64).sqrt()
    }
}

/// What attention needs from a batch: segments `(start, len)`, tokens already cached per
/// segment, per-token RoPE tables `(tokens, dim/2)` and the masks by `(len, past)`.
pub struct Layout {
    pub segments: Vec<(usize, usize)>,
    pub past: Vec<usize>,
    pub cos: Tensor,
    pub sin: Tensor,
    pub masks: HashMap<(usize, usize), Option<Tensor>>,
    /// The sliding window (`usize::MAX` without one); the masks already apply it.
    pub window: usize,
}

/// `qkv` (tokens, (q + 2 kv) · dim) → attention output (tokens, q · dim). With `caches`
/// (generation, one per segment) keys and values are appended there and queries see all
/// cached tokens. Differentiable with respect to `qkv` when it carries a graph.
pub fn attention(
    qkv: &Tensor,
    h: Heads,
    lay: &Arc<Layout>,
    caches: Option<&mut [&mut SeqCache]>,
    layer: usize,
) -> Result<Tensor> {
    let y = forward(&qkv.detach(), h, lay, caches, layer)?;
    if !qkv.track_op() {
        return Ok(y);
    }
    let lay = Arc::clone(lay);
    ops::attach(qkv, y, "attention", move |qkv, _, dy| {
        backward(qkv, dy, h, &lay)
    })
}

/// q (heads, tokens, dim), k and v (kv heads, tokens, dim), with RoPE applied to q and k.
fn split(qkv: &Tensor, h: Heads, lay: &Layout) -> Result<(Tensor, Tensor, Tensor)> {
    let n = qkv.dim(0)?;
    let heads = |start: usize, count: usize| -> Result<Tensor> {
        qkv.narrow(1, start * h.dim, count * h.dim)?
            .reshape((n, count, h.dim))?
            .transpose(0, 1)?
            .contiguous()
    };
    let rope = |x: Tensor| -> Result<Tensor> {
        candle_nn::rotary_emb::rope(&x.unsqueeze(0)?, &lay.cos, &lay.sin)?.squeeze(0)
    };
    Ok((
        rope(heads(0, h.q)?)?,
        rope(heads(h.q, h.kv)?)?,
        heads(h.q + h.kv, h.kv)?,
    ))
}

/// Repeats each of `kv` heads `rep` times: (kv, t, d) → (kv · rep, t, d).
fn expand(t: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(t.clone());
    }
    let (kv, len, d) = t.dims3()?;
    t.unsqueeze(1)?
        .expand((kv, rep, len, d))?
        .contiguous()?
        .reshape((kv * rep, len, d))
}

/// Softmax probabilities (f32) of one segment's scores.
fn probabilities(q: &Tensor, k: &Tensor, h: Heads, mask: Option<&Tensor>) -> Result<Tensor> {
    // Scaling q (tokens × dim) instead of the scores (tokens × tokens): a pass over a far
    // smaller tensor; exact for power-of-two head dims, a rounding apart otherwise.
    let scores = (q * h.scale())?.matmul(&k.t()?)?.to_dtype(DType::F32)?;
    match mask {
        Some(m) if scores.device().is_cpu() => scores.apply_op2_no_bwd(m, &MaskedSoftmax),
        Some(m) => candle_nn::ops::softmax_last_dim(&scores.broadcast_add(m)?),
        None => candle_nn::ops::softmax_last_dim(&scores),
    }
}

/// softmax(scores + mask) over the last dim in one pass per row on the CPU: scores
/// (heads, q, k) and an additive mask (q, k), both f32. Masked (-inf) entries become 0
/// without an `exp`; no `scores + mask` tensor is made.
struct MaskedSoftmax;

impl candle_core::CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        ls: &candle_core::Layout,
        m: &candle_core::CpuStorage,
        lm: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (s, m) = match (s, m) {
            (candle_core::CpuStorage::F32(s), candle_core::CpuStorage::F32(m)) => (s, m),
            _ => candle_core::bail!("masked-softmax: f32 scores and mask expected"),
        };
        let (Some((s0, s1)), Some((m0, m1))) = (ls.contiguous_offsets(), lm.contiguous_offsets())
        else {
            candle_core::bail!("masked-softmax: contiguous inputs expected")
        };
        let (s, m) = (&s[s0..s1], &m[m0..m1]);
        let dims = ls.shape().dims();
        let (q, k) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        if lm.shape().dims() != [q, k] {
            candle_core::bail!(
                "masked-softmax: mask {:?} for scores {:?}",
                lm.shape(),
                ls.shape()
            );
        }
        let mut out = vec![0f32; s.len()];
        out.par_chunks_mut(k)
            .zip(s.par_chunks(k))
            .enumerate()
            .for_each(|(r, (o, x))| {
                let mrow = &m[(r % q) * k..(r % q + 1) * k];
                let mut max = f32::NEG_INFINITY;
                for (&a, &b) in x.iter().zip(mrow) {
                    max = max.max(a + b);
                }
                let mut sum = 0f32;
                for ((o, &a), &b) in o.iter_mut().zip(x).zip(mrow) {
                    if b != f32::NEG_INFINITY {
                        *o = (a + b - max).exp();
                        sum += *o;
                    }
                }
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|v| *v *= inv);
            });
        Ok((candle_core::CpuStorage::F32(out), ls.shape().clone()))
    }
}

pub(super) fn forward(
    qkv: &Tensor,
    h: Heads,
    lay: &Layout,
    mut caches: Option<&mut [&mut SeqCache]>,
    layer: usize,
) -> Result<Tensor> {
    let n = qkv.dim(0)?;
    let (q, k, v) = split(qkv, h, lay)?;
    if q.device().is_cpu() && h.dtype == DType::F32 {
        return forward_cpu(&q, &k, &v, n, h, lay, caches, layer);
    }
    let rep = h.q / h.kv;
    let mut outs = Vec::with_capacity(lay.segments.len());
    for (i, (&(s, len), &past)) in lay.segments.iter().zip(&lay.past).enumerate() {
        let qs = q.narrow(1, s, len)?.contiguous()?;
        let mut ks = k.narrow(1, s, len)?.contiguous()?;
        let mut vs = v.narrow(1, s, len)?.contiguous()?;
        if let Some(c) = caches.as_deref_mut() {
            (ks, vs) = c[i].append(layer, &ks, &vs)?;
        }
        let p = probabilities(&qs, &expand(&ks, rep)?, h, lay.masks[&(len, past)].as_ref())?;
        outs.push(p.to_dtype(h.dtype)?.matmul(&expand(&vs, rep)?)?);
    }
    Tensor::cat(&outs, 1)?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((n, h.q * h.dim))
}

/// The f32 data of a CPU tensor `(heads, rows, dim)` whose rows are contiguous, from its
/// first element, and its head stride.
fn heads_data(t: &Tensor) -> Result<(candle_core::StorageRef<'_>, usize, usize)> {
    let (st, l) = t.storage_and_layout();
    let (dims, stride) = (l.dims(), l.stride());
    if dims.len() != 3 || stride[2] != 1 || stride[1] != dims[2] {
        candle_core::bail!("attention: rows of {dims:?} (strides {stride:?}) are not contiguous");
    }
    let (off, hs) = (l.start_offset(), stride[0]);
    Ok((st, off, hs))
}

/// The view of [`heads_data`]'s storage from element `off + skip`, `hs` apart per head.
fn heads_view(
    st: &candle_core::Storage,
    off: usize,
    hs: usize,
    skip: usize,
) -> Result<super::attention_cpu::HeadsView<'_>> {
    match st {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
            Ok(super::attention_cpu::HeadsView {
                data: &v[off + skip..],
                head_stride: hs,
            })
        }
        _ => candle_core::bail!("attention: f32 CPU tensors expected"),
    }
}

/// [`forward`] on the CPU in f32: the fused kernel of `attention_cpu`, each segment written
/// straight into its rows of the output.
#[allow(clippy::too_many_arguments)]
fn forward_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    n: usize,
    h: Heads,
    lay: &Layout,
    mut caches: Option<&mut [&mut SeqCache]>,
    layer: usize,
) -> Result<Tensor> {
    let width = h.q * h.dim;
    let mut out = vec![0f32; n * width];
    for (i, (&(s, len), &past)) in lay.segments.iter().zip(&lay.past).enumerate() {
        // Keys and values: the cache's (past + len rows) or this segment's rows of k / v.
        let (ks, vs, first) = match caches.as_deref_mut() {
            Some(c) => {
                let (ks, vs) = c[i].append(
                    layer,
                    &k.narrow(1, s, len)?.contiguous()?,
                    &v.narrow(1, s, len)?.contiguous()?,
                )?;
                (ks, vs, 0)
            }
            None => (k.clone(), v.clone(), s),
        };
        let (qg, qo, qh) = heads_data(q)?;
        let (kg, ko, kh) = heads_data(&ks)?;
        let (vg, vo, vh) = heads_data(&vs)?;
        let seg = super::attention_cpu::Segment {
            q: heads_view(&qg, qo, qh, s * h.dim)?,
            k: heads_view(&kg, ko, kh, first * h.dim)?,
            v: heads_view(&vg, vo, vh, first * h.dim)?,
            len,
            past,
            window: lay.window,
            heads: h.q,
            kv_heads: h.kv,
            dim: h.dim,
            scale: h.scale() as f32,
        };
        super::attention_cpu::attend(&seg, &mut out[s * width..], width);
    }
    Tensor::from_vec(out, (n, width), q.device())
}

/// One segment's (dq, dk, dv), each (heads, len, dim), with the fused CPU kernel; `q`, `k`,
/// `v` and `dy` are the whole batch's (heads, tokens, dim), the segment's keys its own rows.
fn backward_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dy: &Tensor,
    (s, len): (usize, usize),
    h: Heads,
    lay: &Layout,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (qg, qo, qh) = heads_data(q)?;
    let (kg, ko, kh) = heads_data(k)?;
    let (vg, vo, vh) = heads_data(v)?;
    let (yg, yo, yh) = heads_data(dy)?;
    let seg = super::attention_cpu::Segment {
        q: heads_view(&qg, qo, qh, s * h.dim)?,
        k: heads_view(&kg, ko, kh, s * h.dim)?,
        v: heads_view(&vg, vo, vh, s * h.dim)?,
        len,
        past: 0,
        window: lay.window,
        heads: h.q,
        kv_heads: h.kv,
        dim: h.dim,
        scale: h.scale() as f32,
    };
    let size = |heads: usize| heads * len * h.dim;
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; size(h.q)],
        vec![0f32; size(h.kv)],
        vec![0f32; size(h.kv)],
    );
    super::attention_cpu::attend_backward(
        &seg,
        heads_view(&yg, yo, yh, s * h.dim)?,
        &mut dq,
        &mut dk,
        &mut dv,
    );
    let t = |x: Vec<f32>, heads: usize| Tensor::from_vec(x, (heads, len, h.dim), q.device());
    Ok((t(dq, h.q)?, t(dk, h.kv)?, t(dv, h.kv)?))
}

/// d(qkv) for the output gradient `dy` (tokens, q · dim).
pub(super) fn backward(qkv: &Tensor, dy: &Tensor, h: Heads, lay: &Layout) -> Result<Tensor> {
    let n = qkv.dim(0)?;
    let (q, k, v) = split(qkv, h, lay)?;
    let dy = dy.reshape((n, h.q, h.dim))?.transpose(0, 1)?.contiguous()?;
    let rep = h.q / h.kv;
    let scale = h.scale();
    let (mut dqs, mut dks, mut dvs) = (vec![], vec![], vec![]);
    let fused = q.device().is_cpu() && h.dtype == DType::F32 && lay.past.iter().all(|&p| p == 0);
    for (&(s, len), &past) in lay.segments.iter().zip(&lay.past) {
        if fused {
            let (dq, dk, dv) = backward_cpu(&q, &k, &v, &dy, (s, len), h, lay)?;
            dqs.push(dq);
            dks.push(dk);
            dvs.push(dv);
            continue;
        }
        let qs = q.narrow(1, s, len)?.contiguous()?;
        let ke = expand(&k.narrow(1, s, len)?.contiguous()?, rep)?;
        let ve = expand(&v.narrow(1, s, len)?.contiguous()?, rep)?;
        let dos = dy.narrow(1, s, len)?.contiguous()?;
        let p = probabilities(&qs, &ke, h, lay.masks[&(len, past)].as_ref())?;
        let pd = p.to_dtype(h.dtype)?;
        // dV = Pᵀ dO; dP = dO Vᵀ; dS = P ⊙ (dP − Σ dP ⊙ P); dQ = dS K·s; dK = dSᵀ Q·s
        let dve = pd.t()?.matmul(&dos)?;
        let dp = dos.matmul(&ve.t()?)?.to_dtype(DType::F32)?;
        let ds =
            (&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)?)?.to_dtype(h.dtype)?;
        dqs.push((ds.matmul(&ke)? * scale)?);
        let dke = (ds.t()?.matmul(&qs)? * scale)?;
        let fold = |t: Tensor| -> Result<Tensor> {
            if rep == 1 {
                Ok(t)
            } else {
                t.reshape((h.kv, rep, len, h.dim))?.sum(1)
            }
        };
        dks.push(fold(dke)?);
        dvs.push(fold(dve)?);
    }
    // RoPE is a rotation: its backward is the same rotation with -sin.
    let unrope = |parts: Vec<Tensor>| -> Result<Tensor> {
        let neg_sin = lay.sin.neg()?;
        candle_nn::rotary_emb::rope(&Tensor::cat(&parts, 1)?.unsqueeze(0)?, &lay.cos, &neg_sin)?
            .squeeze(0)
    };
    let flat = |t: Tensor, heads: usize| -> Result<Tensor> {
        t.transpose(0, 1)?.contiguous()?.reshape((n, heads * h.dim))
    };
    Tensor::cat(
        &[
            flat(unrope(dqs)?, h.q)?,
            flat(unrope(dks)?, h.kv)?,
            flat(Tensor::cat(&dvs, 1)?, h.kv)?,
        ],
        1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{grads, max_diff, randn};

    /// The same attention from candle's differentiable ops (narrow, rope_slow, softmax).
    fn composed(qkv: &Tensor, h: Heads, lay: &Layout) -> Result<Tensor> {
        let n = qkv.dim(0)?;
        let heads = |start: usize, count: usize| -> Result<Tensor> {
            qkv.narrow(1, start * h.dim, count * h.dim)?
                .reshape((n, count, h.dim))?
                .transpose(0, 1)
        };
        let rope = |x: Tensor| -> Result<Tensor> {
            candle_nn::rotary_emb::rope_slow(&x.contiguous()?.unsqueeze(0)?, &lay.cos, &lay.sin)?
                .squeeze(0)
        };
        let (q, k, v) = (
            rope(heads(0, h.q)?)?,
            rope(heads(h.q, h.kv)?)?,
            heads(h.q + h.kv, h.kv)?,
        );
        let rep = h.q / h.kv;
        let mut outs = vec![];
        for &(s, len) in &lay.segments {
            let ks = expand(&k.narrow(1, s, len)?, rep)?;
            let vs = expand(&v.narrow(1, s, len)?, rep)?;
            let mut sc = (q.narrow(1, s, len)?.matmul(&ks.t()?)? * h.scale())?;
            if let Some(m) = &lay.masks[&(len, 0)] {
                sc = sc.broadcast_add(m)?;
            }
            outs.push(candle_nn::ops::softmax(&sc, D::Minus1)?.matmul(&vs)?);
        }
        Tensor::cat(&outs, 1)?
            .transpose(0, 1)?
            .reshape((n, h.q * h.dim))
    }

    fn causal(len: usize) -> Tensor {
        let v: Vec<f32> = (0..len * len)
            .map(|i| {
                if i % len <= i / len {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        Tensor::from_vec(v, (len, len), &candle_core::Device::Cpu).unwrap()
    }

    #[test]
    fn backward_matches_the_composed_graph() {
        for (q, kv) in [(4, 4), (4, 2)] {
            let h = Heads {
                q,
                kv,
                dim: 8,
                dtype: DType::F32,
            };
            let (lens, n) = ([3usize, 5, 1], 9);
            let mut masks = HashMap::new();
            for &l in &lens {
                masks.insert((l, 0), (l > 1).then(|| causal(l)));
            }
            let lay = Arc::new(Layout {
                segments: vec![(0, 3), (3, 5), (8, 1)],
                past: vec![0; 3],
                cos: randn(&[n, 4], 11),
                sin: randn(&[n, 4], 12),
                masks,
                window: usize::MAX,
            });
            let x = randn(&[n, (q + 2 * kv) * 8], 13);
            let (yf, ys, gf, gs) = grads(
                &x,
                |x| attention(x, h, &lay, None, 0),
                |x| composed(x, h, &lay),
            );
            assert!(max_diff(&yf, &ys) < 1e-5, "{}", max_diff(&yf, &ys));
            assert!(max_diff(&gf, &gs) < 1e-5, "{}", max_diff(&gf, &gs));
        }
    }
}
