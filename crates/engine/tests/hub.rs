//! Hub downloads against a local HTTP server that answers like the Hugging Face Hub: revision
//! API, resolve URLs with ETag/X-Repo-Commit, LFS files redirected to a "CDN" path with Range.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use easel_engine::hub::{DownloadProgress, Downloader};
use easel_engine::Error;

const REPO: &str = "acme/tiny-sd";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Clone)]
struct HubFile {
    path: String,
    data: Vec<u8>,
    etag: String,
    lfs: bool,
}

#[derive(Default)]
struct State {
    files: Vec<HubFile>,
    gated: bool,
    /// Cut the next CDN answer for this etag after this many body bytes (one-shot).
    cut: Option<(String, usize)>,
    /// Announce this size in the HEAD answer for this path.
    lie_size: Option<(String, u64)>,
    /// Body bytes sent for file downloads, and the Range headers received.
    served: u64,
    ranges: Vec<String>,
    requests: usize,
}

struct Server {
    base: String,
    state: Arc<Mutex<State>>,
}

fn lock(s: &Arc<Mutex<State>>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl Server {
    fn start(files: Vec<HubFile>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State { files, ..Default::default() }));
        let st = state.clone();
        let b = base.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                let b = b.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, &st, &b);
                });
            }
        });
        Server { base, state }
    }
}

fn respond(
    mut s: &TcpStream,
    status: &str,
    headers: &[(String, String)],
    body: &[u8],
    len: usize,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {len}\r\n\r\n"));
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}

fn handle(conn: TcpStream, st: &Arc<Mutex<State>>, base: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(&conn);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    for _ in 0..100 {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let head = method == "HEAD";
    let mut state = lock(st);
    state.requests += 1;
    if state.gated && headers.get("authorization").map(String::as_str) != Some("Bearer good-token") {
        let body = b"{\"error\":\"Access to model acme/tiny-sd is restricted.\"}";
        return respond(&conn, "401 Unauthorized", &[], if head { b"" } else { body }, body.len());
    }
    let not_found = |c: &TcpStream| respond(c, "404 Not Found", &[], b"", 0);

    if let Some(rest) = target.strip_prefix("/api/models/") {
        let Some((repo, _rev)) = rest.split_once("/revision/") else { return not_found(&conn) };
        if repo != REPO {
            return not_found(&conn);
        }
        let siblings: Vec<_> = state.files.iter().map(|f| serde_json::json!({ "rfilename": f.path })).collect();
        let body = serde_json::to_vec(&serde_json::json!({ "sha": COMMIT, "siblings": siblings }))?;
        return respond(&conn, "200 OK", &[], &body, body.len());
    }
    let prefix = format!("/{REPO}/resolve/");
    if let Some(rest) = target.strip_prefix(&prefix) {
        let Some((_rev, path)) = rest.split_once('/') else { return not_found(&conn) };
        let Some(f) = state.files.iter().find(|f| f.path == path).cloned() else { return not_found(&conn) };
        let size = match &state.lie_size {
            Some((p, s)) if *p == f.path => *s,
            _ => f.data.len() as u64,
        };
        let mut h = vec![("X-Repo-Commit".to_string(), COMMIT.to_string())];
        if f.lfs {
            // The Hub redirects LFS files to its CDN, with the sha256 and size on the redirect.
            h.push(("X-Linked-Etag".into(), format!("\"{}\"", f.etag)));
            h.push(("X-Linked-Size".into(), size.to_string()));
            h.push(("ETag".into(), "\"not-the-blob-name\"".into()));
            h.push(("Location".into(), format!("{base}/cdn/{}", f.etag)));
            return respond(&conn, "302 Found", &h, b"", 0);
        }
        h.push(("ETag".into(), format!("\"{}\"", f.etag)));
        if head {
            return respond(&conn, "200 OK", &h, b"", size as usize);
        }
        state.served += f.data.len() as u64;
        return respond(&conn, "200 OK", &h, &f.data, f.data.len());
    }
    if let Some(etag) = target.strip_prefix("/cdn/") {
        let Some(f) = state.files.iter().find(|f| f.etag == etag).cloned() else { return not_found(&conn) };
        let start = match headers.get("range") {
            Some(r) => {
                state.ranges.push(r.clone());
                r.strip_prefix("bytes=")
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|r| r.parse::<usize>().ok())
                    .unwrap_or(0)
            }
            None => 0,
        };
        let start = start.min(f.data.len());
        let body = &f.data[start..];
        let (status, mut h) = if start > 0 {
            let cr = format!("bytes {start}-{}/{}", f.data.len() - 1, f.data.len());
            ("206 Partial Content", vec![("Content-Range".to_string(), cr)])
        } else {
            ("200 OK", vec![])
        };
        h.push(("Accept-Ranges".into(), "bytes".into()));
        // An interruption: announce the full length, send part of it, close.
        let sent = match state.cut.take() {
            Some((e, n)) if e == f.etag => n.min(body.len()),
            other => {
                state.cut = other;
                body.len()
            }
        };
        state.served += sent as u64;
        drop(state);
        return respond(&conn, status, &h, &body[..sent], body.len());
    }
    drop(state);
    not_found(&conn)
}

fn sha256_hex(data: &[u8]) -> String {
    // The test only needs distinct, LFS-looking names: a cheap 64-hex digest stands in.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}").repeat(4)
}

fn file(path: &str, data: Vec<u8>, lfs: bool) -> HubFile {
    let etag = if lfs { sha256_hex(&data) } else { sha256_hex(&data)[..40].to_string() };
    HubFile { path: path.to_string(), data, etag, lfs }
}

fn weights(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

const MODEL_INDEX: &str = r#"{"_class_name":"StableDiffusionPipeline","scheduler":["diffusers","PNDMScheduler"],
"text_encoder":["transformers","CLIPTextModel"],"tokenizer":["transformers","CLIPTokenizer"],
"unet":["diffusers","UNet2DConditionModel"],"vae":["diffusers","AutoencoderKL"],
"safety_checker":["stable_diffusion","StableDiffusionSafetyChecker"]}"#;

fn repo_files() -> Vec<HubFile> {
    vec![
        file("model_index.json", MODEL_INDEX.as_bytes().to_vec(), false),
        file("scheduler/scheduler_config.json", b"{\"beta_start\":0.00085}".to_vec(), false),
        file("text_encoder/config.json", b"{\"hidden_size\":32}".to_vec(), false),
        file("text_encoder/model.safetensors", weights(1, 3000), true),
        file("text_encoder/model.fp16.safetensors", weights(2, 1500), true),
        file("tokenizer/vocab.json", b"{\"a\":0}".to_vec(), false),
        file("tokenizer/merges.txt", b"#version: 0.2\n".to_vec(), false),
        file("unet/config.json", b"{\"sample_size\":8}".to_vec(), false),
        file("unet/diffusion_pytorch_model.fp16.safetensors", weights(3, 200_000), true),
        file("unet/diffusion_pytorch_model.safetensors", weights(4, 400_000), true),
        file("unet/diffusion_pytorch_model.bin", weights(5, 400_000), true),
        file("vae/config.json", b"{\"latent_channels\":4}".to_vec(), false),
        file("vae/diffusion_pytorch_model.safetensors", weights(6, 5000), true),
        file("safety_checker/model.safetensors", weights(7, 9000), true),
    ]
}

const WANTED: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
];

fn wanted_bytes(files: &[HubFile]) -> u64 {
    files.iter().filter(|f| WANTED.contains(&f.path.as_str())).map(|f| f.data.len() as u64).sum()
}

fn no_progress(_: DownloadProgress) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

fn check_snapshot(cache: &Path, files: &[HubFile]) {
    let folder = cache.join("models--acme--tiny-sd");
    assert_eq!(std::fs::read_to_string(folder.join("refs/main")).expect("ref"), COMMIT);
    let snapshot = folder.join("snapshots").join(COMMIT);
    for f in files {
        let p = snapshot.join(&f.path);
        if !WANTED.contains(&f.path.as_str()) {
            assert!(!p.exists(), "{} should not be downloaded", f.path);
            continue;
        }
        assert_eq!(std::fs::read(&p).expect("snapshot file"), f.data, "{}", f.path);
        assert_eq!(std::fs::read(folder.join("blobs").join(&f.etag)).expect("blob"), f.data);
        #[cfg(unix)]
        {
            let depth = f.path.split('/').count() + 1;
            let want = format!("{}blobs/{}", "../".repeat(depth), f.etag);
            assert_eq!(std::fs::read_link(&p).expect("symlink").to_string_lossy(), want);
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(folder.join("blobs"))
        .expect("blobs")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn full_download_has_huggingface_hub_layout() {
    let files = repo_files();
    let server = Server::start(files.clone());
    let cache = tempfile::tempdir().expect("tempdir");
    let d = Downloader::new(&server.base, cache.path(), None);
    assert!(d.find_local(REPO, "main").is_none());
    let mut last = None;
    let snap = d
        .download(REPO, "main", &mut |p| {
            last = Some(p);
            ControlFlow::Continue(())
        })
        .expect("download");
    assert_eq!(snap, cache.path().join("models--acme--tiny-sd/snapshots").join(COMMIT));
    check_snapshot(cache.path(), &files);
    let last = last.expect("progress reported");
    assert_eq!(last.total_bytes, wanted_bytes(&files));
    assert_eq!(last.total_expected, wanted_bytes(&files));
    assert!(last.bytes_per_second > 0.0);
    assert_eq!(lock(&server.state).served, wanted_bytes(&files), "only the needed files, once");
    assert_eq!(d.find_local(REPO, "main"), Some(snap.clone()));
    assert_eq!(d.find_local(REPO, COMMIT), Some(snap));

    // A second download transfers nothing.
    d.download(REPO, "main", &mut no_progress).expect("again");
    assert_eq!(lock(&server.state).served, wanted_bytes(&files));
}

#[test]
fn interrupted_download_resumes_with_range() {
    let files = repo_files();
    let unet = files.iter().find(|f| f.path == "unet/diffusion_pytorch_model.fp16.safetensors").cloned();
    let unet = unet.expect("unet");
    let server = Server::start(files.clone());
    lock(&server.state).cut = Some((unet.etag.clone(), 70_000));
    let cache = tempfile::tempdir().expect("tempdir");
    let d = Downloader::new(&server.base, cache.path(), None);
    let err = d.download(REPO, "main", &mut no_progress).expect_err("cut short");
    assert!(matches!(err, Error::HubInterrupted { .. }), "{err}");
    assert!(err.to_string().contains("resume"), "{err}");
    let partial = cache.path().join("models--acme--tiny-sd/blobs").join(format!("{}.incomplete", unet.etag));
    assert_eq!(std::fs::metadata(&partial).expect("partial kept").len(), 70_000);

    d.download(REPO, "main", &mut no_progress).expect("resume");
    check_snapshot(cache.path(), &files);
    let st = lock(&server.state);
    assert_eq!(st.ranges, vec!["bytes=70000-".to_string()]);
    assert_eq!(st.served, wanted_bytes(&files), "no byte sent twice");
}

#[test]
fn cancel_keeps_partial_file_for_resume() {
    let files = repo_files();
    let server = Server::start(files.clone());
    let cache = tempfile::tempdir().expect("tempdir");
    let d = Downloader::new(&server.base, cache.path(), None);
    let mut seen = 0u64;
    let err = d
        .download(REPO, "main", &mut |p| {
            if p.file.starts_with("unet/") && p.file_bytes > 0 && p.file_bytes < p.file_total {
                seen = p.file_bytes;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })
        .expect_err("cancelled");
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert!(seen > 0);
    let blobs = cache.path().join("models--acme--tiny-sd/blobs");
    let partial: Vec<_> = std::fs::read_dir(&blobs)
        .expect("blobs")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
        .collect();
    assert_eq!(partial.len(), 1);
    assert_eq!(partial[0].metadata().expect("meta").len(), seen);
    assert!(d.find_local(REPO, "main").is_none());

    d.download(REPO, "main", &mut no_progress).expect("resume");
    check_snapshot(cache.path(), &files);
    assert_eq!(lock(&server.state).ranges, vec![format!("bytes={seen}-")]);
}

#[test]
fn missing_repo_is_not_found() {
    let server = Server::start(repo_files());
    let cache = tempfile::tempdir().expect("tempdir");
    let d = Downloader::new(&server.base, cache.path(), None);
    let err = d.download("acme/nope", "main", &mut no_progress).expect_err("404");
    assert!(matches!(err, Error::HubNotFound { .. }), "{err}");
    assert!(err.to_string().contains("acme/nope") && err.to_string().contains("not found"), "{err}");
}

#[test]
fn gated_repo_explains_the_token() {
    let files = repo_files();
    let server = Server::start(files.clone());
    lock(&server.state).gated = true;
    let cache = tempfile::tempdir().expect("tempdir");
    let d = Downloader::new(&server.base, cache.path(), None);
    let err = d.download(REPO, "main", &mut no_progress).expect_err("401");
    assert!(matches!(err, Error::HubGated { status: 401, .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("HF_TOKEN") && msg.contains("huggingface-cli login"), "{msg}");

    let bad = Downloader::new(&server.base, cache.path(), Some("bad".into()));
    let msg = bad.download(REPO, "main", &mut no_progress).expect_err("401").to_string();
    assert!(msg.contains("no access"), "{msg}");

    let good = Downloader::new(&server.base, cache.path(), Some("good-token".into()));
    good.download(REPO, "main", &mut no_progress).expect("token accepted");
    check_snapshot(cache.path(), &files);
}

#[test]
fn wrong_size_is_detected() {
    let files = repo_files();
    let server = Server::start(files.clone());
    // The Hub announces more bytes than the CDN then sends in full.
    lock(&server.state).lie_size = Some(("vae/diffusion_pytorch_model.safetensors".into(), 6000));
    let cache = tempfile::tempdir().expect("tempdir");
    let d = Downloader::new(&server.base, cache.path(), None);
    let err = d.download(REPO, "main", &mut no_progress).expect_err("size");
    assert!(matches!(err, Error::HubSizeMismatch { expected: 6000, received: 5000, .. }), "{err}");
    assert!(err.to_string().contains("deleted"), "{err}");

    // Announcing fewer bytes than are sent is caught too, without writing past the size.
    lock(&server.state).lie_size = Some(("vae/diffusion_pytorch_model.safetensors".into(), 4000));
    let err = d.download(REPO, "main", &mut no_progress).expect_err("size");
    assert!(matches!(err, Error::HubSizeMismatch { expected: 4000, .. }), "{err}");
    let vae = files.iter().find(|f| f.path == "vae/diffusion_pytorch_model.safetensors").expect("vae");
    let blobs = cache.path().join("models--acme--tiny-sd/blobs");
    assert!(!blobs.join(&vae.etag).exists());
    assert!(!blobs.join(format!("{}.incomplete", vae.etag)).exists());
}

#[test]
fn closed_port_is_offline() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let cache = tempfile::tempdir().expect("tempdir");
    let d = Downloader::new(format!("http://127.0.0.1:{port}"), cache.path(), None);
    let err = d.download(REPO, "main", &mut no_progress).expect_err("offline");
    assert!(matches!(err, Error::HubOffline { .. }), "{err}");
    assert!(err.to_string().contains("cannot reach the Hugging Face Hub"), "{err}");
}

/// A snapshot as huggingface_hub leaves it (refs, blobs, relative symlinks) is found and used
/// without the network, also by `download` when offline.
#[test]
fn find_local_uses_python_snapshot() {
    let cache = tempfile::tempdir().expect("tempdir");
    let folder = cache.path().join("models--acme--tiny-sd");
    let snapshot = folder.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(folder.join("refs")).expect("mkdir");
    std::fs::create_dir_all(folder.join("blobs")).expect("mkdir");
    std::fs::write(folder.join("refs/main"), COMMIT).expect("ref");
    let files = repo_files();
    for f in files.iter().filter(|f| WANTED.contains(&f.path.as_str())) {
        std::fs::write(folder.join("blobs").join(&f.etag), &f.data).expect("blob");
        let dest = snapshot.join(&f.path);
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        #[cfg(unix)]
        std::os::unix::fs::symlink(format!("{}blobs/{}", "../".repeat(f.path.split('/').count() + 1), f.etag), &dest)
            .expect("symlink");
        #[cfg(not(unix))]
        std::fs::write(&dest, &f.data).expect("copy");
    }
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let d = Downloader::new(format!("http://127.0.0.1:{port}"), cache.path(), None);
    assert_eq!(d.find_local(REPO, "main"), Some(snapshot.clone()));
    assert_eq!(d.download(REPO, "main", &mut no_progress).expect("offline but cached"), snapshot);

    // A missing blob (dangling link) makes the snapshot incomplete.
    let vae = files.iter().find(|f| f.path == "vae/diffusion_pytorch_model.safetensors").expect("vae");
    std::fs::remove_file(folder.join("blobs").join(&vae.etag)).expect("rm");
    assert_eq!(d.find_local(REPO, "main"), None);
}

#[test]
fn curated_list() {
    let ids: Vec<_> = easel_engine::hub::CURATED.iter().map(|m| m.id).collect();
    assert_eq!(ids, ["sd15", "sd21", "sdxl", "sd-turbo", "sdxl-turbo"]);
    assert_eq!(easel_engine::hub::curated("sd15").map(|m| m.repo), Some("stable-diffusion-v1-5/stable-diffusion-v1-5"));
}
