//! Our Phi-3 (training-capable: all positions, packed segments, LoRA, explicit backward).
//!
//! Activations are 2-D `(tokens, hidden)` for the whole flat batch; attention runs per
//! segment (one conversation), so packed rows cost no padding and no cross-talk. The
//! backward runs layer by layer: each layer's input is a leaf, its output gradient comes
//! from the layer above, so per-layer activation recompute uses the very same code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Result as CResult, Tensor, Var};
use candle_nn::kv_cache::KvCache;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::attention;
use super::config::Phi3Config;
use super::layer_cpu;
use super::lora::{peft_key, Linear, Lora, LoraConfig};
use super::ops;
use super::weights::Weights;
use crate::error::{Error, Result};

/// One decoder layer.
pub struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    qkv: Linear,
    o: Linear,
    gate_up: Linear,
    down: Linear,
}

impl Layer {
    fn linears(&self) -> [(&'static str, &Linear); 4] {
        [
            ("qkv_proj", &self.qkv),
            ("o_proj", &self.o),
            ("gate_up_proj", &self.gate_up),
            ("down_proj", &self.down),
        ]
    }
}

/// A flat batch: token ids, segments, the RoPE tables and masks they need, and targets.
///
/// In generation a segment continues a cached sequence: `past[i]` tokens of segment `i`
/// are already in its KV cache, so its positions start there.
pub struct Batch {
    ids: Tensor,
    /// Segments, past lengths, RoPE tables and masks (see [`attention::Layout`]).
    attn: Arc<attention::Layout>,
    /// Positions that have a target, and the targets (both u32).
    target_pos: Option<Tensor>,
    targets: Option<Tensor>,
    n_targets: usize,
}

impl Batch {
    pub fn n_tokens(&self) -> usize {
        self.attn.segments.iter().map(|s| s.1).sum()
    }
    pub fn n_targets(&self) -> usize {
        self.n_targets
    }
}

/// One sequence's KV cache for generation: per layer, keys and values of shape
/// (kv_heads, tokens, head_dim), preallocated and filled in place.
pub struct SeqCache {
    layers: Vec<KvCache>,
}

impl SeqCache {
    /// Appends layer `l`'s keys and values (kv heads, tokens, dim); returns all cached.
    pub(super) fn append(&mut self, l: usize, k: &Tensor, v: &Tensor) -> CResult<(Tensor, Tensor)> {
        self.layers[l].append(k, v)
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .map_or(0, |c| c.k_cache().current_seq_len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Phi-3 with frozen base weights and LoRA adapters.
pub struct Phi3 {
    pub cfg: Phi3Config,
    pub lora_cfg: LoraConfig,
    pub folder: PathBuf,
    device: Device,
    dtype: DType,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
}

fn seed_mix(seed: u64, a: u64, b: u64) -> u64 {
    // splitmix64 over the three parts: distinct, well-spread seeds per (layer, module).
    let mut z =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Phi3 {
    /// Loads the base weights from `folder` (config.json + safetensors) in `dtype` on
    /// `device` and creates fresh adapters from `seed`.
    pub fn load(
        folder: &Path,
        lora_cfg: LoraConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        lora_cfg.validate()?;
        Self::load_unchecked(folder, lora_cfg, seed, device, dtype)
    }

    /// Loads the base weights only, without adapters (a merged model, for generation).
    pub fn load_frozen(folder: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let none = LoraConfig {
            target_modules: vec![],
            ..LoraConfig::default()
        };
        Self::load_unchecked(folder, none, 0, device, dtype)
    }

    fn load_unchecked(
        folder: &Path,
        lora_cfg: LoraConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        crate::tune_allocator_for_training();
        let cfg = super::weights::read_config(folder)?;
        let w = Weights::open(folder)?;
        let (h, v, i) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let get = |name: &str, shape: &[usize]| w.get(name, shape, dtype, device);
        let embed = get("model.embed_tokens.weight", &[v, h])?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            let mut lin = |module: &str, block: &str| -> Result<Linear> {
                let (out, inp) = cfg.linear_shape(module).expect("known module");
                let weight = get(&format!("{p}{block}.{module}.weight"), &[out, inp])?;
                let lora = if lora_cfg.target_modules.iter().any(|m| m == module) {
                    Some(Lora::init(
                        lora_cfg.r, out, inp, &lora_cfg, &mut rng, device,
                    )?)
                } else {
                    None
                };
                Ok(Linear { weight, lora })
            };
            let qkv = lin("qkv_proj", "self_attn")?;
            let o = lin("o_proj", "self_attn")?;
            let gate_up = lin("gate_up_proj", "mlp")?;
            let down = lin("down_proj", "mlp")?;
            layers.push(Layer {
                input_norm: get(&format!("{p}input_layernorm.weight"), &[h])?,
                post_norm: get(&format!("{p}post_attention_layernorm.weight"), &[h])?,
                qkv,
                o,
                gate_up,
                down,
            });
        }
        let _ = i;
        let norm = get("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight", &[v, h])?
        };
        Ok(Self {
            cfg,
            lora_cfg,
            folder: folder.to_path_buf(),
            device: device.clone(),
            dtype,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every adapter tensor with its PEFT name, in a fixed order (layer, module, A then B).
    pub fn lora_params(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for (module, lin) in layer.linears() {
                if let Some(lora) = &lin.lora {
                    out.push((peft_key(l, module, "A"), &lora.a));
                    out.push((peft_key(l, module, "B"), &lora.b));
                }
            }
        }
        out
    }

    /// Layer `l`'s adapters, in the same order as [`Self::lora_params`].
    fn layer_params(&self, l: usize) -> Vec<&Var> {
        let mut out = Vec::new();
        for (_, lin) in self.layers[l].linears() {
            if let Some(lora) = &lin.lora {
                out.push(&lora.a);
                out.push(&lora.b);
            }
        }
        out
    }

    /// Each linear's adapter, for merging and export: (layer, module, base weight, adapter).
    pub fn adapters(&self) -> Vec<(usize, &'static str, &Tensor, &Lora)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for (module, lin) in layer.linears() {
                if let Some(lora) = &lin.lora {
                    out.push((l, module, &lin.weight, lora));
                }
            }
        }
        out
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
        let half = self.cfg.head_dim / 2;
        let attn = self.cfg.attention_factor() as f32;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        let mut segments = Vec::with_capacity(seq_lengths.len());
        let mut freqs: HashMap<bool, Vec<f32>> = HashMap::new();
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
            let inv = freqs
                .entry(long)
                .or_insert_with(|| self.inv_freq_f32(total));
            for p in p0..total {
                for &f in inv.iter() {
                    // f32 like transformers: angle = inv_freq * position, then cos/sin.
                    let a = f * p as f32;
                    cos.push(a.cos() * attn);
                    sin.push(a.sin() * attn);
                }
            }
            segments.push((start, len));
            start += len;
        }
        let dev = &self.device;
        let cos = Tensor::from_vec(cos, (n, half), dev)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (n, half), dev)?.to_dtype(self.dtype)?;
        let mut masks = HashMap::new();
        for (&(_, len), &p0) in segments.iter().zip(past) {
            if let std::collections::hash_map::Entry::Vacant(e) = masks.entry((len, p0)) {
                e.insert(self.mask(len, p0)?);
            }
        }
        let (mut pos, mut tgt) = (Vec::new(), Vec::new());
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
                    pos.push(t as u32);
                    tgt.push(y as u32);
                }
            }
        }
        let n_targets = pos.len();
        let (target_pos, targets) = if labels.is_some() && n_targets > 0 {
            (
                Some(Tensor::from_vec(pos, n_targets, dev)?),
                Some(Tensor::from_vec(tgt, n_targets, dev)?),
            )
        } else {
            (None, None)
        };
        Ok(Batch {
            ids: Tensor::from_slice(ids, n, dev)?,
            attn: Arc::new(attention::Layout {
                segments,
                past: past.to_vec(),
                cos,
                sin,
                masks,
                window: self.cfg.sliding_window.unwrap_or(usize::MAX),
            }),
            target_pos,
            targets,
            n_targets,
        })
    }

    /// Inverse frequencies in f32, computed the way transformers does
    /// (`1 / (factor * base ** (arange(0, d, 2) / d))` in float32).
    fn inv_freq_f32(&self, len: usize) -> Vec<f32> {
        let d = self.cfg.head_dim;
        let base = self.cfg.rope_theta as f32;
        (0..d / 2)
            .map(|i| {
                let e = (2 * i) as f32 / d as f32;
                let p = base.powf(e);
                let factor = match &self.cfg.longrope {
                    Some(l) if len > l.original_max_position_embeddings => l.long_factor[i] as f32,
                    Some(l) => l.short_factor[i] as f32,
                    None => 1.0,
                };
                1.0 / (factor * p)
            })
            .collect()
    }

    /// Additive causal mask (len, past + len) in f32 for queries at positions
    /// `past..past + len`, with the sliding window when configured (key k visible from
    /// query q iff k <= q and q - k < window, as transformers). `None` when nothing is
    /// masked (one query that sees every cached key).
    fn mask(&self, len: usize, past: usize) -> CResult<Option<Tensor>> {
        let w = self.cfg.sliding_window.unwrap_or(usize::MAX);
        let total = past + len;
        if len == 1 && total <= w {
            return Ok(None);
        }
        let v: Vec<f32> = (past..total)
            .flat_map(|q| {
                (0..total).map(move |k| {
                    if k <= q && q - k < w {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        Tensor::from_vec(v, (len, total), &self.device).map(Some)
    }

    fn embed(&self, batch: &Batch) -> CResult<Tensor> {
        self.embed.index_select(&batch.ids, 0)
    }

    /// One decoder layer. `grad` false runs without a graph (LoRA weights detached).
    /// With `caches` (one per segment, generation), each segment's keys and values are
    /// appended to its cache and its queries attend to everything cached so far.
    fn layer(
        &self,
        l: usize,
        x: &Tensor,
        b: &Batch,
        grad: bool,
        seed: Option<u64>,
        caches: Option<&mut [&mut SeqCache]>,
    ) -> CResult<Tensor> {
        let layer = &self.layers[l];
        let cfg = &self.cfg;
        let eps = cfg.rms_norm_eps;
        let lin = |lin: &Linear, x: &Tensor, k: u64| -> CResult<Tensor> {
            let s = seed.map(|s| seed_mix(s, l as u64, k));
            if grad {
                lin.forward(x, s)
            } else {
                lin.forward_detached(x, s)
            }
        };
        let h = ops::rms_norm(x, &layer.input_norm, eps)?;
        let qkv = lin(&layer.qkv, &h, 0)?;
        let heads = attention::Heads {
            q: cfg.num_attention_heads,
            kv: cfg.num_key_value_heads,
            dim: cfg.head_dim,
            dtype: self.dtype,
        };
        let attn = attention::attention(&qkv, heads, &b.attn, caches, l)?;
        let x = (x + lin(&layer.o, &attn, 1)?)?;
        let h = ops::rms_norm(&x, &layer.post_norm, eps)?;
        let gu = lin(&layer.gate_up, &h, 2)?;
        let act = ops::swiglu(&gu)?;
        x + lin(&layer.down, &act, 3)?
    }

    /// The final hidden states (after all layers, before the norm), without a graph.
    fn hidden(&self, b: &Batch) -> CResult<Tensor> {
        let mut x = self.embed(b)?;
        for l in 0..self.layers.len() {
            x = self.layer(l, &x, b, false, None, None)?;
        }
        Ok(x)
    }

    /// An empty KV cache for one sequence of up to `capacity` tokens (it grows if needed).
    pub fn new_cache(&self, capacity: usize) -> SeqCache {
        SeqCache {
            layers: (0..self.layers.len())
                .map(|_| KvCache::new(1, capacity.max(1)))
                .collect(),
        }
    }

    /// Generation's forward: runs `b` (built with [`Self::batch_after`], one segment per
    /// cache) through the model, appending keys and values to `caches`, and returns the
    /// logits of each segment's last token, (segments, vocab) in f32.
    pub fn forward_cached(&self, b: &Batch, caches: &mut [&mut SeqCache]) -> Result<Tensor> {
        if caches.len() != b.attn.segments.len() {
            return Err(Error::InvalidArgument(format!(
                "{} caches for {} segments",
                caches.len(),
                b.attn.segments.len()
            )));
        }
        for (c, &p) in caches.iter().zip(&b.attn.past) {
            if c.len() != p {
                return Err(Error::InvalidArgument(format!(
                    "a cache holds {} tokens but the batch continues after {p}",
                    c.len()
                )));
            }
        }
        let mut x = self.embed(b)?;
        for l in 0..self.layers.len() {
            x = self.layer(l, &x, b, false, None, Some(&mut *caches))?;
        }
        let last: Vec<u32> = b
            .attn
            .segments
            .iter()
            .map(|&(s, len)| (s + len - 1) as u32)
            .collect();
        let last = Tensor::from_vec(last, b.attn.segments.len(), &self.device)?;
        let h = ops::rms_norm(
            &x.index_select(&last, 0)?,
            &self.norm,
            self.cfg.rms_norm_eps,
        )?;
        Ok(super::skinny::matmul_t(&h, &self.lm_head)?.to_dtype(DType::F32)?)
    }

    /// Logits for every position (tokens, vocab), f32.
    pub fn logits(&self, b: &Batch) -> Result<Tensor> {
        let x = self.hidden(b)?;
        let h = ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?;
        Ok(ops::frozen_linear(&h, &self.lm_head)?.to_dtype(DType::F32)?)
    }

    /// The summed cross-entropy over the batch's targets, without gradients.
    pub fn loss_sum(&self, b: &Batch) -> Result<f64> {
        let (Some(pos), Some(tgt)) = (&b.target_pos, &b.targets) else {
            return Ok(0.0);
        };
        let x = self.hidden(b)?;
        let h = ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?.index_select(pos, 0)?;
        let (_, raw) = ops::linear_cross_entropy(&h, &self.lm_head, tgt, 1.0, false)?;
        Ok(raw)
    }

    /// Forward and backward of `scale × Σ CE` over the batch; adds each adapter tensor's
    /// gradient into `grads` (ordered as [`Self::lora_params`]) and returns the unscaled
    /// CE sum. With `recompute`, layer activations are recomputed during the backward
    /// instead of kept (same gradients, less memory). `dropout_seed` draws LoRA dropout.
    ///
    /// On the CPU in f32 this runs [`super::layer_cpu`]'s hand-written backward; elsewhere
    /// candle's autograd ([`Self::forward_backward_graph`]). `FERROTUNE_AUTOGRAD=1` forces
    /// the autograd path on the CPU too (to compare the two, and as a fallback).
    pub fn forward_backward(
        &self,
        b: &Batch,
        scale: f64,
        recompute: bool,
        dropout_seed: Option<u64>,
        grads: &mut [Option<Tensor>],
    ) -> Result<f64> {
        let forced = std::env::var_os("FERROTUNE_AUTOGRAD").is_some_and(|v| v == "1");
        if self.device.is_cpu() && self.dtype == DType::F32 && !forced {
            self.forward_backward_cpu(b, scale, recompute, dropout_seed, grads)
        } else {
            self.forward_backward_graph(b, scale, recompute, dropout_seed, grads)
        }
    }

    /// Layer `l`'s weights as [`super::layer_cpu`] reads them (CPU, f32).
    fn layer_cpu_weights(&self, l: usize, seed: Option<u64>) -> CResult<layer_cpu::LayerW<'_>> {
        use layer_cpu::f32_view;
        let layer = &self.layers[l];
        let seed = |k: u64| seed.map(|s| seed_mix(s, l as u64, k));
        Ok(layer_cpu::LayerW {
            input_norm: f32_view(&layer.input_norm)?,
            post_norm: f32_view(&layer.post_norm)?,
            qkv: layer.qkv.cpu_view(seed(0))?,
            o: layer.o.cpu_view(seed(1))?,
            gate_up: layer.gate_up.cpu_view(seed(2))?,
            down: layer.down.cpu_view(seed(3))?,
            eps: self.cfg.rms_norm_eps as f32,
            heads: attention::Heads {
                q: self.cfg.num_attention_heads,
                kv: self.cfg.num_key_value_heads,
                dim: self.cfg.head_dim,
                dtype: self.dtype,
            },
        })
    }

    /// [`Self::forward_backward`] on the CPU in f32, without a graph.
    fn forward_backward_cpu(
        &self,
        b: &Batch,
        scale: f64,
        recompute: bool,
        dropout_seed: Option<u64>,
        grads: &mut [Option<Tensor>],
    ) -> Result<f64> {
        use layer_cpu::f32_view;
        let (Some(pos), Some(tgt)) = (&b.target_pos, &b.targets) else {
            return Ok(0.0);
        };
        let (n, hd) = (b.n_tokens(), self.cfg.hidden_size);
        let weights = (0..self.layers.len())
            .map(|l| self.layer_cpu_weights(l, dropout_seed))
            .collect::<CResult<Vec<_>>>()?;
        // xs[l]: the input of layer l; the last one the top of the stack.
        let mut xs: Vec<Vec<f32>> = vec![self.embed(b)?.flatten_all()?.to_vec1::<f32>()?];
        let mut saved = Vec::with_capacity(weights.len());
        for w in &weights {
            let (y, s) = w.forward(xs.last().expect("not empty"), n, &b.attn)?;
            saved.push((!recompute).then_some(s));
            xs.push(y);
        }
        // The head: final norm, the target rows, cross-entropy by chunks.
        let top = xs.pop().expect("not empty");
        let norm = f32_view(&self.norm)?;
        let (hn, rn) = layer_cpu::rms_norm(&top, norm.get(), self.cfg.rms_norm_eps as f32);
        let (pos, tgt) = (pos.to_vec1::<u32>()?, tgt.to_vec1::<u32>()?);
        let mut rows = Vec::with_capacity(pos.len() * hd);
        for &p in &pos {
            rows.extend_from_slice(&hn[p as usize * hd..][..hd]);
        }
        drop(hn);
        let lm = f32_view(&self.lm_head)?;
        let vocab = self.cfg.vocab_size;
        let mut d_hn = vec![0f32; n * hd];
        let mut raw = 0f64;
        for (c, (hc, tc)) in rows
            .chunks(ops::CE_CHUNK * hd)
            .zip(tgt.chunks(ops::CE_CHUNK))
            .enumerate()
        {
            let (sum, dh) =
                ops::ce_chunk_rows(hc, lm.get(), (tc.len(), hd, vocab), tc, scale as f32, true)?;
            raw += sum;
            let dh = dh.expect("asked for");
            // Each position has at most one target: the rows are written, not added.
            for (i, d) in dh.chunks(hd).enumerate() {
                let p = pos[c * ops::CE_CHUNK + i] as usize;
                d_hn[p * hd..][..hd].copy_from_slice(d);
            }
        }
        if !raw.is_finite() {
            return Ok(raw);
        }
        drop(rows);
        let mut g = vec![0f32; n * hd];
        layer_cpu::rms_norm_backward_add(&top, &rn, norm.get(), &d_hn, &mut g);
        drop((top, d_hn));
        let mut offset = grads.len();
        for (l, w) in weights.iter().enumerate().rev() {
            let x = xs.pop().expect("one input per layer");
            let s = match saved.pop().flatten() {
                Some(s) => s,
                None => w.forward(&x, n, &b.attn)?.1,
            };
            let layer_grads = w.backward(&x, &s, &mut g, n, &b.attn, l > 0)?;
            let params = self.layer_params(l);
            offset -= params.len();
            for ((slot, var), gv) in grads[offset..].iter_mut().zip(params).zip(layer_grads) {
                let gv = Tensor::from_vec(gv, var.shape(), &self.device)?;
                *slot = Some(match slot.take() {
                    None => gv,
                    Some(acc) => (acc + gv)?,
                });
            }
        }
        Ok(raw)
    }

    /// [`Self::forward_backward`] through candle's autograd: each layer's input is a leaf
    /// of its own graph (see the module doc).
    fn forward_backward_graph(
        &self,
        b: &Batch,
        scale: f64,
        recompute: bool,
        dropout_seed: Option<u64>,
        grads: &mut [Option<Tensor>],
    ) -> Result<f64> {
        let (Some(pos), Some(tgt)) = (&b.target_pos, &b.targets) else {
            return Ok(0.0);
        };
        let n_layers = self.layers.len();
        let mut inputs: Vec<Option<Var>> = Vec::with_capacity(n_layers);
        let mut outputs: Vec<Tensor> = Vec::with_capacity(n_layers);
        let mut x = self.embed(b)?;
        for l in 0..n_layers {
            // Layer 0's input is the frozen embedding: it needs no gradient.
            let leaf = if l == 0 {
                None
            } else {
                Some(Var::from_tensor(&x)?)
            };
            let input = leaf.as_ref().map_or(&x, |v| v.as_tensor());
            if recompute {
                let out = self.layer(l, input, b, false, dropout_seed, None)?;
                inputs.push(leaf);
                x = out;
            } else {
                let out = self.layer(l, input, b, true, dropout_seed, None)?;
                inputs.push(leaf);
                x = out.detach();
                outputs.push(out);
            }
        }
        let first_input = if recompute {
            Some(self.embed(b)?)
        } else {
            None
        };
        let top = Var::from_tensor(&x)?;
        let h = ops::rms_norm(top.as_tensor(), &self.norm, self.cfg.rms_norm_eps)?
            .index_select(pos, 0)?;
        let (loss, raw) = ops::linear_cross_entropy(&h, &self.lm_head, tgt, scale, true)?;
        if !raw.is_finite() {
            return Ok(raw);
        }
        let mut store = loss.backward()?;
        let mut g = store.remove(top.as_tensor()).ok_or_else(|| {
            Error::Training("internal: no gradient reached the last layer".into())
        })?;
        drop(store);
        let offsets: Vec<usize> = (0..n_layers)
            .scan(0, |acc, l| {
                let o = *acc;
                *acc += self.layer_params(l).len();
                Some(o)
            })
            .collect();
        for l in (0..n_layers).rev() {
            let out = if recompute {
                let input = match &inputs[l] {
                    Some(v) => v.as_tensor().clone(),
                    None => first_input.clone().expect("set with recompute"),
                };
                self.layer(l, &input, b, true, dropout_seed, None)?
            } else {
                outputs.pop().expect("one output per layer")
            };
            let store = (out * &g)?.sum_all()?.backward()?;
            for (j, var) in self.layer_params(l).into_iter().enumerate() {
                if let Some(gv) = store.get(var.as_tensor()) {
                    let slot = &mut grads[offsets[l] + j];
                    *slot = Some(match slot.take() {
                        None => gv.clone(),
                        Some(acc) => (acc + gv)?,
                    });
                }
            }
            if let Some(v) = &inputs[l] {
                g = store.get(v.as_tensor()).cloned().ok_or_else(|| {
                    Error::Training(format!("internal: no gradient reached layer {l}"))
                })?;
            }
        }
        Ok(raw)
    }
}

impl Linear {
    /// This projection as [`layer_cpu`] reads it (CPU, f32), with its dropout seed.
    fn cpu_view(&self, seed: Option<u64>) -> CResult<layer_cpu::Lin<'_>> {
        use layer_cpu::f32_view;
        let (out, inp) = self.weight.dims2()?;
        let lora = match &self.lora {
            None => None,
            Some(a) => Some(layer_cpu::LoraW {
                a: f32_view(a.a.as_tensor())?,
                b: f32_view(a.b.as_tensor())?,
                r: a.a.dim(0)?,
                scale: a.scale as f32,
                dropout: a.dropout,
            }),
        };
        Ok(layer_cpu::Lin {
            w: f32_view(&self.weight)?,
            out,
            inp,
            lora,
            seed,
        })
    }

    /// Forward with the adapter's weights detached (no graph).
    pub fn forward_detached(&self, x: &Tensor, dropout_seed: Option<u64>) -> CResult<Tensor> {
        let y = super::skinny::matmul_t(x, &self.weight)?;
        match &self.lora {
            None => Ok(y),
            Some(l) => {
                let dtype = x.dtype();
                let mut xf = x.to_dtype(DType::F32)?;
                if let (Some(seed), true) = (dropout_seed, l.dropout > 0.0) {
                    xf = xf.broadcast_mul(&super::lora::dropout_mask(
                        xf.dims(),
                        l.dropout,
                        seed,
                        xf.device(),
                    )?)?;
                }
                let d = (xf.matmul(&l.a.as_detached_tensor().t()?)? * l.scale)?
                    .matmul(&l.b.as_detached_tensor().t()?)?;
                y + d.to_dtype(dtype)?
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{max_abs, max_diff, randn};
    use serde_json::json;

    /// A tiny model with GQA and a sliding window, random norm weights and non-zero B (so
    /// every adapter tensor gets a gradient), LoRA dropout on.
    fn tiny(dir: &Path) -> Phi3 {
        let over = json!({"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
                          "sliding_window": 6});
        super::super::random::create_random_model(dir, &over, 3, None).unwrap();
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.25,
            ..LoraConfig::default()
        };
        let mut m = Phi3::load(dir, lora, 5, &Device::Cpu, DType::F32).unwrap();
        for (l, layer) in m.layers.iter_mut().enumerate() {
            layer.input_norm = (randn(&[64], 10 + l as u64) + 1.0).unwrap();
            layer.post_norm = (randn(&[64], 20 + l as u64) + 1.0).unwrap();
        }
        for (i, (_, var)) in m.lora_params().into_iter().enumerate() {
            if i % 2 == 1 {
                var.set(&(randn(var.dims(), 30 + i as u64) * 0.1).unwrap())
                    .unwrap();
            }
        }
        m
    }

    #[test]
    fn hand_written_cpu_backward_equals_autograd() {
        let tmp = tempfile::tempdir().unwrap();
        let m = tiny(&tmp.path().join("m"));
        let lengths = [7usize, 12, 5];
        let n: usize = lengths.iter().sum();
        let ids: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 11) % 300).collect();
        let labels: Vec<i32> = (0..n)
            .map(|i| if i % 5 == 0 { -100 } else { ids[i] as i32 })
            .collect();
        let b = m.batch(&ids, Some(&labels), &lengths).unwrap();
        let params = m.lora_params().len();
        for recompute in [false, true] {
            let run = |cpu: bool| {
                let mut grads = vec![None; params];
                let mut loss = 0.0;
                // twice: the second call accumulates into the first's gradients
                for seed in [Some(7), Some(8)] {
                    loss += if cpu {
                        m.forward_backward_cpu(&b, 0.5, recompute, seed, &mut grads)
                    } else {
                        m.forward_backward_graph(&b, 0.5, recompute, seed, &mut grads)
                    }
                    .unwrap();
                }
                (loss, grads)
            };
            let ((l_cpu, g_cpu), (l_graph, g_graph)) = (run(true), run(false));
            assert!(
                (l_cpu - l_graph).abs() < 1e-5 * l_graph.abs(),
                "{l_cpu} vs {l_graph}"
            );
            for (i, (a, b)) in g_cpu.iter().zip(&g_graph).enumerate() {
                let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
                let size = max_abs(b);
                assert!(size > 0.0, "parameter {i} got no gradient");
                let d = max_diff(a, b);
                assert!(
                    d <= 1e-4 * size,
                    "parameter {i} (recompute {recompute}): {d} of {size}"
                );
            }
        }
    }
}

#[cfg(test)]
mod bf16_tests {
    //! CUDA training runs the autograd path with bf16 base weights and f32 adapters. Its
    //! dtype handling (casts around the adapters, the f32 loss, the composed attention)
    //! runs here on the CPU, where candle also has bf16 kernels, against the f32 model.
    use super::*;
    use serde_json::json;

    #[test]
    fn bf16_base_weights_train_and_generate_like_f32() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let over = json!({"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300});
        super::super::random::create_random_model(&dir, &over, 4, None).unwrap();
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            ..LoraConfig::default()
        };
        let load = |dtype| {
            let m = Phi3::load(&dir, lora.clone(), 6, &Device::Cpu, dtype).unwrap();
            for (i, (_, var)) in m.lora_params().into_iter().enumerate() {
                if i % 2 == 1 {
                    let v = crate::model::ops::tests::randn(var.dims(), 40 + i as u64);
                    var.set(&(v * 0.1).unwrap()).unwrap();
                }
            }
            m
        };
        let (m32, m16) = (load(DType::F32), load(DType::BF16));
        let lengths = [9usize, 14];
        let ids: Vec<u32> = (0..23u32).map(|i| (i * 41 + 3) % 300).collect();
        let labels: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        let run = |m: &Phi3| {
            let b = m.batch(&ids, Some(&labels), &lengths).unwrap();
            let mut grads = vec![None; m.lora_params().len()];
            let loss = m
                .forward_backward(&b, 1.0, false, None, &mut grads)
                .unwrap();
            (loss, grads)
        };
        let ((l32, g32), (l16, g16)) = (run(&m32), run(&m16));
        assert!((l32 - l16).abs() < 0.02 * l32.abs(), "loss {l32} vs {l16}");
        for (i, (a, b)) in g32.iter().zip(&g16).enumerate() {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            assert_eq!(b.dtype(), DType::F32, "adapter gradients stay f32");
            let size = crate::model::ops::tests::max_abs(a);
            let d = crate::model::ops::tests::max_diff(a, b);
            assert!(d <= 0.05 * size, "parameter {i}: {d} of {size}");
        }
        // generation's cached forward: the same next token from both
        let next = |m: &Phi3| {
            let mut cache = m.new_cache(32);
            let b = m.batch_after(&ids[..9], &[9], &[0]).unwrap();
            let logits = m.forward_cached(&b, &mut [&mut cache]).unwrap();
            assert_eq!(logits.dtype(), DType::F32);
            logits.argmax(1).unwrap().to_vec1::<u32>().unwrap()
        };
        assert_eq!(next(&m32), next(&m16));
    }
}
