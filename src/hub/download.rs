//! File downloads: HEAD metadata with the same-origin redirect rule, then the bytes from
//! the CDN without the token, resumable, verified (size + sha256 or git sha1), in parallel
//! byte ranges for large files, into the shared cache. Also byte-range reads of remote
//! files for callers that need only part of one (Parquet footers and row groups).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha1::Digest as _;

use super::cache::{check_repo_path, normalize_etag, RepoCache};
use super::http::{header, hub_error, join_location, origin, Auth, Resp};
use super::repo::Repo;
use super::HubClient;
use crate::error::{Error, IoContext, Result};
use crate::progress::{Ctx, Task};

/// What a HEAD on the resolve URL says about a file.
#[derive(Debug, Clone)]
pub struct FileMeta {
    pub repo: Repo,
    pub path: String,
    /// The commit the revision resolved to (`X-Repo-Commit`).
    pub commit: String,
    /// sha256 (LFS) or git sha1, validated hex.
    pub etag: String,
    pub size: u64,
    /// Where the bytes are: the CDN location, or the resolve URL itself.
    pub url: String,
    /// Whether `url` is on the Hub's origin (and may carry the token).
    pub auth: Auth,
}

impl FileMeta {
    fn is_sha256(&self) -> bool {
        self.etag.len() == 64
    }
}

/// Running digest matching the kind of ETag: sha256 for LFS, git blob sha1 otherwise.
enum Hasher {
    Sha256(sha2::Sha256),
    GitSha1(sha1::Sha1),
}

impl Hasher {
    fn new(meta: &FileMeta) -> Self {
        if meta.is_sha256() {
            Hasher::Sha256(sha2::Sha256::new())
        } else {
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {}\0", meta.size).as_bytes());
            Hasher::GitSha1(h)
        }
    }
    fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::GitSha1(h) => h.update(b),
        }
    }
    fn hex(self) -> String {
        match self {
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::GitSha1(h) => hex::encode(h.finalize()),
        }
    }
}

/// Percent-quotes a repo path the way huggingface_hub does (`/` kept).
fn quote_path(path: &str) -> String {
    path.split('/')
        .map(super::quote_all)
        .collect::<Vec<_>>()
        .join("/")
}

const CHUNK: usize = 1 << 20;

/// Outcome of a byte-range read.
pub enum RangeRead {
    Bytes(Vec<u8>),
    /// The server answered 200 to a Range request: it does not do ranges.
    Unsupported,
}

impl HubClient {
    /// The resolve URL of `path` at `revision`.
    pub fn resolve_url(&self, repo: &Repo, revision: &str, path: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.settings().endpoint,
            repo.url_path(),
            super::quote_all(revision),
            quote_path(path)
        )
    }

    /// HEAD on the resolve URL. Redirects are followed only within the Hub's origin; a
    /// redirect elsewhere is the CDN, and the metadata is read from that 3xx answer.
    pub fn file_metadata(
        &self,
        repo: &Repo,
        revision: &str,
        path: &str,
        ctx: &Ctx,
    ) -> Result<FileMeta> {
        check_repo_path(path)?;
        let mut url = self.resolve_url(repo, revision, path);
        for _hop in 0..10 {
            let resp = self
                .http
                .send("HEAD", &url, self.auth_for(&url), None, ctx.cancel())?;
            let status = resp.status();
            if status.is_redirection() {
                let loc = header(&resp, "location").ok_or_else(|| {
                    Error::Protocol(format!("{status} from {url} without a Location"))
                })?;
                let next = join_location(&url, loc);
                if origin(&next) == self.hub_origin() {
                    url = next;
                    continue;
                }
                return self.meta_from(&resp, repo, path, next, Auth::None);
            }
            if !status.is_success() {
                let err = hub_error(&resp, &url, &self.target(repo, revision, Some(path)));
                if let Error::EntryNotFound { .. } = err {
                    if let Some(commit) = header(&resp, "x-repo-commit") {
                        if super::cache::is_commit(commit) {
                            let _ = self.repo_cache(repo).mark_missing(commit, path);
                        }
                    }
                }
                return Err(err);
            }
            return self.meta_from(&resp, repo, path, url.clone(), Auth::Hub);
        }
        Err(Error::Protocol(format!("too many redirects from {url}")))
    }

    fn meta_from(
        &self,
        resp: &Resp,
        repo: &Repo,
        path: &str,
        url: String,
        auth: Auth,
    ) -> Result<FileMeta> {
        let commit = header(resp, "x-repo-commit")
            .filter(|c| super::cache::is_commit(c))
            .ok_or_else(|| Error::Protocol(format!("no valid X-Repo-Commit for {path}")))?
            .to_string();
        let raw_etag = header(resp, "x-linked-etag")
            .or_else(|| header(resp, "etag"))
            .ok_or_else(|| Error::Protocol(format!("no ETag for {path}")))?;
        let etag = normalize_etag(raw_etag)?;
        let size = header(resp, "x-linked-size")
            .or_else(|| {
                if resp.status().is_redirection() {
                    None
                } else {
                    header(resp, "content-length")
                }
            })
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| Error::Protocol(format!("no file size for {path}")))?;
        Ok(FileMeta {
            repo: repo.clone(),
            path: path.to_string(),
            commit,
            etag,
            size,
            url,
            auth,
        })
    }

    /// `hf_hub_download`: the local path of `path` at `revision`, from the cache when it
    /// is there, else downloaded into it. Offline (or when the Hub cannot be reached) the
    /// cache answers alone.
    pub fn download(&self, repo: &Repo, revision: &str, path: &str, ctx: &Ctx) -> Result<PathBuf> {
        check_repo_path(path)?;
        super::cache::check_revision(revision)?;
        let cache = self.repo_cache(repo);
        if let Some(commit) = cache.resolve_ref(revision) {
            // A commit id pins the content: a cached file needs no request at all.
            if super::cache::is_commit(revision) || self.settings().offline {
                if let Some(p) = cache.cached_file(&commit, path) {
                    return Ok(p);
                }
                // The Hub said earlier that this file does not exist (`.no_exist`), as
                // huggingface_hub remembers it.
                if cache.is_marked_missing(&commit, path) {
                    return Err(Error::EntryNotFound {
                        repo_id: repo.id.clone(),
                        revision: revision.to_string(),
                        path: path.to_string(),
                    });
                }
            }
        }
        if self.settings().offline {
            return Err(self.offline_error(repo, revision, path, "HF_HUB_OFFLINE is set"));
        }
        let meta = match self.file_metadata(repo, revision, path, ctx) {
            Ok(m) => m,
            Err(Error::Http(why)) => {
                // Same as huggingface_hub: no connection, but a cached copy → use it.
                if let Some(p) = cache
                    .resolve_ref(revision)
                    .and_then(|c| cache.cached_file(&c, path))
                {
                    ctx.message(&format!("Hub unreachable ({why}); using cached {path}"));
                    return Ok(p);
                }
                return Err(Error::Http(why));
            }
            Err(e) => return Err(e),
        };
        cache.write_ref(revision, &meta.commit)?;
        self.fetch_into_cache(&meta, ctx)
    }

    pub(crate) fn offline_error(
        &self,
        repo: &Repo,
        revision: &str,
        path: &str,
        why: &str,
    ) -> Error {
        Error::OfflineNotCached {
            what: format!("{}@{revision}:{path}", repo.id),
            cache: self.repo_cache(repo).root,
            why: why.to_string(),
        }
    }

    /// Ensures the blob of `meta` is in the cache and linked from its snapshot.
    pub fn fetch_into_cache(&self, meta: &FileMeta, ctx: &Ctx) -> Result<PathBuf> {
        let cache = self.repo_cache(&meta.repo);
        if let Some(p) = cache.cached_file(&meta.commit, &meta.path) {
            return Ok(p);
        }
        let blob = cache.blob_path(&meta.etag);
        if !blob.is_file() {
            let _lock = cache.lock(&meta.etag)?;
            if !blob.is_file() {
                self.download_blob(meta, &cache, &blob, ctx)?;
            }
        }
        cache.link_snapshot(&meta.commit, &meta.path, &meta.etag)
    }

    fn download_blob(
        &self,
        meta: &FileMeta,
        cache: &RepoCache,
        blob: &Path,
        ctx: &Ctx,
    ) -> Result<()> {
        let blobs = blob.parent().expect("blob has a parent");
        fs::create_dir_all(blobs).at(blobs)?;
        let task = ctx.task(&meta.path, Some(meta.size), "B");
        let max = self.settings().max_retries;
        let mut attempt = 0;
        loop {
            let tmp = cache.incomplete_path(&meta.etag);
            let parallel = meta.size >= self.settings().parallel_threshold
                && self.settings().parallel_connections > 1
                && fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0) == 0;
            let parallel_digest = if parallel {
                self.download_parallel(meta, &tmp, &task, ctx)?
            } else {
                None
            };
            // Not parallel, or the server ignored Range: one stream.
            let digest = match parallel_digest {
                Some(d) => d,
                None => self.download_sequential(meta, &tmp, &task, ctx)?,
            };
            if digest == meta.etag {
                fs::rename(&tmp, blob).at(blob)?;
                return Ok(());
            }
            // Corrupted bytes: never cache them; start over from zero.
            let _ = fs::remove_file(&tmp);
            if attempt >= max {
                return Err(Error::Integrity(format!(
                    "{}: downloaded content has digest {digest} but the Hub announced {} ({} attempts); nothing was cached",
                    meta.path, meta.etag, attempt + 1
                )));
            }
            ctx.message(&format!(
                "{}: checksum mismatch, downloading again",
                meta.path
            ));
            self.http.backoff(attempt, None, ctx.cancel())?;
            attempt += 1;
        }
    }

    /// Streams the file into `tmp`, resuming from its current length with `Range`.
    /// Returns the content digest.
    fn download_sequential(
        &self,
        meta: &FileMeta,
        tmp: &Path,
        task: &Task,
        ctx: &Ctx,
    ) -> Result<String> {
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(tmp)
            .at(tmp)?;
        let mut have = file.metadata().at(tmp)?.len();
        if have > meta.size {
            file.set_len(0).at(tmp)?;
            have = 0;
        }
        // Hash what a previous attempt left, so the digest covers the whole file.
        let mut hasher = Hasher::new(meta);
        if have > 0 {
            file.seek(SeekFrom::Start(0)).at(tmp)?;
            let mut buf = vec![0u8; CHUNK];
            let mut left = have;
            while left > 0 {
                let n = file
                    .read(&mut buf[..(left.min(CHUNK as u64) as usize)])
                    .at(tmp)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
            task.advance(have);
        }
        let mut restarts = 0;
        loop {
            let resumed =
                self.fetch_resuming(meta, have, meta.size, ctx, &mut |bytes: &[u8]| {
                    file.write_all(bytes).at(tmp)?;
                    hasher.update(bytes);
                    task.advance(bytes.len() as u64);
                    Ok(())
                })?;
            file.flush().at(tmp)?;
            have = file.metadata().at(tmp)?.len();
            if resumed {
                break;
            }
            // The server answered a Range request with the whole file: start over.
            restarts += 1;
            if restarts > self.settings().max_retries {
                return Err(Error::Http(format!(
                    "{}: the connection keeps dropping and the server ignores Range requests",
                    meta.path
                )));
            }
            file.set_len(0).at(tmp)?;
            hasher = Hasher::new(meta);
            have = 0;
        }
        if have != meta.size {
            return Err(Error::Integrity(format!(
                "{}: got {have} bytes, expected {}",
                meta.path, meta.size
            )));
        }
        file.sync_all().at(tmp)?;
        Ok(hasher.hex())
    }

    /// One GET of `meta.url` (optionally from `range`), feeding body chunks to `sink`.
    /// `Ok(false)`, without reading the body, when a Range request was answered with 200.
    fn stream_once(
        &self,
        meta: &FileMeta,
        range: Option<(u64, Option<u64>)>,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
        ctx: &Ctx,
    ) -> Result<bool> {
        let mut resp = self
            .http
            .send("GET", &meta.url, meta.auth, range, ctx.cancel())?;
        let status = resp.status().as_u16();
        match (status, range) {
            (206, Some((from, _))) => {
                let cr = header(&resp, "content-range").unwrap_or("");
                let ok = cr
                    .trim()
                    .strip_prefix("bytes ")
                    .and_then(|r| r.split('-').next())
                    .and_then(|s| s.parse::<u64>().ok())
                    == Some(from);
                if !ok {
                    return Err(Error::Protocol(format!(
                        "{}: asked for bytes from {from}, got Content-Range {cr:?}",
                        meta.path
                    )));
                }
            }
            (200, Some(_)) => return Ok(false),
            (200, None) => {}
            _ => {
                return Err(hub_error(
                    &resp,
                    &meta.url,
                    &self.target(&meta.repo, &meta.commit, Some(&meta.path)),
                ))
            }
        }
        let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
        let mut buf = vec![0u8; CHUNK];
        loop {
            ctx.check()?;
            let n = reader.read(&mut buf).map_err(|e| {
                Error::Http(format!("{}: connection lost mid-file: {e}", meta.path))
            })?;
            if n == 0 {
                return Ok(true);
            }
            sink(&buf[..n])?;
        }
    }

    /// Large files: `parallel_connections` range requests into part files (each resumable
    /// by its length), then concatenated into `tmp` while hashing. `Ok(None)` when the
    /// server does not do ranges.
    fn download_parallel(
        &self,
        meta: &FileMeta,
        tmp: &Path,
        task: &Task,
        ctx: &Ctx,
    ) -> Result<Option<String>> {
        let n = self.settings().parallel_connections.max(1) as u64;
        let part_len = meta.size.div_ceil(n);
        let blobs = tmp.parent().expect("tmp has a parent");
        let parts: Vec<(PathBuf, u64, u64)> = (0..n)
            .map(|k| {
                let start = k * part_len;
                let end = ((k + 1) * part_len).min(meta.size);
                (
                    blobs.join(format!("{}.p{k}-{n}.partial", meta.etag)),
                    start,
                    end,
                )
            })
            .filter(|(_, s, e)| s < e)
            .collect();
        let results: Vec<Result<bool>> = std::thread::scope(|s| {
            let handles: Vec<_> = parts
                .iter()
                .map(|(p, start, end)| {
                    s.spawn(move || self.download_part(meta, p, *start, *end, task, ctx))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Http("download thread panicked".into())))
                })
                .collect()
        });
        let mut ranges_ok = true;
        for r in results {
            if !r? {
                ranges_ok = false;
            }
        }
        if !ranges_ok {
            for (p, _, _) in &parts {
                let _ = fs::remove_file(p);
            }
            return Ok(None);
        }
        let mut out = File::create(tmp).at(tmp)?;
        let mut hasher = Hasher::new(meta);
        let mut buf = vec![0u8; CHUNK];
        for (p, _, _) in &parts {
            let mut f = File::open(p).at(p)?;
            loop {
                let k = f.read(&mut buf).at(p)?;
                if k == 0 {
                    break;
                }
                hasher.update(&buf[..k]);
                out.write_all(&buf[..k]).at(tmp)?;
            }
        }
        out.sync_all().at(tmp)?;
        for (p, _, _) in &parts {
            let _ = fs::remove_file(p);
        }
        Ok(Some(hasher.hex()))
    }

    /// Fetches bytes `[start, end)` into `part`, resuming from its length. `Ok(false)` if
    /// the server ignored the Range header.
    fn download_part(
        &self,
        meta: &FileMeta,
        part: &Path,
        start: u64,
        end: u64,
        task: &Task,
        ctx: &Ctx,
    ) -> Result<bool> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .at(part)?;
        let mut have = file.metadata().at(part)?.len();
        if have > end - start {
            file.set_len(0).at(part)?;
            have = 0;
        }
        task.advance(have);
        self.fetch_resuming(meta, start + have, end, ctx, &mut |b: &[u8]| {
            file.write_all(b).at(part)?;
            task.advance(b.len() as u64);
            Ok(())
        })
    }

    /// Reads bytes `[start, end)` of a remote file (for footer and row-group reads).
    pub fn read_range(
        &self,
        meta: &FileMeta,
        start: u64,
        end: u64,
        ctx: &Ctx,
    ) -> Result<RangeRead> {
        let mut out = Vec::with_capacity((end - start) as usize);
        let ranged = self.fetch_resuming(meta, start, end, ctx, &mut |b: &[u8]| {
            out.extend_from_slice(b);
            Ok(())
        })?;
        Ok(if ranged {
            RangeRead::Bytes(out)
        } else {
            RangeRead::Unsupported
        })
    }

    /// Streams bytes `[start, end)` of the file into `sink`, reconnecting after dropped
    /// connections and transient errors (with back-off) and resuming where the sink got to.
    /// `Ok(false)` when the server answered a Range request with the whole file.
    fn fetch_resuming(
        &self,
        meta: &FileMeta,
        start: u64,
        end: u64,
        ctx: &Ctx,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<bool> {
        let mut done = 0u64;
        let mut failures = 0;
        while start + done < end {
            ctx.check()?;
            let from = start + done;
            let range = match (from, end == meta.size) {
                (0, true) => None,
                (_, true) => Some((from, None)),
                (_, false) => Some((from, Some(end - 1))),
            };
            let res = self.stream_once(
                meta,
                range,
                &mut |b: &[u8]| {
                    let room = (end - start - done) as usize;
                    let b = &b[..b.len().min(room)];
                    done += b.len() as u64;
                    sink(b)
                },
                ctx,
            );
            match res {
                Ok(false) => return Ok(false),
                Ok(true) => {}
                Err(e) => {
                    failures += 1;
                    if failures > self.settings().max_retries || !is_retryable(&e) {
                        return Err(e);
                    }
                    self.http.backoff(failures - 1, None, ctx.cancel())?;
                }
            }
        }
        Ok(true)
    }
}

fn is_retryable(e: &Error) -> bool {
    matches!(e, Error::Http(_))
}
