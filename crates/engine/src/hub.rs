//! Model downloads from the Hugging Face Hub into the standard HF cache.
//!
//! The transfer is written here on `ureq` rather than with the `hf-hub` crate because `hf-hub`'s
//! sync API can neither cancel a download nor keep huggingface_hub's `.incomplete` partial files.
//! The cache layout is huggingface_hub's own, so Python tools (diffusers) and Easel share models:
//!
//! ```text
//! {cache}/models--{org}--{name}/refs/{revision}         commit hash
//! {cache}/models--{org}--{name}/blobs/{etag}            file contents (sha256 for LFS files)
//! {cache}/models--{org}--{name}/blobs/{etag}.incomplete partial download, resumed with Range
//! {cache}/models--{org}--{name}/snapshots/{commit}/{path} -> ../../blobs/{etag}
//! ```

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, Result};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// A model Easel offers to download, with the diffusers-layout repository it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CuratedModel {
    /// Short stable id used in settings and on the command line.
    pub id: &'static str,
    pub repo: &'static str,
    pub revision: &'static str,
    pub title: &'static str,
    /// Model family, as named by [`crate::models`] ("sd1", "sd2", "sdxl").
    pub family: &'static str,
}

/// The curated list; the files fetched for each are chosen by [`select_files`].
pub const CURATED: &[CuratedModel] = &[
    CuratedModel {
        id: "sd15",
        // runwayml deleted its repository; this is the mirror diffusers now points to.
        repo: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        revision: "main",
        title: "Stable Diffusion 1.5",
        family: "sd1",
    },
    CuratedModel {
        id: "sd21",
        repo: "stabilityai/stable-diffusion-2-1",
        revision: "main",
        title: "Stable Diffusion 2.1",
        family: "sd2",
    },
    CuratedModel {
        id: "sdxl",
        repo: "stabilityai/stable-diffusion-xl-base-1.0",
        revision: "main",
        title: "Stable Diffusion XL base 1.0",
        family: "sdxl",
    },
    CuratedModel { id: "sd-turbo", repo: "stabilityai/sd-turbo", revision: "main", title: "SD-Turbo", family: "sd2" },
    CuratedModel {
        id: "sdxl-turbo",
        repo: "stabilityai/sdxl-turbo",
        revision: "main",
        title: "SDXL-Turbo",
        family: "sdxl",
    },
];

/// Looks a curated model up by its id.
pub fn curated(id: &str) -> Option<&'static CuratedModel> {
    CURATED.iter().find(|m| m.id == id)
}

/// Components whose weights Easel loads; others (safety_checker, feature_extractor) are skipped.
const WEIGHT_COMPONENTS: &[&str] = &["text_encoder", "text_encoder_2", "unet", "vae"];
const TOKENIZER_COMPONENTS: &[&str] = &["tokenizer", "tokenizer_2"];
const TOKENIZER_FILES: &[&str] = &["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"];

/// Picks, from a diffusers repository's file list, the files Easel needs: configs, tokenizers and
/// safetensors weights, the fp16 variant where the repository has one (half the download). Never
/// pickles (.bin/.ckpt), ONNX, Flax or OpenVINO files, nor single-file checkpoints at the root.
pub fn select_files(siblings: &[String]) -> Vec<String> {
    let present: HashSet<&str> = siblings.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for f in ["model_index.json", "scheduler/scheduler_config.json"] {
        if present.contains(f) {
            out.push(f.to_string());
        }
    }
    for comp in WEIGHT_COMPONENTS {
        let config = format!("{comp}/config.json");
        if present.contains(config.as_str()) {
            out.push(config);
        }
        let in_comp: Vec<&str> = siblings
            .iter()
            .filter_map(|s| s.strip_prefix(comp).and_then(|r| r.strip_prefix('/')))
            .filter(|name| !name.contains('/'))
            .collect();
        // Weights with no variant, or the fp16 variant when the repository has one.
        let weights = |want: Option<&str>| -> Vec<&str> {
            in_comp.iter().copied().filter(|n| weights_variant(n) == Some(want)).collect()
        };
        let fp16 = weights(Some("fp16"));
        let chosen = if fp16.iter().any(|n| n.ends_with(".safetensors")) { fp16 } else { weights(None) };
        out.extend(chosen.into_iter().map(|n| format!("{comp}/{n}")));
    }
    for comp in TOKENIZER_COMPONENTS {
        for f in TOKENIZER_FILES {
            let path = format!("{comp}/{f}");
            if present.contains(path.as_str()) {
                out.push(path);
            }
        }
    }
    out
}

/// For a safetensors weights file or shard index, its diffusers variant: `Some(None)` for plain
/// weights, `Some(Some("fp16"))` for `x.fp16.safetensors`, `x.fp16-00001-of-00002.safetensors` or
/// `x.safetensors.index.fp16.json`; `None` for anything else.
fn weights_variant(name: &str) -> Option<Option<&str>> {
    if let Some(stem) = name.strip_suffix(".safetensors") {
        // Shards: "model-00001-of-00002" or "model.fp16-00001-of-00002".
        let stem = match stem.rfind("-of-") {
            Some(i) => stem[..i].rsplit_once('-').map_or(stem, |(s, _)| s),
            None => stem,
        };
        return Some(stem.split_once('.').map(|(_, v)| v));
    }
    let rest = name.strip_suffix(".json")?;
    let (stem, after) = rest.split_once(".safetensors.index")?;
    if stem.contains('.') {
        return None;
    }
    match after.strip_prefix('.') {
        Some(v) if !v.is_empty() => Some(Some(v)),
        None if after.is_empty() => Some(None),
        _ => None,
    }
}

/// Progress of a download, reported after every chunk received.
#[derive(Debug, Clone, PartialEq)]
pub struct DownloadProgress {
    /// Repository path of the file being transferred.
    pub file: String,
    pub file_bytes: u64,
    pub file_total: u64,
    /// Bytes present for the whole snapshot, including files already cached or resumed.
    pub total_bytes: u64,
    pub total_expected: u64,
    /// Average over this session's transfer (resumed bytes don't count).
    pub bytes_per_second: f64,
}

/// What the Hub says about one file before it is downloaded.
#[derive(Debug, Clone)]
struct FileMeta {
    path: String,
    etag: String,
    size: u64,
    /// Where the bytes are (the CDN for LFS files), and whether the token may be sent there.
    url: String,
    same_host: bool,
}

#[derive(Clone)]
pub struct Downloader {
    endpoint: String,
    cache_dir: PathBuf,
    token: Option<String>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Downloader {
    // Hand-written so the token never ends up in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downloader")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// huggingface_hub's `HF_HOME`: `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    if let Some(h) = std::env::var_os("HF_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(x).join("huggingface");
    }
    dirs::home_dir().unwrap_or_default().join(".cache").join("huggingface")
}

/// The hub cache shared with Python: `$HF_HUB_CACHE`, else `$HF_HOME/hub`.
pub fn default_cache_dir() -> PathBuf {
    match std::env::var_os("HF_HUB_CACHE").filter(|h| !h.is_empty()) {
        Some(c) => PathBuf::from(c),
        None => hf_home().join("hub"),
    }
}

/// The token as huggingface_hub finds it: `$HF_TOKEN`, else the file `huggingface-cli login` wrote.
pub fn token_from_env() -> Option<String> {
    if let Ok(t) = std::env::var("HF_TOKEN") {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Some(t);
        }
    }
    let path = std::env::var_os("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home().join("token"));
    let t = fs::read_to_string(path).ok()?.trim().to_string();
    (!t.is_empty()).then_some(t)
}

/// The folder huggingface_hub uses for a model repository.
pub fn repo_folder(cache_dir: &Path, repo: &str) -> PathBuf {
    cache_dir.join(format!("models--{}", repo.replace('/', "--")))
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// `W/"abc"` → `abc`, as huggingface_hub normalises ETags.
fn normalize_etag(e: &str) -> String {
    e.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

/// Resolves a `Location` header against the URL it came from (the Hub uses relative redirects for
/// renamed repositories and absolute ones to its CDN).
fn join_url(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let origin_end = base.find("://").and_then(|i| base[i + 3..].find('/').map(|j| i + 3 + j)).unwrap_or(base.len());
    if location.starts_with('/') {
        format!("{}{location}", &base[..origin_end])
    } else {
        let dir_end = base.rfind('/').filter(|&i| i >= origin_end).unwrap_or(base.len());
        format!("{}/{location}", &base[..dir_end])
    }
}

fn origin(url: &str) -> &str {
    let start = url.find("://").map_or(0, |i| i + 3);
    url[start..].find('/').map_or(url, |j| &url[..start + j])
}

/// Percent-encodes a repository path segment by segment (file names may hold spaces or `#`).
fn encode_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn header<'a>(resp: &'a ureq::http::Response<ureq::Body>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

impl Downloader {
    pub fn new(endpoint: impl Into<String>, cache_dir: impl Into<PathBuf>, token: Option<String>) -> Self {
        let config = ureq::Agent::config_builder()
            // Statuses are mapped to our own errors (gated, not found), redirects followed by hand
            // because the Hub puts the LFS ETag and size on the redirect itself.
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            // A stalled transfer fails (and can be resumed) rather than hanging forever.
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("easel/", env!("CARGO_PKG_VERSION")))
            .build();
        Downloader {
            endpoint: endpoint.into().trim_end_matches('/').to_string(),
            cache_dir: cache_dir.into(),
            token,
            agent: config.into(),
        }
    }

    /// Endpoint (`$HF_ENDPOINT`), cache and token as huggingface_hub would find them.
    pub fn from_env() -> Self {
        let endpoint =
            std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()).unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Self::new(endpoint, default_cache_dir(), token_from_env())
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The snapshot folder of `repo` at `revision` if everything Easel needs is already in the
    /// cache (downloaded by Easel or by diffusers), found without any network access.
    pub fn find_local(&self, repo: &str, revision: &str) -> Option<PathBuf> {
        let folder = repo_folder(&self.cache_dir, repo);
        let commit = if is_commit_hash(revision) {
            revision.to_string()
        } else {
            fs::read_to_string(folder.join("refs").join(revision)).ok()?.trim().to_string()
        };
        let snapshot = folder.join("snapshots").join(commit);
        snapshot_complete(&snapshot).then_some(snapshot)
    }

    /// Downloads what Easel needs of `repo` at `revision` and returns the snapshot folder.
    ///
    /// Files already in the cache are not fetched again, partial ones are resumed. `progress`
    /// returning `Break` cancels, keeping the partial file for a later call to resume. When the Hub
    /// can't be reached but the model is complete in the cache, the cached snapshot is returned.
    pub fn download(
        &self,
        repo: &str,
        revision: &str,
        progress: &mut dyn FnMut(DownloadProgress) -> ControlFlow<()>,
    ) -> Result<PathBuf> {
        match self.download_inner(repo, revision, progress) {
            Err(e @ Error::HubOffline { .. }) => self.find_local(repo, revision).ok_or(e),
            other => other,
        }
    }

    fn download_inner(
        &self,
        repo: &str,
        revision: &str,
        progress: &mut dyn FnMut(DownloadProgress) -> ControlFlow<()>,
    ) -> Result<PathBuf> {
        let (commit, siblings) = self.repo_info(repo, revision)?;
        let files = select_files(&siblings);
        if !files.iter().any(|f| f == "model_index.json") {
            return Err(Error::HubNotFound {
                repo: repo.to_string(),
                what: "model_index.json (not a diffusers model repository)".to_string(),
            });
        }
        let metas = files.iter().map(|f| self.file_meta(repo, &commit, f)).collect::<Result<Vec<_>>>()?;

        let folder = repo_folder(&self.cache_dir, repo);
        let blobs = folder.join("blobs");
        let snapshot = folder.join("snapshots").join(&commit);
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        if revision != commit {
            let refs = folder.join("refs");
            fs::create_dir_all(&refs).map_err(io_err(&refs))?;
            let r = refs.join(revision);
            if let Some(parent) = r.parent() {
                // Revisions like "refs/pr/1" nest.
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            fs::write(&r, &commit).map_err(io_err(&r))?;
        }

        let mut tally = Tally {
            total_expected: metas.iter().map(|m| m.size).sum(),
            total_done: 0,
            session_bytes: 0,
            started: Instant::now(),
        };
        for meta in &metas {
            let blob = blobs.join(&meta.etag);
            if !blob.is_file() {
                self.fetch_blob(meta, &blob, &mut tally, progress)?;
            } else {
                tally.total_done += meta.size;
                let report = tally.report(&meta.path, meta.size, meta.size);
                if progress(report).is_break() {
                    return Err(Error::Cancelled);
                }
            }
            link_snapshot(&snapshot, &meta.path, &blob)?;
        }
        Ok(snapshot)
    }

    fn get(&self, url: &str, auth: bool) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let req = self.agent.get(url);
        match (&self.token, auth) {
            (Some(t), true) => req.header("Authorization", format!("Bearer {t}")),
            _ => req,
        }
    }

    fn transport_error(&self, url: &str, e: ureq::Error) -> Error {
        match e {
            ureq::Error::HostNotFound | ureq::Error::ConnectionFailed | ureq::Error::Timeout(_) => {
                Error::HubOffline { endpoint: self.endpoint.clone(), message: e.to_string() }
            }
            ureq::Error::Io(ref io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::NotConnected
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::HostUnreachable
                        | std::io::ErrorKind::NetworkUnreachable
                        | std::io::ErrorKind::AddrNotAvailable
                ) =>
            {
                Error::HubOffline { endpoint: self.endpoint.clone(), message: e.to_string() }
            }
            // Name resolution fails with an uncategorised I/O error; without DNS there is no network.
            ureq::Error::Io(ref io)
                if io.to_string().contains("lookup address") || io.to_string().contains("name resolution") =>
            {
                Error::HubOffline { endpoint: self.endpoint.clone(), message: e.to_string() }
            }
            other => Error::HubHttp { url: url.to_string(), message: other.to_string() },
        }
    }

    fn status_error(&self, repo: &str, what: &str, url: &str, status: u16) -> Error {
        match status {
            401 | 403 => Error::HubGated { repo: repo.to_string(), status, token_set: self.token.is_some() },
            404 => Error::HubNotFound { repo: repo.to_string(), what: what.to_string() },
            _ => Error::HubHttp { url: url.to_string(), message: format!("HTTP status {status}") },
        }
    }

    /// Commit hash and file list of `repo` at `revision`.
    fn repo_info(&self, repo: &str, revision: &str) -> Result<(String, Vec<String>)> {
        #[derive(serde::Deserialize)]
        struct Sibling {
            rfilename: String,
        }
        #[derive(serde::Deserialize)]
        struct Info {
            sha: String,
            #[serde(default)]
            siblings: Vec<Sibling>,
        }
        let url = format!("{}/api/models/{repo}/revision/{}", self.endpoint, encode_path(revision));
        let resp = self.get(&url, true).call().map_err(|e| self.transport_error(&url, e))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(self.status_error(repo, &format!("revision {revision}"), &url, status));
        }
        let text = resp.into_body().read_to_string().map_err(|e| self.transport_error(&url, e))?;
        let info: Info = serde_json::from_str(&text)
            .map_err(|e| Error::HubHttp { url: url.clone(), message: format!("unexpected answer: {e}") })?;
        if !is_commit_hash(&info.sha) {
            return Err(Error::HubHttp { url, message: format!("unexpected commit hash {:?}", info.sha) });
        }
        Ok((info.sha, info.siblings.into_iter().map(|s| s.rfilename).collect()))
    }

    /// HEAD of the resolve URL, without following the redirect: for LFS files the Hub puts the
    /// sha256 (`X-Linked-Etag`) and size (`X-Linked-Size`) on the redirect to its CDN.
    fn file_meta(&self, repo: &str, commit: &str, path: &str) -> Result<FileMeta> {
        let mut url = format!("{}/{repo}/resolve/{commit}/{}", self.endpoint, encode_path(path));
        // Bounded: relative redirects (renamed repositories) are followed a few times at most.
        for _ in 0..5 {
            let mut req = self.agent.head(&url);
            if let Some(t) = &self.token {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
            let resp = req.call().map_err(|e| self.transport_error(&url, e))?;
            let status = resp.status().as_u16();
            let etag = header(&resp, "x-linked-etag").or_else(|| header(&resp, "etag")).map(normalize_etag);
            let size = header(&resp, "x-linked-size")
                .or_else(|| header(&resp, "content-length"))
                .and_then(|s| s.trim().parse::<u64>().ok());
            let location = header(&resp, "location").map(|l| join_url(&url, l));
            match status {
                200..=399 if etag.is_some() => {
                    let (Some(etag), Some(size)) = (etag, size) else {
                        return Err(Error::HubHttp { url, message: "no file size in the answer".to_string() });
                    };
                    // ETags become file names: refuse anything that could escape blobs/.
                    if etag.is_empty() || etag.contains(['/', '\\']) || etag.starts_with('.') {
                        return Err(Error::HubHttp { url, message: format!("unexpected ETag {etag:?}") });
                    }
                    let target = if (300..400).contains(&status) { location.unwrap_or(url.clone()) } else { url };
                    let same_host = origin(&target) == origin(&self.endpoint);
                    return Ok(FileMeta { path: path.to_string(), etag, size, url: target, same_host });
                }
                300..=399 => match location {
                    Some(l) => url = l,
                    None => return Err(Error::HubHttp { url, message: "redirect without Location".to_string() }),
                },
                200..=299 => return Err(Error::HubHttp { url, message: "no ETag in the answer".to_string() }),
                _ => return Err(self.status_error(repo, path, &url, status)),
            }
        }
        Err(Error::HubHttp { url, message: "too many redirects".to_string() })
    }

    /// Downloads one blob into `{blob}.incomplete`, resuming what is there, then renames it.
    fn fetch_blob(
        &self,
        meta: &FileMeta,
        blob: &Path,
        tally: &mut Tally,
        progress: &mut dyn FnMut(DownloadProgress) -> ControlFlow<()>,
    ) -> Result<()> {
        let mut partial_name = blob.as_os_str().to_owned();
        partial_name.push(".incomplete");
        let partial = PathBuf::from(partial_name);
        let mut have = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if have > meta.size {
            // Not a prefix of this file: start over.
            fs::remove_file(&partial).map_err(io_err(&partial))?;
            have = 0;
        }

        if have < meta.size {
            let mut req = self.get(&meta.url, meta.same_host);
            if have > 0 {
                req = req.header("Range", format!("bytes={have}-"));
            }
            let resp = req.call().map_err(|e| self.transport_error(&meta.url, e))?;
            let status = resp.status().as_u16();
            let mut file = match status {
                206 if have > 0 => fs::OpenOptions::new().append(true).open(&partial).map_err(io_err(&partial))?,
                // The server ignored the Range: take the whole file again.
                200 => {
                    have = 0;
                    fs::File::create(&partial).map_err(io_err(&partial))?
                }
                _ => return Err(self.status_error("", &meta.path, &meta.url, status)),
            };
            tally.total_done += have;
            let mut reader = resp.into_body().into_reader();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = file.flush();
                        return Err(Error::HubInterrupted { file: meta.path.clone(), message: e.to_string() });
                    }
                };
                if have + n as u64 > meta.size {
                    drop(file);
                    let _ = fs::remove_file(&partial);
                    return Err(Error::HubSizeMismatch {
                        file: meta.path.clone(),
                        expected: meta.size,
                        received: have + n as u64,
                    });
                }
                file.write_all(&buf[..n]).map_err(io_err(&partial))?;
                have += n as u64;
                tally.total_done += n as u64;
                tally.session_bytes += n as u64;
                if progress(tally.report(&meta.path, have, meta.size)).is_break() {
                    file.flush().map_err(io_err(&partial))?;
                    return Err(Error::Cancelled);
                }
            }
            file.sync_all().map_err(io_err(&partial))?;
        }

        if have != meta.size {
            // The server ended the body cleanly but short: resuming would not help.
            let _ = fs::remove_file(&partial);
            return Err(Error::HubSizeMismatch { file: meta.path.clone(), expected: meta.size, received: have });
        }
        fs::rename(&partial, blob).map_err(io_err(blob))
    }
}

struct Tally {
    total_expected: u64,
    total_done: u64,
    session_bytes: u64,
    started: Instant,
}

impl Tally {
    fn report(&self, file: &str, file_bytes: u64, file_total: u64) -> DownloadProgress {
        let secs = self.started.elapsed().as_secs_f64();
        DownloadProgress {
            file: file.to_string(),
            file_bytes,
            file_total,
            total_bytes: self.total_done,
            total_expected: self.total_expected,
            bytes_per_second: if secs > 0.0 { self.session_bytes as f64 / secs } else { 0.0 },
        }
    }
}

/// Points `snapshots/{commit}/{path}` at the blob: a relative symlink as huggingface_hub makes,
/// or a copy where symlinks aren't available.
fn link_snapshot(snapshot: &Path, path: &str, blob: &Path) -> Result<()> {
    let dest = snapshot.join(path);
    let parent = dest.parent().unwrap_or(snapshot);
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    if dest.symlink_metadata().is_ok() {
        fs::remove_file(&dest).map_err(io_err(&dest))?;
    }
    #[cfg(unix)]
    {
        // From snapshots/{commit}/{path}: up one per folder in path, then commit and snapshots.
        let depth = path.split('/').count() + 1;
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(blob.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(&target, &dest).map_err(io_err(&dest))
    }
    #[cfg(not(unix))]
    {
        fs::copy(blob, &dest).map(|_| ()).map_err(io_err(&dest))
    }
}

/// Whether a snapshot folder holds everything Easel loads: the components model_index.json
/// names, each with its config and weights (every shard of a sharded one), and the tokenizers.
fn snapshot_complete(snapshot: &Path) -> bool {
    let Ok(text) = fs::read_to_string(snapshot.join("model_index.json")) else {
        return false;
    };
    let Ok(index) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text) else {
        return false;
    };
    // Components set to [null, null] in model_index.json are absent on purpose.
    let listed = |c: &str| index.get(c).and_then(|v| v.as_array()).is_some_and(|a| a.iter().all(|x| !x.is_null()));
    if listed("scheduler") && !snapshot.join("scheduler/scheduler_config.json").is_file() {
        return false;
    }
    for comp in WEIGHT_COMPONENTS.iter().filter(|c| listed(c)) {
        let dir = snapshot.join(comp);
        if !dir.join("config.json").is_file() || !weights_complete(&dir) {
            return false;
        }
    }
    TOKENIZER_COMPONENTS
        .iter()
        .filter(|c| listed(c))
        .all(|c| ["vocab.json", "merges.txt"].iter().all(|f| snapshot.join(c).join(f).is_file()))
}

/// A component folder has a single safetensors file, or a shard index whose shards all exist.
fn weights_complete(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    let names: Vec<String> = entries
        .filter_map(|e| e.ok())
        // is_file follows the symlink: a dangling link to a missing blob doesn't count.
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let sharded = |n: &String| n.contains("-of-");
    if names.iter().any(|n| n.ends_with(".safetensors") && !sharded(n)) {
        return true;
    }
    names
        .iter()
        .filter(|n| n.ends_with(".json") && n.contains(".safetensors.index"))
        .any(|idx| shards_present(dir, idx))
}

fn shards_present(dir: &Path, index: &str) -> bool {
    let Ok(text) = fs::read_to_string(dir.join(index)) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
        return false;
    };
    let shards: HashSet<&str> = map.values().filter_map(|s| s.as_str()).collect();
    !shards.is_empty() && shards.iter().all(|s| !s.contains('/') && dir.join(s).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn prefers_fp16_and_skips_other_formats() {
        let siblings = s(&[
            "model_index.json",
            "v1-5-pruned.safetensors",
            "scheduler/scheduler_config.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.non_ema.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.msgpack",
            "vae_1_0/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/config.json",
            "text_encoder/model.safetensors.index.fp16.json",
            "text_encoder/model.fp16-00001-of-00002.safetensors",
            "text_encoder/model.fp16-00002-of-00002.safetensors",
            "text_encoder/model.safetensors",
            "text_encoder/model.onnx",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "safety_checker/model.safetensors",
        ]);
        let mut got = select_files(&siblings);
        got.sort();
        let mut want = s(&[
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.fp16-00001-of-00002.safetensors",
            "text_encoder/model.fp16-00002-of-00002.safetensors",
            "text_encoder/model.safetensors.index.fp16.json",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ]);
        want.sort();
        // The non-EMA unet is a second full-size copy for training: unwanted.
        assert_eq!(got, want);
    }

    #[test]
    fn urls() {
        assert_eq!(join_url("https://h.co/a/b/c", "/x/y"), "https://h.co/x/y");
        assert_eq!(join_url("https://h.co/a/b/c", "https://cdn/z"), "https://cdn/z");
        assert_eq!(join_url("https://h.co/a/b/c", "d"), "https://h.co/a/b/d");
        assert_eq!(origin("http://127.0.0.1:80/a/b"), "http://127.0.0.1:80");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(encode_path("a b/c#.json"), "a%20b/c%23.json");
    }
}
