//! Output files that appear under their final name only when complete: written to a
//! hidden temporary name beside the destination, renamed on success, removed on failure.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// A file written under a temporary name, renamed into place by `commit`, deleted if
/// dropped before that (error or Ctrl-C): a final name only ever holds a complete file.
pub struct PendingFile {
    pub(crate) tmp: PathBuf,
    pub(crate) dest: PathBuf,
    done: bool,
}

impl PendingFile {
    pub fn new(dest: PathBuf) -> Self {
        let dir = dest.parent().unwrap_or(Path::new("."));
        let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        let tmp = dir.join(format!(".{name}.{}.tmp", crate::hub::cache::random_hex8()));
        Self {
            tmp,
            dest,
            done: false,
        }
    }
    pub fn commit(mut self) -> Result<PathBuf> {
        fs::rename(&self.tmp, &self.dest).at(&self.dest)?;
        self.done = true;
        Ok(self.dest.clone())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
