//! AdamW (torch.optim.AdamW's arithmetic, decoupled weight decay) with torch-style
//! global-norm clipping and, for fp16, dynamic loss scaling — on the backend, over the flat
//! adapter buffers: one reduction for the norm, one pass for the update, and the decision to
//! skip a step with a non-finite gradient made on the device (the host learns of it with
//! the step's one read of the loss and the norm).
//!
//! candle's own AdamW has no state export, no clipping and keeps moments in the
//! parameter dtype; LoRA parameters are few, so this is short and in f32.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::kernels::{AdamWStep, Backend, Buf, Dt};

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// The moments of every adapter parameter, flat, on the backend.
pub struct AdamW {
    pub params: AdamWParams,
    /// Optimizer steps taken (skipped fp16 overflow steps do not count, as in torch).
    pub step: u64,
    exp_avg: Buf,
    exp_avg_sq: Buf,
    status: Buf,
}

impl AdamW {
    pub fn new(params: AdamWParams, be: &dyn Backend, n: usize) -> Result<Self> {
        Ok(Self {
            params,
            step: 0,
            exp_avg: be.zeros(n, Dt::F32)?,
            exp_avg_sq: be.zeros(n, Dt::F32)?,
            status: be.zeros(1, Dt::I32)?,
        })
    }

    /// Queues one update of `p` with the gradients `g` (scaled by `grad_scale`, e.g. the
    /// inverse loss scale), clipped to `max_norm` (`<= 0`: none) by the norm whose square
    /// is `norm_sq`: torch's `clip_grad_norm_` then `AdamW.step()`. When that norm is not
    /// finite the device changes nothing; the caller, which reads the norm once per step,
    /// then calls [`Self::skipped`].
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        be: &dyn Backend,
        p: &mut Buf,
        g: &Buf,
        norm_sq: (&Buf, usize),
        lr: f64,
        max_norm: f64,
        grad_scale: f64,
    ) -> Result<()> {
        let hp = self.params;
        self.step += 1;
        let t = self.step as i32;
        let step = AdamWStep {
            lr: lr as f32,
            beta1: hp.beta1 as f32,
            beta2: hp.beta2 as f32,
            eps: hp.eps as f32,
            weight_decay: hp.weight_decay as f32,
            bc1: (1.0 - hp.beta1.powi(t)) as f32,
            bc2_sqrt: (1.0 - hp.beta2.powi(t)).sqrt() as f32,
            grad_scale: grad_scale as f32,
            max_norm: max_norm as f32,
        };
        be.adamw(
            p,
            g,
            &mut self.exp_avg,
            &mut self.exp_avg_sq,
            step,
            norm_sq,
            &mut self.status,
        )
    }

    /// The last update was skipped on the device (a non-finite gradient norm).
    pub fn skipped(&mut self) {
        self.step -= 1;
    }

    /// The moments by parameter name, on the host, for a checkpoint. `layout`: the adapter
    /// tensors' names, shapes and offsets (`Phi3::lora_layout`).
    pub fn state(
        &self,
        be: &dyn Backend,
        layout: &[(String, Vec<usize>, usize)],
    ) -> Result<Vec<(String, Tensor)>> {
        let (m, v) = (be.to_f32(&self.exp_avg)?, be.to_f32(&self.exp_avg_sq)?);
        let mut out = Vec::with_capacity(layout.len() * 2);
        for (name, shape, off) in layout {
            let n: usize = shape.iter().product();
            for (key, src) in [("exp_avg", &m), ("exp_avg_sq", &v)] {
                let t =
                    Tensor::from_vec(src[*off..off + n].to_vec(), shape.as_slice(), &Device::Cpu)?;
                out.push((format!("{name}.{key}"), t));
            }
        }
        Ok(out)
    }

    /// Restores the moments saved by [`Self::state`] (and the step count).
    pub fn load(
        &mut self,
        be: &dyn Backend,
        path: &Path,
        layout: &[(String, Vec<usize>, usize)],
        step: u64,
    ) -> Result<()> {
        let mut st: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| {
                Error::Training(format!(
                    "{}: cannot read the optimizer state ({e})",
                    path.display()
                ))
            })?;
        let total = layout
            .iter()
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum();
        let (mut m, mut v) = (vec![0f32; total], vec![0f32; total]);
        for (n, shape, off) in layout {
            for (dst, key) in [(&mut m, "exp_avg"), (&mut v, "exp_avg_sq")] {
                let t = st.remove(&format!("{n}.{key}")).ok_or_else(|| {
                    Error::Training(format!(
                        "{}: no {key} for {n}; the checkpoint belongs to another run",
                        path.display()
                    ))
                })?;
                if t.dims() != shape.as_slice() {
                    return Err(Error::Training(format!(
                        "{}: {n}.{key} has shape {:?}, expected {:?}",
                        path.display(),
                        t.dims(),
                        shape
                    )));
                }
                let vals = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                dst[*off..*off + vals.len()].copy_from_slice(&vals);
            }
        }
        self.exp_avg = be.upload_f32(&m, Dt::F32)?;
        self.exp_avg_sq = be.upload_f32(&v, Dt::F32)?;
        self.step = step;
        Ok(())
    }
}

/// fp16's dynamic loss scale (torch's `GradScaler` rules): start at 2¹⁶, halve on a step
/// whose gradients overflow (that step is skipped), double after 2000 good steps in a row.
#[derive(Debug, Clone, Copy)]
pub struct LossScale {
    pub scale: f64,
    good: u32,
    /// Steps skipped for overflow so far.
    pub skipped: u64,
}

impl LossScale {
    const GROWTH_INTERVAL: u32 = 2000;

    pub fn new() -> Self {
        Self {
            scale: 65536.0,
            good: 0,
            skipped: 0,
        }
    }

    /// Records a step's outcome; returns true when the step was an overflow (skipped).
    pub fn record(&mut self, finite: bool) -> bool {
        if finite {
            self.good += 1;
            if self.good == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good = 0;
            }
            false
        } else {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good = 0;
            self.skipped += 1;
            true
        }
    }
}

impl Default for LossScale {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::Cpu;

    /// torch's AdamW + clip_grad_norm_, written out plainly in f64, two steps.
    #[test]
    fn update_matches_the_formulas_and_skips_non_finite() {
        let be = Cpu;
        let hp = AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut opt = AdamW::new(hp, &be, 4).unwrap();
        let mut p = be.upload_f32(&[1.0, -2.0, 0.5, 0.0], Dt::F32).unwrap();
        let mut want = [1.0f64, -2.0, 0.5, 0.0];
        let (mut m, mut v) = ([0f64; 4], [0f64; 4]);
        for (t, raw) in [[4.0f32, -2.0, 0.0, 8.0], [0.5, 0.5, -0.5, 0.1]]
            .iter()
            .enumerate()
        {
            let g = be.upload_f32(raw, Dt::F32).unwrap();
            let mut stats = be.zeros(2, Dt::F64).unwrap();
            be.sum_into(&g, true, &mut stats, 1).unwrap();
            opt.update(&be, &mut p, &g, (&stats, 1), 0.1, 1.0, 0.5)
                .unwrap();
            // reference
            let gs: Vec<f64> = raw.iter().map(|&x| x as f64 * 0.5).collect();
            let norm = gs.iter().map(|x| x * x).sum::<f64>().sqrt();
            let clip = (1.0 / (norm + 1e-6)).min(1.0);
            let k = (t + 1) as i32;
            for i in 0..4 {
                let gi = gs[i] * clip;
                want[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.999 * v[i] + 0.001 * gi * gi;
                let denom = (v[i]).sqrt() / (1.0 - 0.999f64.powi(k)).sqrt() + 1e-8;
                want[i] -= 0.1 / (1.0 - 0.9f64.powi(k)) * m[i] / denom;
            }
        }
        let got = be.to_f32(&p).unwrap();
        for (a, b) in got.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        // a non-finite norm: nothing moves, status says so
        let g = be
            .upload_f32(&[f32::INFINITY, 0.0, 0.0, 0.0], Dt::F32)
            .unwrap();
        let mut stats = be.zeros(2, Dt::F64).unwrap();
        be.sum_into(&g, true, &mut stats, 1).unwrap();
        opt.update(&be, &mut p, &g, (&stats, 1), 0.1, 1.0, 1.0)
            .unwrap();
        opt.skipped();
        assert_eq!(be.to_f32(&p).unwrap(), got);
        assert_eq!(opt.step, 2);
    }

    #[test]
    fn loss_scale_halves_on_overflow_and_grows_after_good_steps() {
        let mut s = LossScale::new();
        assert!(s.record(false));
        assert_eq!(s.scale, 32768.0);
        for _ in 0..1999 {
            assert!(!s.record(true));
        }
        assert_eq!(s.scale, 32768.0);
        s.record(true);
        assert_eq!(s.scale, 65536.0);
        assert_eq!(s.skipped, 1);
    }
}
