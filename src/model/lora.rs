//! LoRA adapters: `y = x W^T + scale · B(A(dropout(x)))`, with PEFT's initialisation and
//! names, kept in f32 whatever the base weights' dtype.

use candle_core::{DType, Device, Result as CResult, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::ops;
use crate::error::{Error, Result};

/// The projections of a Phi-3 layer LoRA can target.
pub const TARGETS: &[&str] = &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];

/// The LoRA hyper-parameters (PEFT's `LoraConfig` subset ferrotune supports).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 128.0,
            dropout: 0.0,
            target_modules: TARGETS.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.r == 0 {
            return bad("lora_r must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("lora_alpha must be positive, got {}", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.dropout
            ));
        }
        if self.target_modules.is_empty() {
            return bad("target_modules is empty; LoRA needs at least one module".into());
        }
        for m in &self.target_modules {
            if !TARGETS.contains(&m.as_str()) {
                return bad(format!(
                    "unknown LoRA target module '{m}'; Phi-3's are {}",
                    TARGETS.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// One adapter pair on one projection.
pub struct Lora {
    /// (r, in)
    pub a: Var,
    /// (out, r)
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

impl Lora {
    /// PEFT's initialisation: A ~ kaiming-uniform(a=√5) = U(±1/√in), B = 0.
    pub fn init(
        r: usize,
        out: usize,
        inp: usize,
        cfg: &LoraConfig,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> CResult<Self> {
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..r * inp)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        Ok(Self {
            a: Var::from_tensor(&Tensor::from_vec(a, (r, inp), device)?)?,
            b: Var::zeros((out, r), DType::F32, device)?,
            scale: cfg.scale(),
            dropout: cfg.dropout,
        })
    }

    /// The adapter's contribution for input `x` (n, in), in `x`'s dtype. `dropout_seed`
    /// is `Some` in training: the mask is drawn from it, so a recomputed forward draws
    /// the same mask.
    pub fn forward(&self, x: &Tensor, dropout_seed: Option<u64>) -> CResult<Tensor> {
        let dtype = x.dtype();
        let mut x = x.to_dtype(DType::F32)?;
        if let (Some(seed), true) = (dropout_seed, self.dropout > 0.0) {
            x = x.broadcast_mul(&dropout_mask(x.dims(), self.dropout, seed, x.device())?)?;
        }
        // The scale goes on the rank-r intermediate, not on the (tokens, out) result: one
        // pass over a tensor `out / r` times smaller (PEFT scales last; the two differ by
        // rounding only, and not at all for power-of-two scales such as alpha/r = 16).
        let h = (x.matmul(&self.a.as_tensor().t()?)? * self.scale)?;
        h.matmul(&self.b.as_tensor().t()?)?.to_dtype(dtype)
    }

    /// `scale · B @ A` (out, in) in f32: what merging adds to the base weight.
    pub fn delta(&self) -> CResult<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale
    }
}

/// A {0, 1/(1-p)} mask drawn from `seed` (host RNG: reproducible on any device).
pub(crate) fn dropout_mask(shape: &[usize], p: f64, seed: u64, device: &Device) -> CResult<Tensor> {
    let v = dropout_values(shape.iter().product(), p, seed);
    Tensor::from_vec(v, shape, device)
}

/// The values of [`dropout_mask`], `n` of them.
pub(crate) fn dropout_values(n: usize, p: f64, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let keep = (1.0 / (1.0 - p)) as f32;
    (0..n)
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect()
}

/// A frozen projection with an optional adapter.
pub struct Linear {
    pub weight: Tensor,
    pub lora: Option<Lora>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor, dropout_seed: Option<u64>) -> CResult<Tensor> {
        let y = ops::frozen_linear(x, &self.weight)?;
        match &self.lora {
            None => Ok(y),
            Some(l) => y + l.forward(x, dropout_seed)?,
        }
    }
}

/// PEFT's key for one adapter tensor of layer `layer`'s `module` (`which` = "A" or "B").
pub fn peft_key(layer: usize, module: &str, which: &str) -> String {
    let block = if module == "qkv_proj" || module == "o_proj" {
        "self_attn"
    } else {
        "mlp"
    };
    format!("base_model.model.model.layers.{layer}.{block}.{module}.lora_{which}.weight")
}
