//! Core errors → Python exceptions. The classes live in `ferrotune/exceptions.py` (so they
//! can also derive from `ValueError`, `OSError`, ...); this exhaustive `match` picks one
//! per variant, so a new variant does not compile until it has a class.

use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError};
use pyo3::prelude::*;

use crate::error::Error;

fn class_name(e: &Error) -> &'static str {
    match e {
        Error::InvalidArgument(_) => "InvalidArgumentError",
        Error::RepositoryNotFound { .. } => "RepositoryNotFoundError",
        Error::GatedRepo { .. } => "GatedRepoError",
        Error::RevisionNotFound { .. } => "RevisionNotFoundError",
        Error::EntryNotFound { .. } => "EntryNotFoundError",
        Error::InvalidToken { .. } => "InvalidTokenError",
        Error::OfflineNotCached { .. } => "OfflineNotCachedError",
        Error::Http(_) => "HubHTTPError",
        Error::Integrity(_) => "IntegrityError",
        Error::Protocol(_) => "ProtocolError",
        Error::Dataset(_) => "DatasetError",
        Error::DataFormat { .. } => "DataFormatError",
        Error::Template(_) => "ChatTemplateError",
        Error::Conversation { .. } => "ConversationError",
        Error::Model(_) => "ModelError",
        Error::Training(_) => "TrainingError",
        Error::Compute(_) => "ComputeError",
        Error::OutOfMemory(_) => "OutOfMemoryError",
        Error::GpuUnavailable(_) => "GpuUnavailableError",
        Error::Cancelled => "KeyboardInterrupt",
        Error::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => "FerrotuneFileNotFoundError",
            std::io::ErrorKind::PermissionDenied => "FerrotunePermissionError",
            _ => "FerrotuneIOError",
        },
    }
}

/// The Python exception for a core error.
pub fn to_pyerr(py: Python<'_>, e: Error) -> PyErr {
    let name = class_name(&e);
    if name == "KeyboardInterrupt" {
        return PyKeyboardInterrupt::new_err("interrupted");
    }
    let message = e.to_string();
    let class = py
        .import("ferrotune.exceptions")
        .and_then(|m| m.getattr(name));
    match class {
        Ok(cls) => match cls.call1((message.clone(),)) {
            Ok(inst) => PyErr::from_value(inst),
            Err(err) => err,
        },
        Err(_) => PyRuntimeError::new_err(format!("{name}: {message}")),
    }
}
