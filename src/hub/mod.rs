//! A small Hugging Face Hub client that speaks the same protocol and shares the same cache
//! as `huggingface_hub`. Why our own and not the `hf-hub` crate: that crate ignores
//! `HF_TOKEN`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and `X-Error-Code`, and sends the token to
//! the CDN.
//!
//! - [`settings`]: endpoint, cache, token and offline mode from the environment
//! - [`repo`]: repository ids (model or dataset)
//! - [`http`]: requests, retries with back-off, error-code mapping
//! - [`api`]: revision → commit, recursive tree listing
//! - [`download`]: HEAD metadata, verified resumable downloads, byte-range reads
//! - [`cache`]: the cache layout, atomic refs, symlinked snapshots, locks

pub mod api;
pub mod cache;
pub mod download;
pub mod http;
pub mod repo;
pub mod settings;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

pub use api::RepoFile;
pub use cache::RepoCache;
pub use download::{FileMeta, RangeRead};
pub use repo::{Repo, RepoKind};
pub use settings::HubSettings;

use crate::error::Result;
use crate::progress::Ctx;

/// Python's `urllib.parse.quote(s, safe="")`: everything but `A-Za-z0-9_.-~` is escaped.
const QUOTE_ALL: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'_')
    .remove(b'.')
    .remove(b'-')
    .remove(b'~');

pub(crate) fn quote_all(s: &str) -> String {
    utf8_percent_encode(s, QUOTE_ALL).to_string()
}

/// The Hub client: settings plus one HTTP agent (connection pool).
pub struct HubClient {
    http: http::Http,
    hub_origin: Option<String>,
}

impl HubClient {
    pub fn new(settings: HubSettings) -> Self {
        let hub_origin = http::origin(&settings.endpoint);
        Self {
            http: http::Http::new(settings),
            hub_origin,
        }
    }

    /// A client configured from the environment, with an optional explicit token.
    pub fn from_env(token: Option<String>) -> Self {
        Self::new(HubSettings::from_env().with_token(token))
    }

    pub fn settings(&self) -> &HubSettings {
        self.http.settings()
    }

    pub(crate) fn hub_origin(&self) -> Option<String> {
        self.hub_origin.clone()
    }

    /// The cache folder of `repo`.
    pub fn repo_cache(&self, repo: &Repo) -> RepoCache {
        RepoCache::new(&self.settings().cache_dir, repo)
    }

    /// The commit `revision` points to: asked of the Hub when online (recording
    /// `refs/{revision}`), read from the cache when offline or when the Hub is unreachable.
    pub fn resolve_revision(&self, repo: &Repo, revision: &str, ctx: &Ctx) -> Result<String> {
        cache::check_revision(revision)?;
        let cache = self.repo_cache(repo);
        if self.settings().offline {
            return cache.resolve_ref(revision).ok_or_else(|| {
                self.offline_error(repo, revision, "(revision)", "HF_HUB_OFFLINE is set")
            });
        }
        match self.fetch_commit(repo, revision, ctx) {
            Err(crate::error::Error::Http(why)) => match cache.resolve_ref(revision) {
                Some(c) => {
                    ctx.message(&format!(
                        "Hub unreachable ({why}); using the cached {}@{revision}",
                        repo.id
                    ));
                    Ok(c)
                }
                None => Err(crate::error::Error::Http(why)),
            },
            other => other,
        }
    }

    /// Files of the repo at `commit`: listed by the Hub online, or the cached snapshot's
    /// files offline (only what is cached can be used offline anyway).
    pub fn files_at(&self, repo: &Repo, commit: &str, ctx: &Ctx) -> Result<Vec<RepoFile>> {
        if !self.settings().offline {
            return self.list_files(repo, commit, ctx);
        }
        let root = self.repo_cache(repo).root.join("snapshots").join(commit);
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.is_file() {
                    let rel = p.strip_prefix(&root).expect("under root");
                    let rel = rel.to_string_lossy().replace('\\', "/");
                    let etag = std::fs::read_link(&p)
                        .ok()
                        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().to_string()))
                        .unwrap_or_default();
                    let size = p.metadata().map(|m| m.len()).unwrap_or(0);
                    let (oid, lfs) = if etag.len() == 64 {
                        (String::new(), Some(etag))
                    } else {
                        (etag, None)
                    };
                    out.push(RepoFile {
                        path: rel,
                        size,
                        oid,
                        lfs_sha256: lfs,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }
}
