//! Where the Hub is, where its cache lives, and who we are: read from the same environment
//! variables `huggingface_hub` honours, so both tools share one cache and one token.

use std::path::PathBuf;
use std::time::Duration;

/// Settings of a [`super::HubClient`]. Build with [`HubSettings::from_env`], then override.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// `HF_ENDPOINT` without a trailing `/` (default `https://huggingface.co`).
    pub endpoint: String,
    /// `HF_HUB_CACHE` (or legacy `HUGGINGFACE_HUB_CACHE`, default `$HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// `HF_TOKEN`, else the token file; `None` when there is none.
    pub token: Option<String>,
    /// Where the token came from, for error messages (never the token itself).
    pub token_source: String,
    /// `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`: no request at all.
    pub offline: bool,
    /// Timeout of metadata calls (`HF_HUB_ETAG_TIMEOUT`, 10 s).
    pub etag_timeout: Duration,
    /// Timeout of each read while downloading (`HF_HUB_DOWNLOAD_TIMEOUT`, 10 s).
    pub download_timeout: Duration,
    /// How many times a transient failure is retried (`FERROTUNE_HUB_MAX_RETRIES`, 5).
    pub max_retries: u32,
    /// First back-off delay (`FERROTUNE_HUB_BACKOFF`, seconds, 0.5); doubles per retry,
    /// capped at `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Files at least this large are fetched as parallel byte ranges
    /// (`FERROTUNE_PARALLEL_THRESHOLD`, bytes; 64 MiB).
    pub parallel_threshold: u64,
    /// Concurrent range requests for one large file (`FERROTUNE_PARALLEL_CONNECTIONS`, 8).
    pub parallel_connections: usize,
    pub user_agent: String,
}

/// `1/ON/YES/TRUE` (any case) — the values `huggingface_hub` treats as true.
pub fn env_true(name: &str) -> bool {
    std::env::var(name)
        .map(|v| {
            matches!(
                v.trim().to_ascii_uppercase().as_str(),
                "1" | "ON" | "YES" | "TRUE"
            )
        })
        .unwrap_or(false)
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_secs(name: &str, default: f64) -> Duration {
    let secs = env_nonempty(name)
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(default);
    Duration::from_secs_f64(secs)
}

fn home_dir() -> PathBuf {
    env_nonempty("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    if let Some(h) = env_nonempty("HF_HOME") {
        return expand_user(&h);
    }
    let xdg = env_nonempty("XDG_CACHE_HOME")
        .map(|p| expand_user(&p))
        .unwrap_or_else(|| home_dir().join(".cache"));
    xdg.join("huggingface")
}

fn expand_user(p: &str) -> PathBuf {
    if let Some(rest) = p.strip_prefix("~/") {
        home_dir().join(rest)
    } else if p == "~" {
        home_dir()
    } else {
        PathBuf::from(p)
    }
}

impl HubSettings {
    /// Reads the environment the way `huggingface_hub` does.
    pub fn from_env() -> Self {
        let endpoint = env_nonempty("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .unwrap_or_else(|| "https://huggingface.co".to_string());
        let home = hf_home();
        let cache_dir = env_nonempty("HF_HUB_CACHE")
            .or_else(|| env_nonempty("HUGGINGFACE_HUB_CACHE"))
            .map(|p| expand_user(&p))
            .unwrap_or_else(|| home.join("hub"));
        let (token, token_source) = match env_nonempty("HF_TOKEN") {
            Some(t) => (Some(t.trim().to_string()), "HF_TOKEN".to_string()),
            None => {
                let path = env_nonempty("HF_TOKEN_PATH")
                    .map(|p| expand_user(&p))
                    .unwrap_or_else(|| home.join("token"));
                let token = std::fs::read_to_string(&path)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty());
                (token, path.display().to_string())
            }
        };
        let offline = env_true("HF_HUB_OFFLINE") || env_true("TRANSFORMERS_OFFLINE");
        Self {
            endpoint,
            cache_dir,
            token,
            token_source,
            offline,
            etag_timeout: env_secs("HF_HUB_ETAG_TIMEOUT", 10.0),
            download_timeout: env_secs("HF_HUB_DOWNLOAD_TIMEOUT", 10.0),
            max_retries: env_nonempty("FERROTUNE_HUB_MAX_RETRIES")
                .and_then(|v| v.parse().ok())
                .unwrap_or(5),
            initial_backoff: env_secs("FERROTUNE_HUB_BACKOFF", 0.5),
            max_backoff: Duration::from_secs(16),
            parallel_threshold: env_nonempty("FERROTUNE_PARALLEL_THRESHOLD")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(64 << 20),
            parallel_connections: env_nonempty("FERROTUNE_PARALLEL_CONNECTIONS")
                .and_then(|v| v.trim().parse().ok())
                .filter(|n: &usize| *n >= 1)
                .unwrap_or(8),
            user_agent: format!("ferrotune/{}; rust", env!("CARGO_PKG_VERSION")),
        }
    }

    /// Replaces the token (an explicit `token=` argument wins over the environment).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        if let Some(t) = token.filter(|t| !t.trim().is_empty()) {
            self.token = Some(t.trim().to_string());
            self.token_source = "the token= argument".to_string();
        }
        self
    }
}
