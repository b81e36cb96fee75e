//! AdamW (torch.optim.AdamW's arithmetic, decoupled weight decay) with state that can be
//! saved and restored, and torch-style global-norm gradient clipping.
//!
//! candle's own AdamW has no state export, no clipping and keeps moments in the
//! parameter dtype; LoRA parameters are few, so this is short and in f32.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub params: AdamWParams,
    /// Optimizer steps taken.
    pub step: u64,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
}

impl AdamW {
    pub fn new(params: AdamWParams, vars: &[&Var]) -> Result<Self> {
        let zeros = |v: &&Var| v.as_tensor().zeros_like();
        Ok(Self {
            params,
            step: 0,
            exp_avg: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            exp_avg_sq: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    /// One update with learning rate `lr`, as torch's single-tensor AdamW:
    /// `p *= 1 - lr·wd; m = lerp(m, g, 1-β1); v = β2·v + (1-β2)·g²;
    /// p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + ε)`.
    pub fn update(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64) -> Result<()> {
        let p = self.params;
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2_sqrt = (1.0 - p.beta2.powi(t)).sqrt();
        for (i, var) in vars.iter().enumerate() {
            let g = &grads[i];
            let mut w = var.as_detached_tensor();
            if p.weight_decay != 0.0 {
                w = (w * (1.0 - lr * p.weight_decay))?;
            }
            let m = &self.exp_avg[i];
            let m = ((g - m)? * (1.0 - p.beta1))?.add(m)?;
            let v = ((&self.exp_avg_sq[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + p.eps)?;
            let w = (w - ((&m / &denom)? * (lr / bc1))?)?;
            var.set(&w)?;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        Ok(())
    }

    /// The moments by parameter name, for a checkpoint.
    pub fn state(&self, names: &[String]) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(names.len() * 2);
        for (i, n) in names.iter().enumerate() {
            out.push((format!("{n}.exp_avg"), self.exp_avg[i].clone()));
            out.push((format!("{n}.exp_avg_sq"), self.exp_avg_sq[i].clone()));
        }
        out
    }

    /// Restores the moments saved by [`Self::state`] (and the step count).
    pub fn load(&mut self, path: &Path, names: &[String], step: u64) -> Result<()> {
        let dev = self
            .exp_avg
            .first()
            .map(|t| t.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let mut st: HashMap<String, Tensor> =
            candle_core::safetensors::load(path, &dev).map_err(|e| {
                Error::Training(format!(
                    "{}: cannot read the optimizer state ({e})",
                    path.display()
                ))
            })?;
        for (i, n) in names.iter().enumerate() {
            for (slot, key) in [
                (&mut self.exp_avg[i], "exp_avg"),
                (&mut self.exp_avg_sq[i], "exp_avg_sq"),
            ] {
                let t = st.remove(&format!("{n}.{key}")).ok_or_else(|| {
                    Error::Training(format!(
                        "{}: no {key} for {n}; the checkpoint belongs to another run",
                        path.display()
                    ))
                })?;
                if t.dims() != slot.dims() {
                    return Err(Error::Training(format!(
                        "{}: {n}.{key} has shape {:?}, expected {:?}",
                        path.display(),
                        t.dims(),
                        slot.dims()
                    )));
                }
                *slot = t.to_dtype(DType::F32)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (`<= 0`: no clipping),
/// as `torch.nn.utils.clip_grad_norm_`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        let n = g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        sq += n;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm.is_finite() {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}
