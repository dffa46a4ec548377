//! Textual-inversion embeddings: `.safetensors` files whose name, written in a prompt, stands
//! for their learned token vectors (SD 1.x / 2.x `emb_params`; SDXL `clip_l` and `clip_g`).
//! As A1111: the name's tokens are found in the tokenized prompt and replaced by placeholders
//! whose token embeddings are the file's vectors (see `prompt::chunk_prompt_with` and
//! `ClipTextModel::forward_with_fixes`). Pickle (`.pt`, `.bin`) embeddings are refused unread.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// One embedding: its name (the file's stem) and its vectors for each text encoder.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub name: String,
    pub path: PathBuf,
    /// Per text encoder (one, or SDXL's two): (vectors, width).
    pub vectors: Vec<Tensor>,
}

fn embedding_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Model { path: path.to_path_buf(), message: message.into() }
}

impl Embedding {
    /// Reads an embedding for a model whose text encoders are `widths` wide.
    pub fn read(path: &Path, widths: &[usize]) -> Result<Self> {
        let extension = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        if extension != "safetensors" {
            return Err(embedding_error(
                path,
                "a pickle embedding (.pt/.bin) can run code when opened, so Easel does not read it: use a .safetensors one",
            ));
        }
        crate::models::safetensors_check::validate_safetensors(path)?;
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| embedding_error(path, format!("cannot read it: {}", crate::error::candle_message(e))))?;
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let by_keys =
            |keys: &[&str]| -> Option<Vec<Tensor>> { keys.iter().map(|k| tensors.get(*k).cloned()).collect() };
        let found = match widths.len() {
            2 => by_keys(&["clip_l", "clip_g"]),
            _ => by_keys(&["emb_params"]).or_else(|| {
                // Some tools store the single tensor under another name (`string_to_param.*`).
                let mut two_d = tensors.iter().filter(|(k, t)| !k.starts_with("clip_") && t.rank() == 2);
                match (two_d.next(), two_d.next()) {
                    (Some((_, t)), None) => Some(vec![t.clone()]),
                    _ => None,
                }
            }),
        };
        let Some(vectors) = found else {
            let keys: Vec<&String> = tensors.keys().collect();
            let want = if widths.len() == 2 { "clip_l and clip_g (SDXL)" } else { "emb_params (SD 1.x / 2.x)" };
            return Err(embedding_error(
                path,
                format!("not an embedding for this model: it holds {keys:?}, expected {want}"),
            ));
        };
        let mut checked = Vec::with_capacity(vectors.len());
        for (v, &width) in vectors.iter().zip(widths) {
            let v = if v.rank() == 1 { v.unsqueeze(0)? } else { v.clone() };
            let (n, w) = v.dims2().map_err(|_| embedding_error(path, format!("vectors of shape {:?}", v.dims())))?;
            if w != width || n == 0 {
                return Err(embedding_error(
                    path,
                    format!("its vectors are {w} wide but this model's text encoder is {width}: an embedding for another model"),
                ));
            }
            checked.push(v.to_dtype(DType::F32)?);
        }
        Ok(Self { name, path: path.to_path_buf(), vectors: checked })
    }

    pub fn vector_count(&self) -> usize {
        self.vectors.first().map(|v| v.dim(0).unwrap_or(0)).unwrap_or(0)
    }
}

/// The embedding files of a folder (subfolders too): `.safetensors` to use, pickles to refuse.
pub fn embedding_files(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut usable, mut pickles) = (Vec::new(), Vec::new());
    let Ok(entries) = std::fs::read_dir(dir) else { return (usable, pickles) };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            let (u, p) = embedding_files(&path);
            usable.extend(u);
            pickles.extend(p);
            continue;
        }
        match path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).as_deref() {
            Some("safetensors") => usable.push(path),
            Some("pt" | "bin") => pickles.push(path),
            _ => {}
        }
    }
    usable.sort();
    pickles.sort();
    (usable, pickles)
}

/// Whether `name` is written in `text` as a word (what decides that an embedding is used).
pub fn mentions(text: &str, name: &str) -> bool {
    let word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    text.match_indices(name).any(|(at, _)| {
        let before = text[..at].chars().next_back().is_none_or(|c| !word(c));
        let after = text[at + name.len()..].chars().next().is_none_or(|c| !word(c));
        before && after
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_found_as_whole_words() {
        assert!(mentions("a photo of myemb, snow", "myemb"));
        assert!(mentions("(myemb:1.2)", "myemb"));
        assert!(!mentions("a photo of myembx", "myemb"));
        assert!(!mentions("bad-myemb", "myemb"));
    }
}
