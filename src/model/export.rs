//! Reading and writing adapters and merged models in the formats PEFT and transformers load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, TensorView};

use super::lora::LoraConfig;
use super::phi3::Phi3;
use super::weights::{Weights, SIDE_FILES};
use crate::error::{Error, IoContext, Result};

/// A tensor's bytes as safetensors stores them (little endian).
fn tensor_bytes(t: &Tensor) -> Result<(StDtype, Vec<usize>, Vec<u8>)> {
    let t = t.to_device(&candle_core::Device::Cpu)?.flatten_all()?;
    let shape = t.dims().to_vec();
    let (dtype, bytes) = match t.dtype() {
        DType::F32 => (
            StDtype::F32,
            t.to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            StDtype::BF16,
            t.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_bits().to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            StDtype::F16,
            t.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_bits().to_le_bytes())
                .collect(),
        ),
        other => return Err(Error::Model(format!("cannot export a {other:?} tensor"))),
    };
    Ok((dtype, shape, bytes))
}

/// Writes `tensors` to `path` as safetensors (with `format: pt` metadata, which
/// transformers requires), under a temporary name first.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (dtype, _, bytes) = tensor_bytes(t)?;
        owned.push((name.clone(), dtype, t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Model(e.to_string()))
        })
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let pending = crate::data::pending_file::PendingFile::new(path.to_path_buf());
    safetensors::serialize_to_file(views, Some(meta), &pending.tmp)
        .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
    pending.commit()?;
    Ok(())
}

/// A folder built under a temporary name and renamed into place when complete; an
/// existing folder of that name is replaced.
pub struct PendingDir {
    pub tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl PendingDir {
    pub fn new(dest: &Path) -> Result<Self> {
        let parent = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).at(parent)?;
        let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        let tmp = parent.join(format!(".{name}.{}.tmp", crate::hub::cache::random_hex8()));
        std::fs::create_dir_all(&tmp).at(&tmp)?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            done: false,
        })
    }

    pub fn commit(mut self) -> Result<PathBuf> {
        if self.dest.exists() {
            // Move the old one aside first so the final name is never half-replaced.
            let old = self.tmp.with_extension("old");
            std::fs::rename(&self.dest, &old).at(&self.dest)?;
            std::fs::rename(&self.tmp, &self.dest).at(&self.dest)?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.tmp, &self.dest).at(&self.dest)?;
        }
        self.done = true;
        Ok(self.dest.clone())
    }
}

impl Drop for PendingDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// PEFT's `adapter_config.json` for `cfg`.
pub fn adapter_config_json(cfg: &LoraConfig, base_model: &str) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
        "revision": null,
    })
}

/// Reads the LoRA settings of a PEFT adapter folder.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).at(&path)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Model(format!("{}: not valid JSON ({e})", path.display())))?;
    let bad = |m: &str| Error::Model(format!("{}: {m}", path.display()));
    if v.get("peft_type")
        .and_then(|t| t.as_str())
        .is_some_and(|t| t != "LORA")
    {
        return Err(bad("not a LoRA adapter (peft_type is not LORA)"));
    }
    if v.get("use_dora").and_then(|t| t.as_bool()) == Some(true) {
        return Err(bad("DoRA adapters are not supported"));
    }
    let targets = match v.get("target_modules") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect(),
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        _ => return Err(bad("target_modules is missing")),
    };
    Ok(LoraConfig {
        r: v.get("r")
            .and_then(|r| r.as_u64())
            .ok_or_else(|| bad("r is missing"))? as usize,
        alpha: v
            .get("lora_alpha")
            .and_then(|r| r.as_f64())
            .ok_or_else(|| bad("lora_alpha is missing"))?,
        dropout: v
            .get("lora_dropout")
            .and_then(|r| r.as_f64())
            .unwrap_or(0.0),
        target_modules: targets,
        use_rslora: v
            .get("use_rslora")
            .and_then(|r| r.as_bool())
            .unwrap_or(false),
    })
}

impl Phi3 {
    /// The adapter tensors by PEFT name, f32 on the host.
    pub fn lora_state(&self) -> Result<Vec<(String, Tensor)>> {
        let v = self.lora_values()?;
        self.lora_layout()
            .into_iter()
            .map(|(name, shape, off)| {
                let n: usize = shape.iter().product();
                let t = Tensor::from_vec(v[off..off + n].to_vec(), shape, &Device::Cpu)?;
                Ok((name, t))
            })
            .collect()
    }

    /// Sets adapter tensors by PEFT name; every name must be known, shapes must match and
    /// with `complete` every adapter tensor must be given.
    pub fn set_lora_state(&self, state: &HashMap<String, Tensor>, complete: bool) -> Result<()> {
        let layout = self.lora_layout();
        let known: HashMap<&str, &Vec<usize>> =
            layout.iter().map(|(n, s, _)| (n.as_str(), s)).collect();
        for name in state.keys() {
            if !known.contains_key(name.as_str()) {
                let mut names: Vec<&str> = known.keys().copied().collect();
                names.sort();
                return Err(Error::InvalidArgument(format!(
                    "unknown adapter tensor '{name}' (this model's adapters are e.g. {})",
                    names.iter().take(2).cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        // Check everything before changing anything: a failed call leaves the adapters as they were.
        for (name, shape, _) in &layout {
            match state.get(name) {
                Some(t) if t.dims() != shape.as_slice() => {
                    return Err(Error::InvalidArgument(format!(
                        "adapter tensor '{name}' has shape {:?}, expected {:?}",
                        t.dims(),
                        shape
                    )))
                }
                None if complete => {
                    return Err(Error::InvalidArgument(format!(
                        "adapter tensor '{name}' is missing"
                    )))
                }
                _ => {}
            }
        }
        let mut v = self.lora_values()?;
        for (name, _, off) in &layout {
            if let Some(t) = state.get(name) {
                let vals = t
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                v[*off..*off + vals.len()].copy_from_slice(&vals);
            }
        }
        self.set_lora_values(&v)
    }

    /// Loads the weights of a PEFT adapter folder (its config must match this model's).
    pub fn load_adapter(&self, dir: &Path) -> Result<()> {
        let cfg = read_adapter_config(dir)?;
        let mine = &self.lora_cfg;
        let mut a = cfg.target_modules.clone();
        let mut b = mine.target_modules.clone();
        a.sort();
        b.sort();
        if cfg.r != mine.r || a != b {
            return Err(Error::Model(format!(
                "{}: adapter has r={} on {:?}, the model was set up with r={} on {:?}",
                dir.display(),
                cfg.r,
                cfg.target_modules,
                mine.r,
                mine.target_modules
            )));
        }
        let path = dir.join("adapter_model.safetensors");
        if !path.is_file() {
            return Err(Error::Model(format!(
                "{}: missing (ferrotune reads safetensors adapters)",
                path.display()
            )));
        }
        let raw = candle_core::safetensors::load(&path, &Device::Cpu)
            .map_err(|e| Error::Model(format!("{}: cannot read ({e})", path.display())))?;
        // PEFT sometimes saves "...lora_A.default.weight"; normalise to the saved form.
        let state: HashMap<String, Tensor> = raw
            .into_iter()
            .map(|(k, v)| (k.replace(".default.weight", ".weight"), v))
            .collect();
        self.set_lora_state(&state, true)
    }

    /// Writes a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`).
    pub fn save_adapter(&self, dir: &Path, base_model: &str) -> Result<PathBuf> {
        let pending = PendingDir::new(dir)?;
        self.write_adapter_into(&pending.tmp, base_model)?;
        pending.commit()
    }

    /// Writes the adapter files into an existing folder.
    pub fn write_adapter_into(&self, dir: &Path, base_model: &str) -> Result<()> {
        write_safetensors(&dir.join("adapter_model.safetensors"), &self.lora_state()?)?;
        let cfg = serde_json::to_string_pretty(&adapter_config_json(&self.lora_cfg, base_model))
            .expect("json");
        let p = dir.join("adapter_config.json");
        std::fs::write(&p, cfg).at(&p)
    }

    /// Writes the merged model (base + scale·B·A in the weights' stored dtype) as a
    /// Hugging Face folder: the same shards, config.json, generation config and tokenizer.
    pub fn save_merged(&self, dir: &Path, ctx: &crate::progress::Ctx) -> Result<PathBuf> {
        let pending = PendingDir::new(dir)?;
        let src = Weights::open(&self.folder)?;
        let deltas = self.lora_deltas()?;
        let cpu = candle_core::Device::Cpu;
        let task = ctx.task(
            "merge LoRA into the weights",
            Some(src.files().len() as u64),
            "files",
        );
        for file in src.files() {
            ctx.cancel().check()?;
            let tensors = candle_core::safetensors::load(file, &cpu)
                .map_err(|e| Error::Model(format!("{}: {e}", file.display())))?;
            let mut out: Vec<(String, Tensor)> = Vec::with_capacity(tensors.len());
            for (name, t) in tensors {
                let t = match deltas.get(&name) {
                    Some((delta, out, inp)) => {
                        let stored = t.dtype();
                        let d = Tensor::from_slice(delta, (*out, *inp), &cpu)?;
                        (t.to_dtype(DType::F32)? + d)?.to_dtype(stored)?
                    }
                    None => t,
                };
                out.push((name, t));
            }
            out.sort_by(|a, b| a.0.cmp(&b.0));
            let name = file.file_name().expect("file name");
            write_safetensors(&pending.tmp.join(name), &out)?;
            task.advance(1);
        }
        for side in SIDE_FILES
            .iter()
            .chain(["model.safetensors.index.json"].iter())
        {
            let from = self.folder.join(side);
            let from = if from.is_file() {
                from
            } else {
                // An Azure ML MLflow folder keeps the tokenizer in data/tokenizer/.
                match self.folder.parent().map(|p| p.join("tokenizer").join(side)) {
                    Some(p) if p.is_file() => p,
                    _ => continue,
                }
            };
            let to = pending.tmp.join(side);
            std::fs::copy(&from, &to).at(&to)?;
        }
        pending.commit()
    }
}
