//! Validation of a `.safetensors` file before it is memory-mapped.
//!
//! A truncated file that is mmapped kills the process with SIGBUS on first touch of the
//! missing pages, so the header and the file length are checked first, with plain reads.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// Headers larger than this are refused (real ones are well under 1 MB).
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

fn model_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Model { path: path.to_path_buf(), message: message.into() }
}

/// Checks that `path` is a complete safetensors file and returns its tensor names.
pub fn validate_safetensors(path: &Path) -> Result<Vec<String>> {
    let mut file = File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let actual_len = file.metadata().map_err(|source| Error::Io { path: path.to_path_buf(), source })?.len();
    if actual_len < 8 {
        return Err(model_error(path, format!("not a safetensors file: only {actual_len} bytes long")));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(model_error(path, format!("not a safetensors file: header claims {header_len} bytes")));
    }
    if 8 + header_len > actual_len {
        return Err(model_error(
            path,
            format!("file is truncated: its header needs {} bytes but the file has {actual_len}", 8 + header_len),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| model_error(path, format!("not a safetensors file: its header is not valid JSON ({e})")))?;
    let mut data_end = 0u64;
    let mut names = Vec::with_capacity(header.len());
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)));
        let Some((start, end)) = offsets else {
            return Err(model_error(path, format!("tensor \"{name}\" has no valid data_offsets in the header")));
        };
        if end < start {
            return Err(model_error(path, format!("tensor \"{name}\" has data_offsets that run backwards")));
        }
        data_end = data_end.max(end);
        names.push(name.clone());
    }
    let expected_len = 8 + header_len + data_end;
    if actual_len < expected_len {
        return Err(model_error(
            path,
            format!("file is truncated: expected {expected_len} bytes, found {actual_len} (an interrupted download or copy?)"),
        ));
    }
    Ok(names)
}
