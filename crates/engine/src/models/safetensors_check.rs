//! Validation of a `.safetensors` file before it is memory-mapped.
//!
//! A truncated file that is mmapped kills the process with SIGBUS on first touch of the
//! missing pages, so the header and the file length are checked first, with plain reads. The
//! checks are stricter than the format's reference parser where a lenient reading would hide a
//! broken file (duplicate names, trailing bytes), and every message says what is wrong.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::{Error, Result};

/// Headers larger than this are refused (real ones are well under 1 MB).
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

fn model_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Model { path: path.to_path_buf(), message: message.into() }
}

fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// The header's entries in file order, duplicates kept (a JSON map would silently keep the last).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// One tensor's place in the data section.
struct Span {
    name: String,
    start: u64,
    end: u64,
}

fn parse_entry(path: &Path, name: &str, info: &serde_json::Value) -> Result<Span> {
    let bad = |what: String| model_error(path, format!("tensor \"{name}\": {what}"));
    let dtype = info.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("no dtype in the header".into()))?;
    let size = dtype_size(dtype).ok_or_else(|| bad(format!("unknown dtype \"{dtype}\"")))?;
    let shape = info.get("shape").and_then(|s| s.as_array()).ok_or_else(|| bad("no shape in the header".into()))?;
    let mut bytes = size;
    for dim in shape {
        let dim = dim.as_u64().ok_or_else(|| bad(format!("invalid shape {shape:?}")))?;
        bytes =
            bytes.checked_mul(dim).ok_or_else(|| bad(format!("shape {shape:?} overflows: the size is too large")))?;
    }
    let offsets = info
        .get("data_offsets")
        .and_then(|o| o.as_array())
        .filter(|o| o.len() == 2)
        .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)));
    let (start, end) = offsets.ok_or_else(|| bad("no valid data_offsets in the header".into()))?;
    if end < start {
        return Err(bad(format!("data_offsets [{start}, {end}] run backwards")));
    }
    if end - start != bytes {
        return Err(bad(format!(
            "size mismatch: shape {shape:?} of {dtype} needs {bytes} bytes, its data_offsets span {}",
            end - start
        )));
    }
    Ok(Span { name: name.to_string(), start, end })
}

/// Checks that `path` is a complete, well-formed safetensors file and returns its tensor names.
pub fn validate_safetensors(path: &Path) -> Result<Vec<String>> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(io)?;
    let actual_len = file.metadata().map_err(io)?.len();
    if actual_len < 8 {
        let what =
            if actual_len == 0 { "the file is empty".to_string() } else { format!("only {actual_len} bytes long") };
        return Err(model_error(path, format!("not a safetensors file: {what} (too small to hold a header)")));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(io)?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len == 0 {
        return Err(model_error(path, "not a safetensors file: its header is empty"));
    }
    if header_len > MAX_HEADER_BYTES {
        return Err(model_error(path, format!("not a safetensors file: the header claims {header_len} bytes")));
    }
    let data_start = 8 + header_len;
    if data_start > actual_len {
        return Err(model_error(
            path,
            format!("the file is truncated: its header needs {data_start} bytes but the file has {actual_len}"),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let Entries(entries) = serde_json::from_slice(&header)
        .map_err(|e| model_error(path, format!("not a safetensors file: its header is not valid JSON ({e})")))?;

    let mut spans = Vec::with_capacity(entries.len());
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    for (name, info) in &entries {
        if !seen.insert(name.as_str()) {
            return Err(model_error(path, format!("the header names tensor \"{name}\" twice (duplicate)")));
        }
        if name != "__metadata__" {
            spans.push(parse_entry(path, name, info)?);
        }
    }
    if spans.is_empty() {
        return Err(model_error(path, "the file holds no tensors: not a model"));
    }
    // The data section must be covered exactly: no overlaps, no holes.
    spans.sort_by_key(|s| (s.start, s.end));
    let mut covered = 0u64;
    for span in &spans {
        if span.start < covered {
            return Err(model_error(
                path,
                format!("tensor \"{}\" overlaps the tensor before it (data_offsets)", span.name),
            ));
        }
        if span.start > covered {
            return Err(model_error(
                path,
                format!("a gap of {} bytes before tensor \"{}\" (data_offsets)", span.start - covered, span.name),
            ));
        }
        covered = span.end;
    }
    let expected_len = data_start + covered;
    if actual_len < expected_len {
        return Err(model_error(
            path,
            format!("the file is truncated: expected {expected_len} bytes, found {actual_len} (an interrupted download or copy?)"),
        ));
    }
    if actual_len > expected_len {
        return Err(model_error(
            path,
            format!("{} trailing bytes after the tensor data: expected a length of {expected_len} bytes, found {actual_len}", actual_len - expected_len),
        ));
    }
    Ok(spans.into_iter().map(|s| s.name).collect())
}
