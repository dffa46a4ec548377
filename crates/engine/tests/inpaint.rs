//! Inpainting and outpainting against diffusers' inpaint pipelines (tests/fixtures/inpaint, made
//! by scripts/make_inpaint_fixtures.py): 4-channel models (latent blending) and 9-channel
//! inpainting models, SD 1.x, SD 2.x-v and SDXL, every sampler; mask blur with the overlay,
//! "only masked" (diffusers' `padding_mask_crop`) and outpainting.

mod common;

use std::ops::ControlFlow;

use common::*;
use easel_engine::metadata::{read_png, RgbImage};
use easel_engine::models::LoadOptions;
use easel_engine::pipeline::inpaint::{Inpaint, InpaintArea, Mask, Outpaint};
use easel_engine::pipeline::{to_rgb8, GenerationRequest, Pipeline, StepProgress, Task};
use easel_engine::rng::RngKind;
use easel_engine::schedulers::{SamplerId, Schedule};

fn reference() -> (serde_json::Value, std::collections::HashMap<String, candle_core::Tensor>) {
    let dir = fixtures().join("inpaint");
    let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &candle_core::Device::Cpu).unwrap();
    (json, tensors)
}

fn request(json: &serde_json::Value, sampler: &str, size: u32) -> GenerationRequest {
    let (sampler, schedule) = SamplerId::parse_with_schedule(sampler).unwrap();
    GenerationRequest {
        prompt: json["prompt"].as_str().unwrap().into(),
        negative_prompt: json["negative_prompt"].as_str().unwrap().into(),
        steps: json["steps"].as_u64().unwrap() as usize,
        guidance_scale: json["guidance_scale"].as_f64().unwrap(),
        seed: json["seed"].as_u64().unwrap(),
        width: size as usize,
        height: size as usize,
        sampler,
        schedule: schedule.unwrap_or(Schedule::Default),
        rng: RngKind::Cpu,
        emphasis: easel_engine::pipeline::prompt::Emphasis::None,
        clip_skip: 1,
        loras: Vec::new(),
        embeddings: Vec::new(),
    }
}

fn init_image() -> RgbImage {
    read_png(&fixtures().join("img2img/init.png")).unwrap()
}

fn mask(name: &str) -> Mask {
    Mask::from_rgb(&read_png(&fixtures().join("inpaint").join(name)).unwrap())
}

fn go(_: StepProgress) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

/// (model name, the loaded pipeline) for each base model and its inpainting twin.
fn pipelines(dir: &std::path::Path) -> Vec<(String, bool, Pipeline)> {
    let mut out = Vec::new();
    for model in MODELS {
        out.push((model.to_string(), false, Pipeline::load(&model_dir(model), LoadOptions::default()).unwrap()));
        let nine = inpainting_model(model, dir);
        out.push((model.to_string(), true, Pipeline::load(&nine, LoadOptions::default()).unwrap()));
    }
    out
}

fn reference_image(tensors: &std::collections::HashMap<String, candle_core::Tensor>, key: &str) -> Vec<u8> {
    tensors[&format!("{key}.image")].flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn inpainting_matches_diffusers_for_both_kinds_of_model() {
    let (json, tensors) = reference();
    let dir = tempfile::tempdir().unwrap();
    let image = init_image();
    let mut worst = f64::INFINITY;
    let mut checked = 0;
    for (model, nine, pipeline) in pipelines(dir.path()) {
        assert_eq!(pipeline.info().is_inpainting(), nine, "{model}");
        let kind = if nine { "9ch" } else { "4ch" };
        for case in json["cases"].as_array().unwrap() {
            if case["model"] != model.as_str() || case["inpainting_model"] != nine {
                continue;
            }
            let key = case["key"].as_str().unwrap();
            let sampler = case["sampler"].as_str().unwrap();
            let strength = case["strength"].as_f64().unwrap();
            let (ours, exact) = if let Some(sides) = case["outpaint"].as_array() {
                let sides: Vec<u32> = sides.iter().map(|v| v.as_u64().unwrap() as u32).collect();
                let outpaint = Outpaint { left: sides[0], top: sides[1], right: sides[2], bottom: sides[3] };
                let (wide, border) = outpaint.extend(&image).unwrap();
                let req = GenerationRequest { height: wide.height as usize, ..request(&json, sampler, wide.width) };
                let latents = pipeline.denoise_inpaint(&req, &wide, &border, strength, &mut go).unwrap();
                (latents, true)
            } else if case["mask_blur"] == 0 && case["area"] == "whole" {
                let req = request(&json, sampler, 64);
                let latents = pipeline.denoise_inpaint(&req, &image, &mask("mask.png"), strength, &mut go).unwrap();
                (latents, true)
            } else {
                // Blur and "only masked" go through the whole task, overlay included.
                let area = match case["area"].as_str().unwrap() {
                    "masked" => InpaintArea::Masked { padding: case["padding"].as_u64().unwrap() as u32 },
                    _ => InpaintArea::Whole,
                };
                let inpaint = Inpaint {
                    image: image.clone(),
                    mask: mask(case["mask"].as_str().unwrap()),
                    strength,
                    mask_blur: case["mask_blur"].as_f64().unwrap(),
                    area,
                };
                let req = request(&json, sampler, 64);
                let picture = pipeline.generate_task(&req, &Task::Inpaint(inpaint), &mut go).unwrap();
                let psnr = psnr(&picture.data, &reference_image(&tensors, key));
                eprintln!("{key}: PSNR {psnr:.1} dB");
                worst = worst.min(psnr);
                assert!(psnr >= 40.0, "{key}: PSNR {psnr:.1} dB");
                checked += 1;
                continue;
            };
            if exact {
                assert_close(&format!("{key} latents"), &ours, &tensors[&format!("{key}.latents")], 3e-5);
            }
            let picture = to_rgb8(&pipeline.decode_latents(&ours).unwrap()).unwrap();
            let psnr = psnr(&picture.data, &reference_image(&tensors, key));
            worst = worst.min(psnr);
            assert!(psnr >= 40.0, "{key} ({kind}): PSNR {psnr:.1} dB");
            checked += 1;
        }
    }
    assert_eq!(checked, json["cases"].as_array().unwrap().len(), "every reference case ran");
    eprintln!("inpainting: {checked} cases, worst PSNR against diffusers {worst:.1} dB");
}

#[test]
fn unmasked_pixels_are_kept_and_masked_ones_change() {
    let pipeline = Pipeline::load(&model_dir("sd1-tiny"), LoadOptions::default()).unwrap();
    let (json, _) = reference();
    let image = init_image();
    let inpaint = Inpaint {
        image: image.clone(),
        mask: mask("mask.png"),
        strength: 1.0,
        mask_blur: 4.0,
        area: InpaintArea::Whole,
    };
    let out = pipeline.generate_task(&request(&json, "euler", 64), &Task::Inpaint(inpaint.clone()), &mut go).unwrap();
    let soft = inpaint.soft_mask().unwrap();
    let (mut kept, mut changed, mut inside) = (0, 0, 0);
    for (i, &m) in soft.data.iter().enumerate() {
        let d: i32 = (0..3).map(|c| (out.data[i * 3 + c] as i32 - image.data[i * 3 + c] as i32).abs()).max().unwrap();
        if m == 0 {
            assert_eq!(d, 0, "pixel {i} outside the blurred mask changed");
            kept += 1;
        } else if m >= 250 {
            inside += 1;
            changed += (d > 8) as usize;
        }
    }
    // The tiny model paints noise-like colours: nearly every fully masked pixel differs.
    assert!(kept > 1500 && inside > 100 && changed * 10 >= inside * 8, "kept {kept}, changed {changed} of {inside}");
}

#[test]
fn bad_masks_and_models_without_masks_are_refused_before_any_work() {
    let (json, _) = reference();
    let dir = tempfile::tempdir().unwrap();
    let image = init_image();
    let req = request(&json, "euler", 64);
    let mut never = |_: StepProgress| -> ControlFlow<()> { panic!("no step may run") };
    let pipeline = Pipeline::load(&model_dir("sd1-tiny"), LoadOptions::default()).unwrap();
    let base = Inpaint {
        image: image.clone(),
        mask: mask("mask.png"),
        strength: 1.0,
        mask_blur: 0.0,
        area: InpaintArea::Whole,
    };
    let black = Inpaint { mask: Mask::empty(64, 64), ..base.clone() };
    let err = pipeline.generate_task(&req, &Task::Inpaint(black), &mut never).unwrap_err().to_string();
    assert!(err.contains("all black") && err.contains("nothing to repaint"), "{err}");
    let small = Inpaint { mask: Mask::empty(32, 32).inverted(), ..base.clone() };
    let err = pipeline.generate_task(&req, &Task::Inpaint(small), &mut never).unwrap_err().to_string();
    assert!(err.contains("32×32") && err.contains("64×64"), "{err}");
    for strength in [0.0, 1.5] {
        let wrong = Inpaint { strength, ..base.clone() };
        let err = pipeline.generate_task(&req, &Task::Inpaint(wrong), &mut never).unwrap_err().to_string();
        assert!(err.contains("strength"), "{err}");
    }
    // An inpainting model needs its mask: text to image and image to image are refused.
    let nine = Pipeline::load(&inpainting_model("sd1-tiny", dir.path()), LoadOptions::default()).unwrap();
    let err = nine.generate_task(&req, &Task::TextToImage, &mut never).unwrap_err().to_string();
    assert!(err.contains("inpainting model") && err.contains("mask"), "{err}");
    let init = easel_engine::pipeline::ImageToImage { image, strength: 0.5 };
    let err = nine.generate_task(&req, &Task::ImageToImage(init), &mut never).unwrap_err().to_string();
    assert!(err.contains("inpainting model"), "{err}");
}
