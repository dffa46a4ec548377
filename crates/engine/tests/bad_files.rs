//! The corpus of broken files in tests/fixtures/bad (scripts/make_bad_models.py): every
//! container-level defect gives its own clear error from the safetensors check — never a panic,
//! never a SIGBUS — with the words tests/fixtures/bad/expected.json asks for.

mod common;

use easel_engine::models::safetensors_check::validate_safetensors;

/// Defects in the file container itself; the others (LoRA, ControlNet, SD3, …) are valid
/// safetensors files of the wrong kind, judged by family detection.
const CONTAINER_DEFECTS: [&str; 22] = [
    "zero-bytes.safetensors",
    "short-4-bytes.safetensors",
    "truncated-in-header.safetensors",
    "truncated-mid-data.safetensors",
    "truncated-last-byte.safetensors",
    "trailing-bytes.safetensors",
    "header-len-u64-max.safetensors",
    "header-len-oversized.safetensors",
    "header-len-zero.safetensors",
    "header-not-json.safetensors",
    "header-json-array.safetensors",
    "header-invalid-utf8.safetensors",
    "duplicate-key.safetensors",
    "no-tensors.safetensors",
    "offsets-out-of-range.safetensors",
    "offsets-overlap.safetensors",
    "offsets-reversed.safetensors",
    "shape-size-mismatch.safetensors",
    "dtype-unknown.safetensors",
    "shape-negative.safetensors",
    "shape-overflow.safetensors",
    "entry-missing-dtype.safetensors",
];

#[test]
fn every_broken_container_gets_its_own_clear_error() {
    let dir = common::fixtures().join("bad");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let mut messages = std::collections::HashSet::new();
    for name in CONTAINER_DEFECTS.iter().chain(&["text-file.safetensors"]) {
        let err = validate_safetensors(&dir.join(name)).expect_err(name).to_string();
        let words: Vec<&str> =
            expected[name]["error_contains_any"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
        let lower = err.to_lowercase();
        assert!(words.iter().any(|w| lower.contains(w)), "{name}: {err:?} should mention one of {words:?}");
        assert!(err.contains(name), "{name}: the error names the file: {err}");
        messages.insert(err.replace(name, ""));
    }
    assert!(messages.len() >= 18, "errors should say what is wrong, not one generic message");
}

#[test]
fn well_formed_files_of_the_wrong_kind_pass_the_container_check() {
    let dir = common::fixtures().join("bad");
    for name in ["lora.safetensors", "controlnet.safetensors", "vae-only.safetensors", "unsupported-sd3.safetensors"] {
        let names = validate_safetensors(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!names.is_empty());
    }
    // And every real model file of the fixtures passes.
    for model in common::MODELS {
        let unet = common::model_dir(model).join("unet");
        let file = std::fs::read_dir(&unet)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(".safetensors"))
            .unwrap();
        assert!(validate_safetensors(&file).unwrap().len() > 10, "{model}");
    }
}
