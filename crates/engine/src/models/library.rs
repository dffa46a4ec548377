//! Finding the models already on disk: the Hugging Face cache (shared with diffusers and other
//! Python tools) and a folder of checkpoints the artist picks.

use std::path::{Path, PathBuf};

use super::{inspect_model, Family};

#[derive(Debug, Clone, PartialEq)]
pub struct LocalModel {
    pub path: PathBuf,
    /// `org/name` for the HF cache, the file or folder name otherwise.
    pub name: String,
    pub family: Option<Family>,
    pub turbo: bool,
    pub size_bytes: u64,
    /// Why the model cannot be used, when it cannot.
    pub problem: Option<String>,
}

/// The folder name of Easel Mini, the small model that ships in `assets/models/`.
pub const EASEL_MINI: &str = "easel-mini";

/// Where Easel Mini is: `$EASEL_MINI_MODEL` if set, else `assets/models/easel-mini` beside the
/// executable or two or three levels up (a `target/release` or `target/<triple>/release`
/// build), else in the source tree Easel was built from. None when none of them has it.
pub fn easel_mini() -> Option<PathBuf> {
    let relative = Path::new("assets/models").join(EASEL_MINI);
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os("EASEL_MINI_MODEL") {
        candidates.push(PathBuf::from(path));
    }
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        candidates.extend(exe_dir.ancestors().take(4).map(|dir| dir.join(&relative)));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(&relative));
    candidates.into_iter().find(|dir| dir.join("model_index.json").is_file())
}

fn size_of(path: &Path) -> u64 {
    if path.is_file() {
        return std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    }
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    // `metadata` follows the cache's symlinks to the blobs, so sizes are the real ones.
    entries.filter_map(|e| e.ok()).map(|e| size_of(&e.path())).sum()
}

fn describe(path: PathBuf, name: String) -> LocalModel {
    let size_bytes = size_of(&path);
    match inspect_model(&path) {
        Ok(info) => LocalModel { path, name, family: Some(info.family), turbo: info.turbo, size_bytes, problem: None },
        Err(e) => LocalModel { path, name, family: None, turbo: false, size_bytes, problem: Some(e.to_string()) },
    }
}

/// Diffusers pipelines in the HF cache (`models--org--name/snapshots/<commit>/model_index.json`);
/// the newest snapshot of each repository.
pub fn scan_hf_cache(cache: &Path) -> Vec<LocalModel> {
    let Ok(repos) = std::fs::read_dir(cache) else { return Vec::new() };
    let mut found = Vec::new();
    for repo in repos.filter_map(|e| e.ok()) {
        let dir_name = repo.file_name().to_string_lossy().into_owned();
        let Some(repo_id) = dir_name.strip_prefix("models--").map(|r| r.replacen("--", "/", 1)) else { continue };
        let Ok(snapshots) = std::fs::read_dir(repo.path().join("snapshots")) else { continue };
        let newest = snapshots
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("model_index.json").is_file())
            .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
        if let Some(snapshot) = newest {
            found.push(describe(snapshot.path(), repo_id));
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

/// Checkpoints (`*.safetensors`) and diffusers folders directly inside `dir`. Files that are
/// not checkpoints (LoRAs, VAEs, …) are left out; broken checkpoints are listed with the reason.
pub fn scan_models_folder(dir: &Path) -> Vec<LocalModel> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_checkpoint = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        if path.is_dir() && path.join("model_index.json").is_file() {
            found.push(describe(path, name));
        } else if path.is_file() && is_checkpoint {
            let model = describe(path, name);
            let wrong_kind = model.problem.as_deref().is_some_and(|p| p.contains("this file is"));
            if !wrong_kind {
                found.push(model);
            }
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &to.join(entry.file_name()));
            } else {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }

    #[test]
    fn finds_diffusers_downloads_in_the_hf_cache() {
        let cache = tempfile::tempdir().unwrap();
        let snapshot = cache.path().join("models--stabilityai--sdxl-tiny/snapshots/0123abcd");
        copy_dir(&fixtures().join("models/sdxl-tiny"), &snapshot);
        std::fs::create_dir_all(cache.path().join("models--someone--a-lora/snapshots/ffff")).unwrap();
        let found = scan_hf_cache(cache.path());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].name, "stabilityai/sdxl-tiny");
        assert_eq!(found[0].family, Some(Family::Sdxl));
        assert!(found[0].size_bytes > 1_000_000);
        assert!(found[0].problem.is_none());
    }

    #[test]
    fn lists_checkpoints_and_folders_but_not_other_kinds() {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&fixtures().join("models/sd1-tiny"), &dir.path().join("sd1-tiny"));
        std::fs::copy(fixtures().join("bad/lora.safetensors"), dir.path().join("lora.safetensors")).unwrap();
        std::fs::copy(fixtures().join("bad/truncated-mid-data.safetensors"), dir.path().join("broken.safetensors"))
            .unwrap();
        let found = scan_models_folder(dir.path());
        let names: Vec<&str> = found.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["broken.safetensors", "sd1-tiny"]);
        assert!(found[0].problem.as_deref().is_some_and(|p| p.contains("truncated")));
        assert_eq!(found[1].family, Some(Family::Sd1));
    }
}
