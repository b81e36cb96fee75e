//! Training's forward and backward of a decoder layer on the CPU in f32, written out by
//! hand on flat buffers instead of through candle's autograd.
//!
//! Why: with the graph, a CPU training step kept only ~1.6 of 2 cores busy. candle's
//! backward zero-fills and then adds every gradient it stores (`GradStore::or_insert`),
//! each fused op's output is copied once more to attach its backward, and the residual and
//! LoRA adds are passes of their own — all on the calling thread, while the other core
//! waits. Here every product is one `gemm` call that writes or accumulates straight into
//! its destination (the LoRA term and the residual are accumulated into the projection's
//! output, the input gradients into one buffer), and the element-wise steps (RMSNorm,
//! SwiGLU and their backwards) are single parallel passes over the rows. Attention uses the
//! same graph-free forward and backward as the autograd path (`attention::forward` /
//! `attention::backward`).
//!
//! The graph path (`Phi3::forward_backward_graph`) stays for other devices and dtypes and
//! is this module's reference in the tests.

use std::ops::Deref;

use candle_core::{CpuStorage, Device, Result, Storage, Tensor};
use rayon::prelude::*;

use super::attention::{self, Heads, Layout};
use super::skinny::{add_product, product, Mat};

/// Rows per parallel task in the element-wise passes.
const ROWS_PER_TASK: usize = 16;

/// Read access to the values of a contiguous f32 CPU tensor.
pub(super) struct F32<'a> {
    // candle's storage lock guard (its lock type is candle's choice, hence the box)
    guard: Box<dyn Deref<Target = Storage> + 'a>,
    range: (usize, usize),
}

impl F32<'_> {
    pub fn get(&self) -> &[f32] {
        match &**self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.range.0..self.range.1],
            _ => unreachable!("checked in f32_view"),
        }
    }
}

/// The values of `t`, which must be a contiguous f32 CPU tensor.
pub(super) fn f32_view(t: &Tensor) -> Result<F32<'_>> {
    let (guard, layout) = t.storage_and_layout();
    let range = layout.contiguous_offsets();
    match (&*guard, range) {
        (Storage::Cpu(CpuStorage::F32(_)), Some(range)) => Ok(F32 {
            guard: Box::new(guard),
            range,
        }),
        _ => candle_core::bail!("layer-cpu: a contiguous f32 CPU tensor expected"),
    }
}

/// A frozen projection `(out, in)` with its adapter, as seen by this module.
pub(super) struct Lin<'a> {
    pub w: F32<'a>,
    pub out: usize,
    pub inp: usize,
    pub lora: Option<LoraW<'a>>,
    /// The dropout seed of this projection in this micro-batch (training only).
    pub seed: Option<u64>,
}

/// An adapter: `a` (r, in), `b` (out, r).
pub(super) struct LoraW<'a> {
    pub a: F32<'a>,
    pub b: F32<'a>,
    pub r: usize,
    pub scale: f32,
    pub dropout: f64,
}

/// A layer's weights: the two RMSNorm weights and the projections.
pub(super) struct LayerW<'a> {
    pub input_norm: F32<'a>,
    pub post_norm: F32<'a>,
    pub qkv: Lin<'a>,
    pub o: Lin<'a>,
    pub gate_up: Lin<'a>,
    pub down: Lin<'a>,
    pub eps: f32,
    pub heads: Heads,
}

/// What a projection's backward needs of its forward: its input (kept by the caller), the
/// adapter's rank-r intermediate `u = dropout(x) Aᵀ` (n, r) and the dropout mask.
struct LoraSaved {
    u: Vec<f32>,
    mask: Option<Vec<f32>>,
}

/// The activations of one layer's forward that its backward reads. The two RMSNorm
/// outputs and the SwiGLU output are not kept: the backward recomputes them from `x`, `x1`
/// and `gu` in one cheap pass each (about a third less memory per token).
pub(super) struct Saved {
    qkv: Tensor,
    attn: Tensor,
    /// The residual stream after attention (input of the second RMSNorm).
    x1: Vec<f32>,
    gu: Vec<f32>,
    lora: [Option<LoraSaved>; 4],
}

/// `x · mask` when there is a mask.
fn dropped<'a>(x: &'a [f32], mask: Option<&[f32]>) -> std::borrow::Cow<'a, [f32]> {
    match mask {
        None => std::borrow::Cow::Borrowed(x),
        Some(m) => {
            std::borrow::Cow::Owned(x.par_iter().zip(m.par_iter()).map(|(a, b)| a * b).collect())
        }
    }
}

impl Lin<'_> {
    /// `y += x Wᵀ + s · (dropout(x) Aᵀ) Bᵀ` for `x` (n, in) and `y` (n, out), or into new
    /// memory when `y` is `None`. Returns the output and what the backward needs.
    fn forward(&self, x: &[f32], n: usize, y: Option<Vec<f32>>) -> (Vec<f32>, Option<LoraSaved>) {
        let xm = Mat::new(x, n, self.inp);
        let w = Mat::new(self.w.get(), self.out, self.inp).t();
        let mut y = match y {
            Some(mut y) => {
                add_product(&mut y, xm, w, 1.0);
                y
            }
            None => product(xm, w, 1.0),
        };
        let Some(l) = &self.lora else {
            return (y, None);
        };
        let mask = match self.seed {
            Some(seed) if l.dropout > 0.0 => {
                Some(super::lora::dropout_values(n * self.inp, l.dropout, seed))
            }
            _ => None,
        };
        let xd = dropped(x, mask.as_deref());
        let u = product(
            Mat::new(&xd, n, self.inp),
            Mat::new(l.a.get(), l.r, self.inp).t(),
            1.0,
        );
        add_product(
            &mut y,
            Mat::new(&u, n, l.r),
            Mat::new(l.b.get(), self.out, l.r).t(),
            l.scale,
        );
        (y, Some(LoraSaved { u, mask }))
    }

    /// For the output gradient `dy` (n, out): returns `dx` (n, in) when `need_dx`, and
    /// pushes the adapter's gradients `(dA, dB)` to `grads`.
    fn backward(
        &self,
        x: &[f32],
        dy: &[f32],
        n: usize,
        saved: Option<&LoraSaved>,
        need_dx: bool,
        grads: &mut Vec<Vec<f32>>,
    ) -> Option<Vec<f32>> {
        let dym = Mat::new(dy, n, self.out);
        let mut dx = need_dx.then(|| product(dym, Mat::new(self.w.get(), self.out, self.inp), 1.0));
        let (Some(l), Some(s)) = (&self.lora, saved) else {
            return dx;
        };
        let (a, b) = (
            Mat::new(l.a.get(), l.r, self.inp),
            Mat::new(l.b.get(), self.out, l.r),
        );
        // y = s · u Bᵀ, u = xd Aᵀ:  dB = s · dyᵀ u,  du = s · dy B,  dA = duᵀ xd,
        // dxd = du A (and dx = dxd · mask).
        let db = product(dym.t(), Mat::new(&s.u, n, l.r), l.scale);
        let du = product(dym, b, l.scale);
        let dum = Mat::new(&du, n, l.r);
        let xd = dropped(x, s.mask.as_deref());
        let da = product(dum.t(), Mat::new(&xd, n, self.inp), 1.0);
        match (&mut dx, &s.mask) {
            (None, _) => {}
            (Some(dx), None) => add_product(dx, dum, a, 1.0),
            (Some(dx), Some(m)) => {
                let dxd = product(dum, a, 1.0);
                dx.par_iter_mut()
                    .zip(dxd.par_iter().zip(m.par_iter()))
                    .for_each(|(o, (g, k))| *o += g * k);
            }
        }
        grads.push(da);
        grads.push(db);
        dx
    }
}

/// RMSNorm of the rows of `x` (n, width): `(x · r · w, r)` with `r = 1/sqrt(mean(x²) + eps)`
/// per row, in f32 as transformers computes it.
pub(super) fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
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
pub(super) fn rms_norm_backward_add(x: &[f32], r: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32]) {
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

/// SwiGLU's input gradient `[d gate | d up]` (n, 2i) for `gu` (n, 2i) and `dy` (n, i):
/// with `σ = sigmoid(gate)`, `d gate = dy · up · σ · (1 + gate · (1 − σ))`,
/// `d up = dy · gate · σ`.
fn swiglu_backward(gu: &[f32], dy: &[f32], i: usize) -> Vec<f32> {
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

impl LayerW<'_> {
    /// The layer's output for input `x` (n, hidden), and the activations its backward needs.
    pub fn forward(&self, x: &[f32], n: usize, lay: &Layout) -> Result<(Vec<f32>, Saved)> {
        let hd = self.input_norm.get().len();
        let (h1, _) = rms_norm(x, self.input_norm.get(), self.eps);
        let (qkv, l_qkv) = self.qkv.forward(&h1, n, None);
        drop(h1);
        let qkv = Tensor::from_vec(qkv, (n, self.qkv.out), &Device::Cpu)?;
        let attn = attention::forward(&qkv, self.heads, lay, None, 0)?;
        let (x1, l_o) = {
            let a = f32_view(&attn)?;
            self.o.forward(a.get(), n, Some(x.to_vec()))
        };
        let (h2, _) = rms_norm(&x1, self.post_norm.get(), self.eps);
        let (gu, l_gu) = self.gate_up.forward(&h2, n, None);
        drop(h2);
        let act = super::ops::swiglu_rows(&gu, self.gate_up.out / 2);
        let (x2, l_d) = self.down.forward(&act, n, Some(x1.clone()));
        debug_assert_eq!(x2.len(), n * hd);
        Ok((
            x2,
            Saved {
                qkv,
                attn,
                x1,
                gu,
                lora: [l_qkv, l_o, l_gu, l_d],
            },
        ))
    }

    /// Turns `g` = d loss / d output (n, hidden) into d loss / d input, in place (left
    /// partial when `need_dx` is false: the first layer's input is frozen), and returns the
    /// adapter gradients in the order qkv, o, gate_up, down (A then B each).
    pub fn backward(
        &self,
        x: &[f32],
        s: &Saved,
        g: &mut [f32],
        n: usize,
        lay: &Layout,
        need_dx: bool,
    ) -> Result<Vec<Vec<f32>>> {
        let mut by_module: [Vec<Vec<f32>>; 4] = Default::default();
        let [l_qkv, l_o, l_gu, l_d] = &s.lora;
        let always = |d: Option<Vec<f32>>| d.expect("asked for");
        // x2 = x1 + down(swiglu(gate_up(norm(x1))))
        let act = super::ops::swiglu_rows(&s.gu, self.gate_up.out / 2);
        let d_act = always(
            self.down
                .backward(&act, g, n, l_d.as_ref(), true, &mut by_module[3]),
        );
        drop(act);
        let d_gu = swiglu_backward(&s.gu, &d_act, self.gate_up.out / 2);
        drop(d_act);
        let (h2, r2) = rms_norm(&s.x1, self.post_norm.get(), self.eps);
        let d_h2 =
            always(
                self.gate_up
                    .backward(&h2, &d_gu, n, l_gu.as_ref(), true, &mut by_module[2]),
            );
        drop((d_gu, h2));
        rms_norm_backward_add(&s.x1, &r2, self.post_norm.get(), &d_h2, g);
        drop(d_h2);
        // x1 = x + o(attention(qkv(norm(x))))
        let d_attn = {
            let a = f32_view(&s.attn)?;
            always(
                self.o
                    .backward(a.get(), g, n, l_o.as_ref(), true, &mut by_module[1]),
            )
        };
        let d_attn = Tensor::from_vec(d_attn, (n, self.o.inp), &Device::Cpu)?;
        let d_qkv = attention::backward(&s.qkv, &d_attn, self.heads, lay)?;
        drop(d_attn);
        let (h1, r1) = rms_norm(x, self.input_norm.get(), self.eps);
        let d_h1 = {
            let dq = f32_view(&d_qkv)?;
            self.qkv
                .backward(&h1, dq.get(), n, l_qkv.as_ref(), need_dx, &mut by_module[0])
        };
        drop((d_qkv, h1));
        if let Some(d_h1) = d_h1 {
            rms_norm_backward_add(x, &r1, self.input_norm.get(), &d_h1, g);
        }
        Ok(by_module.into_iter().flatten().collect())
    }
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
