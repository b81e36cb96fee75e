//! The training configuration: the Azure ML fine-tuning pipeline's parameter names (the
//! Python layer maps the notebook's `finetune_parameters` onto this) and their checks.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::LoraConfig;

/// When to evaluate or save.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    No,
    Steps,
    Epoch,
}

/// `resume_from_checkpoint`: a folder, or `true` for the newest in the checkpoint folder.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Resume {
    Latest(bool),
    Path(PathBuf),
}

fn d_epochs() -> f64 {
    1.0
}
fn d_neg1() -> i64 {
    -1
}
fn d_one() -> usize {
    1
}
fn d_lr() -> f64 {
    2e-5
}
fn d_sched() -> String {
    "linear".into()
}
fn d_b1() -> f64 {
    0.9
}
fn d_b2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_clip() -> f64 {
    1.0
}
fn d_r() -> usize {
    8
}
fn d_alpha() -> f64 {
    128.0
}
fn d_targets() -> Vec<String> {
    crate::model::TARGETS
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn d_true() -> bool {
    true
}
fn d_precision() -> String {
    "auto".into()
}
fn d_seed() -> u64 {
    42
}
fn d_log() -> usize {
    10
}
fn d_epoch() -> Strategy {
    Strategy::Epoch
}
fn d_auto() -> String {
    "auto".into()
}
fn d_split() -> f64 {
    0.2
}
fn d_interval() -> f64 {
    30.0
}

/// Everything `finetune` takes. Unknown keys are an error (the Python layer has already
/// turned notebook-only keys into notes).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: String,
    pub train_file: PathBuf,
    #[serde(default)]
    pub validation_file: Option<PathBuf>,
    pub output_dir: PathBuf,
    /// Where `checkpoint-{step}/` folders are written and rotated, and where
    /// `resume_from_checkpoint: true` looks; `None`: `output_dir`.
    #[serde(default)]
    pub checkpoint_dir: Option<PathBuf>,
    #[serde(default = "d_epochs")]
    pub num_train_epochs: f64,
    #[serde(default = "d_neg1")]
    pub max_steps: i64,
    #[serde(default = "d_one")]
    pub per_device_train_batch_size: usize,
    #[serde(default = "d_one")]
    pub per_device_eval_batch_size: usize,
    #[serde(default = "d_one")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default = "d_sched")]
    pub lr_scheduler_type: String,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_b1")]
    pub adam_beta1: f64,
    #[serde(default = "d_b2")]
    pub adam_beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_epsilon: f64,
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    #[serde(default = "d_neg1")]
    pub max_seq_length: i64,
    #[serde(default = "d_r")]
    pub lora_r: usize,
    #[serde(default = "d_alpha")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default = "d_targets")]
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default = "d_true")]
    pub merge_lora_weights: bool,
    #[serde(default = "d_precision")]
    pub precision: String,
    #[serde(default = "d_seed")]
    pub seed: u64,
    #[serde(default = "d_log")]
    pub logging_steps: usize,
    #[serde(default = "d_epoch")]
    pub evaluation_strategy: Strategy,
    #[serde(default)]
    pub eval_steps: Option<usize>,
    #[serde(default = "d_epoch")]
    pub save_strategy: Strategy,
    #[serde(default)]
    pub save_steps: Option<usize>,
    #[serde(default = "d_neg1")]
    pub save_total_limit: i64,
    /// Also save a checkpoint once this many minutes have passed since the last one (a
    /// preempted job loses at most about this much work); 0 turns it off. Only when
    /// `save_strategy` is not "no"; such a checkpoint is replaced by the next one.
    #[serde(default = "d_interval")]
    pub save_interval_minutes: f64,
    #[serde(default)]
    pub resume_from_checkpoint: Option<Resume>,
    #[serde(default = "d_auto")]
    pub device: String,
    #[serde(default)]
    pub gradient_checkpointing: bool,
    #[serde(default = "d_true")]
    pub shuffle: bool,
    #[serde(default = "d_split")]
    pub validation_split: f64,
    #[serde(default)]
    pub adapter_init: Option<PathBuf>,
    #[serde(default = "d_true")]
    pub packing: bool,
    #[serde(default)]
    pub token: Option<String>,
    /// Set when a launcher started this process as one of several data-parallel workers.
    #[serde(default)]
    pub distributed: Option<super::WorldSpec>,
}

impl TrainConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: TrainConfig = serde_json::from_str(text)
            .map_err(|e| Error::InvalidArgument(format!("bad training configuration: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        let pos = |name: &str, v: f64| -> Result<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::InvalidArgument(format!(
                    "{name} must be positive, got {v}"
                )))
            }
        };
        pos("learning_rate", self.learning_rate)?;
        if self.max_steps <= 0 {
            pos("num_train_epochs", self.num_train_epochs)?;
        }
        for (name, v) in [
            (
                "per_device_train_batch_size",
                self.per_device_train_batch_size,
            ),
            (
                "per_device_eval_batch_size",
                self.per_device_eval_batch_size,
            ),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
            ("logging_steps", self.logging_steps),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            return bad(format!(
                "adam_beta1/adam_beta2 must be in [0, 1), got {}/{}",
                self.adam_beta1, self.adam_beta2
            ));
        }
        if self.adam_epsilon.is_nan() || self.adam_epsilon <= 0.0 {
            return bad(format!(
                "adam_epsilon must be positive, got {}",
                self.adam_epsilon
            ));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return bad(format!(
                "weight_decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(format!(
                "warmup_ratio must be in [0, 1), got {}",
                self.warmup_ratio
            ));
        }
        if !(self.validation_split > 0.0 && self.validation_split < 1.0) {
            return bad(format!(
                "validation_split must be in (0, 1), got {}",
                self.validation_split
            ));
        }
        if !self.max_grad_norm.is_finite() {
            return bad("max_grad_norm must be finite (<= 0 turns clipping off)".into());
        }
        if self.max_seq_length == 0 || self.max_seq_length < -1 {
            return bad(format!(
                "max_seq_length must be -1 (the model's) or positive, got {}",
                self.max_seq_length
            ));
        }
        super::schedule::Schedule::parse(&self.lr_scheduler_type)?;
        crate::model::check_precision(&self.precision)?;
        if self.evaluation_strategy == Strategy::Steps && self.eval_steps == Some(0) {
            return bad("eval_steps must be at least 1".into());
        }
        if !(self.save_interval_minutes.is_finite() && self.save_interval_minutes >= 0.0) {
            return bad(format!(
                "save_interval_minutes must be >= 0 (0: off), got {}",
                self.save_interval_minutes
            ));
        }
        if self.save_strategy == Strategy::Steps && self.save_steps.unwrap_or(0) == 0 {
            return bad("save_strategy 'steps' needs save_steps >= 1".into());
        }
        if let Some(w) = &self.distributed {
            w.validate()?;
        }
        self.lora().validate()
    }

    /// The folder of the `checkpoint-{step}/` folders: `checkpoint_dir`, or `output_dir`.
    pub fn checkpoints(&self) -> &Path {
        self.checkpoint_dir.as_deref().unwrap_or(&self.output_dir)
    }

    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules: self.target_modules.clone(),
            use_rslora: self.use_rslora,
        }
    }
}
