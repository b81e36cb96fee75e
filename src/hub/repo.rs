//! Repository identity: `org/name` plus whether it is a model or a dataset repo.

use crate::error::{Error, Result};

/// Model and dataset repos differ only in URL prefixes and cache folder names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    /// "model" / "dataset", for messages.
    pub fn name(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        }
    }
    /// "models" / "datasets": the `/api/{}/...` segment and the cache folder prefix.
    pub fn plural(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
    /// Parses `"model"`/`"dataset"` (also the plural forms).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "model" | "models" => Ok(RepoKind::Model),
            "dataset" | "datasets" => Ok(RepoKind::Dataset),
            other => Err(Error::InvalidArgument(format!(
                "repo_type must be 'model' or 'dataset', not '{other}'"
            ))),
        }
    }
}

/// A validated repository id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repo {
    pub id: String,
    pub kind: RepoKind,
}

impl Repo {
    /// Validates `id` with the rules `huggingface_hub.validate_repo_id` applies: one
    /// optional `namespace/`, characters `[A-Za-z0-9_.-]`, no `--` or `..`, no leading or
    /// trailing `-`/`.`, at most 96 characters in the name.
    pub fn new(id: &str, kind: RepoKind) -> Result<Self> {
        let bad = |why: &str| {
            Err(Error::InvalidArgument(format!(
                "'{id}' is not a valid {} repo id ({why}); expected 'name' or 'namespace/name', e.g. 'HuggingFaceH4/ultrachat_200k'",
                kind.name()
            )))
        };
        let parts: Vec<&str> = id.split('/').collect();
        if id.is_empty() || parts.len() > 2 {
            return bad("use at most one '/'");
        }
        for p in &parts {
            if p.is_empty() || p.len() > 96 {
                return bad("each part must have 1 to 96 characters");
            }
            if !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            {
                return bad("only letters, digits, '_', '-' and '.' are allowed");
            }
            if p.starts_with(['-', '.']) || p.ends_with(['-', '.']) {
                return bad("a part cannot start or end with '-' or '.'");
            }
        }
        if id.contains("--") || id.contains("..") {
            return bad("'--' and '..' are not allowed");
        }
        Ok(Self {
            id: id.to_string(),
            kind,
        })
    }

    pub fn dataset(id: &str) -> Result<Self> {
        Self::new(id, RepoKind::Dataset)
    }

    pub fn model(id: &str) -> Result<Self> {
        Self::new(id, RepoKind::Model)
    }

    /// Cache folder name: `datasets--org--name` / `models--org--name`.
    pub fn cache_folder(&self) -> String {
        format!("{}--{}", self.kind.plural(), self.id.replace('/', "--"))
    }

    /// The prefix of file URLs: `datasets/{id}` for datasets, `{id}` for models.
    pub fn url_path(&self) -> String {
        match self.kind {
            RepoKind::Model => self.id.clone(),
            RepoKind::Dataset => format!("datasets/{}", self.id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        let r = Repo::dataset("HuggingFaceH4/ultrachat_200k").unwrap();
        assert_eq!(r.cache_folder(), "datasets--HuggingFaceH4--ultrachat_200k");
        assert_eq!(r.url_path(), "datasets/HuggingFaceH4/ultrachat_200k");
        let m = Repo::model("microsoft/Phi-3-mini-4k-instruct").unwrap();
        assert_eq!(
            m.cache_folder(),
            "models--microsoft--Phi-3-mini-4k-instruct"
        );
        assert_eq!(m.url_path(), "microsoft/Phi-3-mini-4k-instruct");
        assert!(Repo::model("gpt2").is_ok());
    }

    #[test]
    fn invalid_ids() {
        for bad in [
            "", "a/b/c", "../x", "a/..", "a--b/c", "a/ b", "/abs", "a/", "-a/b", "a/b.", "a\\b",
        ] {
            assert!(
                matches!(Repo::dataset(bad), Err(Error::InvalidArgument(_))),
                "{bad:?} accepted"
            );
        }
    }
}

/// What a user's "model or tokenizer" argument names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source<'a> {
    /// An existing local path.
    Local(&'a std::path::Path),
    /// Looks like a path (starts with `.` or `/`, or has a `\`) but does not exist.
    MissingPath(&'a std::path::Path),
    /// Anything else: a Hub repo id.
    Hub(&'a str),
}

impl<'a> Source<'a> {
    pub fn classify(source: &'a str) -> Self {
        let path = std::path::Path::new(source);
        if path.exists() {
            Source::Local(path)
        } else if source.starts_with('.') || source.starts_with('/') || source.contains('\\') {
            Source::MissingPath(path)
        } else {
            Source::Hub(source)
        }
    }
}
