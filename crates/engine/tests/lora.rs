//! LoRA and LyCORIS against diffusers (tests/fixtures/lora, made by
//! scripts/make_lora_fixtures.py): kohya LoRA and LoCon, PEFT, LoHa, LoKr, two stacked, an
//! LCM-style LoRA with the LCM sampler, on SD 1.x and SDXL; and that the base model comes back
//! exactly when LoRAs are removed or weighted 0.

mod common;

use std::ops::ControlFlow;

use common::*;
use easel_engine::models::lora::LoraWeight;
use easel_engine::models::LoadOptions;
use easel_engine::pipeline::{to_rgb8, GenerationRequest, Pipeline};
use easel_engine::rng::RngKind;
use easel_engine::schedulers::{SamplerId, Schedule};

fn reference() -> (serde_json::Value, std::collections::HashMap<String, candle_core::Tensor>) {
    let dir = fixtures().join("lora");
    let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &candle_core::Device::Cpu).unwrap();
    (json, tensors)
}

fn lora(file: &str, weight: f64) -> LoraWeight {
    LoraWeight { path: fixtures().join("lora").join(file), text_weight: weight, unet_weight: weight }
}

fn request(json: &serde_json::Value, case: &serde_json::Value) -> GenerationRequest {
    let sampler = case["sampler"].as_str().unwrap_or("euler");
    GenerationRequest {
        prompt: json["prompt"].as_str().unwrap().into(),
        negative_prompt: json["negative_prompt"].as_str().unwrap().into(),
        steps: case["steps"].as_u64().or(json["steps"].as_u64()).unwrap() as usize,
        guidance_scale: case["guidance"].as_f64().or(json["guidance_scale"].as_f64()).unwrap(),
        seed: json["seed"].as_u64().unwrap(),
        width: 64,
        height: 64,
        sampler: SamplerId::parse_with_schedule(sampler).unwrap().0,
        schedule: Schedule::Default,
        rng: RngKind::Cpu,
        emphasis: Default::default(),
        clip_skip: 1,
        loras: case["loras"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| lora(l[0].as_str().unwrap(), l[1].as_f64().unwrap()))
            .collect(),
        embeddings: Vec::new(),
    }
}

fn run(pipeline: &Pipeline, req: &GenerationRequest) -> candle_core::Tensor {
    pipeline.denoise(req, &mut |_| ControlFlow::Continue(())).unwrap()
}

#[test]
fn every_lora_format_matches_diffusers() {
    let (json, tensors) = reference();
    let mut worst = f64::INFINITY;
    for model in ["sd1-tiny", "sdxl-tiny"] {
        let pipeline = Pipeline::load(&model_dir(model), LoadOptions::default()).unwrap();
        let base = tensors[&format!("{model}.base.latents")].clone();
        for case in json["cases"].as_array().unwrap().iter().filter(|c| c["model"] == model) {
            let key = case["key"].as_str().unwrap();
            let req = request(&json, case);
            let latents = run(&pipeline, &req);
            // Easel adds the low-rank path beside the base weights, diffusers fuses them into the
            // weights: the same sums in another order.
            assert_close(&format!("{key} latents"), &latents, &tensors[&format!("{key}.latents")], 1e-4);
            if !req.loras.is_empty() {
                let moved = max_rel_diff(&latents, &base);
                assert!(moved > 1e-2, "{key}: the LoRA must change the picture clearly ({moved})");
            }
            let ours = to_rgb8(&pipeline.decode_latents(&latents).unwrap()).unwrap();
            let theirs: Vec<u8> = tensors[&format!("{key}.image")].flatten_all().unwrap().to_vec1().unwrap();
            let psnr = psnr(&ours.data, &theirs);
            worst = worst.min(psnr);
            assert!(psnr >= 40.0, "{key}: PSNR {psnr:.1} dB");
        }
    }
    eprintln!("LoRA: worst PSNR against diffusers {worst:.1} dB");
}

/// Removing a LoRA, or weighting it 0, gives the base model's latents to the bit: the base
/// weights are never touched, and no reload is needed.
#[test]
fn the_base_model_comes_back_exactly() {
    let (json, _) = reference();
    let pipeline = Pipeline::load(&model_dir("sd1-tiny"), LoadOptions::default()).unwrap();
    let case = json["cases"].as_array().unwrap().iter().find(|c| c["key"] == "sd1-tiny.base").unwrap();
    let base_req = request(&json, case);
    let base = values(&run(&pipeline, &base_req));
    let with = GenerationRequest { loras: vec![lora("sd1-tiny-locon.safetensors", 0.6)], ..base_req.clone() };
    let report = pipeline.apply_loras(&with.loras).unwrap();
    assert_eq!(report.layers, 108, "every module of the LoCon attaches to its layer");
    assert!(report.unmatched.is_empty(), "{:?}", report.unmatched);
    assert!(report.bytes > 0 && report.bytes < 200_000, "only the adapters take memory: {} bytes", report.bytes);
    assert_ne!(values(&run(&pipeline, &with)), base);
    assert_eq!(values(&run(&pipeline, &base_req)), base, "after removing the LoRA");
    let zero = GenerationRequest { loras: vec![lora("sd1-tiny-locon.safetensors", 0.0)], ..base_req };
    assert_eq!(values(&run(&pipeline, &zero)), base, "at weight 0");
}

#[test]
fn bad_loras_are_refused_with_a_message_and_change_nothing() {
    let (json, _) = reference();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = Pipeline::load(&model_dir("sd1-tiny"), LoadOptions::default()).unwrap();
    let case = json["cases"].as_array().unwrap().iter().find(|c| c["key"] == "sd1-tiny.base").unwrap();
    let base_req = request(&json, case);
    let base = values(&run(&pipeline, &base_req));
    let refused = |l: LoraWeight| {
        let req = GenerationRequest { loras: vec![l], ..base_req.clone() };
        pipeline.denoise(&req, &mut |_| ControlFlow::Continue(())).unwrap_err().to_string()
    };
    // A LoRA of another family names both.
    let err = refused(lora("sdxl-tiny-kohya.safetensors", 1.0));
    assert!(err.contains("sdxl-tiny-kohya") && err.contains("SD 1.x"), "{err}");
    // Truncated.
    let bytes = std::fs::read(fixtures().join("lora/sd1-tiny-kohya.safetensors")).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = refused(LoraWeight { path: truncated, text_weight: 1.0, unet_weight: 1.0 });
    assert!(err.contains("truncated"), "{err}");
    // A model's weights where a LoRA should be.
    let not_lora = model_dir("sd1-tiny").join("unet/diffusion_pytorch_model.safetensors");
    let err = refused(LoraWeight { path: not_lora, text_weight: 1.0, unet_weight: 1.0 });
    assert!(err.contains("not a LoRA"), "{err}");
    // A file none of whose modules is a layer of this model, even behind a good one.
    let stranger = dir.path().join("stranger.safetensors");
    let t =
        |dims: &[usize]| candle_core::Tensor::zeros(dims, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let tensors = std::collections::HashMap::from([
        ("lora_unet_no_such_block_proj.lora_down.weight".to_string(), t(&[2, 4])),
        ("lora_unet_no_such_block_proj.lora_up.weight".to_string(), t(&[4, 2])),
    ]);
    candle_core::safetensors::save(&tensors, &stranger).unwrap();
    let both = GenerationRequest {
        loras: vec![
            lora("sd1-tiny-kohya.safetensors", 1.0),
            LoraWeight { path: stranger, text_weight: 1.0, unet_weight: 1.0 },
        ],
        ..base_req.clone()
    };
    let err = pipeline.denoise(&both, &mut |_| ControlFlow::Continue(())).unwrap_err().to_string();
    assert!(err.contains("stranger") && err.contains("none of its 1 modules"), "{err}");
    // A tag naming no file is refused before any work.
    let tagged = GenerationRequest { prompt: "a fox <lora:nowhere:0.5>".into(), ..base_req.clone() };
    let err = pipeline.denoise(&tagged, &mut |_| ControlFlow::Continue(())).unwrap_err().to_string();
    assert!(err.contains("<lora:nowhere>"), "{err}");
    // None of it changed the model.
    assert_eq!(values(&run(&pipeline, &base_req)), base);
}
