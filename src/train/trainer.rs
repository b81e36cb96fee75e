//! The training loop: plan, (resume,) steps with accumulation and clipping, logging,
//! evaluation, checkpoints, and the final adapter / merged model / summary.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;
use serde_json::json;

use super::checkpoint::{self, TrainerState};
use super::config::{Resume, Strategy, TrainConfig};
use super::data::{self, Data};
use super::optim::{clip_grad_norm, AdamW, AdamWParams};
use super::schedule::Schedule;
use crate::chat::TokenizedRows;
use crate::error::{Error, IoContext, Result};
use crate::hub::HubClient;
use crate::model::{self, Phi3};
use crate::progress::Ctx;

/// What `finetune` returns (and writes to `train_summary.json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub output_dir: PathBuf,
    pub global_step: usize,
    pub total_steps: usize,
    pub epochs: f64,
    pub step_losses: Vec<f64>,
    pub log_history: Vec<serde_json::Value>,
    pub eval: Vec<serde_json::Value>,
    pub best_checkpoint: Option<PathBuf>,
    pub best_eval_loss: Option<f64>,
    pub train_tokens: u64,
    pub train_seconds: f64,
    pub tokens_per_second: f64,
    pub adapter_dir: PathBuf,
    pub merged_dir: Option<PathBuf>,
    pub device: String,
    pub resumed_from: Option<PathBuf>,
}

struct Plan {
    rows: usize,
    micro_per_epoch: usize,
    updates_per_epoch: usize,
    total_steps: usize,
    warmup: usize,
}

impl Plan {
    fn new(cfg: &TrainConfig, rows: usize) -> Self {
        let micro_per_epoch = rows.div_ceil(cfg.per_device_train_batch_size);
        let updates_per_epoch = micro_per_epoch
            .div_ceil(cfg.gradient_accumulation_steps)
            .max(1);
        let total_steps = if cfg.max_steps > 0 {
            cfg.max_steps as usize
        } else {
            ((cfg.num_train_epochs * updates_per_epoch as f64).ceil() as usize).max(1)
        };
        let warmup = if cfg.warmup_steps > 0 {
            cfg.warmup_steps
        } else {
            (cfg.warmup_ratio * total_steps as f64).ceil() as usize
        };
        Self {
            rows,
            micro_per_epoch,
            updates_per_epoch,
            total_steps,
            warmup,
        }
    }

    fn json(&self, cfg: &TrainConfig) -> serde_json::Value {
        json!({
            "rows": self.rows,
            "total_steps": self.total_steps,
            "per_device_train_batch_size": cfg.per_device_train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "seed": cfg.seed,
            "shuffle": cfg.shuffle,
            "lora_r": cfg.lora_r,
        })
    }

    /// Row indices of each micro-batch of optimizer step `step`.
    fn step_batches(&self, cfg: &TrainConfig, step: usize, order: &[usize]) -> Vec<Vec<usize>> {
        let in_epoch = step % self.updates_per_epoch;
        let ga = cfg.gradient_accumulation_steps;
        let bs = cfg.per_device_train_batch_size;
        let first = in_epoch * ga;
        let last = ((in_epoch + 1) * ga).min(self.micro_per_epoch);
        (first..last)
            .map(|m| order[m * bs..((m + 1) * bs).min(self.rows)].to_vec())
            .collect()
    }
}

fn seed_for(seed: u64, step: usize, micro: usize) -> u64 {
    seed ^ ((step as u64) << 20) ^ (micro as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Mean loss over `rows` (forward only), batched `bs` rows at a time.
fn evaluate(model: &Phi3, rows: &TokenizedRows, bs: usize, ctx: &Ctx) -> Result<f64> {
    let n = rows.num_rows();
    let (mut sum, mut count) = (0.0, 0usize);
    let idx: Vec<usize> = (0..n).collect();
    for chunk in idx.chunks(bs) {
        ctx.cancel().check()?;
        let f = data::gather(rows, chunk);
        let b = model.batch(&f.ids, Some(&f.labels), &f.seq_lengths)?;
        sum += model.loss_sum(&b)?;
        count += b.n_targets();
    }
    if count == 0 {
        return Err(Error::Training(
            "the validation set has no trainable tokens".into(),
        ));
    }
    Ok(sum / count as f64)
}

/// Runs a whole fine-tuning job.
pub fn finetune(cfg: &TrainConfig, ctx: &Ctx) -> Result<Summary> {
    cfg.validate()?;
    let device = model::device(&cfg.device)?;
    let dtype = model::base_dtype(&device, &cfg.precision)?;
    if !device.is_cuda() && cfg.precision != "32" {
        ctx.message("precision 16/bf16 applies on CUDA; on CPU ferrotune trains in float32");
    }
    std::fs::create_dir_all(&cfg.output_dir).at(&cfg.output_dir)?;
    let folder = model::weights::resolve_model(
        &cfg.model,
        "main",
        || HubClient::from_env(cfg.token.clone()),
        ctx,
    )?;
    let Data {
        train,
        validation,
        train_path,
    } = data::prepare(cfg, ctx)?;
    let mut lora = cfg.lora();
    if let Some(a) = &cfg.adapter_init {
        let from = model::export::read_adapter_config(a)?;
        if from != lora {
            ctx.message(&format!(
                "adapter_init {}: using its LoRA settings (r={}, alpha={}, targets {:?})",
                a.display(),
                from.r,
                from.alpha,
                from.target_modules
            ));
            lora = from;
        }
    }
    let model = Phi3::load(&folder, lora, cfg.seed, &device, dtype)?;
    if let Some(a) = &cfg.adapter_init {
        model.load_adapter(a)?;
    }
    let names: Vec<String> = model.lora_params().into_iter().map(|(n, _)| n).collect();
    let plan = Plan::new(cfg, train.num_rows());
    let schedule = Schedule::parse(&cfg.lr_scheduler_type)?;
    let mut opt = {
        let params = model.lora_params();
        let vars: Vec<_> = params.iter().map(|p| p.1).collect();
        AdamW::new(
            AdamWParams {
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_epsilon,
                weight_decay: cfg.weight_decay,
            },
            &vars,
        )?
    };
    let mut state = TrainerState {
        global_step: 0,
        epoch: 0.0,
        total_steps: plan.total_steps,
        step_losses: Vec::new(),
        log_history: Vec::new(),
        eval_history: Vec::new(),
        best_step: None,
        best_eval_loss: None,
        train_tokens: 0,
        plan: plan.json(cfg),
    };
    let resumed_from = match &cfg.resume_from_checkpoint {
        None | Some(Resume::Latest(false)) => None,
        Some(Resume::Latest(true)) => match checkpoint::list(&cfg.output_dir).pop() {
            Some((_, dir)) => Some(dir),
            None => {
                ctx.message(&format!(
                    "no checkpoint in {} yet: starting from step 0",
                    cfg.output_dir.display()
                ));
                None
            }
        },
        Some(Resume::Path(p)) => Some(p.clone()),
    };
    if let Some(dir) = &resumed_from {
        let saved = checkpoint::read_state(dir)?;
        if saved.plan != state.plan {
            return Err(Error::Training(format!(
                "{}: the checkpoint belongs to a different plan ({}) than this run ({}); use the same data and batch settings, or a new output_dir",
                dir.display(),
                saved.plan,
                state.plan
            )));
        }
        model.load_adapter(dir)?;
        opt.load(
            &dir.join(checkpoint::OPTIMIZER),
            &names,
            saved.global_step as u64,
        )?;
        state = saved;
        ctx.message(&format!(
            "resuming from {} (step {})",
            dir.display(),
            state.global_step
        ));
    }

    let recompute = cfg.gradient_checkpointing;
    let task = ctx.task("train", Some(plan.total_steps as u64), "steps");
    task.advance(state.global_step as u64);
    let started = Instant::now();
    let mut tokens_this_run = 0u64;
    let (mut log_loss, mut log_steps, mut log_tokens, mut log_t0) =
        (0.0, 0usize, 0u64, Instant::now());
    let mut order_epoch = usize::MAX;
    let mut order = Vec::new();
    let save = |state: &TrainerState, model: &Phi3, opt: &AdamW| -> Result<PathBuf> {
        let dest = checkpoint::checkpoint_dir(&cfg.output_dir, state.global_step);
        let pending = model::export::PendingDir::new(&dest)?;
        model.write_adapter_into(&pending.tmp, &cfg.model)?;
        model::export::write_safetensors(
            &pending.tmp.join(checkpoint::OPTIMIZER),
            &opt.state(&names),
        )?;
        let p = pending.tmp.join(checkpoint::STATE);
        std::fs::write(&p, serde_json::to_string_pretty(state).expect("json")).at(&p)?;
        let dir = pending.commit()?;
        checkpoint::rotate(&cfg.output_dir, cfg.save_total_limit, state.best_step)?;
        Ok(dir)
    };
    let eval_now = |state: &mut TrainerState, model: &Phi3| -> Result<()> {
        let Some(val) = &validation else {
            return Ok(());
        };
        let loss = evaluate(model, val, cfg.per_device_eval_batch_size, ctx)?;
        let entry = json!({
            "step": state.global_step,
            "epoch": state.epoch,
            "eval_loss": loss,
            "eval_perplexity": loss.exp(),
        });
        ctx.metrics(&entry.to_string());
        state.eval_history.push(entry);
        if state.best_eval_loss.is_none_or(|b| loss < b) {
            state.best_eval_loss = Some(loss);
            state.best_step = Some(state.global_step);
        }
        Ok(())
    };

    while state.global_step < plan.total_steps {
        let step = state.global_step;
        if ctx.cancel().is_cancelled() {
            if step > 0 {
                let dir = save(&state, &model, &opt)?;
                ctx.message(&format!(
                    "interrupted: saved {} — resume with resume_from_checkpoint=True",
                    dir.display()
                ));
            }
            return Err(Error::Cancelled);
        }
        let epoch = step / plan.updates_per_epoch;
        if epoch != order_epoch {
            order = data::epoch_order(plan.rows, epoch, cfg.seed, cfg.shuffle);
            order_epoch = epoch;
        }
        let batches: Vec<_> = plan
            .step_batches(cfg, step, &order)
            .iter()
            .map(|idx| {
                let f = data::gather(&train, idx);
                model.batch(&f.ids, Some(&f.labels), &f.seq_lengths)
            })
            .collect::<Result<_>>()?;
        let n_targets: usize = batches.iter().map(|b| b.n_targets()).sum();
        let n_tokens: usize = batches.iter().map(|b| b.n_tokens()).sum();
        let params = model.lora_params();
        let vars: Vec<_> = params.iter().map(|p| p.1).collect();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss_sum = 0.0;
        if n_targets > 0 {
            let scale = 1.0 / n_targets as f64;
            for (k, b) in batches.iter().enumerate() {
                let seed = (model.lora_cfg.dropout > 0.0).then(|| seed_for(cfg.seed, step, k));
                loss_sum += model.forward_backward(b, scale, recompute, seed, &mut grads)?;
            }
        }
        let loss = if n_targets > 0 {
            loss_sum / n_targets as f64
        } else {
            0.0
        };
        if !loss.is_finite() {
            return Err(Error::Training(format!(
                "the loss is {loss} at step {} (epoch {:.2}); training stopped. Lower learning_rate (now {}) or check the data; the last checkpoint is intact",
                step + 1,
                state.epoch,
                cfg.learning_rate
            )));
        }
        let lr = cfg.learning_rate * schedule.factor(step, plan.warmup, plan.total_steps);
        let mut grad_norm = 0.0;
        if n_targets > 0 {
            let mut g: Vec<Tensor> = grads
                .into_iter()
                .zip(&vars)
                .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
                .collect::<candle_core::Result<_>>()?;
            grad_norm = clip_grad_norm(&mut g, cfg.max_grad_norm)?;
            if !grad_norm.is_finite() {
                return Err(Error::Training(format!(
                    "the gradient norm is {grad_norm} at step {}; training stopped. Lower learning_rate (now {})",
                    step + 1,
                    cfg.learning_rate
                )));
            }
            opt.update(&vars, &g, lr)?;
        } else {
            ctx.message(&format!(
                "step {}: no trainable tokens in this step's rows; skipped",
                step + 1
            ));
        }
        state.global_step += 1;
        state.epoch = state.global_step as f64 / plan.updates_per_epoch as f64;
        state.step_losses.push(loss);
        state.train_tokens += n_tokens as u64;
        tokens_this_run += n_tokens as u64;
        log_loss += loss;
        log_steps += 1;
        log_tokens += n_tokens as u64;
        task.advance(1);
        let gs = state.global_step;
        if gs.is_multiple_of(cfg.logging_steps) || gs == plan.total_steps {
            let secs = log_t0.elapsed().as_secs_f64().max(1e-9);
            let entry = json!({
                "step": gs,
                "epoch": state.epoch,
                "loss": log_loss / log_steps as f64,
                "learning_rate": lr,
                "grad_norm": grad_norm,
                "tokens_per_second": log_tokens as f64 / secs,
            });
            ctx.metrics(&entry.to_string());
            state.log_history.push(entry);
            (log_loss, log_steps, log_tokens, log_t0) = (0.0, 0, 0, Instant::now());
        }
        let epoch_end = gs.is_multiple_of(plan.updates_per_epoch) || gs == plan.total_steps;
        let due = |strategy: Strategy, every: Option<usize>| match strategy {
            Strategy::No => false,
            Strategy::Epoch => epoch_end,
            Strategy::Steps => {
                every.is_some_and(|e| gs.is_multiple_of(e)) || gs == plan.total_steps
            }
        };
        if due(
            cfg.evaluation_strategy,
            cfg.eval_steps.or(Some(cfg.logging_steps)),
        ) {
            eval_now(&mut state, &model)?;
        }
        if due(cfg.save_strategy, cfg.save_steps) {
            save(&state, &model, &opt)?;
        }
    }
    drop(task);
    let train_seconds = started.elapsed().as_secs_f64();
    let adapter_dir = model.save_adapter(&cfg.output_dir.join("adapter"), &cfg.model)?;
    let merged_dir = if cfg.merge_lora_weights {
        Some(model.save_merged(&cfg.output_dir.join("merged"), ctx)?)
    } else {
        None
    };
    let summary = Summary {
        output_dir: cfg.output_dir.clone(),
        global_step: state.global_step,
        total_steps: plan.total_steps,
        epochs: state.epoch,
        step_losses: state.step_losses.clone(),
        log_history: state.log_history.clone(),
        eval: state.eval_history.clone(),
        best_checkpoint: state
            .best_step
            .map(|s| checkpoint::checkpoint_dir(&cfg.output_dir, s))
            .filter(|p| p.is_dir()),
        best_eval_loss: state.best_eval_loss,
        train_tokens: state.train_tokens,
        train_seconds,
        tokens_per_second: tokens_this_run as f64 / train_seconds.max(1e-9),
        adapter_dir,
        merged_dir,
        device: crate::model::device_name(&device),
        resumed_from,
    };
    let _ = train_path;
    let p = cfg.output_dir.join("train_summary.json");
    let pending = crate::data::pending_file::PendingFile::new(p.clone());
    std::fs::write(
        &pending.tmp,
        serde_json::to_string_pretty(&summary).expect("json"),
    )
    .at(&p)?;
    pending.commit()?;
    Ok(summary)
}
