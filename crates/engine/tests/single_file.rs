//! Single-file checkpoints in the original LDM layout (tests/fixtures/single_file, made by
//! scripts/make_single_file_fixtures.py and committed gzipped) against diffusers'
//! `from_single_file` on the same files: same family and architecture, same numbers.

mod common;

use std::ops::ControlFlow;

use common::*;
use easel_engine::models::{inspect_model, Family, LoadOptions};
use easel_engine::pipeline::{GenerationRequest, Pipeline};
use easel_engine::rng::RngKind;
use easel_engine::schedulers::{PredictionType, SamplerId, Schedule};

fn reference(name: &str) -> Reference {
    let dir = fixtures().join("single_file/reference");
    let json = serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap()).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &candle_core::Device::Cpu).unwrap();
    Reference { json, tensors }
}

#[test]
fn single_files_match_diffusers_from_single_file() {
    let dir = tempfile::tempdir().unwrap();
    // The stock tiny layouts, then off-standard ones as community checkpoints have them (every
    // number read from the shapes): linear projections on SD 1.x, a level without attention,
    // non-stock time-embedding widths, uneven per-layer depths and a narrow add-time embedding
    // (SDXL, as SSD-1B / Vega), no mid block (BK-SDM).
    for (name, family) in [
        ("sd1-single", Family::Sd1),
        ("sd2v-single", Family::Sd2),
        ("sdxl-single", Family::Sdxl),
        ("sd1-offstd", Family::Sd1),
        ("sd2v-offstd", Family::Sd2),
        ("sdxl-offstd", Family::Sdxl),
        ("sd1-nomid", Family::Sd1),
    ] {
        let path = unpack_single_file(name, dir.path());
        let r = reference(name);
        let info = inspect_model(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(info.family, family, "{name}");
        assert_eq!(info.prediction_type.id(), r.str("prediction_type"), "{name}");
        let pipeline = Pipeline::load(&path, LoadOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));

        let cond = pipeline
            .encode_text(
                r.str("prompt"),
                r.str("negative_prompt"),
                &easel_engine::pipeline::text::PromptOptions::DIFFUSERS,
            )
            .unwrap();
        assert_close(&format!("{name} uncond"), &cond.negative, r.tensor("text.uncond"), 1e-5);
        assert_close(&format!("{name} cond"), &cond.positive, r.tensor("text.cond"), 1e-5);

        let sd = pipeline.model();
        let added = match family {
            Family::Sdxl => Some(easel_engine::models::unet::AddedCond {
                text_embeds: r.tensor("unet.text_embeds"),
                time_ids: r.tensor("unet.time_ids"),
            }),
            _ => None,
        };
        let out = sd
            .unet
            .forward(
                r.tensor("unet.sample"),
                r.f64("unet.timestep") as f32,
                r.tensor("unet.encoder_hidden_states"),
                added,
            )
            .unwrap();
        assert_close(&format!("{name} unet"), &out, r.tensor("unet.out"), 1e-5);

        let image = pipeline.decode_latents(r.tensor("euler.latents")).unwrap();
        assert_close(&format!("{name} vae"), &image, r.tensor("vae.image"), 1e-5);

        let request = GenerationRequest {
            prompt: r.str("prompt").into(),
            negative_prompt: r.str("negative_prompt").into(),
            steps: r.f64("steps") as usize,
            guidance_scale: r.f64("guidance_scale"),
            seed: r.f64("seed") as u64,
            width: r.f64("width") as usize,
            height: r.f64("height") as usize,
            sampler: SamplerId::Euler,
            schedule: Schedule::Default,
            rng: RngKind::Cpu,
            emphasis: easel_engine::pipeline::prompt::Emphasis::None,
            clip_skip: 1,
            loras: Vec::new(),
            embeddings: Vec::new(),
        };
        let latents = pipeline.denoise(&request, &mut |_| ControlFlow::Continue(())).unwrap();
        assert_close(&format!("{name} euler latents"), &latents, r.tensor("euler.latents"), 2e-5);

        // The whole picture against diffusers' (values in [-1, 1], a peak-to-peak range of 2).
        let image = pipeline.decode_latents(&latents).unwrap();
        let (ours, theirs) = (values(&image), values(r.tensor("vae.image")));
        let mse = ours.iter().zip(&theirs).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / ours.len() as f64;
        let psnr = 10.0 * (4.0 / mse.max(1e-20)).log10();
        eprintln!("{name}: image PSNR {psnr:.1} dB against diffusers");
        assert!(psnr >= 60.0, "{name}: image PSNR {psnr:.1} dB");
    }
}

#[test]
fn bf16_and_pruned_files_load_like_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let r = reference("sd1-single");
    for name in ["sd1-single-bf16", "sd1-single-pruned"] {
        let path = unpack_single_file(name, dir.path());
        let pipeline = Pipeline::load(&path, LoadOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let cond = pipeline
            .encode_text(
                r.str("prompt"),
                r.str("negative_prompt"),
                &easel_engine::pipeline::text::PromptOptions::DIFFUSERS,
            )
            .unwrap();
        assert_close(&format!("{name} cond"), &cond.positive, r.tensor("text.cond"), 1e-5);
        let out = pipeline
            .model()
            .unet
            .forward(r.tensor("unet.sample"), 500.0, r.tensor("unet.encoder_hidden_states"), None)
            .unwrap();
        assert_close(&format!("{name} unet"), &out, r.tensor("unet.out"), 1e-5);
    }
}

/// A 9-channel SD 1.x inpainting single file against diffusers' inpaint pipeline on it
/// (`from_single_file`), strength 1: one U-Net call and the whole 4-step Euler run.
#[test]
fn an_inpainting_single_file_matches_diffusers() {
    use easel_engine::metadata::RgbImage;
    use easel_engine::pipeline::inpaint::Mask;
    let dir = tempfile::tempdir().unwrap();
    let path = unpack_single_file("sd1-single-inpaint", dir.path());
    let r = reference("sd1-single-inpaint");
    let pipeline = Pipeline::load(&path, LoadOptions::default()).unwrap();
    assert!(pipeline.info().is_inpainting());
    let out = pipeline
        .model()
        .unet
        .forward(r.tensor("unet.sample"), r.f64("unet.timestep") as f32, r.tensor("unet.encoder_hidden_states"), None)
        .unwrap();
    assert_close("inpaint unet", &out, r.tensor("unet.out"), 1e-5);
    // The reference's picture is continuous in [0, 1] and Easel takes 8-bit pictures: rounded,
    // it moves the latents by ~1e-4 (relative), hence the looser tolerance below.
    let to_u8 = |t: &candle_core::Tensor| -> Vec<u8> {
        values(t).iter().map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8).collect()
    };
    let planar =
        to_u8(&r.tensor("inpaint.image").squeeze(0).unwrap().permute((1, 2, 0)).unwrap().contiguous().unwrap());
    let image = RgbImage { width: 64, height: 64, data: planar };
    let mask = Mask { width: 64, height: 64, data: to_u8(r.tensor("inpaint.mask_image")) };
    let request = GenerationRequest {
        prompt: r.str("prompt").into(),
        negative_prompt: r.str("negative_prompt").into(),
        steps: r.f64("steps") as usize,
        guidance_scale: r.f64("guidance_scale"),
        seed: r.f64("seed") as u64,
        width: 64,
        height: 64,
        sampler: SamplerId::Euler,
        schedule: Schedule::Default,
        rng: RngKind::Cpu,
        emphasis: easel_engine::pipeline::prompt::Emphasis::None,
        clip_skip: 1,
        loras: Vec::new(),
        embeddings: Vec::new(),
    };
    let latents = pipeline.denoise_inpaint(&request, &image, &mask, 1.0, &mut |_| ControlFlow::Continue(())).unwrap();
    assert_close("inpaint euler latents", &latents, r.tensor("euler.latents"), 1e-3);
}

#[test]
fn wrong_kinds_are_named() {
    let bad = fixtures().join("bad");
    for (file, words) in [
        ("lora.safetensors", "LoRA"),
        ("controlnet.safetensors", "ControlNet"),
        ("unsupported-sd3.safetensors", "Stable Diffusion 3"),
        ("unsupported-sdxl-refiner.safetensors", "refiner"),
        ("vae-only.safetensors", "VAE"),
        ("textual-inversion.safetensors", "textual-inversion"),
        ("missing-unet.safetensors", "U-Net"),
        ("unsupported-in-channels-8.safetensors", "input channels"),
        ("unet-conv-in-wrong-rank.safetensors", "input_blocks.0.0.weight"),
        ("unet-incomplete.safetensors", "missing"),
    ] {
        let err = inspect_model(&bad.join(file)).expect_err(file).to_string();
        assert!(err.contains(words), "{file}: {err}");
    }
}

#[test]
fn a_vae_override_replaces_the_models_own() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = unpack_single_file("sd1-single", dir.path());
    let r = reference("sd1-single");
    let latents = r.tensor("euler.latents");
    let own = Pipeline::load(&checkpoint, LoadOptions::default()).unwrap().decode_latents(latents).unwrap();

    // The same VAE as a standalone file in the original naming (as vae-ft-mse-… is shipped).
    let all = candle_core::safetensors::load(&checkpoint, &candle_core::Device::Cpu).unwrap();
    let vae: std::collections::HashMap<String, candle_core::Tensor> =
        all.into_iter().filter_map(|(k, v)| k.strip_prefix("first_stage_model.").map(|k| (k.to_string(), v))).collect();
    let vae_file = dir.path().join("vae.safetensors");
    candle_core::safetensors::save(&vae, &vae_file).unwrap();
    for override_path in [vae_file.clone(), checkpoint.clone()] {
        let options = LoadOptions { vae_override: Some(override_path.clone()), ..LoadOptions::default() };
        let decoded = Pipeline::load(&checkpoint, options).unwrap().decode_latents(latents).unwrap();
        assert_close(&format!("override {}", override_path.display()), &decoded, &own, 0.0);
    }

    // A VAE from another model with other latent channels or a broken file is refused clearly.
    let lora = fixtures().join("bad/lora.safetensors");
    let options = LoadOptions { vae_override: Some(lora), ..LoadOptions::default() };
    let err = Pipeline::load(&checkpoint, options).err().expect("a LoRA is no VAE").to_string();
    assert!(err.contains("not a VAE"), "{err}");
}

#[test]
fn turbo_checkpoints_are_told_apart_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (name, as_file, sampler_spacing) in [
        ("sd2v-single", "sd_turbo.safetensors", "trailing"),
        ("sdxl-single", "sd_xl_turbo_1.0_fp16.safetensors", "trailing"),
    ] {
        let path = unpack_single_file(name, dir.path());
        let renamed = dir.path().join(as_file);
        std::fs::rename(&path, &renamed).unwrap();
        let info = inspect_model(&renamed).unwrap();
        assert!(info.turbo, "{as_file}");
        assert_eq!(info.default_steps(), 1);
        assert_eq!(info.default_guidance(), 0.0);
        assert_eq!(
            info.prediction_type,
            PredictionType::Epsilon,
            "{as_file}: SD-Turbo predicts noise, unlike SD 2.1-v"
        );
        let config = info.scheduler.load().unwrap();
        assert_eq!(config.timestep_spacing.map(|t| format!("{t:?}").to_lowercase()).as_deref(), Some(sampler_spacing));
    }
}

#[test]
fn sd2_base_checkpoints_predict_noise() {
    let dir = tempfile::tempdir().unwrap();
    let path = unpack_single_file("sd2v-single", dir.path());
    let renamed = dir.path().join("v2-1_512-ema-pruned-base.safetensors");
    std::fs::rename(&path, &renamed).unwrap();
    assert_eq!(inspect_model(&renamed).unwrap().prediction_type, PredictionType::Epsilon);
}

/// `name`'s tensors with `change` applied, written as `<out>.safetensors` in `dir`.
fn altered(
    name: &str,
    dir: &std::path::Path,
    out: &str,
    change: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) -> std::path::PathBuf {
    let original = unpack_single_file(name, dir);
    let mut tensors = candle_core::safetensors::load(&original, &candle_core::Device::Cpu).unwrap();
    change(&mut tensors);
    let path = dir.join(format!("{out}.safetensors"));
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

/// Files whose shapes disagree with each other are refused when they are read or loaded, with
/// a message naming the tensor and the shape it should have: never found inside a step.
#[test]
fn inconsistent_files_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let narrow = |tensors: &mut std::collections::HashMap<String, candle_core::Tensor>, key: &str, dim, len| {
        let t = tensors[key].narrow(dim, 0, len).unwrap().contiguous().unwrap();
        tensors.insert(key.to_string(), t);
    };
    let label = "model.diffusion_model.label_emb.0.0.weight";
    // SDXL's add embedding takes pooled (128) + 6 × k: 1663 is no such width.
    let sdxl = altered("sdxl-single", dir.path(), "sdxl-bad-label", |t| narrow(t, label, 1, 1663));
    let error = inspect_model(&sdxl).unwrap_err().to_string();
    assert!(error.contains(label) && error.contains("pooled text width 128"), "{error}");

    // The U-Net's cross-attention must take the text encoder's width (64 here).
    let to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight";
    let sd1 = altered("sd1-single", dir.path(), "sd1-bad-context", |t| narrow(t, to_k, 1, 48));
    let error = inspect_model(&sd1).unwrap_err().to_string();
    assert!(error.contains(to_k) && error.contains("width 64"), "{error}");

    // A transposed matrix has the right number of values but not the right shape: it is
    // refused while loading (also where weights are read in place), named as the file names it.
    let emb = "model.diffusion_model.middle_block.0.emb_layers.1.weight";
    let sd1 = altered("sd1-single", dir.path(), "sd1-transposed", |t| {
        let transposed = t[emb].t().unwrap().contiguous().unwrap();
        t.insert(emb.to_string(), transposed);
    });
    inspect_model(&sd1).expect("the header alone looks like a model");
    for map_weights in [true, false] {
        let options = LoadOptions { map_weights, ..LoadOptions::default() };
        let error = Pipeline::load(&sd1, options).err().expect("a transposed tensor must be refused").to_string();
        assert!(error.contains(emb) && error.contains("expected [64, 128]"), "{error}");
        assert!(!error.contains("backtrace") && error.lines().count() <= 2, "{error}");
    }
}
