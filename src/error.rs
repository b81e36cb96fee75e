//! The one error type of the core.
//!
//! Every variant is a kind a user can act on; the Python bindings map each one to its own
//! exception class under `ferrotune.FerrotuneError` with an exhaustive `match`, so a new
//! variant does not compile until it has a Python class.

use std::path::PathBuf;

/// Result alias used across the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in ferrotune's core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller-supplied argument is out of range or malformed (maps to `ValueError` too).
    #[error("{0}")]
    InvalidArgument(String),

    /// The Hub answered that the repository does not exist (or is private and no valid
    /// token was sent).
    #[error("{repo_kind} repository '{repo_id}' was not found on {endpoint}. Check the spelling; if it is private, pass token= or set HF_TOKEN.")]
    RepositoryNotFound {
        repo_kind: &'static str,
        repo_id: String,
        endpoint: String,
    },

    /// The repository is gated and the token (if any) has not been granted access.
    #[error("{repo_kind} repository '{repo_id}' is gated: {message}. Visit {url} to ask for access, then pass token= or set HF_TOKEN.")]
    GatedRepo {
        repo_kind: &'static str,
        repo_id: String,
        url: String,
        message: String,
    },

    /// The branch, tag or commit does not exist in the repository.
    #[error("revision '{revision}' was not found in '{repo_id}'")]
    RevisionNotFound { repo_id: String, revision: String },

    /// The file does not exist at that revision.
    #[error("file '{path}' was not found in '{repo_id}' at revision '{revision}'")]
    EntryNotFound {
        repo_id: String,
        revision: String,
        path: String,
    },

    /// The Hub rejected the token.
    #[error("the Hub rejected the token ({message}). Check HF_TOKEN, the token= argument or the token file {token_source}.")]
    InvalidToken {
        message: String,
        token_source: String,
    },

    /// Offline mode (or no network) and the file is not in the local cache.
    #[error("'{what}' is not in the local cache ({cache}) and {why}. Run once with network access, or unset HF_HUB_OFFLINE.")]
    OfflineNotCached {
        what: String,
        cache: PathBuf,
        why: String,
    },

    /// A network or HTTP failure that retries did not cure.
    #[error("{0}")]
    Http(String),

    /// Bytes on disk or on the wire do not match what the Hub promised (size or sha256).
    #[error("{0}")]
    Integrity(String),

    /// The server sent something unsafe or malformed (a path escaping the snapshot, an
    /// ETag that is not a hash, a broken response). Refused, nothing written.
    #[error("refused a malformed or unsafe answer from the server: {0}")]
    Protocol(String),

    /// A dataset has no such split/config, or its layout cannot be understood.
    #[error("{0}")]
    Dataset(String),

    /// A data file is not in the expected format (bad Parquet, wrong schema, bad JSON).
    #[error("{path}: {message}")]
    DataFormat { path: String, message: String },

    /// A chat template that does not compile, or that fails on data it should handle.
    #[error("{0}")]
    Template(String),

    /// A conversation that cannot be trained on, with `strict=True` (otherwise such rows
    /// are dropped and counted).
    #[error("{path}: {position}: {detail} ({reason}; with strict=False such rows are dropped and counted)")]
    Conversation {
        path: String,
        position: String,
        reason: &'static str,
        detail: String,
    },

    /// Model files that cannot be used: missing or corrupt weights, a config that does not
    /// match the weights, an architecture ferrotune does not train.
    #[error("{0}")]
    Model(String),

    /// Training cannot go on (a NaN/inf loss, no trainable tokens, a bad checkpoint).
    #[error("{0}")]
    Training(String),

    /// A tensor computation failed.
    #[error("tensor computation failed: {0}")]
    Compute(String),

    /// The GPU ran out of memory (what was asked, what was free, what to change).
    #[error("{0}")]
    OutOfMemory(String),

    /// No usable GPU: no driver, a driver too old, no such device, a GPU too old for this
    /// build, a missing CUDA library, or a build without CUDA support.
    #[error("{0}")]
    GpuUnavailable(String),

    /// The operation was interrupted (Ctrl-C); nothing was left under a final name.
    #[error("interrupted")]
    Cancelled,

    /// A local file-system error, with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A `DataFormat` error for `path`.
    pub fn data_format(path: impl std::fmt::Display, message: impl std::fmt::Display) -> Self {
        Error::DataFormat {
            path: path.to_string(),
            message: message.to_string(),
        }
    }
}

/// Attaches a path to `std::io::Result`s.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Compute(e.to_string())
    }
}
