//! Finding a model's files and reading its safetensors weights.
//!
//! A model is a folder with `config.json` and `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), an Azure ML MLflow model folder (`data/model/`), or a
//! Hub repo id, fetched through the foundation's Hub client into the usual HF cache.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};

use super::config::Phi3Config;
use crate::error::{Error, IoContext, Result};
use crate::hub::{HubClient, Repo};
use crate::progress::Ctx;

const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";
/// Files a model folder may carry besides weights; fetched from the Hub when present and
/// copied into merged exports.
pub const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
];

/// The folder holding `config.json` + weights: `dir` itself or `dir/data/model`.
pub fn model_folder(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join("data").join("model")]
        .into_iter()
        .find(|d| d.join("config.json").is_file())
}

/// Resolves `source` (a folder, an MLflow folder, or a Hub repo id) to a local folder.
pub fn resolve_model(
    source: &str,
    revision: &str,
    hub: impl FnOnce() -> HubClient,
    ctx: &Ctx,
) -> Result<PathBuf> {
    let source = match crate::hub::repo::Source::classify(source) {
        crate::hub::repo::Source::Local(path) => {
            return model_folder(path).ok_or_else(|| {
                Error::Model(format!(
                    "{}: no config.json here nor in data/model/ (an Azure ML MLflow model folder)",
                    path.display()
                ))
            })
        }
        crate::hub::repo::Source::MissingPath(_) => {
            return Err(Error::Model(format!("{source}: no such model folder")))
        }
        crate::hub::repo::Source::Hub(id) => id,
    };
    let hub = hub();
    let repo = Repo::model(source)?;
    let commit = hub.resolve_revision(&repo, revision, ctx)?;
    let config = hub.download(&repo, &commit, "config.json", ctx)?;
    for name in SIDE_FILES.iter().skip(1) {
        match hub.download(&repo, &commit, name, ctx) {
            Ok(_) | Err(Error::EntryNotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    match hub.download(&repo, &commit, INDEX, ctx) {
        Ok(index) => {
            for shard in shard_names(&index)? {
                hub.download(&repo, &commit, &shard, ctx)?;
            }
        }
        Err(Error::EntryNotFound { .. }) => {
            hub.download(&repo, &commit, SINGLE, ctx)?;
        }
        Err(e) => return Err(e),
    }
    Ok(config
        .parent()
        .expect("snapshot file has a parent")
        .to_path_buf())
}

fn shard_names(index: &Path) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(index).at(index)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Model(format!("{}: not valid JSON ({e})", index.display())))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Model(format!("{}: no weight_map", index.display())))?;
    let mut names = BTreeSet::new();
    for f in map.values() {
        let f = f.as_str().unwrap_or_default();
        if f.is_empty() || f.contains('/') || f.contains('\\') || f.starts_with('.') {
            return Err(Error::Model(format!(
                "{}: unsafe shard name {f:?}",
                index.display()
            )));
        }
        names.insert(f.to_string());
    }
    Ok(names)
}

/// Reads `config.json` of a model folder.
pub fn read_config(folder: &Path) -> Result<Phi3Config> {
    let path = folder.join("config.json");
    let text = std::fs::read_to_string(&path).at(&path)?;
    Phi3Config::from_json(&text, &path.display().to_string())
}

/// The safetensors files of a model folder, memory-mapped.
pub struct Weights {
    folder: PathBuf,
    st: MmapedSafetensors,
    files: Vec<PathBuf>,
}

impl Weights {
    pub fn open(folder: &Path) -> Result<Self> {
        let files: Vec<PathBuf> = if folder.join(INDEX).is_file() {
            shard_names(&folder.join(INDEX))?
                .into_iter()
                .map(|n| folder.join(n))
                .collect()
        } else if folder.join(SINGLE).is_file() {
            vec![folder.join(SINGLE)]
        } else {
            return Err(Error::Model(format!(
                "{}: no {SINGLE} or {INDEX} (ferrotune reads safetensors weights; convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))",
                folder.display()
            )));
        };
        for f in &files {
            if !f.is_file() {
                return Err(Error::Model(format!(
                    "{}: weight shard listed in {INDEX} is missing",
                    f.display()
                )));
            }
        }
        // SAFETY: the files are mapped read-only; like every safetensors reader we assume
        // nobody truncates them while we read.
        let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| {
            Error::Model(format!(
                "{}: cannot read the safetensors weights ({e}); the file may be truncated or corrupt — download it again",
                folder.display()
            ))
        })?;
        Ok(Self {
            folder: folder.to_path_buf(),
            st,
            files,
        })
    }

    pub fn folder(&self) -> &Path {
        &self.folder
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The names of every stored tensor.
    pub fn names(&self) -> Vec<String> {
        self.st.tensors().into_iter().map(|(n, _)| n).collect()
    }

    /// Loads `name`, checks its shape and converts it to `dtype` on `device`.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let view = self.st.get(name).map_err(|_| {
            Error::Model(format!(
                "{}: weight '{name}' is missing (is this a Phi-3 checkpoint?)",
                self.folder.display()
            ))
        })?;
        if view.shape() != shape {
            return Err(Error::Model(format!(
                "{}: weight '{name}' has shape {:?} but config.json implies {shape:?}; config.json and the weights do not belong together",
                self.folder.display(),
                view.shape()
            )));
        }
        let t = view
            .load(device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| {
                Error::Model(format!("{}: weight '{name}': {e}", self.folder.display()))
            })?;
        Ok(t)
    }

    /// Loads `name` as f32 values, checking its shape.
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.get(name, shape, DType::F32, &Device::Cpu)?
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| Error::Model(format!("{}: weight '{name}': {e}", self.folder.display())))
    }

    /// The stored dtype of `name`.
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        let view = self.st.get(name).ok()?;
        DType::try_from(view.dtype()).ok()
    }
}
