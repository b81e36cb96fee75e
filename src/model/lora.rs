//! LoRA adapters: `y = x W^T + scale · B(A(dropout(x)))`, with PEFT's configuration,
//! initialisation and names; the adapters stay f32 whatever the base weights' dtype (see
//! `phi3::Adapters`).

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

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

/// PEFT's initialisation of A (r, in): kaiming-uniform(a=√5) = U(±1/√in), drawn from `rng`
/// row by row (B starts at zero).
pub fn init_a(r: usize, inp: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let bound = 1.0 / (inp as f64).sqrt();
    (0..r * inp)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect()
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
