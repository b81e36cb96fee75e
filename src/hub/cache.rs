//! The `huggingface_hub` cache layout, shared byte for byte with Python tools:
//!
//! ```text
//! {cache}/{datasets|models}--{org}--{name}/
//!   refs/{revision}            commit sha, no newline
//!   blobs/{etag}               file bytes; `{etag}.{8 hex}.incomplete` while downloading
//!   snapshots/{commit}/{path}  relative symlink to ../../blobs/{etag}
//!   .no_exist/{commit}/{path}  empty marker after a 404
//! {cache}/.locks/{repo folder}/{etag}.lock
//! ```

use std::fs::{self, File, OpenOptions};
use std::path::{Component, Path, PathBuf};

use super::repo::Repo;
use crate::error::{Error, IoContext, Result};

/// Refuses a server- or user-supplied repo path that could escape its folder: absolute
/// paths, `..`, drive or UNC prefixes, backslashes, empty segments, NUL.
pub fn check_repo_path(path: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::Protocol(format!("unsafe file path {path:?}: {why}")));
    if path.is_empty() {
        return bad("empty");
    }
    if path.contains('\0') || path.contains('\\') {
        return bad("contains NUL or a backslash");
    }
    if path.starts_with('/') {
        return bad("absolute");
    }
    let b = path.as_bytes();
    if b.len() >= 2 && b[1] == b':' && b[0].is_ascii_alphabetic() {
        return bad("drive prefix");
    }
    for seg in path.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return bad("empty, '.' or '..' segment");
        }
    }
    if Path::new(path)
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return bad("not a plain relative path");
    }
    Ok(())
}

/// Accepts only ETags that are git sha1 (40 hex) or sha256 (64 hex) digests, since they
/// become file names. Strips `W/` and quotes first.
pub fn normalize_etag(raw: &str) -> Result<String> {
    let e = raw.trim();
    let e = e.strip_prefix("W/").unwrap_or(e);
    let e = e.trim_matches('"');
    if (e.len() == 40 || e.len() == 64) && e.bytes().all(|c| c.is_ascii_hexdigit()) {
        Ok(e.to_string())
    } else {
        Err(Error::Protocol(format!(
            "ETag {raw:?} is not a 40- or 64-digit hex digest"
        )))
    }
}

/// True for a full 40-hex commit id.
pub fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|c| c.is_ascii_hexdigit())
}

/// Refuses revision names that would escape `refs/` (they become file names there).
pub fn check_revision(rev: &str) -> Result<()> {
    if rev.is_empty() || check_repo_path(rev).is_err() {
        return Err(Error::InvalidArgument(format!(
            "revision {rev:?} is not a valid branch, tag or commit name"
        )));
    }
    Ok(())
}

/// One repository's folder in the cache.
#[derive(Debug, Clone)]
pub struct RepoCache {
    /// `{cache}/{kind}--{org}--{name}`
    pub root: PathBuf,
    /// `{cache}/.locks/{kind}--{org}--{name}`
    pub locks: PathBuf,
}

/// Writes `bytes` to `path` atomically: a temp file in the same folder, then rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).at(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f"),
        random_hex8()
    ));
    fs::write(&tmp, bytes).at(&tmp)?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// 8 hex digits, unique enough for temp-file names (time, pid and a counter mixed).
pub fn random_hex8() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = t
        ^ ((std::process::id() as u64) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // splitmix64 finaliser: spreads the bits so consecutive calls look unrelated.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    format!("{:08x}", x as u32)
}

/// An exclusive `flock` on a lock file, released on drop.
pub struct LockGuard {
    file: File,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

impl RepoCache {
    pub fn new(cache_dir: &Path, repo: &Repo) -> Self {
        let folder = repo.cache_folder();
        Self {
            root: cache_dir.join(&folder),
            locks: cache_dir.join(".locks").join(folder),
        }
    }

    /// The commit a revision pointed to when last seen (`refs/{rev}`), or the revision
    /// itself when it is a commit.
    pub fn resolve_ref(&self, rev: &str) -> Option<String> {
        if is_commit(rev) {
            return Some(rev.to_string());
        }
        check_revision(rev).ok()?;
        let s = fs::read_to_string(self.root.join("refs").join(rev)).ok()?;
        let s = s.trim();
        is_commit(s).then(|| s.to_string())
    }

    /// Records `refs/{rev} = commit` (atomically, only when it changed).
    pub fn write_ref(&self, rev: &str, commit: &str) -> Result<()> {
        if is_commit(rev) || rev == commit {
            return Ok(());
        }
        check_revision(rev)?;
        let p = self.root.join("refs").join(rev);
        if fs::read_to_string(&p).ok().as_deref() == Some(commit) {
            return Ok(());
        }
        write_atomic(&p, commit.as_bytes())
    }

    pub fn snapshot_path(&self, commit: &str, path: &str) -> PathBuf {
        self.root.join("snapshots").join(commit).join(path)
    }

    /// The snapshot file if it exists (following the symlink to a present blob).
    pub fn cached_file(&self, commit: &str, path: &str) -> Option<PathBuf> {
        let p = self.snapshot_path(commit, path);
        p.is_file().then_some(p)
    }

    pub fn blob_path(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    /// An existing `.incomplete` file for this blob (to resume), else a fresh name.
    pub fn incomplete_path(&self, etag: &str) -> PathBuf {
        let blobs = self.root.join("blobs");
        if let Ok(rd) = fs::read_dir(&blobs) {
            let prefix = format!("{etag}.");
            let mut best: Option<(u64, PathBuf)> = None;
            for e in rd.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(&prefix) && name.ends_with(".incomplete") {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    if best.as_ref().is_none_or(|(l, _)| len > *l) {
                        best = Some((len, e.path()));
                    }
                }
            }
            if let Some((_, p)) = best {
                return p;
            }
        }
        blobs.join(format!("{etag}.{}.incomplete", random_hex8()))
    }

    /// Points `snapshots/{commit}/{path}` at `blobs/{etag}` with a relative symlink,
    /// replacing whatever was there.
    pub fn link_snapshot(&self, commit: &str, path: &str, etag: &str) -> Result<PathBuf> {
        check_repo_path(path)?;
        let link = self.snapshot_path(commit, path);
        let dir = link.parent().expect("snapshot path has a parent");
        fs::create_dir_all(dir).at(dir)?;
        let depth = path.split('/').count() - 1;
        let mut target = PathBuf::from("../..");
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        let tmp = dir.join(format!(".{}.link", random_hex8()));
        symlink(&target, &tmp).at(&tmp)?;
        fs::rename(&tmp, &link).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(&link, e)
        })?;
        Ok(link)
    }

    /// `.no_exist/{commit}/{path}`: remembers a 404 so offline calls can answer quickly.
    pub fn mark_missing(&self, commit: &str, path: &str) -> Result<()> {
        if check_repo_path(path).is_err() {
            return Ok(());
        }
        let p = self.root.join(".no_exist").join(commit).join(path);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).at(d)?;
        }
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .at(&p)?;
        Ok(())
    }

    pub fn is_marked_missing(&self, commit: &str, path: &str) -> bool {
        self.root.join(".no_exist").join(commit).join(path).exists()
    }

    /// Takes the per-blob lock that `huggingface_hub` also takes while downloading.
    pub fn lock(&self, etag: &str) -> Result<LockGuard> {
        fs::create_dir_all(&self.locks).at(&self.locks)?;
        let p = self.locks.join(format!("{etag}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .at(&p)?;
        file.lock().at(&p)?;
        Ok(LockGuard { file })
    }
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    // Without symlinks, huggingface_hub copies the blob into the snapshot; so do we.
    let blob = link.parent().unwrap().join(target);
    fs::copy(blob, link).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_paths() {
        for ok in [
            "a.parquet",
            "data/train-00000-of-00003.parquet",
            "README.md",
            "a/b/c d.txt",
        ] {
            assert!(check_repo_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "C:/x",
            "c:x",
            "a\\b",
            "\\\\srv\\x",
            "a/.",
            "a\0b",
        ] {
            assert!(
                matches!(check_repo_path(bad), Err(Error::Protocol(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn etags() {
        let sha1 = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(normalize_etag(&format!("\"{sha1}\"")).unwrap(), sha1);
        assert_eq!(normalize_etag(&format!("W/\"{sha1}\"")).unwrap(), sha1);
        let sha256 = "a".repeat(64);
        assert_eq!(normalize_etag(&sha256).unwrap(), sha256);
        for bad in [
            "",
            "\"../../etc/passwd\"",
            "abc",
            &"g".repeat(40),
            &"a".repeat(41),
        ] {
            assert!(normalize_etag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn snapshot_links_are_relative_and_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::dataset("org/name").unwrap();
        let c = RepoCache::new(dir.path(), &repo);
        let etag = "b".repeat(64);
        fs::create_dir_all(c.root.join("blobs")).unwrap();
        fs::write(c.blob_path(&etag), b"hello").unwrap();
        let commit = "c".repeat(40);
        let link = c.link_snapshot(&commit, "data/x/y.parquet", &etag).unwrap();
        assert_eq!(
            fs::read_link(&link).unwrap(),
            PathBuf::from("../../../../blobs").join(&etag)
        );
        assert_eq!(fs::read(&link).unwrap(), b"hello");
        assert_eq!(c.cached_file(&commit, "data/x/y.parquet"), Some(link));
        c.write_ref("main", &commit).unwrap();
        assert_eq!(
            fs::read_to_string(c.root.join("refs/main")).unwrap(),
            commit
        );
        assert_eq!(c.resolve_ref("main"), Some(commit.clone()));
        c.mark_missing(&commit, "x.py").unwrap();
        assert!(c.is_marked_missing(&commit, "x.py"));
        let _g = c.lock(&etag).unwrap();
        assert!(dir
            .path()
            .join(".locks/datasets--org--name")
            .join(format!("{etag}.lock"))
            .exists());
    }
}
