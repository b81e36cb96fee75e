//! The CPU backend: f32 on host buffers, through the fused kernels of this folder
//! (`gemm` products into fresh memory or accumulated into their destination, the fused
//! causal attention, the row passes, the fused cross-entropy chunk).

pub mod attention;
pub mod gemm;
pub mod rows;
pub mod vexp;

use rayon::prelude::*;

use super::{
    dropout, product_shape, AdamWStep, Backend, Buf, Dt, Heads, KvCache, Layout, Mat, Rope,
    RopeSpec,
};
use crate::error::{Error, Result};
use attention::{HeadsView, Segment};

/// The CPU backend (stateless; threads are rayon's).
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu;

fn f32_only(dt: Dt) -> Result<()> {
    if dt != Dt::F32 {
        return Err(Error::InvalidArgument(format!(
            "the CPU computes in float32; {dt:?} buffers exist only on a GPU"
        )));
    }
    Ok(())
}

/// The slice view of a [`Mat`] for `gemm`.
fn slice_mat<'a>(m: &Mat<'a>) -> Result<gemm::Mat<'a>> {
    let data = &m.buf.f32s()?[m.off..m.off + m.rows * m.cols];
    let s = gemm::Mat::new(data, m.rows, m.cols);
    Ok(if m.t { s.t() } else { s })
}

/// Head views of one segment's rows inside fused `qkv` rows of width `w`.
fn qkv_views(qkv: &[f32], first: usize, h: Heads) -> [HeadsView<'_>; 3] {
    let w = h.qkv_width();
    let at = |col: usize| HeadsView {
        data: &qkv[first * w + col..],
        head_stride: h.dim,
        row_stride: w,
    };
    [at(0), at(h.q * h.dim), at((h.q + h.kv) * h.dim)]
}

impl Cpu {
    /// Appends segment rows `s..s+len` of the k and v columns of `qkv` to layer `layer` of
    /// `cache` at rows `past..` (growing it when full).
    fn cache_append(
        &self,
        cache: &mut KvCache,
        layer: usize,
        qkv: &[f32],
        (s, len): (usize, usize),
        past: usize,
        h: Heads,
    ) -> Result<()> {
        let (w, kvw) = (h.qkv_width(), h.kv * h.dim);
        cache.reserve(self, past + len, kvw)?;
        let (k, v) = &mut cache.layers[layer];
        let (k, v) = (k.f32s_mut()?, v.f32s_mut()?);
        for r in 0..len {
            let row = &qkv[(s + r) * w..][..w];
            let dst = (past + r) * kvw;
            k[dst..dst + kvw].copy_from_slice(&row[h.q * h.dim..][..kvw]);
            v[dst..dst + kvw].copy_from_slice(&row[(h.q + h.kv) * h.dim..][..kvw]);
        }
        Ok(())
    }
}

impl Backend for Cpu {
    fn name(&self) -> String {
        "cpu".into()
    }

    fn act(&self) -> Dt {
        Dt::F32
    }

    fn upload_f32(&self, v: &[f32], dt: Dt) -> Result<Buf> {
        f32_only(dt)?;
        Ok(Buf::host_f32(v.to_vec()))
    }

    fn upload_i32(&self, v: &[i32]) -> Result<Buf> {
        Ok(Buf::host_i32(v.to_vec()))
    }

    fn to_f32(&self, b: &Buf) -> Result<Vec<f32>> {
        match b.dt() {
            Dt::F32 => Ok(b.f32s()?.to_vec()),
            Dt::I32 => Ok(b.i32s()?.iter().map(|&v| v as f32).collect()),
            Dt::F64 => Ok(b.f64s()?.iter().map(|&v| v as f32).collect()),
            dt => Err(Error::Compute(format!(
                "internal: a {dt:?} buffer on the CPU"
            ))),
        }
    }

    fn to_f64(&self, b: &Buf) -> Result<Vec<f64>> {
        match b.dt() {
            Dt::F64 => Ok(b.f64s()?.to_vec()),
            _ => Ok(self.to_f32(b)?.into_iter().map(f64::from).collect()),
        }
    }

    fn zeros(&self, len: usize, dt: Dt) -> Result<Buf> {
        match dt {
            Dt::F32 => Ok(Buf::host_f32(vec![0.0; len])),
            Dt::I32 => Ok(Buf::host_i32(vec![0; len])),
            Dt::F64 => Ok(Buf::host_f64(vec![0.0; len])),
            dt => f32_only(dt).map(|_| unreachable!()),
        }
    }

    fn clone_buf(&self, b: &Buf) -> Result<Buf> {
        match b.dt() {
            Dt::F32 => Ok(Buf::host_f32(b.f32s()?.to_vec())),
            Dt::I32 => Ok(Buf::host_i32(b.i32s()?.to_vec())),
            Dt::F64 => Ok(Buf::host_f64(b.f64s()?.to_vec())),
            dt => f32_only(dt).map(|_| unreachable!()),
        }
    }

    fn copy(
        &self,
        dst: &mut Buf,
        dst_off: usize,
        src: &Buf,
        src_off: usize,
        len: usize,
    ) -> Result<()> {
        let s = &src.f32s()?[src_off..src_off + len];
        dst.f32s_mut()?[dst_off..dst_off + len].copy_from_slice(s);
        Ok(())
    }

    fn cast(&self, b: &Buf, dt: Dt, scale: f32) -> Result<Buf> {
        f32_only(dt)?;
        let v = b.f32s()?;
        Ok(Buf::host_f32(if scale == 1.0 {
            v.to_vec()
        } else {
            v.par_iter().map(|&x| x * scale).collect()
        }))
    }

    fn fill_zero(&self, b: &mut Buf) -> Result<()> {
        match b.dt() {
            Dt::F64 => b.f64s_mut()?.fill(0.0),
            _ => b.f32s_mut()?.fill(0.0),
        }
        Ok(())
    }

    fn matmul(&self, a: Mat, b: Mat, alpha: f32, out: Dt) -> Result<Buf> {
        f32_only(out)?;
        product_shape(&a, &b)?;
        Ok(Buf::host_f32(gemm::product(
            slice_mat(&a)?,
            slice_mat(&b)?,
            alpha,
        )))
    }

    fn matmul_acc(&self, dst: &mut Buf, off: usize, a: Mat, b: Mat, alpha: f32) -> Result<()> {
        let (m, _, n) = product_shape(&a, &b)?;
        let (sa, sb) = (slice_mat(&a)?, slice_mat(&b)?);
        let d = dst.f32s_mut()?;
        if off + m * n > d.len() {
            return Err(Error::Compute(format!(
                "internal: a {m}x{n} product at {off} does not fit {}",
                d.len()
            )));
        }
        gemm::add_product(&mut d[off..off + m * n], sa, sb, alpha);
        Ok(())
    }

    fn rms_norm(&self, x: &Buf, w: &Buf, eps: f32) -> Result<(Buf, Buf)> {
        let (y, r) = rows::rms_norm(x.f32s()?, w.f32s()?, eps);
        Ok((Buf::host_f32(y), Buf::host_f32(r)))
    }

    fn rms_norm_bwd(
        &self,
        x: &Buf,
        w: &Buf,
        rstd: &Buf,
        dy: &Buf,
        dx: &mut Buf,
        accumulate: bool,
    ) -> Result<()> {
        let d = dx.f32s_mut()?;
        if !accumulate {
            d.fill(0.0);
        }
        rows::rms_norm_backward_add(x.f32s()?, rstd.f32s()?, w.f32s()?, dy.f32s()?, d);
        Ok(())
    }

    fn rope(&self, qkv: &mut Buf, lay: &Layout, inverse: bool) -> Result<()> {
        let Rope::Tables { cos, sin } = &lay.rope else {
            return Err(Error::Compute(
                "internal: a device RoPE layout on the CPU".into(),
            ));
        };
        let h = lay.heads;
        rows::rope_rows(
            qkv.f32s_mut()?,
            h.qkv_width(),
            h.q + h.kv,
            h.dim,
            cos,
            sin,
            inverse,
        );
        Ok(())
    }

    fn swiglu(&self, gu: &Buf, inter: usize) -> Result<Buf> {
        Ok(Buf::host_f32(rows::swiglu_rows(gu.f32s()?, inter)))
    }

    fn swiglu_bwd(&self, gu: &Buf, dy: &Buf, inter: usize) -> Result<Buf> {
        Ok(Buf::host_f32(rows::swiglu_backward(
            gu.f32s()?,
            dy.f32s()?,
            inter,
        )))
    }

    fn dropout(&self, x: &Buf, p: f32, key: u64) -> Result<Buf> {
        let scale = (1.0 / (1.0 - p as f64)) as f32;
        let v: Vec<f32> = x
            .f32s()?
            .par_iter()
            .enumerate()
            .map(|(i, &a)| {
                if dropout::keep(key, i as u64, p) {
                    a * scale
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Buf::host_f32(v))
    }

    fn add(&self, y: &mut Buf, x: &Buf) -> Result<()> {
        let x = x.f32s()?;
        y.f32s_mut()?
            .par_iter_mut()
            .zip(x.par_iter())
            .for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn gather_rows(&self, src: &Buf, idx: &Buf, width: usize) -> Result<Buf> {
        let (s, idx) = (src.f32s()?, idx.i32s()?);
        let mut out = Vec::with_capacity(idx.len() * width);
        for &i in idx {
            let i = i as usize;
            if (i + 1) * width > s.len() {
                return Err(Error::Compute(format!("internal: row {i} out of range")));
            }
            out.extend_from_slice(&s[i * width..(i + 1) * width]);
        }
        Ok(Buf::host_f32(out))
    }

    fn scatter_rows(&self, dst: &mut Buf, idx: &Buf, src: &Buf, width: usize) -> Result<()> {
        let (s, idx, d) = (src.f32s()?, idx.i32s()?, dst.f32s_mut()?);
        for (r, &i) in idx.iter().enumerate() {
            let i = i as usize;
            d[i * width..(i + 1) * width].copy_from_slice(&s[r * width..(r + 1) * width]);
        }
        Ok(())
    }

    fn layout(
        &self,
        segments: Vec<(usize, usize)>,
        past: Vec<usize>,
        window: usize,
        heads: Heads,
        rope: RopeSpec,
    ) -> Result<Layout> {
        let half = heads.dim / 2;
        let n = rope.pos.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n * half), Vec::with_capacity(n * half));
        for (&p, &t) in rope.pos.iter().zip(rope.tab) {
            for &f in &rope.inv_freq[t as usize] {
                // f32 like transformers: angle = inv_freq * position, then cos/sin.
                let a = f * p as f32;
                cos.push(a.cos() * rope.mscale);
                sin.push(a.sin() * rope.mscale);
            }
        }
        Ok(Layout {
            segments,
            past,
            window,
            heads,
            rope: Rope::Tables { cos, sin },
        })
    }

    fn attention(
        &self,
        qkv: &Buf,
        lay: &Layout,
        mut caches: Option<&mut [&mut KvCache]>,
        layer: usize,
    ) -> Result<(Buf, Option<Buf>)> {
        let h = lay.heads;
        let x = qkv.f32s()?;
        let width = h.q * h.dim;
        let n = lay.rows();
        let mut out = vec![0f32; n * width];
        for (i, (&(s, len), &past)) in lay.segments.iter().zip(&lay.past).enumerate() {
            let [q, k, v] = qkv_views(x, s, h);
            fn seg<'a>(
                [q, k, v]: [HeadsView<'a>; 3],
                len: usize,
                past: usize,
                lay: &Layout,
            ) -> Segment<'a> {
                let h = lay.heads;
                Segment {
                    q,
                    k,
                    v,
                    len,
                    past,
                    window: lay.window,
                    heads: h.q,
                    kv_heads: h.kv,
                    dim: h.dim,
                    scale: h.scale(),
                }
            }
            match caches.as_deref_mut() {
                Some(c) => {
                    self.cache_append(c[i], layer, x, (s, len), past, h)?;
                    let (kc, vc) = &c[i].layers[layer];
                    let view = |d| HeadsView {
                        data: d,
                        head_stride: h.dim,
                        row_stride: h.kv * h.dim,
                    };
                    let segment = seg([q, view(kc.f32s()?), view(vc.f32s()?)], len, past, lay);
                    attention::attend(&segment, &mut out[s * width..], width);
                }
                None => {
                    if past != 0 {
                        return Err(Error::Compute(
                            "internal: attention after a past without a cache".into(),
                        ));
                    }
                    attention::attend(
                        &seg([q, k, v], len, past, lay),
                        &mut out[s * width..],
                        width,
                    );
                }
            }
        }
        Ok((Buf::host_f32(out), None))
    }

    fn attention_bwd(
        &self,
        qkv: &Buf,
        _out: &Buf,
        _lse: Option<&Buf>,
        dout: &Buf,
        lay: &Layout,
    ) -> Result<Buf> {
        let h = lay.heads;
        let (x, dy) = (qkv.f32s()?, dout.f32s()?);
        let (w, d) = (h.qkv_width(), h.dim);
        let mut dqkv = vec![0f32; lay.rows() * w];
        for (&(s, len), &past) in lay.segments.iter().zip(&lay.past) {
            if past != 0 {
                return Err(Error::Compute("internal: a backward after a past".into()));
            }
            let [q, k, v] = qkv_views(x, s, h);
            let seg = Segment {
                q,
                k,
                v,
                len,
                past: 0,
                window: lay.window,
                heads: h.q,
                kv_heads: h.kv,
                dim: d,
                scale: h.scale(),
            };
            let dyv = HeadsView {
                data: &dy[s * h.q * d..],
                head_stride: d,
                row_stride: h.q * d,
            };
            let (mut dq, mut dk, mut dv) = (
                vec![0f32; h.q * len * d],
                vec![0f32; h.kv * len * d],
                vec![0f32; h.kv * len * d],
            );
            attention::attend_backward(&seg, dyv, &mut dq, &mut dk, &mut dv);
            // head-major (heads, len, d) → the token rows of d qkv
            let rows = &mut dqkv[s * w..(s + len) * w];
            rows.par_chunks_mut(w).enumerate().for_each(|(r, row)| {
                for hh in 0..h.q {
                    row[hh * d..(hh + 1) * d].copy_from_slice(&dq[(hh * len + r) * d..][..d]);
                }
                for g in 0..h.kv {
                    let src = (g * len + r) * d;
                    row[(h.q + g) * d..][..d].copy_from_slice(&dk[src..src + d]);
                    row[(h.q + h.kv + g) * d..][..d].copy_from_slice(&dv[src..src + d]);
                }
            });
        }
        Ok(Buf::host_f32(dqkv))
    }

    fn cross_entropy(
        &self,
        h: &Buf,
        w: &Buf,
        targets: &Buf,
        grad_scale: Option<f32>,
        loss: &mut Buf,
    ) -> Result<Option<Buf>> {
        let (hv, wv, t) = (h.f32s()?, w.f32s()?, targets.i32s()?);
        let rows = t.len();
        if rows == 0 {
            return Ok(grad_scale.map(|_| Buf::host_f32(vec![])));
        }
        let hidden = hv.len() / rows;
        let vocab = wv.len() / hidden;
        let t: Vec<u32> = t.iter().map(|&v| v as u32).collect();
        let mut dh = grad_scale.map(|_| Vec::with_capacity(hv.len()));
        let mut total = 0f64;
        for (hc, tc) in hv
            .chunks(rows::CE_CHUNK * hidden)
            .zip(t.chunks(rows::CE_CHUNK))
        {
            let (sum, g) = rows::ce_chunk_rows(
                hc,
                wv,
                (tc.len(), hidden, vocab),
                tc,
                grad_scale.unwrap_or(1.0),
                grad_scale.is_some(),
            )?;
            total += sum;
            if let (Some(d), Some(g)) = (dh.as_mut(), g) {
                d.extend_from_slice(&g);
            }
        }
        loss.f64s_mut()?[0] += total;
        Ok(dh.map(Buf::host_f32))
    }

    fn sum_into(&self, x: &Buf, square: bool, out: &mut Buf, idx: usize) -> Result<()> {
        let x = x.f32s()?;
        let s: f64 = if square {
            x.par_iter().map(|&v| (v as f64) * (v as f64)).sum()
        } else {
            x.par_iter().map(|&v| v as f64).sum()
        };
        out.f64s_mut()?[idx] += s;
        Ok(())
    }

    fn adamw(
        &self,
        p: &mut Buf,
        g: &Buf,
        m: &mut Buf,
        v: &mut Buf,
        s: AdamWStep,
        norm_sq: (&Buf, usize),
        status: &mut Buf,
    ) -> Result<()> {
        let norm = norm_sq.0.f64s()?[norm_sq.1].sqrt() * s.grad_scale as f64;
        let finite = norm.is_finite();
        status.i32s_mut()?[0] = i32::from(!finite);
        if !finite {
            return Ok(());
        }
        let clip = if s.max_norm > 0.0 {
            (s.max_norm as f64 / (norm + 1e-6)).min(1.0) as f32
        } else {
            1.0
        };
        let gs = s.grad_scale * clip;
        let decay = 1.0 - s.lr * s.weight_decay;
        let step = s.lr / s.bc1;
        let (g, m, v) = (g.f32s()?, m.f32s_mut()?, v.f32s_mut()?);
        p.f32s_mut()?
            .par_iter_mut()
            .zip(g.par_iter())
            .zip(m.par_iter_mut().zip(v.par_iter_mut()))
            .for_each(|((p, &g), (m, v))| {
                let g = g * gs;
                *p *= decay;
                *m += (g - *m) * (1.0 - s.beta1);
                *v = *v * s.beta2 + g * g * (1.0 - s.beta2);
                *p -= step * (*m / (v.sqrt() / s.bc2_sqrt + s.eps));
            });
        Ok(())
    }
}
