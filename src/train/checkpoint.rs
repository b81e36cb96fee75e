//! Checkpoints: `checkpoint-{step}/` holds the adapter (a loadable PEFT folder), the
//! optimizer moments and `trainer_state.json`; written under a temporary name, renamed
//! when complete, rotated by `save_total_limit` keeping the best by eval loss.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    /// The newest checkpoint written outside `save_strategy` (by `save_interval_minutes`,
    /// or on SIGTERM / Ctrl-C): removed once a newer checkpoint is complete, so such
    /// safety copies do not pile up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unscheduled_checkpoint: Option<usize>,
    /// Training stopped during the evaluation after `global_step`: a resume runs it first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub eval_pending: bool,
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

/// `save_interval_minutes`: a checkpoint is also due once this long has passed since the
/// last one (or since training started), so a preempted job loses at most about that much
/// work whatever `save_strategy` schedules. The clock is passed in (tests fake it).
#[derive(Debug, Clone)]
pub struct SaveClock {
    every: Option<Duration>,
    last: Instant,
}

impl SaveClock {
    /// `minutes` <= 0 turns the interval off.
    pub fn new(minutes: f64, now: Instant) -> Self {
        let every = (minutes > 0.0 && minutes.is_finite())
            .then(|| Duration::from_secs_f64((minutes * 60.0).min(1e12)));
        Self { every, last: now }
    }

    /// Has the interval passed since the last checkpoint?
    pub fn due(&self, now: Instant) -> bool {
        self.every
            .is_some_and(|e| now.saturating_duration_since(self.last) >= e)
    }

    /// A checkpoint was written at `now` (of any kind): the interval starts again.
    pub fn saved(&mut self, now: Instant) {
        self.last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_clock_is_due_after_the_interval_since_the_last_checkpoint() {
        let t0 = Instant::now();
        let min = |m: u64| t0 + Duration::from_secs(60 * m);
        let mut clock = SaveClock::new(30.0, t0);
        assert!(!clock.due(t0));
        assert!(!clock.due(min(29)));
        assert!(clock.due(min(30)));
        assert!(clock.due(min(95)));
        // a checkpoint at minute 40 (scheduled or not) restarts the interval
        clock.saved(min(40));
        assert!(!clock.due(min(69)));
        assert!(clock.due(min(70)));
        // a clock that reads earlier than the last save is never due
        assert!(!clock.due(t0));
    }

    #[test]
    fn save_clock_fractional_and_off() {
        let t0 = Instant::now();
        let clock = SaveClock::new(0.5, t0);
        assert!(!clock.due(t0 + Duration::from_secs(29)));
        assert!(clock.due(t0 + Duration::from_secs(30)));
        for off in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let clock = SaveClock::new(off, t0);
            assert!(!clock.due(t0 + Duration::from_secs(1 << 40)), "{off}");
        }
    }

    #[test]
    fn trainer_state_without_the_new_fields_still_reads() {
        // checkpoints written before unscheduled_checkpoint / eval_pending existed
        let old = r#"{"global_step": 4, "epoch": 0.5, "total_steps": 8, "step_losses": [1.0],
            "log_history": [], "eval_history": [], "best_step": null, "best_eval_loss": null,
            "train_tokens": 10, "plan": {"rows": 3}}"#;
        let s: TrainerState = serde_json::from_str(old).unwrap();
        assert_eq!(s.unscheduled_checkpoint, None);
        assert!(!s.eval_pending);
        // and the defaults are not written
        let text = serde_json::to_string(&s).unwrap();
        assert!(
            !text.contains("unscheduled_checkpoint") && !text.contains("eval_pending"),
            "{text}"
        );
    }
}
