//! Our Phi-3 (training-capable: all positions, packed segments, LoRA, hand-written
//! backward), on any [`Backend`].
//!
//! Activations are 2-D `(tokens, hidden)` for the whole flat batch; attention runs per
//! segment (one conversation), so packed rows cost no padding and no cross-talk. The
//! layers are [`super::layer`]'s; the backward runs layer by layer from the top, each
//! layer's input kept (or, with `recompute`, each layer run again) — the same code path.
//!
//! The adapters of all layers live in one flat f32 buffer on the backend (A then B of each
//! targeted projection, layer by layer: the order of [`Phi3::lora_names`]); gradients and
//! the optimizer's moments are flat buffers with the same offsets, so a step's AdamW is one
//! pass, its gradient norm one reduction and a data-parallel sum one transfer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::config::Phi3Config;
use super::layer::{LayerW, Lin, LoraSlot, Step};
use super::lora::{init_a, peft_key, LoraConfig};
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::kernels::{Backend, Buf, Dt, Heads, KvCache, Layout, Mat, RopeSpec};

/// One targeted projection's adapter in the flat buffers.
#[derive(Debug, Clone)]
pub struct AdapterEntry {
    pub layer: usize,
    pub module: &'static str,
    pub r: usize,
    pub inp: usize,
    pub out: usize,
    /// Offsets (in elements) of A (r, in) and B (out, r).
    pub a_off: usize,
    pub b_off: usize,
}

/// An adapter's `scale · B A` (row-major values, out, in).
pub type Delta = (Vec<f32>, usize, usize);

/// The adapter parameters: f32 on the backend, plus their copy in the activation type
/// (what the layers' products read) when that is not f32.
pub struct Adapters {
    pub params: Buf,
    act: Option<Buf>,
}

impl Adapters {
    /// The buffer the layers read.
    fn for_layers(&self) -> &Buf {
        self.act.as_ref().unwrap_or(&self.params)
    }
}

/// A flat batch: token ids, the segments' layout (positions, RoPE), and targets.
///
/// In generation a segment continues a cached sequence: `past[i]` tokens of segment `i`
/// are already in its KV cache, so its positions start there.
pub struct Batch {
    ids: Buf,
    lay: Layout,
    /// Positions that have a target, and the targets (both i32).
    target_pos: Option<Buf>,
    targets: Option<Buf>,
    n_targets: usize,
}

impl Batch {
    pub fn n_tokens(&self) -> usize {
        self.lay.rows()
    }
    pub fn n_targets(&self) -> usize {
        self.n_targets
    }
}

/// Phi-3 with frozen base weights and LoRA adapters.
pub struct Phi3 {
    pub cfg: Phi3Config,
    pub lora_cfg: LoraConfig,
    pub folder: PathBuf,
    be: Arc<dyn Backend>,
    embed: Buf,
    layers: Vec<LayerW>,
    norm: Buf,
    /// `None` with tied embeddings (the embedding matrix is the output matrix).
    lm_head: Option<Buf>,
    entries: Vec<AdapterEntry>,
    n_lora: usize,
    adapters: RwLock<Adapters>,
    /// RoPE inverse frequencies: `[short or plain]`, plus `[long]` with LongRoPE.
    inv_freq: Vec<Vec<f32>>,
}

/// Bytes of activations one token keeps through a training forward for its backward: per
/// layer the layer's input, the RoPE'd `qkv`, the attention output and its log-sum-exp,
/// the residual after attention, the `gate_up` output and the rank-r LoRA intermediates;
/// with `recompute` only the layer inputs (one layer's worth comes back at a time).
pub fn activation_bytes_per_token(
    cfg: &Phi3Config,
    act: Dt,
    lora: &LoraConfig,
    recompute: bool,
) -> usize {
    let input = cfg.hidden_size * act.size();
    let per_layer = if recompute {
        input
    } else {
        input + layer_saved_bytes(cfg, act, lora)
    };
    cfg.num_hidden_layers * per_layer
}

/// One layer's saved activations per token, without its input.
fn layer_saved_bytes(cfg: &Phi3Config, act: Dt, lora: &LoraConfig) -> usize {
    let (q, kv, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let qkv = (q + 2 * kv) * d;
    let u = lora.target_modules.len() * lora.r;
    (qkv + q * d + cfg.hidden_size + 2 * cfg.intermediate_size + u) * act.size() + q * 4
}

impl Phi3 {
    /// Loads the base weights from `folder` (config.json + safetensors) onto `be` and
    /// creates fresh adapters from `seed`.
    pub fn load(
        folder: &Path,
        lora_cfg: LoraConfig,
        seed: u64,
        be: Arc<dyn Backend>,
    ) -> Result<Self> {
        lora_cfg.validate()?;
        Self::load_unchecked(folder, lora_cfg, seed, be)
    }

    /// Loads the base weights only, without adapters (a merged model, for generation).
    pub fn load_frozen(folder: &Path, be: Arc<dyn Backend>) -> Result<Self> {
        let none = LoraConfig {
            target_modules: vec![],
            ..LoraConfig::default()
        };
        Self::load_unchecked(folder, none, 0, be)
    }

    fn load_unchecked(
        folder: &Path,
        lora_cfg: LoraConfig,
        seed: u64,
        be: Arc<dyn Backend>,
    ) -> Result<Self> {
        crate::tune_allocator_for_training();
        let cfg = super::weights::read_config(folder)?;
        let w = Weights::open(folder)?;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let act = be.act();
        let get = |name: &str, shape: &[usize]| -> Result<Buf> {
            be.upload_f32(&w.get_f32(name, shape)?, act)
        };
        let embed = get("model.embed_tokens.weight", &[v, h])?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let scale = lora_cfg.scale() as f32;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let mut entries = Vec::new();
        let mut init = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            let mut lin = |module: &'static str, block: &str| -> Result<Lin> {
                let (out, inp) = cfg.linear_shape(module).expect("known module");
                let weight = get(&format!("{p}{block}.{module}.weight"), &[out, inp])?;
                let lora = if lora_cfg.target_modules.iter().any(|m| m == module) {
                    let r = lora_cfg.r;
                    let a_off = init.len();
                    init.extend(init_a(r, inp, &mut rng));
                    let b_off = init.len();
                    init.resize(b_off + out * r, 0.0);
                    entries.push(AdapterEntry {
                        layer: l,
                        module,
                        r,
                        inp,
                        out,
                        a_off,
                        b_off,
                    });
                    Some(LoraSlot {
                        a_off,
                        b_off,
                        r,
                        scale,
                        dropout: lora_cfg.dropout as f32,
                    })
                } else {
                    None
                };
                Ok(Lin {
                    w: weight,
                    out,
                    inp,
                    lora,
                })
            };
            let qkv = lin("qkv_proj", "self_attn")?;
            let o = lin("o_proj", "self_attn")?;
            let gate_up = lin("gate_up_proj", "mlp")?;
            let down = lin("down_proj", "mlp")?;
            layers.push(LayerW {
                input_norm: get(&format!("{p}input_layernorm.weight"), &[h])?,
                post_norm: get(&format!("{p}post_attention_layernorm.weight"), &[h])?,
                qkv,
                o,
                gate_up,
                down,
            });
        }
        let norm = get("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(get("lm_head.weight", &[v, h])?)
        };
        let n_lora = init.len();
        let params = be.upload_f32(&init, Dt::F32)?;
        let adapters = Adapters {
            act: Self::act_copy(be.as_ref(), &params)?,
            params,
        };
        let inv_freq = Self::inv_freq_tables(&cfg);
        Ok(Self {
            cfg,
            lora_cfg,
            folder: folder.to_path_buf(),
            be,
            embed,
            layers,
            norm,
            lm_head,
            entries,
            n_lora,
            adapters: RwLock::new(adapters),
            inv_freq,
        })
    }

    /// The activation-type copy of the f32 adapters (none when activations are f32).
    fn act_copy(be: &dyn Backend, params: &Buf) -> Result<Option<Buf>> {
        if be.act() == Dt::F32 {
            Ok(None)
        } else {
            be.cast(params, be.act(), 1.0).map(Some)
        }
    }

    /// Inverse frequencies in f32, computed the way transformers does
    /// (`1 / (factor * base ** (arange(0, d, 2) / d))` in float32): the plain (or LongRoPE
    /// short) table, and LongRoPE's long one.
    fn inv_freq_tables(cfg: &Phi3Config) -> Vec<Vec<f32>> {
        let d = cfg.head_dim;
        let base = cfg.rope_theta as f32;
        let table = |factors: Option<&[f64]>| -> Vec<f32> {
            (0..d / 2)
                .map(|i| {
                    let e = (2 * i) as f32 / d as f32;
                    let f = factors.map_or(1.0, |f| f[i] as f32);
                    1.0 / (f * base.powf(e))
                })
                .collect()
        };
        match &cfg.longrope {
            Some(l) => vec![table(Some(&l.short_factor)), table(Some(&l.long_factor))],
            None => vec![table(None)],
        }
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.be
    }

    /// "cpu", "cuda:0", ...
    pub fn device_name(&self) -> String {
        self.be.name()
    }

    fn heads(&self) -> Heads {
        Heads {
            q: self.cfg.num_attention_heads,
            kv: self.cfg.num_key_value_heads,
            dim: self.cfg.head_dim,
        }
    }

    fn lm_head(&self) -> &Buf {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The adapters in the flat buffers, in [`Self::lora_names`]' order.
    pub fn adapter_entries(&self) -> &[AdapterEntry] {
        &self.entries
    }

    /// Elements of the flat adapter buffers.
    pub fn n_lora(&self) -> usize {
        self.n_lora
    }

    /// Every adapter tensor's PEFT name, shape and offset, in a fixed order (layer,
    /// module, A then B).
    pub fn lora_layout(&self) -> Vec<(String, Vec<usize>, usize)> {
        let mut out = Vec::with_capacity(self.entries.len() * 2);
        for e in &self.entries {
            out.push((peft_key(e.layer, e.module, "A"), vec![e.r, e.inp], e.a_off));
            out.push((peft_key(e.layer, e.module, "B"), vec![e.out, e.r], e.b_off));
        }
        out
    }

    /// The PEFT names of the adapter tensors, in order.
    pub fn lora_names(&self) -> Vec<String> {
        self.lora_layout().into_iter().map(|(n, ..)| n).collect()
    }

    /// The adapter parameters, flat, on the host.
    pub fn lora_values(&self) -> Result<Vec<f32>> {
        let a = self.adapters.read().expect("adapters lock");
        self.be.to_f32(&a.params)
    }

    /// Replaces the adapter parameters (flat, in [`Self::lora_layout`]'s order).
    pub fn set_lora_values(&self, v: &[f32]) -> Result<()> {
        if v.len() != self.n_lora {
            return Err(Error::InvalidArgument(format!(
                "{} adapter values for {} parameters",
                v.len(),
                self.n_lora
            )));
        }
        let params = self.be.upload_f32(v, Dt::F32)?;
        let act = Self::act_copy(self.be.as_ref(), &params)?;
        *self.adapters.write().expect("adapters lock") = Adapters { params, act };
        Ok(())
    }

    /// Runs `f` on the adapter parameters (the optimizer's update), then refreshes their
    /// activation-type copy.
    pub fn update_lora<R>(&self, f: impl FnOnce(&mut Buf) -> Result<R>) -> Result<R> {
        let mut a = self.adapters.write().expect("adapters lock");
        let r = f(&mut a.params)?;
        a.act = Self::act_copy(self.be.as_ref(), &a.params)?;
        Ok(r)
    }

    /// `scale · B A` (out, in) f32 of every adapter, by the name of the weight it adds to.
    pub fn lora_deltas(&self) -> Result<HashMap<String, Delta>> {
        let v = self.lora_values()?;
        let s = self.lora_cfg.scale() as f32;
        let mut out = HashMap::new();
        for e in &self.entries {
            let a = crate::kernels::cpu::gemm::Mat::new(&v[e.a_off..], e.r, e.inp);
            let b = crate::kernels::cpu::gemm::Mat::new(&v[e.b_off..], e.out, e.r);
            let d = crate::kernels::cpu::gemm::product(b, a, s);
            let block = if e.module == "qkv_proj" || e.module == "o_proj" {
                "self_attn"
            } else {
                "mlp"
            };
            out.insert(
                format!("model.layers.{}.{block}.{}.weight", e.layer, e.module),
                (d, e.out, e.inp),
            );
        }
        Ok(out)
    }

    /// Bytes of activations one token keeps through a training forward for its backward
    /// ([`activation_bytes_per_token`] for this model).
    pub fn activation_bytes_per_token(&self, recompute: bool) -> usize {
        activation_bytes_per_token(&self.cfg, self.be.act(), &self.lora_cfg, recompute)
    }

    /// Device bytes a training step of `tokens` tokens (the largest micro-batch) needs on
    /// top of the weights, with or without `recompute`: kept activations, the transients
    /// of one layer's backward (its recomputed activations, the gradients flowing through
    /// it, the `gate_up` gradient), the cross-entropy chunk's logits, and the adapters'
    /// f32 parameters, gradients and AdamW moments.
    pub fn step_bytes(&self, tokens: usize, recompute: bool) -> usize {
        let c = &self.cfg;
        let e = self.be.act().size();
        let kept = tokens * self.activation_bytes_per_token(recompute);
        let one_layer = tokens * layer_saved_bytes(&self.cfg, self.be.act(), &self.lora_cfg);
        let transient = tokens * (4 * c.hidden_size + 4 * c.intermediate_size) * e
            + if recompute { one_layer } else { 0 };
        let logits = tokens.min(8192) * c.vocab_size * e;
        let adapters = self.n_lora * (4 * 4 + e);
        kept + transient + logits + adapters
    }

    /// Builds a batch. `labels` (same length as `ids`, -100 = no loss) is needed for loss
    /// computations; `seq_lengths` (summing to `ids.len()`) splits `ids` into conversations.
    pub fn batch(
        &self,
        ids: &[u32],
        labels: Option<&[i32]>,
        seq_lengths: &[usize],
    ) -> Result<Batch> {
        self.build_batch(ids, labels, seq_lengths, &vec![0; seq_lengths.len()])
    }

    /// A batch that continues cached sequences (generation): segment `i` holds the next
    /// `seq_lengths[i]` tokens of a sequence with `past[i]` tokens already in its cache.
    pub fn batch_after(&self, ids: &[u32], seq_lengths: &[usize], past: &[usize]) -> Result<Batch> {
        if past.len() != seq_lengths.len() {
            return Err(Error::InvalidArgument(format!(
                "{} past lengths for {} segments",
                past.len(),
                seq_lengths.len()
            )));
        }
        self.build_batch(ids, None, seq_lengths, past)
    }

    fn build_batch(
        &self,
        ids: &[u32],
        labels: Option<&[i32]>,
        seq_lengths: &[usize],
        past: &[usize],
    ) -> Result<Batch> {
        let n = ids.len();
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if seq_lengths.iter().sum::<usize>() != n || seq_lengths.contains(&0) {
            return bad(format!(
                "seq_lengths {:?} must be positive and sum to the number of tokens ({n})",
                if seq_lengths.len() > 8 {
                    &seq_lengths[..8]
                } else {
                    seq_lengths
                }
            ));
        }
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return bad(format!(
                "token id {t} is outside the model's vocabulary ({})",
                self.cfg.vocab_size
            ));
        }
        if let Some(l) = labels {
            if l.len() != n {
                return bad(format!("labels has {} entries for {n} tokens", l.len()));
            }
        }
        let mut pos = Vec::with_capacity(n);
        let mut tab = Vec::with_capacity(n);
        let mut segments = Vec::with_capacity(seq_lengths.len());
        let mut start = 0;
        for (&len, &p0) in seq_lengths.iter().zip(past) {
            // LongRoPE picks its factors from the sequence length so far, as transformers
            // does on every forward (also while generating).
            let total = p0 + len;
            let long = self
                .cfg
                .longrope
                .as_ref()
                .is_some_and(|l| total > l.original_max_position_embeddings);
            pos.extend((p0..total).map(|p| p as i32));
            tab.extend(std::iter::repeat_n(i32::from(long), len));
            segments.push((start, len));
            start += len;
        }
        let (mut tpos, mut tgt) = (Vec::new(), Vec::new());
        if let Some(labels) = labels {
            for &(s, len) in &segments {
                for t in s..s + len - 1 {
                    let y = labels[t + 1];
                    if y == -100 {
                        continue;
                    }
                    if y < 0 || y as usize >= self.cfg.vocab_size {
                        return bad(format!(
                            "label {y} at position {} is not a token id nor -100",
                            t + 1
                        ));
                    }
                    tpos.push(t as i32);
                    tgt.push(y);
                }
            }
        }
        let be = &self.be;
        let n_targets = tpos.len();
        let (target_pos, targets) = if labels.is_some() && n_targets > 0 {
            (Some(be.upload_i32(&tpos)?), Some(be.upload_i32(&tgt)?))
        } else {
            (None, None)
        };
        let ids: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        let lay = be.layout(
            segments,
            past.to_vec(),
            self.cfg.sliding_window.unwrap_or(usize::MAX),
            self.heads(),
            RopeSpec {
                pos: &pos,
                tab: &tab,
                inv_freq: &self.inv_freq,
                mscale: self.cfg.attention_factor() as f32,
            },
        )?;
        Ok(Batch {
            ids: be.upload_i32(&ids)?,
            lay,
            target_pos,
            targets,
            n_targets,
        })
    }

    fn step<'a>(&'a self, lora: &'a Buf, layer: usize, dropout_seed: Option<u64>) -> Step<'a> {
        Step {
            be: self.be.as_ref(),
            eps: self.cfg.rms_norm_eps as f32,
            lora,
            layer,
            dropout_seed,
        }
    }

    fn embed(&self, b: &Batch) -> Result<Buf> {
        self.be
            .gather_rows(&self.embed, &b.ids, self.cfg.hidden_size)
    }

    /// The final hidden states (after all layers, before the norm), without gradients.
    fn hidden(&self, b: &Batch, lora: &Buf) -> Result<Buf> {
        let mut x = self.embed(b)?;
        for (l, layer) in self.layers.iter().enumerate() {
            x = layer
                .forward(&self.step(lora, l, None), &x, &b.lay, None, false)?
                .0;
        }
        Ok(x)
    }

    /// An empty KV cache for one sequence of up to `capacity` tokens (it grows if needed).
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        KvCache::new(
            self.be.as_ref(),
            self.layers.len(),
            self.cfg.num_key_value_heads * self.cfg.head_dim,
            capacity,
        )
    }

    /// Generation's forward: runs `b` (built with [`Self::batch_after`], one segment per
    /// cache) through the model, appending keys and values to `caches`, and returns the
    /// logits of each segment's last token (f32, one row of `vocab` per segment).
    pub fn forward_cached(&self, b: &Batch, caches: &mut [&mut KvCache]) -> Result<Vec<Vec<f32>>> {
        let lay = &b.lay;
        if caches.len() != lay.segments.len() {
            return Err(Error::InvalidArgument(format!(
                "{} caches for {} segments",
                caches.len(),
                lay.segments.len()
            )));
        }
        for (c, &p) in caches.iter().zip(&lay.past) {
            if c.len() != p {
                return Err(Error::InvalidArgument(format!(
                    "a cache holds {} tokens but the batch continues after {p}",
                    c.len()
                )));
            }
        }
        let a = self.adapters.read().expect("adapters lock");
        let lora = a.for_layers();
        let mut x = self.embed(b)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let s = self.step(lora, l, None);
            x = layer.forward(&s, &x, lay, Some(&mut *caches), false)?.0;
        }
        for (c, (&(_, len), &p)) in caches.iter_mut().zip(lay.segments.iter().zip(&lay.past)) {
            c.len = p + len;
        }
        let last: Vec<i32> = lay
            .segments
            .iter()
            .map(|&(s, len)| (s + len - 1) as i32)
            .collect();
        let hd = self.cfg.hidden_size;
        let rows = self.be.gather_rows(&x, &self.be.upload_i32(&last)?, hd)?;
        let (h, _) = self
            .be
            .rms_norm(&rows, &self.norm, self.cfg.rms_norm_eps as f32)?;
        let v = self.cfg.vocab_size;
        let logits = self.be.matmul(
            Mat::of(&h, last.len(), hd),
            Mat::of(self.lm_head(), v, hd).t(),
            1.0,
            Dt::F32,
        )?;
        Ok(self
            .be
            .to_f32(&logits)?
            .chunks(v)
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// Logits for every position, `(tokens × vocab)` f32 row-major.
    pub fn logits(&self, b: &Batch) -> Result<Vec<f32>> {
        let a = self.adapters.read().expect("adapters lock");
        let x = self.hidden(b, a.for_layers())?;
        let (h, _) = self
            .be
            .rms_norm(&x, &self.norm, self.cfg.rms_norm_eps as f32)?;
        let (n, hd, v) = (b.n_tokens(), self.cfg.hidden_size, self.cfg.vocab_size);
        let l = self.be.matmul(
            Mat::of(&h, n, hd),
            Mat::of(self.lm_head(), v, hd).t(),
            1.0,
            Dt::F32,
        )?;
        self.be.to_f32(&l)
    }

    /// The summed cross-entropy over the batch's targets, without gradients.
    pub fn loss_sum(&self, b: &Batch) -> Result<f64> {
        let (Some(pos), Some(tgt)) = (&b.target_pos, &b.targets) else {
            return Ok(0.0);
        };
        let a = self.adapters.read().expect("adapters lock");
        let x = self.hidden(b, a.for_layers())?;
        let hd = self.cfg.hidden_size;
        let (h, _) = self
            .be
            .rms_norm(&x, &self.norm, self.cfg.rms_norm_eps as f32)?;
        let rows = self.be.gather_rows(&h, pos, hd)?;
        let mut loss = self.be.zeros(1, Dt::F64)?;
        self.be
            .cross_entropy(&rows, self.lm_head(), tgt, None, &mut loss)?;
        Ok(self.be.to_f64(&loss)?[0])
    }

    /// Forward and backward of `scale × Σ CE` over the batch: adds each adapter
    /// parameter's gradient into `grads` (flat f32, [`Self::lora_layout`]'s offsets) and
    /// the unscaled CE sum into `loss[0]` (an f64 buffer) — both stay on the backend, so a
    /// GPU step needs no host round trip. With `recompute`, each layer's forward runs again
    /// in the backward instead of keeping its activations (same gradients, less memory).
    /// `dropout_seed` draws LoRA dropout.
    pub fn forward_backward(
        &self,
        b: &Batch,
        scale: f64,
        recompute: bool,
        dropout_seed: Option<u64>,
        grads: &mut Buf,
        loss: &mut Buf,
    ) -> Result<()> {
        let (Some(pos), Some(tgt)) = (&b.target_pos, &b.targets) else {
            return Ok(());
        };
        let be = self.be.as_ref();
        let (n, hd) = (b.n_tokens(), self.cfg.hidden_size);
        let eps = self.cfg.rms_norm_eps as f32;
        let a = self.adapters.read().expect("adapters lock");
        let lora = a.for_layers();
        // xs[l]: the input of layer l; the last one the top of the stack.
        let mut xs: Vec<Buf> = vec![self.embed(b)?];
        let mut saved = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let s = self.step(lora, l, dropout_seed);
            let x = xs.last().expect("not empty");
            let (y, sv) = layer.forward(&s, x, &b.lay, None, !recompute)?;
            saved.push(sv);
            xs.push(y);
        }
        // The head: final norm, the target rows, cross-entropy by chunks.
        let top = xs.pop().expect("not empty");
        let (hn, rn) = be.rms_norm(&top, &self.norm, eps)?;
        let rows = be.gather_rows(&hn, pos, hd)?;
        drop(hn);
        let dh = be
            .cross_entropy(&rows, self.lm_head(), tgt, Some(scale as f32), loss)?
            .expect("asked for");
        drop(rows);
        let mut d_hn = be.zeros(n * hd, be.act())?;
        be.scatter_rows(&mut d_hn, pos, &dh, hd)?;
        drop(dh);
        let mut g = be.zeros(n * hd, be.act())?;
        be.rms_norm_bwd(&top, &self.norm, &rn, &d_hn, &mut g, false)?;
        drop((top, d_hn, rn));
        for (l, layer) in self.layers.iter().enumerate().rev() {
            let x = xs.pop().expect("one input per layer");
            let s = self.step(lora, l, dropout_seed);
            let sv = match saved.pop().flatten() {
                Some(sv) => sv,
                None => layer
                    .forward(&s, &x, &b.lay, None, true)?
                    .1
                    .expect("asked for"),
            };
            layer.backward(&s, &x, &sv, &mut g, &b.lay, l > 0, grads)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "reference.rs"]
mod reference;

#[cfg(test)]
pub(crate) mod tests {
    //! The hand-written backward against candle's autograd through the same maths written
    //! with differentiable candle ops (`super::reference`).
    use super::*;
    use crate::kernels::cpu::Cpu;
    use serde_json::json;

    /// A tiny model with GQA and a sliding window, random norm weights and non-zero B (so
    /// every adapter tensor gets a gradient).
    pub(crate) fn tiny(dir: &Path, dropout: f64, be: Arc<dyn Backend>) -> Phi3 {
        let over = json!({"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
                          "sliding_window": 6});
        if !dir.join("config.json").exists() {
            super::super::random::create_random_model(dir, &over, 3, None).unwrap();
        }
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout,
            ..LoraConfig::default()
        };
        let mut m = Phi3::load(dir, lora, 5, be).unwrap();
        let be = m.be.clone();
        for (l, layer) in m.layers.iter_mut().enumerate() {
            let rnd = |seed: u64| -> Vec<f32> {
                super::reference::randn(64, seed)
                    .iter()
                    .map(|v| v + 1.0)
                    .collect()
            };
            layer.input_norm = be.upload_f32(&rnd(10 + l as u64), be.act()).unwrap();
            layer.post_norm = be.upload_f32(&rnd(20 + l as u64), be.act()).unwrap();
        }
        let mut v = m.lora_values().unwrap();
        for (i, (_, shape, off)) in m.lora_layout().into_iter().enumerate() {
            if i % 2 == 1 {
                let n: usize = shape.iter().product();
                let r = super::reference::randn(n, 30 + i as u64);
                for (d, x) in v[off..off + n].iter_mut().zip(r) {
                    *d = 0.1 * x;
                }
            }
        }
        m.set_lora_values(&v).unwrap();
        m
    }

    pub(crate) fn packed_batch(m: &Phi3) -> Batch {
        let lengths = [7usize, 12, 5];
        let n: usize = lengths.iter().sum();
        let ids: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 11) % 300).collect();
        let labels: Vec<i32> = (0..n)
            .map(|i| if i % 5 == 0 { -100 } else { ids[i] as i32 })
            .collect();
        m.batch(&ids, Some(&labels), &lengths).unwrap()
    }

    #[test]
    fn activation_bytes_of_phi3_mini() {
        let tmp = tempfile::tempdir().unwrap();
        let over = json!({"num_hidden_layers": 1, "vocab_size": 10, "hidden_size": 8,
                          "intermediate_size": 8, "num_attention_heads": 2, "num_key_value_heads": 2});
        super::super::random::create_random_model(tmp.path(), &over, 0, None).unwrap();
        let mut cfg = super::super::weights::read_config(tmp.path()).unwrap();
        // Phi-3-mini-4k's dimensions, LoRA r 8 on the four modules, bf16
        (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers,
        ) = (3072, 8192, 32);
        (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        ) = (32, 32, 96);
        let lora = LoraConfig::default();
        // per layer: input 3072 + qkv 9216 + attn 3072 + x1 3072 + gate_up 16384 + 4 × r 8
        // values of 2 bytes, and 32 log-sum-exp floats
        let per_layer = (3072 + 9216 + 3072 + 3072 + 16384 + 32) * 2 + 32 * 4;
        assert_eq!(
            activation_bytes_per_token(&cfg, Dt::BF16, &lora, false),
            32 * per_layer
        );
        assert_eq!(per_layer * 32, 2_234_368); // ≈ 2.1 MiB per token: 9.1 GB for 4096 tokens
        assert_eq!(
            activation_bytes_per_token(&cfg, Dt::BF16, &lora, true),
            32 * 3072 * 2
        );
    }

    #[test]
    fn hand_written_backward_equals_autograd() {
        let tmp = tempfile::tempdir().unwrap();
        let m = tiny(&tmp.path().join("m"), 0.0, Arc::new(Cpu));
        let b = packed_batch(&m);
        let (want_loss, want) = super::reference::loss_and_grads(&m, &b, 0.5);
        for recompute in [false, true] {
            let mut grads = m.be.zeros(m.n_lora(), Dt::F32).unwrap();
            let mut loss = m.be.zeros(1, Dt::F64).unwrap();
            // twice: the second call accumulates into the first's gradients
            for _ in 0..2 {
                m.forward_backward(&b, 0.5, recompute, None, &mut grads, &mut loss)
                    .unwrap();
            }
            let l = m.be.to_f64(&loss).unwrap()[0];
            assert!(
                (l - 2.0 * want_loss).abs() < 1e-5 * want_loss.abs(),
                "{l} vs {want_loss}"
            );
            let g = m.be.to_f32(&grads).unwrap();
            for (name, shape, off) in m.lora_layout() {
                let n: usize = shape.iter().product();
                let (got, want) = (&g[off..off + n], &want[&name]);
                let size = want.iter().fold(0f32, |a, &b| a.max(b.abs()));
                assert!(size > 0.0, "{name} got no gradient");
                let d = got
                    .iter()
                    .zip(want)
                    .fold(0f32, |a, (&x, &y)| a.max((x - 2.0 * y).abs()));
                assert!(
                    d <= 2e-4 * size,
                    "{name} (recompute {recompute}): {d} of {size}"
                );
            }
        }
    }

    #[test]
    fn dropout_is_reproducible_and_recompute_sees_the_same_masks() {
        let tmp = tempfile::tempdir().unwrap();
        let m = tiny(&tmp.path().join("m"), 0.25, Arc::new(Cpu));
        let b = packed_batch(&m);
        let run = |recompute: bool, seed: u64| {
            let mut grads = m.be.zeros(m.n_lora(), Dt::F32).unwrap();
            let mut loss = m.be.zeros(1, Dt::F64).unwrap();
            m.forward_backward(&b, 1.0, recompute, Some(seed), &mut grads, &mut loss)
                .unwrap();
            (m.be.to_f64(&loss).unwrap()[0], m.be.to_f32(&grads).unwrap())
        };
        let (l1, g1) = run(false, 7);
        let (l2, g2) = run(true, 7);
        assert_eq!(l1, l2);
        assert_eq!(g1, g2, "recompute draws the same masks, bit for bit");
        let (l3, _) = run(false, 8);
        assert_ne!(l1, l3, "another seed, another mask");
        let (l0, _) = {
            let m0 = tiny(&tmp.path().join("m"), 0.0, Arc::new(Cpu));
            let b0 = packed_batch(&m0);
            let mut grads = m0.be.zeros(m0.n_lora(), Dt::F32).unwrap();
            let mut loss = m0.be.zeros(1, Dt::F64).unwrap();
            m0.forward_backward(&b0, 1.0, false, Some(7), &mut grads, &mut loss)
                .unwrap();
            (m0.be.to_f64(&loss).unwrap()[0], ())
        };
        assert_ne!(l0, l1, "dropout changes the loss");
    }
}
