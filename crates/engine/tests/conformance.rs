//! Easel against diffusers, component by component and end to end, on the tiny random-weight
//! models in tests/fixtures (made by scripts/make_fixtures.py with pinned diffusers/torch).
//!
//! Tolerances (max |difference| relative to the reference's largest magnitude): 1e-5 for one
//! network call, 2e-5 for whole six-step CFG sampler runs (f32 rounding from a different matmul
//! order grows over the steps), and PSNR ≥ 40 dB for the final 8-bit image. Measured when
//! written: ≤ 1.8e-6 for single calls, ≤ 3.4e-6 for whole runs, PSNR 86 dB to ∞.

mod common;

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::Tensor;
use common::*;
use easel_engine::models::unet::AddedCond;
use easel_engine::models::{Family, LoadOptions, StableDiffusion};
use easel_engine::pipeline::{GenerationRequest, Pipeline};
use easel_engine::rng::RngKind;
use easel_engine::schedulers::{SamplerId, Schedule};

const ONE_CALL: f32 = 1e-5;
const WHOLE_RUN: f32 = 2e-5;

fn load(model: &str) -> Pipeline {
    Pipeline::load(&model_dir(model), LoadOptions::default()).unwrap_or_else(|e| panic!("{model}: {e}"))
}

fn request(reference: &Reference, sampler: SamplerId) -> GenerationRequest {
    GenerationRequest {
        prompt: reference.str("prompt").into(),
        negative_prompt: reference.str("negative_prompt").into(),
        steps: reference.f64("steps") as usize,
        guidance_scale: reference.f64("guidance_scale"),
        seed: reference.f64("seed") as u64,
        width: reference.f64("width") as usize,
        height: reference.f64("height") as usize,
        sampler,
        schedule: Schedule::Default,
        rng: RngKind::Cpu,
        emphasis: easel_engine::pipeline::prompt::Emphasis::None,
        clip_skip: 1,
        loras: Vec::new(),
        embeddings: Vec::new(),
    }
}

#[test]
fn families_are_detected_from_the_files() {
    let expected = [
        ("sd1-tiny", Family::Sd1, "epsilon"),
        ("sd2v-tiny", Family::Sd2, "v_prediction"),
        ("sdxl-tiny", Family::Sdxl, "epsilon"),
    ];
    for (model, family, prediction) in expected {
        let info = easel_engine::models::inspect_diffusers_folder(&model_dir(model)).unwrap();
        assert_eq!(info.family, family, "{model}");
        assert_eq!(info.prediction_type.id(), prediction, "{model}");
        assert!(!info.turbo, "{model}");
    }
}

#[test]
fn text_embeddings_match_diffusers() {
    for model in MODELS {
        let reference = Reference::load(model);
        let pipeline = load(model);
        let cond = pipeline
            .encode_text(
                reference.str("prompt"),
                reference.str("negative_prompt"),
                &easel_engine::pipeline::text::PromptOptions::DIFFUSERS,
            )
            .unwrap();
        assert_close(&format!("{model} uncond"), &cond.negative, reference.tensor("text.uncond"), ONE_CALL);
        assert_close(&format!("{model} cond"), &cond.positive, reference.tensor("text.cond"), ONE_CALL);
        if pipeline.info().family == Family::Sdxl {
            let pooled = cond.pooled.as_ref().unwrap();
            assert_close(
                "sdxl pooled uncond",
                &pooled.narrow(0, 0, 1).unwrap(),
                reference.tensor("text.uncond_pooled"),
                ONE_CALL,
            );
            assert_close(
                "sdxl pooled cond",
                &pooled.narrow(0, 1, 1).unwrap(),
                reference.tensor("text.cond_pooled"),
                ONE_CALL,
            );
        }
    }
}

#[test]
fn empty_prompt_embeddings_match_diffusers() {
    for model in ["sd1-tiny", "sd2v-tiny"] {
        let reference = Reference::load(model);
        let cond = load(model).encode_text("", "", &easel_engine::pipeline::text::PromptOptions::DIFFUSERS).unwrap();
        assert_close(&format!("{model} empty"), &cond.positive, reference.tensor("text.empty"), ONE_CALL);
    }
    // SDXL: an empty negative prompt conditions on zeros (diffusers' force_zeros_for_empty_prompt).
    let cond =
        load("sdxl-tiny").encode_text("a cat", "", &easel_engine::pipeline::text::PromptOptions::DIFFUSERS).unwrap();
    let uncond = values(&cond.negative);
    assert!(uncond.iter().all(|v| *v == 0.0));
}

#[test]
fn unet_call_matches_diffusers() {
    for model in MODELS {
        let reference = Reference::load(model);
        let pipeline = load(model);
        let sd: &StableDiffusion = pipeline.model();
        let t = reference.f64("unet.timestep") as f32;
        let added = if sd.info.family == Family::Sdxl {
            Some(AddedCond {
                text_embeds: reference.tensor("unet.text_embeds"),
                time_ids: reference.tensor("unet.time_ids"),
            })
        } else {
            None
        };
        let out = sd
            .unet
            .forward(reference.tensor("unet.sample"), t, reference.tensor("unet.encoder_hidden_states"), added)
            .unwrap();
        assert_close(&format!("{model} unet"), &out, reference.tensor("unet.out"), ONE_CALL);
    }
}

#[test]
fn vae_decode_matches_diffusers() {
    for model in MODELS {
        let reference = Reference::load(model);
        let pipeline = load(model);
        let image = pipeline.decode_latents(reference.tensor("vae.latents")).unwrap();
        assert_close(&format!("{model} vae"), &image, reference.tensor("vae.image"), ONE_CALL);
    }
}

/// 36×36 latents (scripts/make_large_fixtures.py): the sizes where Easel's own CPU kernels take
/// their large-image paths — Winograd convolutions at the top U-Net level and throughout the
/// VAE, attention over several query blocks — against diffusers.
#[test]
fn large_latents_match_diffusers() {
    let dir = fixtures().join("reference/large/reference.safetensors");
    let reference = candle_core::safetensors::load(dir, &candle_core::Device::Cpu).unwrap();
    let get = |name: &str| reference.get(name).unwrap_or_else(|| panic!("reference tensor {name} missing"));
    for model in MODELS {
        let pipeline = load(model);
        let sd: &StableDiffusion = pipeline.model();
        let added = (sd.info.family == Family::Sdxl).then(|| AddedCond {
            text_embeds: get(&format!("{model}.unet.text_embeds")),
            time_ids: get(&format!("{model}.unet.time_ids")),
        });
        let sample = get(&format!("{model}.unet.sample"));
        assert_eq!(sample.dims(), &[2, 4, 36, 36]);
        let out = sd.unet.forward(sample, 500.0, get(&format!("{model}.unet.encoder_hidden_states")), added).unwrap();
        assert_close(&format!("{model} unet at 36×36"), &out, get(&format!("{model}.unet.out")), ONE_CALL);
    }
    let image = load("sd1-tiny").decode_latents(get("sd1-tiny.vae.latents")).unwrap();
    assert_close("sd1-tiny vae at 288×288", &image, get("sd1-tiny.vae.image"), ONE_CALL);
}

#[test]
fn initial_noise_matches_torch_cpu_generator() {
    for model in MODELS {
        let reference = Reference::load(model);
        let expected = reference.tensor("noise.initial");
        let mut generator = easel_engine::rng::make_generator(RngKind::Cpu, 42);
        let noise =
            Tensor::from_vec(generator.randn(expected.elem_count()), expected.dims(), &candle_core::Device::Cpu)
                .unwrap();
        assert_eq!(values(&noise), values(expected), "{model}: initial noise must be bit-exact");
    }
}

#[test]
fn every_sampler_matches_diffusers_end_to_end() {
    for model in MODELS {
        let reference = Reference::load(model);
        let pipeline = load(model);
        // The pairs the reference has (Euler + Karras is checked at the scheduler level).
        let pairs = SamplerId::combinations().filter(|&p| p != (SamplerId::Euler, Schedule::Karras));
        for (sampler, schedule) in pairs {
            let id = sampler.combined_id(schedule);
            let expected_timesteps = reference.f64s(&format!("sampler.{id}.timesteps"));
            let scheduler = easel_engine::schedulers::build_scheduler(
                sampler,
                schedule,
                pipeline.scheduler_config(),
                expected_timesteps.len(),
            )
            .unwrap();
            for (a, e) in scheduler.timesteps().iter().zip(&expected_timesteps) {
                assert!(
                    (a - e).abs() <= 1e-3 * e.abs().max(1.0),
                    "{model} {id}: timesteps {:?} vs {expected_timesteps:?}",
                    scheduler.timesteps()
                );
            }
            let req = GenerationRequest { schedule, ..request(&reference, sampler) };
            let mut steps_seen = 0;
            let latents = pipeline
                .denoise(&req, &mut |p| {
                    steps_seen = p.step;
                    ControlFlow::Continue(())
                })
                .unwrap();
            assert_eq!(steps_seen, req.steps);
            assert_close(
                &format!("{model} {id} latents"),
                &latents,
                reference.tensor(&format!("sampler.{id}.latents")),
                WHOLE_RUN,
            );
        }
    }
}

#[test]
fn final_image_matches_diffusers() {
    for model in MODELS {
        let reference = Reference::load(model);
        let pipeline = load(model);
        let image =
            pipeline.generate(&request(&reference, SamplerId::Euler), &mut |_| ControlFlow::Continue(())).unwrap();
        let expected: Vec<u8> =
            values(reference.tensor("sampler.euler.image")).iter().map(|v| (v * 255.0).round() as u8).collect();
        let psnr = psnr(&image.data, &expected);
        eprintln!("{model}: PSNR {psnr:.1} dB against diffusers");
        assert!(psnr >= 40.0, "{model}: PSNR {psnr} dB < 40");
    }
}

/// The opt-in CPU bf16 mode is not exact; its documented bound: the final image stays within
/// PSNR 40 dB of the f32 image (measured 47–54 dB), and it really runs in bf16 (not identical).
#[test]
fn bf16_mode_stays_close_to_f32() {
    let bf16_options = LoadOptions { cpu_bf16: true, ..LoadOptions::default() };
    if bf16_options.unet_weights_dtype().is_err() {
        eprintln!("skipped: this CPU has no AVX-512 BF16");
        return;
    }
    for model in MODELS {
        let reference = Reference::load(model);
        let req = request(&reference, SamplerId::Euler);
        let f32_image = load(model).generate(&req, &mut |_| ControlFlow::Continue(())).unwrap();
        let bf16 = Pipeline::load(&model_dir(model), bf16_options.clone()).unwrap();
        let bf16_image = bf16.generate(&req, &mut |_| ControlFlow::Continue(())).unwrap();
        let psnr = psnr(&bf16_image.data, &f32_image.data);
        eprintln!("{model}: bf16 image vs f32 image PSNR {psnr:.1} dB");
        assert!(psnr >= 40.0, "{model}: bf16 PSNR {psnr} dB < 40");
        assert_ne!(bf16_image.data, f32_image.data, "{model}: bf16 mode gave the f32 image bit for bit");
    }
}

#[test]
fn turbo_configs_match_diffusers() {
    for (model, steps_list) in [("sd2v-tiny", vec![1usize, 2]), ("sdxl-tiny", vec![2])] {
        let reference = Reference::load(model);
        let dir = tempfile::tempdir().unwrap();
        let turbo_dir = dir.path().join(format!("{model}-turbo"));
        copy_dir(&model_dir(model), &turbo_dir);
        // The verbatim SD-Turbo / SDXL-Turbo scheduler config, on the tiny weights.
        let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(reference.str("turbo.scheduler_config"));
        std::fs::copy(config, turbo_dir.join("scheduler/scheduler_config.json")).unwrap();
        let pipeline = Pipeline::load(&turbo_dir, LoadOptions::default()).unwrap();
        assert!(pipeline.info().turbo, "{model}: trailing spacing marks a Turbo model");
        assert_eq!(pipeline.info().default_guidance(), 0.0);
        let sampler = if model == "sdxl-tiny" { SamplerId::EulerAncestral } else { SamplerId::Euler };
        for steps in steps_list {
            let req = GenerationRequest {
                steps,
                guidance_scale: reference.f64("turbo.guidance_scale"),
                ..request(&reference, sampler)
            };
            let latents = pipeline.denoise(&req, &mut |_| ControlFlow::Continue(())).unwrap();
            assert_close(
                &format!("{model} turbo {steps} steps"),
                &latents,
                reference.tensor(&format!("turbo.steps{steps}.latents")),
                WHOLE_RUN,
            );
        }
    }
}

#[test]
fn cancelling_stops_the_run() {
    let reference = Reference::load("sd1-tiny");
    let pipeline = load("sd1-tiny");
    let mut calls = 0;
    let result = pipeline.denoise(&request(&reference, SamplerId::Euler), &mut |_| {
        calls += 1;
        ControlFlow::Break(())
    });
    assert!(matches!(result, Err(easel_engine::Error::Cancelled)));
    assert_eq!(calls, 1, "the run stops right after the step that asked");
}

#[test]
fn non_finite_latents_are_an_error_never_a_black_image() {
    let pipeline = load("sd1-tiny");
    let latents = Tensor::from_vec(vec![f32::NAN; 4 * 8 * 8], (1, 4, 8, 8), &candle_core::Device::Cpu).unwrap();
    let err = pipeline.decode_latents(&latents).expect_err("NaN latents must not decode");
    assert!(err.to_string().contains("NaN"), "{err}");
}

/// A copy of `from` (a diffusers folder or a single file) with every float tensor in f16, as
/// most published checkpoints store them.
fn f16_copy(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            f16_copy(&entry.path(), &to.join(entry.file_name()));
        }
    } else if from.extension().is_some_and(|e| e == "safetensors") {
        let tensors = candle_core::safetensors::load(from, &candle_core::Device::Cpu).unwrap();
        let narrowed: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(name, t)| {
                let t = if t.dtype().is_float() { t.to_dtype(candle_core::DType::F16).unwrap() } else { t };
                (name, t)
            })
            .collect();
        candle_core::safetensors::save(&narrowed, to).unwrap();
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

/// On the CPU an f16 checkpoint's convolution and linear weights stay f16 (half the weight
/// memory) and are widened as each layer runs. Widening is exact, so the image must be the
/// one of widening everything at load, as diffusers does — bit for bit, for every family, for
/// diffusers folders and single files.
#[test]
fn f16_weights_kept_in_f16_give_the_image_of_widening_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    for model in MODELS {
        let to = dir.path().join(model);
        f16_copy(&model_dir(model), &to);
        cases.push((model, to));
    }
    let single = unpack_single_file("sd1-single", dir.path());
    let single_f16 = dir.path().join("sd1-single-f16.safetensors");
    f16_copy(&single, &single_f16);
    cases.push(("sd1-tiny", single_f16));

    for (model, path) in cases {
        let req = request(&Reference::load(model), SamplerId::Euler);
        let generate = |options: LoadOptions| {
            let pipeline = Pipeline::load(&path, options).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            pipeline.generate(&req, &mut |_| ControlFlow::Continue(())).unwrap().data
        };
        let kept = generate(LoadOptions::default());
        let widened = generate(LoadOptions { keep_f16_weights: false, ..LoadOptions::default() });
        assert_eq!(kept, widened, "{}: f16 weights kept gave another image", path.display());
        assert!(kept.iter().any(|&v| v != kept[0]), "{}: a flat image", path.display());
    }
}

/// Each stage releases the other components' in-place weights: after a generation only the
/// VAE's (the last stage's) are in the resident set; the text encoders' and the U-Net's are not.
fn check_only_the_vae_stays_resident(pipeline: &Pipeline, path: &std::path::Path) {
    if !cfg!(target_os = "linux") || pipeline.model().weights_in_place == 0 {
        return;
    }
    easel_engine::models::mapped::wait_for_page_in();
    let pages = &pipeline.model().pages;
    if pages.unet.resident_bytes().is_none() {
        eprintln!("/proc/self/pagemap is not readable here: residency not checked");
        return;
    }
    let resident = |p: &easel_engine::models::mapped::MappedPages| p.resident_bytes().unwrap();
    // Pages shared with copied tensors at the blocks' edges may stay.
    let leftover = 64 * 1024;
    assert!(resident(&pages.unet) < leftover, "{}: U-Net {} bytes resident", path.display(), resident(&pages.unet));
    let text = resident(&pages.text_encoders);
    assert!(text < leftover, "{}: text encoders {text} bytes resident", path.display());
    let vae = resident(&pages.vae);
    assert!(vae > leftover, "{}: the VAE just decoded, yet only {vae} bytes resident", path.display());
}

/// On the CPU, convolution and linear weights are read in place from the memory-mapped files
/// instead of copied out at load. The image must be the one of copying them, bit for bit, for
/// every family, for diffusers folders, f16 files and single files (whose renamed, reshaped and
/// fused q/k/v tensors are read in place too).
#[test]
fn weights_read_in_place_give_the_image_of_copying_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut cases: Vec<(&str, std::path::PathBuf)> = MODELS.iter().map(|&m| (m, model_dir(m))).collect();
    for (single, like) in [("sd1-single", "sd1-tiny"), ("sd2v-single", "sd2v-tiny"), ("sdxl-single", "sdxl-tiny")] {
        cases.push((like, unpack_single_file(single, dir.path())));
    }
    let f16_folder = dir.path().join("sd1-tiny-f16");
    f16_copy(&model_dir("sd1-tiny"), &f16_folder);
    cases.push(("sd1-tiny", f16_folder));

    for (model, path) in cases {
        let req = request(&Reference::load(model), SamplerId::Euler);
        let generate = |options: LoadOptions| {
            let pipeline = Pipeline::load(&path, options).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let in_place = pipeline.model().weights_in_place;
            let image = pipeline.generate(&req, &mut |_| ControlFlow::Continue(())).unwrap().data;
            check_only_the_vae_stays_resident(&pipeline, &path);
            (in_place, image)
        };
        let (in_place, mapped) = generate(LoadOptions::default());
        let (none, copied) = generate(LoadOptions { map_weights: false, ..LoadOptions::default() });
        assert!(in_place > 0, "{}: no weight was read in place", path.display());
        assert_eq!(none, 0, "{}: weights read in place although copying was asked for", path.display());
        assert_eq!(mapped, copied, "{}: weights read in place gave another image", path.display());
        assert!(mapped.iter().any(|&v| v != mapped[0]), "{}: a flat image", path.display());
    }
}
