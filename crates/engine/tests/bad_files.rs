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

/// Config numbers that would divide by zero or index past the end inside a layer are refused
/// when the folder is read, naming the file and the setting.
#[test]
fn impossible_configs_are_refused_before_loading() {
    let cases: [(&str, &str, serde_json::Value, &str); 6] = [
        ("unet", "block_out_channels", serde_json::json!([]), "block_out_channels"),
        ("unet", "norm_num_groups", serde_json::json!(0), "norm_num_groups"),
        ("unet", "attention_head_dim", serde_json::json!(0), "attention heads"),
        ("vae", "block_out_channels", serde_json::json!([]), "block_out_channels"),
        ("vae", "norm_num_groups", serde_json::json!(3), "norm_num_groups"),
        ("text_encoder", "num_attention_heads", serde_json::json!(4), "num_attention_heads"),
    ];
    for (component, key, value, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        common::copy_dir(&common::model_dir("sd1-tiny"), dir.path());
        let config_path = dir.path().join(component).join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        config[key] = value.clone();
        std::fs::write(&config_path, config.to_string()).unwrap();
        let error = easel_engine::models::inspect_model(dir.path()).err().map(|e| e.to_string());
        let error = error.unwrap_or_else(|| panic!("{component}.{key} = {value} was accepted"));
        assert!(error.contains(expected) && error.contains(component), "{component}.{key} = {value}: {error}");
    }
}
