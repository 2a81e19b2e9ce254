//! `data download`: fetch a dataset's data files from the Hugging Face Hub with `hf-hub`.
//!
//! Before any request, the endpoint (`HF_ENDPOINT`, default `https://huggingface.co`) is probed
//! with a short TCP connect, so that a machine without internet fails in seconds with a clear
//! message instead of waiting on retries.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

/// The Hub's address when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// How long the reachability probe waits for name resolution and for a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// File endings that `data prepare` reads.
const DATA_SUFFIXES: [&str; 5] = [".parquet", ".jsonl", ".jsonl.gz", ".txt", ".txt.gz"];

/// Settings of [`download`].
#[derive(Debug, Clone)]
pub struct DownloadConfig {
    /// Dataset id on the Hub, e.g. `roneneldan/TinyStories`.
    pub dataset: String,
    /// Only files of this split (matched against path components and file name prefixes).
    pub split: Option<String>,
    pub out: PathBuf,
    pub revision: String,
    /// Hub address; `None` reads `HF_ENDPOINT`.
    pub endpoint: Option<String>,
    /// Download cache; `None` is the Hugging Face default (`HF_HOME`, else `~/.cache/huggingface`).
    pub cache_dir: Option<PathBuf>,
}

/// What [`download`] fetched.
#[derive(Debug, Clone)]
pub struct DownloadSummary {
    pub files: Vec<PathBuf>,
    pub bytes: u64,
}

/// The endpoint in force: the config's, else `HF_ENDPOINT`, else the public Hub.
pub fn endpoint(cfg: &DownloadConfig) -> String {
    endpoint_or_env(cfg.endpoint.as_deref())
}

/// `explicit` when given, else `HF_ENDPOINT`, else the public Hub; without a trailing slash.
pub fn endpoint_or_env(explicit: Option<&str>) -> String {
    explicit
        .map(str::to_string)
        .or_else(|| std::env::var("HF_ENDPOINT").ok().filter(|e| !e.trim().is_empty()))
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
        .trim_end_matches('/')
        .to_string()
}

/// How to do without the Hub, for the message of `talaria data download` when offline.
pub const DATA_OFFLINE_HINT: &str = "`talaria data download` needs internet access; on this machine, copy the \
     dataset's files here by other means and pass them to `talaria data prepare --input`";

/// Fails quickly, with a message that says so and then `hint` (what to do instead), when `endpoint`
/// cannot be reached.
pub fn check_reachable(endpoint: &str, hint: &str) -> Result<()> {
    let offline = |why: String| anyhow!("offline: cannot reach the Hugging Face Hub at {endpoint} ({why}). {hint}");
    let (scheme, rest) = endpoint
        .split_once("://")
        .ok_or_else(|| anyhow!("invalid Hub endpoint {endpoint:?} (expected http:// or https://)"))?;
    let default_port = match scheme {
        "https" => 443,
        "http" => 80,
        _ => bail!("invalid Hub endpoint {endpoint:?} (expected http:// or https://)"),
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    // Name resolution has no timeout of its own, so it runs on a thread that is given up on.
    let (tx, rx) = std::sync::mpsc::channel();
    let target = host_port.clone();
    std::thread::spawn(move || {
        let _ = tx.send(target.to_socket_addrs().map(|a| a.collect::<Vec<_>>()));
    });
    let addrs = match rx.recv_timeout(CONNECT_TIMEOUT) {
        Ok(Ok(addrs)) => addrs,
        Ok(Err(e)) => return Err(offline(format!("cannot resolve {host_port}: {e}"))),
        Err(_) => return Err(offline(format!("resolving {host_port} timed out"))),
    };
    let mut last = String::from("no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("connecting to {a}: {e}"),
        }
    }
    Err(offline(last))
}

/// Whether a repository file is a data file of the wanted split.
fn wanted(path: &str, split: Option<&str>) -> bool {
    let lower = path.to_lowercase();
    if !DATA_SUFFIXES.iter().any(|s| lower.ends_with(s)) {
        return false;
    }
    let Some(split) = split else { return true };
    let dashed = format!("{split}-");
    path.split(['/', '-', '.', '_']).any(|piece| piece == split)
        || path.split('/').any(|c| c == split || c.starts_with(&dashed))
}

/// Downloads the data files of a Hub dataset into `cfg.out`, keeping their repository paths.
pub fn download(cfg: &DownloadConfig) -> Result<DownloadSummary> {
    ensure!(
        !cfg.dataset.trim().is_empty(),
        "give a dataset id such as roneneldan/TinyStories"
    );
    let endpoint = endpoint(cfg);
    check_reachable(&endpoint, DATA_OFFLINE_HINT)?;
    let mut builder = ApiBuilder::from_env();
    if let Some(dir) = &cfg.cache_dir {
        builder = builder.with_cache_dir(dir.clone());
    }
    let api = builder
        .with_endpoint(endpoint.clone())
        .with_progress(true)
        .with_retries(1)
        .build()
        .context("setting up the Hugging Face Hub client")?;
    let repo = api.repo(Repo::with_revision(
        cfg.dataset.clone(),
        RepoType::Dataset,
        cfg.revision.clone(),
    ));
    let info = repo
        .info()
        .with_context(|| format!("listing dataset {} at {endpoint}", cfg.dataset))?;
    let all: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let files: Vec<&str> = all
        .iter()
        .copied()
        .filter(|f| wanted(f, cfg.split.as_deref()))
        .collect();
    if files.is_empty() {
        let data: Vec<&str> = all.iter().copied().filter(|f| wanted(f, None)).collect();
        bail!(
            "dataset {} has no data files{} (data files: {data:?})",
            cfg.dataset,
            cfg.split
                .as_ref()
                .map(|s| format!(" for split {s:?}"))
                .unwrap_or_default()
        );
    }
    let mut out = Vec::new();
    let mut bytes = 0;
    for f in files {
        let cached = repo
            .get(f)
            .with_context(|| format!("downloading {f} of {}", cfg.dataset))?;
        let dest = safe_join(&cfg.out, f)?;
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        bytes += std::fs::copy(&cached, &dest)
            .with_context(|| format!("copying {} to {}", cached.display(), dest.display()))?;
        out.push(dest);
    }
    Ok(DownloadSummary { files: out, bytes })
}

/// `dir/rel`, refusing repository paths that would escape `dir`.
fn safe_join(dir: &Path, rel: &str) -> Result<PathBuf> {
    ensure!(
        !rel.starts_with('/') && rel.split('/').all(|c| c != ".." && !c.is_empty()),
        "refusing the repository path {rel:?}"
    );
    Ok(dir.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_accepts_a_listening_endpoint() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        check_reachable(&format!("http://127.0.0.1:{port}/"), "").unwrap();
        drop(listener);
        let e = check_reachable(&format!("http://127.0.0.1:{port}"), DATA_OFFLINE_HINT)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("offline: cannot reach the Hugging Face Hub"), "{e}");
        assert!(check_reachable("ftp://example.org", "").is_err());
    }

    #[test]
    fn split_matching_picks_data_files_of_the_split() {
        assert!(wanted("data/train-00000-of-00002.parquet", Some("train")));
        assert!(wanted("plain_text/train/0000.parquet", Some("train")));
        assert!(wanted("TinyStories-train.txt", Some("train")));
        assert!(!wanted("data/validation-00000-of-00001.parquet", Some("train")));
        assert!(!wanted("README.md", None));
        assert!(!wanted("data/trainer.parquet", Some("train")));
        assert!(safe_join(Path::new("/x"), "../etc/passwd").is_err());
    }
}
