//! Model identity for the PNG metadata: AUTOMATIC1111's short hash (the first 10 hex digits of
//! the SHA-256 of the whole checkpoint file), computed once per file and cached, since hashing
//! a 7 GB file takes a while.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The full SHA-256 of a file, streamed (never read whole into memory).
pub fn sha256_file(path: &Path) -> Result<String> {
    sha256_file_from(path, 0)
}

/// The SHA-256 of a file's bytes from `offset` on, as lowercase hex, streamed.
pub fn sha256_file_from(path: &Path, offset: u64) -> Result<String> {
    use std::io::{Seek, SeekFrom};
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    file.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A cache of file hashes keyed by path, size and modification time, stored as JSON.
pub struct HashCache {
    path: PathBuf,
    entries: BTreeMap<String, String>,
}

impl HashCache {
    /// Opens the cache at `path`; an unreadable or corrupt cache starts empty.
    pub fn open(path: PathBuf) -> Self {
        let entries =
            std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        Self { path, entries }
    }

    fn key(file: &Path) -> Option<String> {
        let meta = std::fs::metadata(file).ok()?;
        let modified = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
        let canonical = file.canonicalize().ok()?;
        Some(format!("{}|{}|{modified}", canonical.display(), meta.len()))
    }

    /// AUTOMATIC1111's short model hash of `file`, from the cache when the file is unchanged.
    pub fn a1111_hash(&mut self, file: &Path) -> Result<String> {
        let key = Self::key(file);
        // A hand-edited or foreign cache may hold anything: only a full SHA-256 is trusted.
        let cached = key.as_ref().and_then(|k| self.entries.get(k)).filter(|h| is_sha256_hex(h));
        if let Some(hash) = cached {
            return Ok(hash[..10].to_string());
        }
        let hash = sha256_file(file)?;
        if let Some(key) = key {
            self.entries.insert(key, hash.clone());
            // A cache that cannot be written only costs time on the next run.
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let _ = serde_json::to_string(&self.entries).map(|text| std::fs::write(&self.path, text));
        }
        Ok(hash[..10].to_string())
    }
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_hash_is_the_sha256_prefix_and_is_cached() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.safetensors");
        std::fs::write(&file, b"abc").unwrap();
        let cache_path = dir.path().join("cache/hashes.json");
        let mut cache = HashCache::open(cache_path.clone());
        // SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(cache.a1111_hash(&file).unwrap(), "ba7816bf8f");
        assert!(std::fs::read_to_string(&cache_path).unwrap().contains("ba7816bf8f01cfea"));
        // A fresh cache object reads the stored hash; a changed file is hashed again.
        assert_eq!(HashCache::open(cache_path.clone()).a1111_hash(&file).unwrap(), "ba7816bf8f");
        std::fs::write(&file, b"abcd").unwrap();
        assert_eq!(HashCache::open(cache_path).a1111_hash(&file).unwrap(), &sha256_file(&file).unwrap()[..10]);
        std::fs::write(dir.path().join("cache/hashes.json"), "{corrupt").unwrap();
        assert_eq!(HashCache::open(dir.path().join("cache/hashes.json")).a1111_hash(&file).unwrap().len(), 10);
    }

    #[test]
    fn a_too_short_or_foreign_cached_hash_is_recomputed_not_sliced() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.safetensors");
        std::fs::write(&file, b"abc").unwrap();
        let cache_path = dir.path().join("hashes.json");
        let key = HashCache::key(&file).unwrap();
        for bad in ["abc", "", "ß", &"z".repeat(64)] {
            std::fs::write(&cache_path, serde_json::json!({ key.clone(): bad }).to_string()).unwrap();
            assert_eq!(HashCache::open(cache_path.clone()).a1111_hash(&file).unwrap(), "ba7816bf8f", "{bad:?}");
        }
    }
}
