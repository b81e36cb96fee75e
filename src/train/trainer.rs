//! The training loop: plan, (resume,) steps with accumulation and clipping, logging,
//! evaluation, checkpoints, and the final adapter / merged model / summary.

use std::cell::Cell;
use std::path::PathBuf;
use std::time::Instant;

use std::sync::Arc;

use serde::Serialize;
use serde_json::json;

use super::checkpoint::{self, TrainerState};
use super::config::{Resume, Strategy, TrainConfig};
use super::data::{self, Data};
use super::distributed::Group;
use super::optim::{AdamW, AdamWParams, LossScale};
use super::schedule::Schedule;
use crate::chat::TokenizedRows;
use crate::error::{Error, IoContext, Result};
use crate::hub::HubClient;
use crate::kernels::{Backend, Dt};
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
    /// Processes that trained together (1 without a data-parallel launcher).
    pub world_size: usize,
    /// This process's rank; only rank 0 writes checkpoints, exports and the summary file.
    pub rank: usize,
}

struct Plan {
    rows: usize,
    micro_per_epoch: usize,
    updates_per_epoch: usize,
    total_steps: usize,
    warmup: usize,
    /// Data-parallel processes. One optimizer step takes `gradient_accumulation_steps`
    /// micro-batches on each of them: the same rows, in the same order, as one process
    /// with `world × gradient_accumulation_steps`.
    world: usize,
}

impl Plan {
    fn new(cfg: &TrainConfig, rows: usize, world: usize) -> Self {
        let micro_per_epoch = rows.div_ceil(cfg.per_device_train_batch_size);
        let updates_per_epoch = micro_per_epoch
            .div_ceil(cfg.gradient_accumulation_steps * world)
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
            world,
        }
    }

    fn json(&self, cfg: &TrainConfig) -> serde_json::Value {
        let mut plan = json!({
            "rows": self.rows,
            "total_steps": self.total_steps,
            "per_device_train_batch_size": cfg.per_device_train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "seed": cfg.seed,
            "shuffle": cfg.shuffle,
            "lora_r": cfg.lora_r,
        });
        if self.world > 1 {
            plan["world_size"] = json!(self.world);
        }
        plan
    }

    /// Row indices of each micro-batch of optimizer step `step` (all ranks' together:
    /// micro-batch `k` is rank `k % world`'s).
    fn step_batches(&self, cfg: &TrainConfig, step: usize, order: &[usize]) -> Vec<Vec<usize>> {
        let in_epoch = step % self.updates_per_epoch;
        let ga = cfg.gradient_accumulation_steps * self.world;
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

/// Mean loss over `rows` (forward only), batched `bs` rows at a time; with a group, batch
/// `c` is evaluated by rank `c % world` and the sums are added up. `None`: stopped by
/// Ctrl-C / SIGTERM (on any rank).
fn evaluate(
    model: &Phi3,
    rows: &TokenizedRows,
    bs: usize,
    group: Option<&mut Group>,
    ctx: &Ctx,
) -> Result<Option<f64>> {
    let n = rows.num_rows();
    let (mut sum, mut count) = (0.0, 0usize);
    let idx: Vec<usize> = (0..n).collect();
    let (rank, world) = group.as_ref().map_or((0, 1), |g| (g.rank, g.size));
    let mut stopped = false;
    for (c, chunk) in idx.chunks(bs).enumerate() {
        if c % world != rank {
            continue;
        }
        if ctx.cancel().is_cancelled() {
            stopped = true;
            break;
        }
        let f = data::gather(rows, chunk);
        let b = model.batch(&f.ids, Some(&f.labels), &f.seq_lengths)?;
        sum += model.loss_sum(&b)?;
        count += b.n_targets();
    }
    if let Some(g) = group {
        let mut all = [sum, count as f64, f64::from(u8::from(stopped))];
        g.sum_f64(&mut all)?;
        (sum, count, stopped) = (all[0], all[1] as usize, all[2] > 0.0);
    }
    if stopped {
        return Ok(None);
    }
    if count == 0 {
        return Err(Error::Training(
            "the validation set has no trainable tokens".into(),
        ));
    }
    Ok(Some(sum / count as f64))
}

/// Whether `strategy` (for "steps": every `every` steps) evaluates or saves after step `gs`.
fn due(strategy: Strategy, every: Option<usize>, gs: usize, plan: &Plan) -> bool {
    let last = gs == plan.total_steps;
    match strategy {
        Strategy::No => false,
        Strategy::Epoch => gs.is_multiple_of(plan.updates_per_epoch) || last,
        Strategy::Steps => every.is_some_and(|e| gs.is_multiple_of(e)) || last,
    }
}

/// The backend to train on: with a data-parallel group, "cuda"/"auto" mean the GPU of the
/// process's `LOCAL_RANK`, as torch's launchers arrange it.
fn training_backend(cfg: &TrainConfig) -> Result<Arc<dyn Backend>> {
    let be = model::backend(&cfg.device, &cfg.precision)?;
    match &cfg.distributed {
        Some(w) if be.name() != "cpu" && !cfg.device.starts_with("cuda:") && w.local_rank > 0 => {
            model::backend(&format!("cuda:{}", w.local_rank), &cfg.precision)
        }
        _ => Ok(be),
    }
}

/// What every process of a data-parallel group must agree on before training together
/// (checked as the group forms; the prepared rows are compared afterwards, in
/// `data::prepare_in_group`).
fn group_fingerprint(cfg: &TrainConfig, world: usize) -> String {
    json!({
        "ferrotune": env!("CARGO_PKG_VERSION"),
        "model": cfg.model,
        "plan": {
            "per_device_train_batch_size": cfg.per_device_train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "seed": cfg.seed,
            "shuffle": cfg.shuffle,
            "lora_r": cfg.lora_r,
            "world_size": world,
            "max_steps": cfg.max_steps,
            "num_train_epochs": cfg.num_train_epochs,
        },
        "data": [
            json!(cfg.max_seq_length),
            json!(cfg.packing),
            json!(cfg.validation_split),
            json!(format!("{:?}", cfg.evaluation_strategy)),
            json!(cfg.validation_file.is_some()),
        ],
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "lora": [cfg.lora_alpha, cfg.lora_dropout],
        "target_modules": cfg.target_modules,
        "optimizer": [cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.weight_decay, cfg.max_grad_norm],
        "warmup": [cfg.warmup_steps as f64, cfg.warmup_ratio],
        "precision": cfg.precision,
        "adapter_init": cfg.adapter_init,
        "resume_from_checkpoint": format!("{:?}", cfg.resume_from_checkpoint),
    })
    .to_string()
}

/// Whether to recompute activations: as asked, or turned on when the device's free memory
/// (after the weights) cannot hold a step's activations kept (said in the log); a plan that
/// does not fit even then is reported with what to lower.
fn memory_plan(
    cfg: &TrainConfig,
    model: &Phi3,
    train: &TokenizedRows,
    root: bool,
    ctx: &Ctx,
) -> Result<bool> {
    let Some((free, _)) = model.backend().memory()? else {
        return Ok(cfg.gradient_checkpointing);
    };
    // The largest micro-batch: the batch size times the longest row.
    let longest = train
        .row_offsets
        .windows(2)
        .map(|w| (w[1] - w[0]) as usize)
        .max()
        .unwrap_or(0);
    let tokens = longest * cfg.per_device_train_batch_size;
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    let keep = model.step_bytes(tokens, false);
    if !cfg.gradient_checkpointing && keep > free {
        let again = model.step_bytes(tokens, true);
        if root {
            ctx.message(&format!(
                "memory: a step of {tokens} tokens needs ~{:.1} GiB of activations kept, {:.1} GiB are free on {}; turning on gradient_checkpointing (~{:.1} GiB)",
                gib(keep),
                gib(free),
                model.device_name(),
                gib(again)
            ));
        }
        if again > free && root {
            ctx.message(&format!(
                "memory: even with gradient_checkpointing a step needs ~{:.1} GiB ({:.1} GiB free); lower per_device_train_batch_size or max_seq_length if it runs out of memory",
                gib(again),
                gib(free)
            ));
        }
        return Ok(true);
    }
    Ok(cfg.gradient_checkpointing)
}

/// Runs a whole fine-tuning job.
pub fn finetune(cfg: &TrainConfig, ctx: &Ctx) -> Result<Summary> {
    cfg.validate()?;
    let (rank, world) = cfg
        .distributed
        .as_ref()
        .map_or((0, 1), |w| (w.rank, w.world_size));
    let root = rank == 0;
    let be = training_backend(cfg)?;
    let gpu = be.name() != "cpu";
    if !gpu && !matches!(cfg.precision.as_str(), "32" | "auto") && root {
        ctx.message(&format!(
            "precision {} applies on a GPU; on the CPU ferrotune trains in float32",
            cfg.precision
        ));
    }
    std::fs::create_dir_all(&cfg.output_dir).at(&cfg.output_dir)?;
    let folder = model::weights::resolve_model(
        &cfg.model,
        "main",
        || HubClient::from_env(cfg.token.clone()),
        ctx,
    )?;
    // Data-parallel: the group forms first (same settings everywhere), then each node's
    // LOCAL_RANK 0 tokenizes for its node and every rank's rows are compared with rank 0's.
    let (data, mut group) = match &cfg.distributed {
        None => {
            let out = cfg.output_dir.join("tokenized");
            (data::prepare(cfg, data::Source::Tokenize(&out), ctx)?, None)
        }
        Some(w) => {
            let mut g = Group::join(w, &group_fingerprint(cfg, world), be.as_ref(), ctx)?;
            (
                data::prepare_in_group(cfg, w.local_rank, &mut g, ctx)?,
                Some(g),
            )
        }
    };
    let plan = Plan::new(cfg, data.train.num_rows(), world);
    let Data {
        train, validation, ..
    } = data;
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
    let model = Phi3::load(&folder, lora, cfg.seed, be.clone())?;
    if let Some(a) = &cfg.adapter_init {
        model.load_adapter(a)?;
    }
    let layout = model.lora_layout();
    let schedule = Schedule::parse(&cfg.lr_scheduler_type)?;
    let mut opt = AdamW::new(
        AdamWParams {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
        },
        be.as_ref(),
        model.n_lora(),
    )?;
    // fp16 activations need a loss scale (gradients would underflow); bf16 and f32 do not.
    let mut loss_scale = (be.act() == Dt::F16).then(LossScale::new);
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
        unscheduled_checkpoint: None,
        eval_pending: false,
    };
    let resumed_from = match &cfg.resume_from_checkpoint {
        None | Some(Resume::Latest(false)) => None,
        Some(Resume::Latest(true)) => match checkpoint::list(cfg.checkpoints()).pop() {
            Some((_, dir)) => Some(dir),
            None => {
                ctx.message(&format!(
                    "no checkpoint in {} yet: starting from step 0",
                    cfg.checkpoints().display()
                ));
                None
            }
        },
        Some(Resume::Path(p)) => Some(p.clone()),
    };
    if let Some(g) = group.as_mut() {
        // Every rank must resume from the same step (a checkpoint rank 0 wrote into a
        // shared checkpoint folder); a rank that sees another folder would train something else.
        let step = match &resumed_from {
            Some(dir) => checkpoint::read_state(dir)?.global_step as f64,
            None => -1.0,
        };
        let mut both = [step, step * step];
        g.sum_f64(&mut both)?;
        let n = world as f64;
        if (both[0] / n - step).abs() > 1e-9 || (both[1] / n - step * step).abs() > 1e-6 {
            return Err(Error::Training(format!(
                "data-parallel: the ranks would resume from different checkpoints (rank {rank}: {}). Every process needs the same checkpoint_dir (a shared folder; default output_dir)",
                resumed_from
                    .as_ref()
                    .map_or("none".to_string(), |d| d.display().to_string())
            )));
        }
    }
    if let Some(dir) = &resumed_from {
        let saved = checkpoint::read_state(dir)?;
        if saved.plan != state.plan {
            return Err(Error::Training(format!(
                "{}: the checkpoint belongs to a different plan ({}) than this run ({}); use the same data and batch settings, or a new checkpoint_dir / output_dir",
                dir.display(),
                saved.plan,
                state.plan
            )));
        }
        model.load_adapter(dir)?;
        opt.load(
            be.as_ref(),
            &dir.join(checkpoint::OPTIMIZER),
            &layout,
            saved.global_step as u64,
        )?;
        state = saved;
        ctx.message(&format!(
            "resuming from {} (step {})",
            dir.display(),
            state.global_step
        ));
    }

    let recompute = memory_plan(cfg, &model, &train, root, ctx)?;
    let task = ctx.task("train", Some(plan.total_steps as u64), "steps");
    task.advance(state.global_step as u64);
    let started = Instant::now();
    let mut tokens_this_run = 0u64;
    let (mut log_loss, mut log_steps, mut log_tokens, mut log_t0) =
        (0.0, 0usize, 0u64, Instant::now());
    let mut order_epoch = usize::MAX;
    let mut order = Vec::new();
    // The step of the newest checkpoint this run wrote (or resumed from).
    let saved_step = Cell::new(resumed_from.as_ref().map(|_| state.global_step));
    // `unscheduled`: a safety checkpoint (save_interval_minutes, SIGTERM / Ctrl-C), which
    // the next checkpoint replaces.
    let save = |state: &mut TrainerState,
                model: &Phi3,
                opt: &AdamW,
                unscheduled: bool|
     -> Result<PathBuf> {
        let superseded = state
            .unscheduled_checkpoint
            .filter(|&s| s != state.global_step && Some(s) != state.best_step);
        state.unscheduled_checkpoint = unscheduled.then_some(state.global_step);
        let dest = checkpoint::checkpoint_dir(cfg.checkpoints(), state.global_step);
        let pending = model::export::PendingDir::new(&dest)?;
        model.write_adapter_into(&pending.tmp, &cfg.model)?;
        model::export::write_safetensors(
            &pending.tmp.join(checkpoint::OPTIMIZER),
            &opt.state(model.backend().as_ref(), &layout)?,
        )?;
        let p = pending.tmp.join(checkpoint::STATE);
        std::fs::write(&p, serde_json::to_string_pretty(state).expect("json")).at(&p)?;
        let dir = pending.commit()?;
        saved_step.set(Some(state.global_step));
        if let Some(old) = superseded.map(|s| checkpoint::checkpoint_dir(cfg.checkpoints(), s)) {
            if old.is_dir() {
                std::fs::remove_dir_all(&old).at(&old)?;
            }
        }
        checkpoint::rotate(cfg.checkpoints(), cfg.save_total_limit, state.best_step)?;
        Ok(dir)
    };
    // Ok(false): stopped by Ctrl-C / SIGTERM before the evaluation was complete.
    let eval_now =
        |state: &mut TrainerState, model: &Phi3, group: Option<&mut Group>| -> Result<bool> {
            let Some(val) = &validation else {
                return Ok(true);
            };
            let Some(loss) = evaluate(model, val, cfg.per_device_eval_batch_size, group, ctx)?
            else {
                return Ok(false);
            };
            let entry = json!({
                "step": state.global_step,
                "epoch": state.epoch,
                "eval_loss": loss,
                "eval_perplexity": loss.exp(),
            });
            if root {
                ctx.metrics(&entry.to_string());
            }
            state.eval_history.push(entry);
            if state.best_eval_loss.is_none_or(|b| loss < b) {
                state.best_eval_loss = Some(loss);
                state.best_step = Some(state.global_step);
            }
            Ok(true)
        };
    // Ctrl-C / SIGTERM: rank 0 saves the last whole step (unless that checkpoint exists),
    // and every rank waits until it has: the launcher may end the job once one exits.
    let stop = |state: &mut TrainerState,
                model: &Phi3,
                opt: &AdamW,
                group: Option<&mut Group>|
     -> Result<Summary> {
        if root && state.global_step > 0 {
            let dir = if saved_step.get() == Some(state.global_step) {
                checkpoint::checkpoint_dir(cfg.checkpoints(), state.global_step)
            } else {
                save(state, model, opt, true)?
            };
            ctx.message(&format!(
                "interrupted: saved {} — resume with resume_from_checkpoint=True",
                dir.display()
            ));
        }
        if let Some(g) = group {
            g.barrier()?;
            if !ctx.cancel().is_cancelled() {
                return Err(Error::Training(
                    "data-parallel: training stopped because another rank was stopped (SIGTERM or Ctrl-C); rank 0 saved a checkpoint of the last whole step: resume with resume_from_checkpoint=True".into(),
                ));
            }
        }
        Err(Error::Cancelled)
    };
    let mut clock = checkpoint::SaveClock::new(cfg.save_interval_minutes, Instant::now());
    if state.eval_pending {
        // The run this one resumes stopped during this step's evaluation: run it now,
        // then the save it came before.
        state.eval_pending = false;
        if !eval_now(&mut state, &model, group.as_mut())? {
            state.eval_pending = true;
            return stop(&mut state, &model, &opt, group.as_mut());
        }
        if root && due(cfg.save_strategy, cfg.save_steps, state.global_step, &plan) {
            save(&mut state, &model, &opt, false)?;
            clock.saved(Instant::now());
        }
    }

    while state.global_step < plan.total_steps {
        let step = state.global_step;
        let epoch = step / plan.updates_per_epoch;
        if epoch != order_epoch {
            order = data::epoch_order(plan.rows, epoch, cfg.seed, cfg.shuffle);
            order_epoch = epoch;
        }
        // This rank's micro-batches, with their index in the step (for dropout seeds).
        let batches: Vec<_> = plan
            .step_batches(cfg, step, &order)
            .iter()
            .enumerate()
            .filter(|(k, _)| k % world == rank)
            .map(|(k, idx)| {
                let f = data::gather(&train, idx);
                Ok((k, model.batch(&f.ids, Some(&f.labels), &f.seq_lengths)?))
            })
            .collect::<Result<_>>()?;
        let mut counts = [
            f64::from(u8::from(ctx.cancel().is_cancelled())),
            batches.iter().map(|(_, b)| b.n_targets()).sum::<usize>() as f64,
            batches.iter().map(|(_, b)| b.n_tokens()).sum::<usize>() as f64,
        ];
        if let Some(g) = group.as_mut() {
            g.sum_f64(&mut counts)?;
        }
        if counts[0] > 0.0 {
            return stop(&mut state, &model, &opt, group.as_mut());
        }
        let (n_targets, n_tokens) = (counts[1] as usize, counts[2] as usize);
        let lr = cfg.learning_rate * schedule.factor(step, plan.warmup, plan.total_steps);
        let lscale = loss_scale.map_or(1.0, |s| s.scale);
        // stats: [Σ CE of this rank's micro-batches, Σ g² of the summed gradients]
        let mut stats = be.zeros(2, Dt::F64)?;
        let mut grad_norm = 0.0;
        let mut skipped = false;
        let mut stopped = false;
        if n_targets > 0 {
            let mut grads = be.zeros(model.n_lora(), Dt::F32)?;
            let scale = lscale / n_targets as f64;
            for (k, b) in &batches {
                // Ctrl-C / SIGTERM: stop at this micro-batch boundary; the step is dropped.
                if ctx.cancel().is_cancelled() {
                    stopped = true;
                    break;
                }
                let seed = (model.lora_cfg.dropout > 0.0).then(|| seed_for(cfg.seed, step, *k));
                model.forward_backward(b, scale, recompute, seed, &mut grads, &mut stats)?;
            }
            // The ranks agree on stopping before they exchange gradients.
            if let Some(g) = group.as_mut() {
                let mut flag = [f64::from(u8::from(stopped))];
                g.sum_f64(&mut flag)?;
                stopped = flag[0] > 0.0;
            }
            if stopped {
                return stop(&mut state, &model, &opt, group.as_mut());
            }
            if let Some(g) = group.as_mut() {
                g.sum_buf(be.as_ref(), &mut grads)?;
            }
            be.sum_into(&grads, true, &mut stats, 1)?;
            model.update_lora(|p| {
                opt.update(
                    be.as_ref(),
                    p,
                    &grads,
                    (&stats, 1),
                    lr,
                    cfg.max_grad_norm,
                    1.0 / lscale,
                )
            })?;
        } else if root {
            ctx.message(&format!(
                "step {}: no trainable tokens in this step's rows; skipped",
                step + 1
            ));
        }
        // The step's one read from the device: the loss and the gradient norm.
        let read = be.to_f64(&stats)?;
        let mut loss_sum = read[0];
        if n_targets > 0 {
            grad_norm = read[1].sqrt() / lscale;
        }
        if let Some(g) = group.as_mut() {
            let mut total = [loss_sum, f64::from(u8::from(stopped))];
            g.sum_f64(&mut total)?;
            (loss_sum, stopped) = (total[0], total[1] > 0.0);
        }
        if stopped {
            return stop(&mut state, &model, &opt, group.as_mut());
        }
        let loss = if n_targets > 0 {
            loss_sum / n_targets as f64
        } else {
            0.0
        };
        if let Some(ls) = loss_scale.as_mut().filter(|_| n_targets > 0) {
            if ls.record(grad_norm.is_finite()) {
                opt.skipped();
                skipped = true;
                if root {
                    ctx.message(&format!(
                        "step {}: fp16 gradients overflowed; update skipped, loss scale lowered to {} ({} skipped so far)",
                        step + 1,
                        ls.scale,
                        ls.skipped
                    ));
                }
            }
        }
        if !skipped && !loss.is_finite() {
            return Err(Error::Training(format!(
                "the loss is {loss} at step {} (epoch {:.2}); training stopped. Lower learning_rate (now {}) or check the data; the last checkpoint is intact",
                step + 1,
                state.epoch,
                cfg.learning_rate
            )));
        }
        if !skipped && !grad_norm.is_finite() {
            return Err(Error::Training(format!(
                "the gradient norm is {grad_norm} at step {}; training stopped. Lower learning_rate (now {})",
                step + 1,
                cfg.learning_rate
            )));
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
            if root {
                ctx.metrics(&entry.to_string());
            }
            state.log_history.push(entry);
            (log_loss, log_steps, log_tokens, log_t0) = (0.0, 0, 0, Instant::now());
        }
        let eval_every = cfg.eval_steps.or(Some(cfg.logging_steps));
        if due(cfg.evaluation_strategy, eval_every, gs, &plan)
            && !eval_now(&mut state, &model, group.as_mut())?
        {
            state.eval_pending = true;
            return stop(&mut state, &model, &opt, group.as_mut());
        }
        // save_strategy's checkpoints, and in between one whenever save_interval_minutes
        // have passed since the last (unless save_strategy is "no").
        let scheduled = due(cfg.save_strategy, cfg.save_steps, gs, &plan);
        let interval = cfg.save_strategy != Strategy::No && clock.due(Instant::now());
        if root && (scheduled || interval) {
            let dir = save(&mut state, &model, &opt, !scheduled)?;
            clock.saved(Instant::now());
            if !scheduled {
                ctx.message(&format!(
                    "saved {} (save_interval_minutes={}: a safety checkpoint, replaced by the next one)",
                    dir.display(),
                    cfg.save_interval_minutes
                ));
            }
        }
    }
    drop(task);
    let train_seconds = started.elapsed().as_secs_f64();
    let (adapter_dir, merged_dir) = if root {
        let adapter = model.save_adapter(&cfg.output_dir.join("adapter"), &cfg.model)?;
        let merged = if cfg.merge_lora_weights {
            Some(model.save_merged(&cfg.output_dir.join("merged"), ctx)?)
        } else {
            None
        };
        (adapter, merged)
    } else {
        (
            cfg.output_dir.join("adapter"),
            cfg.merge_lora_weights
                .then(|| cfg.output_dir.join("merged")),
        )
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
            .map(|s| checkpoint::checkpoint_dir(cfg.checkpoints(), s))
            .filter(|p| p.is_dir()),
        best_eval_loss: state.best_eval_loss,
        train_tokens: state.train_tokens,
        train_seconds,
        tokens_per_second: tokens_this_run as f64 / train_seconds.max(1e-9),
        adapter_dir,
        merged_dir,
        device: be.name(),
        resumed_from,
        world_size: world,
        rank,
    };
    if root {
        let p = cfg.output_dir.join("train_summary.json");
        let pending = crate::data::pending_file::PendingFile::new(p.clone());
        std::fs::write(
            &pending.tmp,
            serde_json::to_string_pretty(&summary).expect("json"),
        )
        .at(&p)?;
        pending.commit()?;
    }
    // The others finish when rank 0 has written everything (or fail if it could not).
    if let Some(g) = group.as_mut() {
        g.barrier()?;
    }
    Ok(summary)
}

#[cfg(all(test, feature = "gpu-emu"))]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::kernels::cuda::{emu::Emu, Gpu};

    /// The memory plan turns recompute on exactly when a step with kept activations would
    /// not fit the device's free memory, and says so.
    #[test]
    fn recompute_turns_on_when_kept_activations_would_not_fit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let over = json!({"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100});
        model::random::create_random_model(&dir, &over, 1, None).unwrap();
        let emu = Arc::new(Emu::new((8, 0)));
        let be: Arc<dyn Backend> = Arc::new(Gpu::new(emu.clone(), Dt::BF16, "emu".into()));
        let model = Phi3::load(&dir, model::LoraConfig::default(), 0, be).unwrap();
        let cfg = TrainConfig::from_json(&format!(
            r#"{{"model": {:?}, "train_file": "x", "output_dir": "y", "per_device_train_batch_size": 2}}"#,
            dir.display().to_string()
        ))
        .unwrap();
        // two rows of 300 and 500 tokens: a micro-batch is at most 2 × 500 tokens
        let train = TokenizedRows {
            row_offsets: vec![0, 300, 800],
            ..Default::default()
        };
        let (keep, again) = (model.step_bytes(1000, false), model.step_bytes(1000, true));
        assert!(again < keep, "{again} vs {keep}");
        let used = emu.used();
        #[derive(Default)]
        struct Messages(std::sync::Mutex<Vec<String>>);
        impl crate::progress::Progress for Messages {
            fn start(&self, _: u64, _: &str, _: Option<u64>, _: &str) {}
            fn advance(&self, _: u64, _: u64) {}
            fn finish(&self, _: u64) {}
            fn message(&self, text: &str) {
                self.0.lock().unwrap().push(text.to_string());
            }
        }
        let rec = Arc::new(Messages::default());
        let ctx = Ctx::new(rec.clone(), crate::progress::Cancel::new());
        let messages = &rec.0;
        emu.set_memory(used + keep + 1);
        assert!(!memory_plan(&cfg, &model, &train, true, &ctx).unwrap());
        assert!(messages.lock().unwrap().is_empty());
        emu.set_memory(used + (keep + again) / 2);
        assert!(memory_plan(&cfg, &model, &train, true, &ctx).unwrap());
        let said = messages.lock().unwrap().join("\n");
        assert!(
            said.contains("a step of 1000 tokens")
                && said.contains("turning on gradient_checkpointing"),
            "{said}"
        );
        assert!(!said.contains("even with"), "{said}");
        emu.set_memory(used + again / 2);
        assert!(memory_plan(&cfg, &model, &train, true, &ctx).unwrap());
        assert!(messages
            .lock()
            .unwrap()
            .join("\n")
            .contains("even with gradient_checkpointing"));
    }
}
