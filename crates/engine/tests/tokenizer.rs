//! The bundled CLIP tokenizer against transformers' CLIPTokenizer (tests/fixtures/tokenizer,
//! written by scripts/make_tokenizer.py): exact ids for tricky prompts, both pad conventions.

use easel_engine::models::clip::EOS_TOKEN_ID;
use easel_engine::pipeline::text::{ClipTokenizer, MAX_TOKENS};
use serde_json::Value;

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizer/cases.json"))
        .expect("tokenizer fixture");
    let json: Value = serde_json::from_str(&text).expect("valid JSON");
    json["cases"].as_array().expect("cases array").clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn eos_padded_tokenizer_matches_transformers() {
    let tokenizer = ClipTokenizer::bundled(EOS_TOKEN_ID).unwrap();
    let cases = cases();
    assert!(cases.len() >= 20, "fixture should hold many tricky prompts");
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tokenizer.encode_raw(text).unwrap(), ids(&case["ids"]), "raw ids for {text:?}");
        let padded = tokenizer.encode(text).unwrap();
        assert_eq!(padded.ids.len(), MAX_TOKENS);
        assert_eq!(padded.ids, ids(&case["ids_77_eos"]), "padded ids for {text:?}");
        assert_eq!(padded.dropped_tokens, ids(&case["ids"]).len().saturating_sub(MAX_TOKENS));
    }
}

#[test]
fn bang_padded_tokenizer_matches_transformers() {
    let tokenizer = ClipTokenizer::bundled(0).unwrap();
    for case in &cases() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tokenizer.encode_raw(text).unwrap(), ids(&case["ids_bang"]), "raw ids for {text:?}");
        assert_eq!(tokenizer.encode(text).unwrap().ids, ids(&case["ids_77_pad0"]), "padded ids for {text:?}");
    }
}

#[test]
fn long_prompts_are_truncated_keeping_eos() {
    let tokenizer = ClipTokenizer::bundled(EOS_TOKEN_ID).unwrap();
    let long = "cat ".repeat(200);
    let t = tokenizer.encode(&long).unwrap();
    assert_eq!(t.ids.len(), MAX_TOKENS);
    assert_eq!(t.ids[MAX_TOKENS - 1], EOS_TOKEN_ID);
    assert_eq!(t.dropped_tokens, 200 - 75);
    assert_eq!(tokenizer.count_prompt_tokens(&long).unwrap(), 200);
    assert_eq!(tokenizer.count_prompt_tokens("").unwrap(), 0);
}

#[test]
fn a_model_folders_own_vocab_and_merges_are_used() {
    use tokenizers::Model;
    // Write the bundled BPE as the vocab.json + merges.txt pair real diffusers repos ship.
    let dir = tempfile::tempdir().unwrap();
    let bundled = tokenizers::Tokenizer::from_bytes(include_bytes!(
        "../../../assets/tokenizer/clip-vit-large-patch14/tokenizer.json"
    ))
    .unwrap();
    let files = bundled.get_model().save(dir.path(), None).unwrap();
    assert_eq!(files.len(), 2, "vocab.json and merges.txt");
    let tokenizer_dir = dir.path().join("tokenizer");
    std::fs::create_dir_all(&tokenizer_dir).unwrap();
    for f in files {
        std::fs::rename(&f, tokenizer_dir.join(f.file_name().unwrap())).unwrap();
    }
    let own = ClipTokenizer::for_model(dir.path(), "tokenizer", EOS_TOKEN_ID).unwrap();
    for case in &cases() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(own.encode(text).unwrap().ids, ids(&case["ids_77_eos"]), "{text:?}");
    }
    // A broken vocabulary is an error, not a silent fallback.
    std::fs::write(tokenizer_dir.join("vocab.json"), "{oops").unwrap();
    assert!(ClipTokenizer::for_model(dir.path(), "tokenizer", EOS_TOKEN_ID).is_err());
}
