//! Shared helpers for the conformance tests: fixture paths, reference loading, comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

pub const MODELS: [&str; 3] = ["sd1-tiny", "sd2v-tiny", "sdxl-tiny"];

/// The engine's fixtures; the app's tests include this file too (`#[path]`), from the root.
pub fn fixtures() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let engine = crate_dir.join("tests/fixtures");
    if engine.is_dir() {
        engine
    } else {
        crate_dir.join("crates/engine/tests/fixtures")
    }
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub struct Reference {
    pub json: Value,
    pub tensors: HashMap<String, Tensor>,
}

impl Reference {
    pub fn load(model: &str) -> Self {
        let dir = fixtures().join("reference").join(model);
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
        Self { json, tensors }
    }

    pub fn tensor(&self, name: &str) -> &Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("reference tensor {name} missing"))
    }

    pub fn str(&self, key: &str) -> &str {
        self.json[key].as_str().unwrap_or_else(|| panic!("reference key {key} missing"))
    }

    pub fn f64(&self, key: &str) -> f64 {
        self.json[key].as_f64().unwrap_or_else(|| panic!("reference key {key} missing"))
    }

    pub fn f64s(&self, key: &str) -> Vec<f64> {
        self.json[key]
            .as_array()
            .unwrap_or_else(|| panic!("reference key {key} missing"))
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    }
}

pub fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Largest absolute difference, relative to the reference's largest magnitude (at least 1).
pub fn max_rel_diff(actual: &Tensor, expected: &Tensor) -> f32 {
    assert_eq!(actual.dims(), expected.dims(), "shape mismatch");
    let (a, e) = (values(actual), values(expected));
    let scale = e.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter().zip(&e).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale
}

pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tolerance: f32) {
    let diff = max_rel_diff(actual, expected);
    eprintln!("{what}: max relative difference {diff:.3e} (tolerance {tolerance:.0e})");
    assert!(diff <= tolerance, "{what}: max relative difference {diff:e} exceeds {tolerance:e}");
}

pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>() / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// Copies a model folder so a test can change a file (e.g. swap the scheduler config).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Unpacks the gzipped single-file fixture `<name>.safetensors.gz` into `dir`.
pub fn unpack_single_file(name: &str, dir: &Path) -> PathBuf {
    use std::io::Read;
    let gz = fixtures().join("single_file").join(format!("{name}.safetensors.gz"));
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&gz).unwrap()).read_to_end(&mut bytes).unwrap();
    let path = dir.join(format!("{name}.safetensors"));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The 9-channel inpainting model made from `base` (e.g. "sd1-tiny"): the base model with the
/// U-Net of `fixtures/inpaint/<family>-inpaint-unet` (made by scripts/make_inpaint_fixtures.py).
pub fn inpainting_model(base: &str, dir: &Path) -> PathBuf {
    let folder = dir.join(format!("{base}-inpaint"));
    copy_dir(&model_dir(base), &folder);
    std::fs::remove_dir_all(folder.join("unet")).unwrap();
    let unet = fixtures().join("inpaint").join(format!("{}-inpaint-unet", base.trim_end_matches("-tiny")));
    copy_dir(&unet, &folder.join("unet"));
    folder
}
