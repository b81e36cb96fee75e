//! One HTTP layer for the Hub client: a `ureq` agent that never follows redirects by
//! itself (the same-origin rule is ours to apply), retries with back-off, and the mapping
//! of the Hub's `X-Error-Code` answers to typed errors.

use std::time::{Duration, Instant};

use ureq::http::{Response, StatusCode};
use ureq::Body;

use super::repo::Repo;
use super::settings::HubSettings;
use crate::error::{Error, Result};
use crate::progress::Cancel;

/// Response type of every call.
pub type Resp = Response<Body>;

/// Whom a request goes to: the Hub itself (token attached) or anywhere else (never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Hub,
    None,
}

/// The agent plus the settings that shape every request.
pub struct Http {
    agent: ureq::Agent,
    settings: HubSettings,
}

/// Statuses worth retrying.
pub fn is_transient(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

/// `scheme://host[:port]` of a URL, lower-cased, with default ports made explicit, so
/// two URLs of one origin compare equal.
pub fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?.to_ascii_lowercase();
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        && !authority.ends_with(']');
    let authority = if has_port {
        authority
    } else {
        match scheme.as_str() {
            "http" => format!("{authority}:80"),
            "https" => format!("{authority}:443"),
            _ => authority,
        }
    };
    Some(format!("{scheme}://{authority}"))
}

/// Resolves a `Location` header against the URL that produced it.
pub fn join_location(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let Some((scheme, rest)) = base.split_once("://") else {
        return location.to_string();
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if let Some(abs) = location.strip_prefix("//") {
        format!("{scheme}://{abs}")
    } else if location.starts_with('/') {
        format!("{scheme}://{authority}{location}")
    } else {
        let path = &rest[authority.len()..];
        let path = path.split(['?', '#']).next().unwrap_or("");
        let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        format!("{scheme}://{authority}{dir}/{location}")
    }
}

/// A header value as a string, if present and valid.
pub fn header<'a>(resp: &'a Resp, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// `Retry-After` in seconds or as an HTTP date.
fn retry_after(resp: &Resp) -> Option<Duration> {
    let v = header(resp, "retry-after")?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs));
        }
    }
    let when = httpdate::parse_http_date(v).ok()?;
    when.duration_since(std::time::SystemTime::now()).ok()
}

/// Sleeps `d` in short slices so a Ctrl-C interrupts the wait.
pub fn sleep_cancellable(d: Duration, cancel: &Cancel) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        cancel.check()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

impl Http {
    pub fn new(settings: HubSettings) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(settings.user_agent.as_str())
            .timeout_connect(Some(settings.etag_timeout))
            .timeout_recv_response(Some(settings.download_timeout.max(settings.etag_timeout)))
            .timeout_per_read(Some(settings.download_timeout))
            .max_idle_connections_per_host(32)
            .build()
            .into();
        Self { agent, settings }
    }

    pub fn settings(&self) -> &HubSettings {
        &self.settings
    }

    /// One request, no retry. `range` asks for `bytes=start-` or `bytes=start-end`.
    pub fn send_once(
        &self,
        method: &str,
        url: &str,
        auth: Auth,
        range: Option<(u64, Option<u64>)>,
    ) -> std::result::Result<Resp, ureq::Error> {
        let mut req = match method {
            "HEAD" => self.agent.head(url),
            _ => self.agent.get(url),
        }
        .header("Accept-Encoding", "identity");
        if let (Auth::Hub, Some(tok)) = (auth, &self.settings.token) {
            req = req.header("Authorization", format!("Bearer {tok}"));
        }
        if let Some((start, end)) = range {
            let v = match end {
                Some(e) => format!("bytes={start}-{e}"),
                None => format!("bytes={start}-"),
            };
            req = req.header("Range", v);
        }
        req.call()
    }

    /// A request retried on connection errors and transient statuses, honouring
    /// `Retry-After`. Returns the first non-transient response (which may be an error
    /// status: callers map it with [`hub_error`]).
    pub fn send(
        &self,
        method: &str,
        url: &str,
        auth: Auth,
        range: Option<(u64, Option<u64>)>,
        cancel: &Cancel,
    ) -> Result<Resp> {
        let mut attempt = 0u32;
        loop {
            cancel.check()?;
            let outcome = self.send_once(method, url, auth, range);
            let (wait, why) = match outcome {
                Ok(resp) if !is_transient(resp.status().as_u16()) => return Ok(resp),
                Ok(resp) => {
                    let status = resp.status();
                    (retry_after(&resp), format!("HTTP {status}"))
                }
                Err(e) => (None, e.to_string()),
            };
            if attempt >= self.settings.max_retries {
                return Err(Error::Http(format!(
                    "{method} {url} failed after {} attempts: {why}",
                    attempt + 1
                )));
            }
            self.backoff(attempt, wait, cancel)?;
            attempt += 1;
        }
    }

    /// Waits before retry number `attempt + 1`: the server's `Retry-After` if it gave one
    /// (capped at a minute), else exponential back-off.
    pub fn backoff(
        &self,
        attempt: u32,
        server_wait: Option<Duration>,
        cancel: &Cancel,
    ) -> Result<()> {
        let exp = self
            .settings
            .initial_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.settings.max_backoff);
        let wait = server_wait
            .map(|w| w.min(Duration::from_secs(60)))
            .unwrap_or(exp);
        sleep_cancellable(wait, cancel)
    }
}

/// What the caller was doing, for turning an error status into a typed error.
pub struct Target<'a> {
    pub repo: &'a Repo,
    pub revision: &'a str,
    pub path: Option<&'a str>,
    pub endpoint: &'a str,
    pub token_source: &'a str,
}

/// Maps a non-success Hub answer to a typed error, following the rules of
/// `huggingface_hub.utils.hf_raise_for_status`.
pub fn hub_error(resp: &Resp, url: &str, t: &Target<'_>) -> Error {
    let status = resp.status();
    let code = header(resp, "x-error-code").unwrap_or("");
    let message = header(resp, "x-error-message").unwrap_or("").to_string();
    let repo_kind = t.repo.kind.name();
    let not_found = || Error::RepositoryNotFound {
        repo_kind,
        repo_id: t.repo.id.clone(),
        endpoint: t.endpoint.to_string(),
    };
    match code {
        "RepoNotFound" => return not_found(),
        "GatedRepo" => {
            return Error::GatedRepo {
                repo_kind,
                repo_id: t.repo.id.clone(),
                url: format!("{}/{}", t.endpoint, t.repo.url_path()),
                message: if message.is_empty() {
                    "access is restricted".into()
                } else {
                    message
                },
            }
        }
        "RevisionNotFound" => {
            return Error::RevisionNotFound {
                repo_id: t.repo.id.clone(),
                revision: t.revision.to_string(),
            }
        }
        "EntryNotFound" => {
            return Error::EntryNotFound {
                repo_id: t.repo.id.clone(),
                revision: t.revision.to_string(),
                path: t.path.unwrap_or("").to_string(),
            }
        }
        _ => {}
    }
    if status == StatusCode::UNAUTHORIZED {
        if message.contains("Invalid credentials") || message.contains("Invalid user token") {
            return Error::InvalidToken {
                message,
                token_source: t.token_source.to_string(),
            };
        }
        // The Hub answers 401 without a code for repos that do not exist or are private.
        return not_found();
    }
    if status == StatusCode::NOT_FOUND {
        if let Some(p) = t.path {
            return Error::EntryNotFound {
                repo_id: t.repo.id.clone(),
                revision: t.revision.to_string(),
                path: p.to_string(),
            };
        }
        return not_found();
    }
    let detail = if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    };
    Error::Http(format!("HTTP {status} from {url}{detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        assert_eq!(
            origin("https://huggingface.co/api/x").as_deref(),
            Some("https://huggingface.co:443")
        );
        assert_eq!(
            origin("HTTP://127.0.0.1:8080/x?y").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_ne!(
            origin("http://127.0.0.1:8080/a"),
            origin("http://127.0.0.1:8081/a")
        );
        assert_eq!(origin("http://[::1]/a").as_deref(), Some("http://[::1]:80"));
        assert_eq!(origin("no-scheme"), None);
    }

    #[test]
    fn locations() {
        let b = "http://h:1/datasets/a/b/resolve/main/x.parquet";
        assert_eq!(join_location(b, "http://c:2/y"), "http://c:2/y");
        assert_eq!(join_location(b, "/api/z"), "http://h:1/api/z");
        assert_eq!(join_location(b, "//c:3/q"), "http://c:3/q");
        assert_eq!(
            join_location(b, "y.parquet"),
            "http://h:1/datasets/a/b/resolve/main/y.parquet"
        );
    }
}
