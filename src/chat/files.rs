//! Finding and parsing a tokenizer's files: `tokenizer.json`, `tokenizer_config.json`,
//! `special_tokens_map.json`, `generation_config.json`, `config.json` and
//! `chat_template.jinja`, in a local folder, an Azure ML MLflow model folder
//! (`data/tokenizer/` or `data/model/`) or a Hub model repository.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, IoContext, Result};
use crate::hub::{HubClient, Repo};
use crate::progress::Ctx;

/// The files a tokenizer is made of, read into memory.
#[derive(Debug, Clone)]
pub struct TokenizerFiles {
    /// Where they came from (for messages).
    pub origin: String,
    pub tokenizer_json: Value,
    /// `tokenizer_config.json` (an empty object when absent).
    pub config: Value,
    /// `special_tokens_map.json` (an empty object when absent).
    pub special_tokens_map: Value,
    /// `generation_config.json` when present.
    pub generation_config: Option<Value>,
    /// The model's `config.json` when present (model_type, max_position_embeddings).
    pub model_config: Option<Value>,
    /// `chat_template.jinja` when present (transformers ≥ 4.43 saves the template there).
    pub chat_template_file: Option<String>,
}

const OPTIONAL_FILES: [&str; 5] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
    "chat_template.jinja",
];

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).at(path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::data_format(path.display(), format!("not valid JSON: {e}")))
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// The folder inside `dir` that holds `tokenizer.json`: `dir` itself, or the Azure ML
/// MLflow layouts `data/tokenizer/` and `data/model/`.
pub fn tokenizer_folder(dir: &Path) -> Option<PathBuf> {
    [
        dir.to_path_buf(),
        dir.join("data").join("tokenizer"),
        dir.join("data").join("model"),
    ]
    .into_iter()
    .find(|d| d.join("tokenizer.json").is_file())
}

impl TokenizerFiles {
    /// Reads the files from a local folder (or an MLflow model folder).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let Some(folder) = tokenizer_folder(dir) else {
            return Err(Error::io(
                dir.join("tokenizer.json"),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no tokenizer.json here, nor in data/tokenizer/ or data/model/ (an Azure ML MLflow model folder); ferrotune needs the fast-tokenizer file",
                ),
            ));
        };
        // An MLflow folder keeps config.json with the model weights, not the tokenizer.
        let model_config = read_optional_json(&folder.join("config.json"))?
            .or(read_optional_json(&dir.join("data/model/config.json"))?);
        let chat_template_file = match folder.join("chat_template.jinja") {
            p if p.is_file() => Some(std::fs::read_to_string(&p).at(&p)?),
            _ => None,
        };
        Ok(Self {
            origin: folder.display().to_string(),
            tokenizer_json: read_json(&folder.join("tokenizer.json"))?,
            config: read_optional_json(&folder.join("tokenizer_config.json"))?
                .unwrap_or(Value::Object(Default::default())),
            special_tokens_map: read_optional_json(&folder.join("special_tokens_map.json"))?
                .unwrap_or(Value::Object(Default::default())),
            generation_config: read_optional_json(&folder.join("generation_config.json"))?,
            model_config,
            chat_template_file,
        })
    }

    /// Downloads the files of a Hub model repository into the HF cache and reads them.
    pub fn from_hub(hub: &HubClient, repo_id: &str, revision: &str, ctx: &Ctx) -> Result<Self> {
        let repo = Repo::model(repo_id)?;
        let commit = hub.resolve_revision(&repo, revision, ctx)?;
        let main = hub.download(&repo, &commit, "tokenizer.json", ctx)?;
        let folder = main
            .parent()
            .expect("a snapshot file has a parent")
            .to_path_buf();
        for name in OPTIONAL_FILES {
            match hub.download(&repo, &commit, name, ctx) {
                Ok(_) | Err(Error::EntryNotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let mut files = Self::from_dir(&folder)?;
        files.origin = format!("{repo_id}@{commit}");
        Ok(files)
    }

    /// Where `source` points: an existing path is a folder, anything else a Hub repo id.
    pub fn load(
        source: &str,
        revision: &str,
        hub: impl FnOnce() -> HubClient,
        ctx: &Ctx,
    ) -> Result<Self> {
        match crate::hub::repo::Source::classify(source) {
            crate::hub::repo::Source::Local(path) => Self::from_dir(path),
            crate::hub::repo::Source::MissingPath(path) => Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such tokenizer folder"),
            )),
            crate::hub::repo::Source::Hub(id) => Self::from_hub(&hub(), id, revision, ctx),
        }
    }

    /// A special token from tokenizer_config.json (string or AddedToken object), falling
    /// back to special_tokens_map.json.
    pub fn special_token(&self, name: &str) -> Option<String> {
        fn content(v: &Value) -> Option<String> {
            match v {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
                _ => None,
            }
        }
        self.config
            .get(name)
            .and_then(content)
            .or_else(|| self.special_tokens_map.get(name).and_then(content))
    }

    pub fn config_bool(&self, name: &str) -> Option<bool> {
        self.config.get(name).and_then(Value::as_bool)
    }

    /// The chat template: `chat_template` of tokenizer_config.json (a string, or a list of
    /// named templates of which "default" is used), else `chat_template.jinja`.
    pub fn chat_template(&self) -> Result<Option<String>> {
        match self.config.get("chat_template") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Array(list)) => {
                let named = |n: &str| {
                    list.iter().find_map(|t| {
                        (t.get("name").and_then(Value::as_str) == Some(n))
                            .then(|| t.get("template").and_then(Value::as_str))
                            .flatten()
                    })
                };
                match named("default") {
                    Some(t) => Ok(Some(t.to_string())),
                    None => Err(Error::Template(format!(
                        "{}: chat_template is a list of named templates without a 'default' one",
                        self.origin
                    ))),
                }
            }
            Some(Value::Null) | None => Ok(self.chat_template_file.clone()),
            Some(_) => Err(Error::Template(format!(
                "{}: chat_template in tokenizer_config.json is neither a string nor a list",
                self.origin
            ))),
        }
    }

    /// `model_max_length` when it is a real limit (transformers writes 1e30 for "none").
    pub fn model_max_length(&self) -> Option<usize> {
        let v = self.config.get("model_max_length")?.as_f64()?;
        (v > 0.0 && v < 1e12).then_some(v as usize)
    }

    /// `max_position_embeddings` of the model's config.json.
    pub fn max_position_embeddings(&self) -> Option<usize> {
        self.model_config
            .as_ref()?
            .get("max_position_embeddings")?
            .as_u64()
            .map(|v| v as usize)
    }

    /// `eos_token_id` of generation_config.json (an int or a list).
    pub fn generation_eos_ids(&self) -> Option<Vec<u32>> {
        match self.generation_config.as_ref()?.get("eos_token_id")? {
            Value::Number(n) => n.as_u64().map(|v| vec![v as u32]),
            Value::Array(a) => Some(
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|v| v as u32)
                    .collect(),
            ),
            _ => None,
        }
    }

    pub fn model_type(&self) -> Option<&str> {
        self.model_config.as_ref()?.get("model_type")?.as_str()
    }
}
