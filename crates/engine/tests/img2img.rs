//! Image to image against diffusers' img2img pipelines (tests/fixtures/img2img, made by
//! scripts/make_img2img_fixtures.py): every sampler, strengths 0.3 to 1, SD 1.x, SD 2.x-v and
//! SDXL; the same latents and, decoded, the same picture.

mod common;

use std::ops::ControlFlow;

use common::*;
use easel_engine::metadata::read_png;
use easel_engine::models::LoadOptions;
use easel_engine::pipeline::{to_rgb8, GenerationRequest, ImageToImage, Pipeline};
use easel_engine::rng::RngKind;
use easel_engine::schedulers::{SamplerId, Schedule};

fn reference() -> (serde_json::Value, std::collections::HashMap<String, candle_core::Tensor>) {
    let dir = fixtures().join("img2img");
    let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &candle_core::Device::Cpu).unwrap();
    (json, tensors)
}

fn request(json: &serde_json::Value, sampler: &str) -> GenerationRequest {
    let (sampler, schedule) = SamplerId::parse_with_schedule(sampler).unwrap();
    GenerationRequest {
        prompt: json["prompt"].as_str().unwrap().into(),
        negative_prompt: json["negative_prompt"].as_str().unwrap().into(),
        steps: json["steps"].as_u64().unwrap() as usize,
        guidance_scale: json["guidance_scale"].as_f64().unwrap(),
        seed: json["seed"].as_u64().unwrap(),
        width: json["width"].as_u64().unwrap() as usize,
        height: json["height"].as_u64().unwrap() as usize,
        sampler,
        schedule: schedule.unwrap_or(Schedule::Default),
        rng: RngKind::Cpu,
        emphasis: easel_engine::pipeline::prompt::Emphasis::None,
        clip_skip: 1,
        loras: Vec::new(),
        embeddings: Vec::new(),
    }
}

#[test]
fn img2img_matches_diffusers_for_every_sampler_and_strength() {
    let (json, tensors) = reference();
    let image = read_png(&fixtures().join("img2img/init.png")).unwrap();
    let mut worst = f64::INFINITY;
    for model in ["sd1-tiny", "sd2v-tiny", "sdxl-tiny"] {
        let pipeline = Pipeline::load(&model_dir(model), LoadOptions::default()).unwrap();
        for case in json["cases"].as_array().unwrap().iter().filter(|c| c["model"] == model) {
            let (sampler, strength) = (case["sampler"].as_str().unwrap(), case["strength"].as_f64().unwrap());
            let key = format!("{model}.{sampler}.{strength:?}");
            let req = request(&json, sampler);
            let init = ImageToImage { image: image.clone(), strength };
            let mut steps = 0;
            let latents = pipeline
                .denoise_image(&req, &init, &mut |_| {
                    steps += 1;
                    ControlFlow::Continue(())
                })
                .unwrap_or_else(|e| panic!("{key}: {e}"));
            assert_eq!(steps, case["timesteps"].as_array().unwrap().len(), "{key}: steps run");
            assert_close(&format!("{key} latents"), &latents, &tensors[&format!("{key}.latents")], 2e-5);
            let ours = to_rgb8(&pipeline.decode_latents(&latents).unwrap()).unwrap();
            let theirs: Vec<u8> = tensors[&format!("{key}.image")].flatten_all().unwrap().to_vec1().unwrap();
            let psnr = psnr(&ours.data, &theirs);
            worst = worst.min(psnr);
            assert!(psnr >= 40.0, "{key}: PSNR {psnr:.1} dB");
        }
    }
    eprintln!("img2img: worst PSNR against diffusers {worst:.1} dB");
}

#[test]
fn strength_and_size_are_checked_before_any_work() {
    let (json, _) = reference();
    let image = read_png(&fixtures().join("img2img/init.png")).unwrap();
    let pipeline = Pipeline::load(&model_dir("sd1-tiny"), LoadOptions::default()).unwrap();
    let req = request(&json, "euler");
    let mut never = |_: easel_engine::pipeline::StepProgress| -> ControlFlow<()> { panic!("no step may run") };
    for strength in [0.0, -0.5, 1.5, f64::NAN] {
        let init = ImageToImage { image: image.clone(), strength };
        let error = pipeline.denoise_image(&req, &init, &mut never).unwrap_err().to_string();
        assert!(error.contains("strength"), "{strength}: {error}");
    }
    // 6 steps × 0.1 runs no step at all: said, not an unchanged picture.
    let init = ImageToImage { image: image.clone(), strength: 0.1 };
    let error = pipeline.denoise_image(&req, &init, &mut never).unwrap_err().to_string();
    assert!(error.contains("runs no step"), "{error}");
    let wide = GenerationRequest { width: 128, ..req };
    let init = ImageToImage { image, strength: 0.5 };
    let error = pipeline.denoise_image(&wide, &init, &mut never).unwrap_err().to_string();
    assert!(error.contains("64×64") && error.contains("128×64"), "{error}");
}

/// Hires fix against diffusers (text to image, the latents upscaled by F.interpolate or the
/// picture by PIL's Lanczos, img2img with a generator seeded again): SD 1.x and SDXL.
#[test]
fn hires_fix_matches_diffusers() {
    use easel_engine::pipeline::{HiresFix, HiresUpscaler};
    let (json, tensors) = reference();
    for case in json["hires"].as_array().unwrap() {
        let (model, upscaler) = (case["model"].as_str().unwrap(), case["upscaler"].as_str().unwrap());
        let key = format!("hires.{model}.{upscaler}");
        let pipeline = Pipeline::load(&model_dir(model), LoadOptions::default()).unwrap();
        let req = GenerationRequest { steps: case["steps"].as_u64().unwrap() as usize, ..request(&json, "euler") };
        let hires = HiresFix {
            scale: case["scale"].as_f64().unwrap(),
            steps: 0,
            denoise: case["denoise"].as_f64().unwrap(),
            upscaler: upscaler.parse::<HiresUpscaler>().unwrap(),
        };
        let latents = pipeline.denoise_hires(&req, &hires, &mut |_| ControlFlow::Continue(())).unwrap();
        let ours = to_rgb8(&pipeline.decode_latents(&latents).unwrap()).unwrap();
        assert_eq!((ours.width, ours.height), (128, 128), "{key}");
        let theirs: Vec<u8> = tensors[&format!("{key}.image")].flatten_all().unwrap().to_vec1().unwrap();
        let psnr = psnr(&ours.data, &theirs);
        eprintln!("{key}: PSNR {psnr:.1} dB");
        // The image crate's Lanczos is not PIL's to the last bit (measured 63-64 dB after the
        // re-encode): the latents are compared where no picture is resampled.
        if hires.upscaler != HiresUpscaler::Lanczos {
            assert_close(&format!("{key} latents"), &latents, &tensors[&format!("{key}.latents")], 2e-5);
        }
        assert!(psnr >= 40.0, "{key}: PSNR {psnr:.1} dB");
    }
}
