//! Checkpoints: `checkpoint-{step}/` holds the adapter (a loadable PEFT folder), the
//! optimizer moments and `trainer_state.json`; written under a temporary name, renamed
//! when complete, rotated by `save_total_limit` keeping the best by eval loss.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// What a run needs to continue exactly where it stopped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: usize,
    pub epoch: f64,
    pub total_steps: usize,
    pub step_losses: Vec<f64>,
    pub log_history: Vec<serde_json::Value>,
    pub eval_history: Vec<serde_json::Value>,
    pub best_step: Option<usize>,
    pub best_eval_loss: Option<f64>,
    pub train_tokens: u64,
    /// The plan the checkpoint belongs to; a resume with another plan is refused.
    pub plan: serde_json::Value,
}

pub const STATE: &str = "trainer_state.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";

pub fn checkpoint_dir(output: &Path, step: usize) -> PathBuf {
    output.join(format!("checkpoint-{step}"))
}

/// Complete checkpoints in `output`, oldest first.
pub fn list(output: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(output)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join(STATE).is_file().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE);
    let text = std::fs::read_to_string(&p).at(&p)?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Training(format!(
            "{}: not a ferrotune trainer state ({e})",
            p.display()
        ))
    })
}

/// Deletes the oldest checkpoints beyond `limit`, never the newest nor `keep` (the best
/// by eval loss), so a limit of 1 can leave two, as transformers does.
pub fn rotate(output: &Path, limit: i64, keep: Option<usize>) -> Result<()> {
    if limit <= 0 {
        return Ok(());
    }
    let all = list(output);
    let newest = all.last().map(|c| c.0);
    let mut excess = all.len().saturating_sub(limit as usize);
    for (step, dir) in all {
        if excess == 0 {
            break;
        }
        if Some(step) == keep || Some(step) == newest {
            continue;
        }
        std::fs::remove_dir_all(&dir).at(&dir)?;
        excess -= 1;
    }
    Ok(())
}
