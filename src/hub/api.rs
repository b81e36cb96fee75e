//! The Hub's JSON API: revision → commit, and the recursive file tree (paginated).

use serde::Deserialize;

use super::cache::{check_repo_path, is_commit};
use super::http::{header, hub_error, Auth, Target};
use super::repo::Repo;
use super::HubClient;
use crate::error::{Error, Result};
use crate::progress::Ctx;

/// One file of a repository at a commit, as the tree endpoint lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    /// Path inside the repo, validated (no `..`, not absolute).
    pub path: String,
    pub size: u64,
    /// git blob sha1 (the ETag of a regular file).
    pub oid: String,
    /// sha256 of the content for LFS files (their ETag).
    pub lfs_sha256: Option<String>,
}

impl RepoFile {
    /// The ETag the resolve endpoint will announce for this file.
    pub fn etag(&self) -> &str {
        self.lfs_sha256.as_deref().unwrap_or(&self.oid)
    }
}

#[derive(Deserialize)]
struct RevisionInfo {
    sha: Option<String>,
}

#[derive(Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    oid: String,
    #[serde(default)]
    size: u64,
    lfs: Option<LfsInfo>,
}

#[derive(Deserialize)]
struct LfsInfo {
    oid: String,
    size: Option<u64>,
}

/// The `next` URL of a `Link` header, if any.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"" || p.trim() == "rel=next");
        is_next.then(|| {
            url.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

impl HubClient {
    fn api_get_json<T: for<'de> Deserialize<'de>>(
        &self,
        url: &str,
        repo: &Repo,
        revision: &str,
        ctx: &Ctx,
    ) -> Result<(T, Option<String>)> {
        let auth = self.auth_for(url);
        let mut resp = self.http.send("GET", url, auth, None, ctx.cancel())?;
        if !resp.status().is_success() {
            return Err(hub_error(&resp, url, &self.target(repo, revision, None)));
        }
        let next = header(&resp, "link").and_then(next_link);
        let body = resp
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_vec()
            .map_err(|e| Error::Http(format!("reading {url}: {e}")))?;
        let parsed = serde_json::from_slice(&body)
            .map_err(|e| Error::Protocol(format!("{url} answered invalid JSON: {e}")))?;
        Ok((parsed, next))
    }

    /// Asks the Hub which commit `revision` (branch, tag or commit) points to, and records
    /// it in `refs/`. A 40-hex commit is returned as is, without a request.
    pub fn fetch_commit(&self, repo: &Repo, revision: &str, ctx: &Ctx) -> Result<String> {
        if is_commit(revision) {
            return Ok(revision.to_string());
        }
        let url = format!(
            "{}/api/{}/{}/revision/{}",
            self.settings().endpoint,
            repo.kind.plural(),
            repo.id,
            super::quote_all(revision)
        );
        let (info, _): (RevisionInfo, _) = self.api_get_json(&url, repo, revision, ctx)?;
        let sha = info
            .sha
            .filter(|s| is_commit(s))
            .ok_or_else(|| Error::Protocol(format!("{url} did not return a 40-hex 'sha'")))?;
        self.repo_cache(repo).write_ref(revision, &sha)?;
        Ok(sha)
    }

    /// Lists every file of the repo at `commit` (recursive, following `Link: rel="next"`).
    /// Refuses the whole listing if any path is unsafe.
    pub fn list_files(&self, repo: &Repo, commit: &str, ctx: &Ctx) -> Result<Vec<RepoFile>> {
        let mut url = format!(
            "{}/api/{}/{}/tree/{}?recursive=true&expand=false",
            self.settings().endpoint,
            repo.kind.plural(),
            repo.id,
            super::quote_all(commit)
        );
        let mut out = Vec::new();
        for _page in 0..100_000 {
            ctx.check()?;
            let (entries, next): (Vec<TreeEntry>, _) =
                self.api_get_json(&url, repo, commit, ctx)?;
            for e in entries {
                check_repo_path(&e.path)?;
                if e.kind != "file" {
                    continue;
                }
                let lfs_sha256 = match e.lfs {
                    Some(l) => {
                        let sha = super::cache::normalize_etag(&l.oid)?;
                        if let Some(s) = l.size {
                            if s != e.size {
                                return Err(Error::Protocol(format!(
                                    "tree lists {} with size {} but LFS size {s}",
                                    e.path, e.size
                                )));
                            }
                        }
                        Some(sha)
                    }
                    None => None,
                };
                out.push(RepoFile {
                    path: e.path,
                    size: e.size,
                    oid: e.oid,
                    lfs_sha256,
                });
            }
            match next {
                Some(n) => url = super::http::join_location(&url, &n),
                None => return Ok(out),
            }
        }
        Err(Error::Protocol(
            "tree listing did not end after 100000 pages".into(),
        ))
    }

    pub(crate) fn auth_for(&self, url: &str) -> Auth {
        if super::http::origin(url).is_some() && super::http::origin(url) == self.hub_origin() {
            Auth::Hub
        } else {
            Auth::None
        }
    }

    pub(crate) fn target<'a>(
        &'a self,
        repo: &'a Repo,
        revision: &'a str,
        path: Option<&'a str>,
    ) -> Target<'a> {
        Target {
            repo,
            revision,
            path,
            endpoint: &self.settings().endpoint,
            token_source: &self.settings().token_source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header() {
        assert_eq!(
            next_link("<https://h/api/x?cursor=abc>; rel=\"next\"").as_deref(),
            Some("https://h/api/x?cursor=abc")
        );
        assert_eq!(
            next_link("<https://h/p>; rel=\"prev\", <https://h/n>; rel=\"next\"").as_deref(),
            Some("https://h/n")
        );
        assert_eq!(next_link("<https://h/p>; rel=\"prev\""), None);
    }
}
