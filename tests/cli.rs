//! `easel generate` as a user runs it: the PNG and its parameters, and clear refusals of bad
//! input before any work starts.

#[path = "../crates/engine/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::model_dir;
use easel_engine::metadata::{parse_infotext, read_png, read_png_parameters};

fn easel(args: &[&str]) -> Output {
    // Keep the model-hash cache out of the real user data folder.
    let data = std::env::temp_dir().join(format!("easel-cli-test-data-{}", std::process::id()));
    Command::new(env!("CARGO_BIN_EXE_easel")).args(args).env("XDG_DATA_HOME", data).output().expect("run easel")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn generate(model: &Path, output: &Path, extra: &[&str]) -> Output {
    let model = model.to_str().unwrap();
    let output = output.to_str().unwrap();
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "a red fox, (snow:1.2)",
        "--width",
        "64",
        "--height",
        "64",
        "--output",
        output,
    ];
    args.extend_from_slice(extra);
    easel(&args)
}

#[test]
fn sampler_and_schedule_are_separate_flags() {
    let dir = tempfile::tempdir().unwrap();
    let separate = dir.path().join("separate.png");
    let combined = dir.path().join("combined.png");
    let args = ["--steps", "2", "--seed", "9", "--sampler", "dpmpp_2m", "--schedule", "karras"];
    assert!(generate(&model_dir("sd1-tiny"), &separate, &args).status.success());
    let alias = ["--steps", "2", "--seed", "9", "--sampler", "dpmpp_2m_karras"];
    assert!(generate(&model_dir("sd1-tiny"), &combined, &alias).status.success());
    assert_eq!(read_png(&separate).unwrap().data, read_png(&combined).unwrap().data, "the old id is the same choice");
    let text = read_png_parameters(&separate).unwrap().unwrap();
    assert_eq!(parse_infotext(&text).unwrap().schedule_type.as_deref(), Some("Karras"));

    let refused =
        generate(&model_dir("sd1-tiny"), &dir.path().join("x.png"), &["--sampler", "ddim", "--schedule", "karras"]);
    assert!(!refused.status.success());
    let message = stderr(&refused);
    assert!(message.contains("karras") && message.contains("ddim") && message.contains("dpmpp_2m"), "{message}");
    assert!(!dir.path().join("x.png").exists());
}

#[test]
fn generate_writes_a_png_with_a1111_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("fox.png");
    let out = generate(
        &model_dir("sd1-tiny"),
        &out_path,
        &["--steps", "3", "--seed", "1234", "--sampler", "dpmpp_2m_karras", "--negative-prompt", "blurry"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("step 3/3"), "per-step progress on stderr: {}", stderr(&out));

    let image = read_png(&out_path).unwrap();
    assert_eq!((image.width, image.height), (64, 64));
    let distinct: std::collections::HashSet<&u8> = image.data.iter().collect();
    assert!(distinct.len() > 16, "not a flat (e.g. black) image");

    let text = read_png_parameters(&out_path).unwrap().expect("parameters chunk");
    let params = parse_infotext(&text).unwrap();
    assert_eq!(params.prompt, "a red fox, (snow:1.2)");
    assert_eq!(params.negative_prompt, "blurry");
    assert_eq!((params.steps, params.seed, params.width, params.height), (3, 1234, 64, 64));
    assert_eq!(params.sampler, "DPM++ 2M");
    assert_eq!(params.schedule_type.as_deref(), Some("Karras"));
    assert_eq!(params.model.as_deref(), Some("sd1-tiny"));
    assert_eq!(params.rng.as_deref(), Some("CPU"));
}

#[test]
fn same_seed_same_image_and_random_seed_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
    for path in [&a, &b] {
        let out = generate(&model_dir("sd2v-tiny"), path, &["--steps", "2", "--seed", "99"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(read_png(&a).unwrap().data, read_png(&b).unwrap().data);

    let c = dir.path().join("c.png");
    let out = generate(&model_dir("sd2v-tiny"), &c, &["--steps", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let params = parse_infotext(&read_png_parameters(&c).unwrap().unwrap()).unwrap();
    assert!(stderr(&out).contains(&format!("seed {}", params.seed)), "the random seed is printed: {}", stderr(&out));
}

#[test]
fn existing_output_is_never_overwritten_silently() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keep.png");
    std::fs::write(&path, b"precious").unwrap();
    let out = generate(&model_dir("sd1-tiny"), &path, &["--steps", "1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");

    let out = generate(&model_dir("sd1-tiny"), &path, &["--steps", "1", "--overwrite"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(read_png(&path).is_ok());
}

#[test]
fn invalid_settings_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.png");
    let cases: [(&[&str], &str); 5] = [
        (&["--height", "64", "--width", "65"], "multiple of 8"),
        (&["--steps", "0"], "at least 1"),
        (&["--sampler", "heun_plus"], "unknown sampler"),
        (&["--rng", "quantum"], "quantum"),
        (&["--guidance=-3"], "guidance"),
    ];
    for (extra, message) in cases {
        let model = model_dir("sd1-tiny");
        let mut args =
            vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--output", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        if !extra.contains(&"--width") {
            args.extend_from_slice(&["--width", "64", "--height", "64"]);
        }
        let out = easel(&args);
        assert!(!out.status.success(), "{extra:?} should fail");
        let err = stderr(&out);
        assert!(err.contains(message), "{extra:?}: expected {message:?} in {err:?}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!err.contains("step 1/"), "refused before denoising: {err}");
        assert!(!path.exists());
    }
}

#[test]
fn bad_models_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("x.png");

    let out = generate(&dir.path().join("missing"), &out_path, &[]);
    assert!(stderr(&out).contains("no such file or folder"), "{}", stderr(&out));

    // A folder that is only part of a model.
    let partial = dir.path().join("partial");
    std::fs::create_dir_all(partial.join("vae")).unwrap();
    let out = generate(&partial, &out_path, &[]);
    assert!(stderr(&out).contains("missing unet/config.json"), "{}", stderr(&out));

    // A truncated U-Net file: a clear error naming the sizes, never a SIGBUS.
    let truncated = dir.path().join("truncated");
    common::copy_dir(&model_dir("sd1-tiny"), &truncated);
    let unet = truncated.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet).unwrap();
    std::fs::write(&unet, &bytes[..bytes.len() / 2]).unwrap();
    let out = generate(&truncated, &out_path, &["--steps", "1"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("truncated") && err.contains(&bytes.len().to_string()), "{err}");

    // Garbage instead of a safetensors header.
    std::fs::write(&unet, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!").unwrap();
    let err = stderr(&generate(&truncated, &out_path, &["--steps", "1"]));
    assert!(err.contains("header is not valid JSON"), "{err}");

    // Weights that do not fit the config (another model's U-Net).
    std::fs::copy(model_dir("sdxl-tiny").join("unet/diffusion_pytorch_model.safetensors"), &unet).unwrap();
    let err = stderr(&generate(&truncated, &out_path, &["--steps", "1"]));
    assert!(err.contains("weights do not match the config"), "{err}");

    // A U-Net of another kind (instruct-pix2pix's 8 input channels) is named as such.
    let config_path = truncated.join("unet/config.json");
    let config = std::fs::read_to_string(&config_path).unwrap().replace("\"in_channels\": 4", "\"in_channels\": 8");
    std::fs::write(&config_path, config).unwrap();
    let err = stderr(&generate(&truncated, &out_path, &["--steps", "1"]));
    assert!(err.contains("8 input channels"), "{err}");
    assert!(!out_path.exists());
}

#[test]
fn help_lists_the_commands() {
    let out = easel(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("generate"));
}

#[test]
fn bench_reports_every_part_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let model = model_dir("sdxl-tiny");
    let out = easel(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--runs",
        "1",
        "--json",
        json_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("U-Net step, CFG"));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    for key in
        ["text_encoding_s", "unet_step_cfg_s", "unet_step_no_cfg_s", "vae_decode_s", "end_to_end_s", "model_load_s"]
    {
        let seconds = report[key].as_f64().unwrap_or_else(|| panic!("{key} missing"));
        assert!(seconds > 0.0 && seconds.is_finite(), "{key} = {seconds}");
    }
    assert_eq!(report["family"], "SDXL");
    // Which vector instructions ran, as the engine decides them.
    assert_eq!(report["cpu_vector_isa"], easel_engine::kernels::cpu_vector_isa());
    assert!(String::from_utf8_lossy(&out.stdout).contains("CPU kernels"));
    // The tiny model's convolution and linear weights are read in place from its files.
    assert!(report["weights_in_place_bytes"].as_u64().unwrap() > 0);
    if cfg!(target_os = "linux") {
        let peak = report["peak_memory_bytes"].as_u64().unwrap();
        let private = report["peak_private_memory_bytes"].as_u64().unwrap();
        assert!(private > 0 && private <= peak, "private {private} of peak {peak}");
    }
}

#[test]
fn generate_from_a_single_file_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = common::unpack_single_file("sdxl-single", dir.path());
    let out_path = dir.path().join("xl.png");
    let out = generate(&checkpoint, &out_path, &["--steps", "2", "--seed", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("SDXL"), "{}", stderr(&out));
    let params = parse_infotext(&read_png_parameters(&out_path).unwrap().unwrap()).unwrap();
    assert_eq!(params.model.as_deref(), Some("sdxl-single"));
    let sha = easel_engine::models::hash::sha256_file(&checkpoint).unwrap();
    assert_eq!(params.model_hash.as_deref(), Some(&sha[..10]), "A1111's short model hash");
}

/// The issue users hit: an inconsistent single file, with `RUST_BACKTRACE=1` set as many desktops
/// have it. The message names the tensor and no backtrace reaches the user; `--verbose` puts
/// it in the log.
#[test]
fn an_inconsistent_file_gets_a_message_and_no_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let original = common::unpack_single_file("sd1-single", dir.path());
    let mut tensors = candle_core::safetensors::load(&original, &candle_core::Device::Cpu).unwrap();
    let emb = "model.diffusion_model.middle_block.0.emb_layers.1.weight";
    let transposed = tensors[emb].t().unwrap().contiguous().unwrap();
    tensors.insert(emb.to_string(), transposed);
    let bad = dir.path().join("inconsistent.safetensors");
    candle_core::safetensors::save(&tensors, &bad).unwrap();
    let out_path = dir.path().join("never.png");
    for verbose in [false, true] {
        let mut args = vec!["generate", "--model", bad.to_str().unwrap(), "--prompt", "x", "--width", "64"];
        args.extend(["--height", "64", "--output", out_path.to_str().unwrap()]);
        if verbose {
            args.push("--verbose");
        }
        let out = Command::new(env!("CARGO_BIN_EXE_easel"))
            .args(&args)
            .env("XDG_DATA_HOME", dir.path().join("data"))
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let text = stderr(&out);
        assert!(!out.status.success() && !out_path.exists(), "{text}");
        let error = text.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{text}"));
        assert!(error.contains(emb) && error.contains("expected [64, 128]"), "{text}");
        assert!(!error.contains("backtrace"), "{text}");
        if !verbose {
            assert!(!text.contains("stack backtrace") && !text.contains("backtrace of"), "{text}");
        }
    }
}

#[test]
fn pickle_checkpoints_are_refused_without_being_unpickled() {
    let marker = std::path::Path::new("/tmp/easel-bad-pickle-was-unpickled");
    let _ = std::fs::remove_file(marker);
    let dir = tempfile::tempdir().unwrap();
    for name in ["pickle-os-system.ckpt", "pickle-os-system-torchzip.ckpt"] {
        let out = generate(&common::fixtures().join("bad").join(name), &dir.path().join("x.png"), &[]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("pickle"), "{}", stderr(&out));
    }
    assert!(!marker.exists(), "the pickle's payload must never run");
}

#[test]
fn models_list_shows_the_hf_cache_and_a_models_folder() {
    let cache = tempfile::tempdir().unwrap();
    common::copy_dir(&model_dir("sd2v-tiny"), &cache.path().join("models--stabilityai--tiny-sd2/snapshots/abc123"));
    let folder = tempfile::tempdir().unwrap();
    common::unpack_single_file("sd1-single", folder.path());
    let out = Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(["models", "list", "--dir", folder.path().to_str().unwrap()])
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("stabilityai/tiny-sd2") && stdout.contains("SD 2.x"), "{stdout}");
    assert!(stdout.contains("sd1-single.safetensors") && stdout.contains("SD 1.x"), "{stdout}");
}

/// The binary runs with Easel's own allocator (large blocks from the tensor arena, held inside
/// the denoising loop); the library here with the system's. At 256×256 the tiny model's
/// activations and the decoded image are arena blocks, reused across steps and the decode: the
/// image must be the same to the bit.
#[test]
fn the_binary_with_its_allocator_makes_the_library_s_image() {
    use easel_engine::models::LoadOptions;
    use easel_engine::pipeline::{GenerationRequest, Pipeline};
    use easel_engine::rng::RngKind;
    use easel_engine::schedulers::SamplerId;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("arena.png");
    let model = model_dir("sd1-tiny");
    let prompt = "a lighthouse at dusk";
    let out = easel(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--width",
        "256",
        "--height",
        "192",
        "--steps",
        "3",
        "--seed",
        "7",
        "--sampler",
        "dpmpp_2m",
        "--output",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let pipeline = Pipeline::load(&model, LoadOptions::default()).unwrap();
    let request = GenerationRequest {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        steps: 3,
        guidance_scale: 7.0,
        seed: 7,
        width: 256,
        height: 192,
        sampler: SamplerId::DpmPp2m,
        schedule: easel_engine::schedulers::Schedule::Default,
        rng: RngKind::Cpu,
        emphasis: Default::default(),
        clip_skip: 1,
        loras: Vec::new(),
        embeddings: Vec::new(),
    };
    let expected = pipeline.generate(&request, &mut |_| std::ops::ControlFlow::Continue(())).unwrap();
    let image = read_png(&path).unwrap();
    assert_eq!((image.width, image.height), (256, 192));
    assert!(image.data == expected.data, "the binary's image differs from the library's");
}

/// diffusers' image-to-image and hires-fix results (crates/engine/tests/fixtures/img2img).
fn img2img_reference() -> (serde_json::Value, std::collections::HashMap<String, candle_core::Tensor>) {
    fixture_reference("img2img")
}

/// A reference folder's `reference.json` and `reference.safetensors` (crates/engine/tests/fixtures/DIR).
fn fixture_reference(dir: &str) -> (serde_json::Value, std::collections::HashMap<String, candle_core::Tensor>) {
    let fixtures = common::fixtures().join(dir);
    let json = serde_json::from_str(&std::fs::read_to_string(fixtures.join("reference.json")).unwrap()).unwrap();
    let tensors =
        candle_core::safetensors::load(fixtures.join("reference.safetensors"), &candle_core::Device::Cpu).unwrap();
    (json, tensors)
}

/// Image to image through the CLI as a user runs it, against diffusers' img2img pipelines
/// (crates/engine/tests/fixtures/img2img): the PNG and its `Denoising strength`.
#[test]
fn generate_from_an_init_image_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let (json, tensors) = img2img_reference();
    let init = common::fixtures().join("img2img/init.png");
    for (model, sampler, strength) in
        [("sd1-tiny", "euler", "0.6"), ("sd2v-tiny", "ddim", "1.0"), ("sdxl-tiny", "dpmpp_2m", "0.3")]
    {
        let out_path = dir.path().join(format!("{model}.png"));
        let model_path = model_dir(model);
        let steps = json["steps"].to_string();
        let guidance = json["guidance_scale"].to_string();
        let seed = json["seed"].to_string();
        let args = [
            "generate",
            "--model",
            model_path.to_str().unwrap(),
            "--prompt",
            json["prompt"].as_str().unwrap(),
            "--negative-prompt",
            json["negative_prompt"].as_str().unwrap(),
            "--steps",
            &steps,
            "--guidance",
            &guidance,
            "--seed",
            &seed,
            "--sampler",
            sampler,
            "--init-image",
            init.to_str().unwrap(),
            "--strength",
            strength,
            // diffusers reads the brackets of the reference prompt as text.
            "--emphasis",
            "none",
            "--output",
            out_path.to_str().unwrap(),
        ];
        let out = easel(&args);
        assert!(out.status.success(), "{model}: {}", stderr(&out));
        let ours = read_png(&out_path).unwrap();
        assert_eq!((ours.width, ours.height), (64, 64), "the init image's size by default");
        let theirs: Vec<u8> =
            tensors[&format!("{model}.{sampler}.{strength}.image")].flatten_all().unwrap().to_vec1().unwrap();
        let psnr = common::psnr(&ours.data, &theirs);
        assert!(psnr >= 40.0, "{model} {sampler} {strength}: PSNR {psnr:.1} dB");
        let params = parse_infotext(&read_png_parameters(&out_path).unwrap().unwrap()).unwrap();
        assert_eq!(params.denoising_strength, Some(strength.parse().unwrap()), "{model}");
    }

    // Refused before any work, nothing written: a strength out of range, a file that is no PNG.
    let not_png = dir.path().join("not.png");
    std::fs::write(&not_png, b"GIF89a").unwrap();
    let out_path = dir.path().join("never.png");
    let sd1 = model_dir("sd1-tiny");
    for (init, strength, words) in
        [(&init, "1.5", "strength"), (&init, "0", "strength"), (&not_png, "0.5", "init image")]
    {
        let args = [
            "generate",
            "--model",
            sd1.to_str().unwrap(),
            "--prompt",
            "x",
            "--init-image",
            init.to_str().unwrap(),
            "--strength",
            strength,
            "--output",
            out_path.to_str().unwrap(),
        ];
        let out = easel(&args);
        assert!(!out.status.success() && !out_path.exists(), "{strength}");
        assert!(stderr(&out).contains(words), "{}", stderr(&out));
        assert!(!stderr(&out).contains("loaded"), "refused before loading: {}", stderr(&out));
    }
}

/// Hires fix through the CLI against diffusers, with A1111's words in the PNG.
#[test]
fn hires_fix_through_the_cli_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let (json, tensors) = img2img_reference();
    let out_path = dir.path().join("hires.png");
    let model = model_dir("sdxl-tiny");
    let (guidance, seed) = (json["guidance_scale"].to_string(), json["seed"].to_string());
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        json["prompt"].as_str().unwrap(),
        "--negative-prompt",
        json["negative_prompt"].as_str().unwrap(),
        "--steps",
        "4",
        "--guidance",
        &guidance,
        "--seed",
        &seed,
        "--sampler",
        "euler",
        "--width",
        "64",
        "--height",
        "64",
        "--hires-scale",
        "2",
        "--hires-denoise",
        "0.5",
        "--hires-upscaler",
        "latent",
        "--emphasis",
        "none",
        "--output",
        out_path.to_str().unwrap(),
    ];
    let out = easel(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let ours = read_png(&out_path).unwrap();
    assert_eq!((ours.width, ours.height), (128, 128));
    let theirs: Vec<u8> = tensors["hires.sdxl-tiny.latent.image"].flatten_all().unwrap().to_vec1().unwrap();
    let psnr = common::psnr(&ours.data, &theirs);
    assert!(psnr >= 40.0, "PSNR {psnr:.1} dB");
    let text = read_png_parameters(&out_path).unwrap().unwrap();
    for words in ["Size: 64x64", "Denoising strength: 0.5", "Hires upscale: 2", "Hires upscaler: Latent"] {
        assert!(text.contains(words), "{words}: {text}");
    }
    // A hires pass that would be too large, or no steps at all, is refused before any work.
    for (flag, value, words) in [("--hires-scale", "100", "hires scale"), ("--hires-denoise", "0", "strength")] {
        let mut args = args.to_vec();
        let at = args.iter().position(|a| *a == flag).unwrap();
        args[at + 1] = value;
        let never = dir.path().join("never.png");
        let at = args.iter().position(|a| *a == "--output").unwrap();
        args[at + 1] = never.to_str().unwrap();
        let out = easel(&args);
        assert!(!out.status.success() && !never.exists(), "{flag} {value}");
        assert!(stderr(&out).contains(words) && !stderr(&out).contains("loaded"), "{}", stderr(&out));
    }
}

fn inpaint_reference() -> (serde_json::Value, std::collections::HashMap<String, candle_core::Tensor>) {
    fixture_reference("inpaint")
}

/// The reference's settings as `easel generate` flags, then `extra`.
fn reference_args(json: &serde_json::Value, model: &Path, output: &Path, extra: &[&str]) -> Vec<String> {
    let init = common::fixtures().join("img2img/init.png");
    let mut args: Vec<String> = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        json["prompt"].as_str().unwrap(),
        "--negative-prompt",
        json["negative_prompt"].as_str().unwrap(),
        "--steps",
        &json["steps"].to_string(),
        "--guidance",
        &json["guidance_scale"].to_string(),
        "--seed",
        &json["seed"].to_string(),
        "--init-image",
        init.to_str().unwrap(),
        // diffusers reads the brackets of the reference prompt as text.
        "--emphasis",
        "none",
        "--output",
        output.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Inpainting and outpainting through the CLI against diffusers' inpaint pipelines
/// (crates/engine/tests/fixtures/inpaint), with A1111's words in the PNG.
#[test]
fn inpainting_through_the_cli_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let (json, tensors) = inpaint_reference();
    let mask = common::fixtures().join("inpaint/mask.png");
    let small = common::fixtures().join("inpaint/small-mask.png");
    let (mask, small) = (mask.to_str().unwrap(), small.to_str().unwrap());
    let sd1 = model_dir("sd1-tiny");
    let nine = common::inpainting_model("sdxl-tiny", dir.path());
    let cases: Vec<(&Path, &str, Vec<&str>, Vec<&str>)> = vec![
        (
            &sd1,
            "sd1-tiny.4ch.euler_a.0.6",
            vec!["--mask", mask, "--mask-blur", "0", "--sampler", "euler_a", "--strength", "0.6"],
            vec!["Denoising strength: 0.6", "Mask blur: 0"],
        ),
        (
            &sd1,
            "sd1-tiny.4ch.blur4",
            vec!["--mask", mask, "--mask-blur", "4", "--strength", "0.75"],
            vec!["Mask blur: 4", "Denoising strength: 0.75"],
        ),
        (
            &sd1,
            "sd1-tiny.4ch.masked",
            vec!["--mask", small, "--mask-blur", "0", "--inpaint-area", "masked", "--inpaint-padding", "8"],
            vec!["Inpaint area: Only masked", "Masked area padding: 8"],
        ),
        // An inpainting model's strength defaults to 1.
        (
            &nine,
            "sdxl-tiny.9ch.dpmpp_2m.1.0",
            vec!["--mask", mask, "--mask-blur", "0", "--sampler", "dpmpp_2m"],
            vec!["Denoising strength: 1"],
        ),
        (
            &nine,
            "sdxl-tiny.9ch.outpaint",
            vec!["--outpaint", "32,0,0,32", "--mask-blur", "0"],
            vec!["Outpaint: \"32,0,0,32\"", "Size: 96x96"],
        ),
    ];
    for (model, key, extra, words) in cases {
        let out_path = dir.path().join(format!("{key}.png"));
        let args = reference_args(&json, model, &out_path, &extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = easel(&args);
        assert!(out.status.success(), "{key}: {}", stderr(&out));
        let ours = read_png(&out_path).unwrap();
        let theirs: Vec<u8> = tensors[&format!("{key}.image")].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ours.data.len(), theirs.len(), "{key}: size");
        let psnr = common::psnr(&ours.data, &theirs);
        assert!(psnr >= 40.0, "{key}: PSNR {psnr:.1} dB");
        let text = read_png_parameters(&out_path).unwrap().unwrap();
        for w in words {
            assert!(text.contains(w), "{key}: {w}: {text}");
        }
    }
}

/// Each bad inpainting input is a clear message before the model loads, and nothing is written.
#[test]
fn bad_inpainting_input_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let (json, _) = inpaint_reference();
    let black = dir.path().join("black.png");
    let mut black_mask = easel_engine::metadata::RgbImage { width: 64, height: 64, data: vec![0; 64 * 64 * 3] };
    easel_engine::metadata::write_png(&black, &black_mask, &[], false).unwrap();
    let wrong_size = dir.path().join("wrong-size.png");
    black_mask = easel_engine::metadata::RgbImage { width: 32, height: 32, data: vec![255; 32 * 32 * 3] };
    easel_engine::metadata::write_png(&wrong_size, &black_mask, &[], false).unwrap();
    let corrupt = dir.path().join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nbroken").unwrap();
    let mask = common::fixtures().join("inpaint/mask.png");
    let out_path = dir.path().join("never.png");
    let sd1 = model_dir("sd1-tiny");
    let nine = common::inpainting_model("sd1-tiny", dir.path());
    let cases: Vec<(&Path, Vec<&str>, &str)> = vec![
        (&sd1, vec!["--mask", black.to_str().unwrap()], "nothing to repaint"),
        (&sd1, vec!["--mask", wrong_size.to_str().unwrap()], "same size"),
        (&sd1, vec!["--mask", corrupt.to_str().unwrap()], "mask"),
        (&sd1, vec!["--mask", mask.to_str().unwrap(), "--strength", "1.5"], "strength"),
        (&sd1, vec!["--outpaint", "4,0,0,0"], "multiples of 8"),
        (&nine, vec![], "--mask"),
    ];
    for (model, extra, words) in cases {
        let args = reference_args(&json, model, &out_path, &extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = easel(&args);
        let err = stderr(&out);
        assert!(!out.status.success() && !out_path.exists(), "{extra:?}: {err}");
        assert!(err.contains(words), "{extra:?}: {err}");
        assert!(!err.contains("loaded"), "refused before loading: {err}");
    }
    // A mask without an init image, and an inpainting model with no picture at all.
    let out = generate(&sd1, &out_path, &["--mask", mask.to_str().unwrap()]);
    assert!(stderr(&out).contains("needs --init-image"), "{}", stderr(&out));
    let out = generate(&nine, &out_path, &[]);
    assert!(stderr(&out).contains("inpainting model"), "{}", stderr(&out));
}

/// Emphasis, long prompts and clip skip through the CLI against the prompt references
/// (crates/engine/tests/fixtures/prompts), with A1111's words in the PNG.
#[test]
fn prompts_through_the_cli_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (json, tensors) = fixture_reference("prompts");
    for (key, words) in [
        ("weighted.sd1-tiny", vec![]),
        ("no-norm.sdxl-tiny", vec!["Emphasis: No norm"]),
        ("clip-skip-2.sd1-tiny", vec!["Clip skip: 2"]),
        ("long.sd2v-tiny", vec![]),
        ("break.sdxl-tiny", vec![]),
    ] {
        let case = json["cases"].as_array().unwrap().iter().find(|c| c["key"] == key).unwrap();
        let out_path = dir.path().join(format!("{key}.png"));
        let model = model_dir(case["model"].as_str().unwrap());
        let args = [
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--negative-prompt",
            case["negative"].as_str().unwrap(),
            "--emphasis",
            case["emphasis"].as_str().unwrap(),
            "--clip-skip",
            &case["clip_skip"].to_string(),
            "--steps",
            &json["steps"].to_string(),
            "--guidance",
            &json["guidance_scale"].to_string(),
            "--seed",
            &json["seed"].to_string(),
            "--width",
            "64",
            "--height",
            "64",
            "--output",
            out_path.to_str().unwrap(),
        ];
        let out = easel(&args);
        assert!(out.status.success(), "{key}: {}", stderr(&out));
        let ours = read_png(&out_path).unwrap();
        let theirs: Vec<u8> = tensors[&format!("{key}.image")].flatten_all().unwrap().to_vec1().unwrap();
        let psnr = common::psnr(&ours.data, &theirs);
        assert!(psnr >= 40.0, "{key}: PSNR {psnr:.1} dB");
        let text = read_png_parameters(&out_path).unwrap().unwrap();
        for w in words {
            assert!(text.contains(w), "{key}: {w}: {text}");
        }
        if key.starts_with("long") {
            assert!(stderr(&out).contains("chunks of 75"), "{}", stderr(&out));
        }
    }
    // Unbalanced brackets are no error: an unclosed one runs to the end, a stray one is text.
    let unbalanced = dir.path().join("unbalanced.png");
    let model = model_dir("sd1-tiny");
    let out = easel(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a fox ((( in ]] the snow))))",
        "--steps",
        "2",
        "--output",
        unbalanced.to_str().unwrap(),
    ]);
    assert!(out.status.success() && unbalanced.exists(), "{}", stderr(&out));
    // Nonsense is refused before any work.
    let out = generate(&model_dir("sd1-tiny"), &dir.path().join("x.png"), &["--clip-skip", "0"]);
    assert!(stderr(&out).contains("clip skip"), "{}", stderr(&out));
    let out = generate(&model_dir("sd1-tiny"), &dir.path().join("x.png"), &["--emphasis", "loud"]);
    assert!(stderr(&out).contains("emphasis"), "{}", stderr(&out));
}

/// LoRAs through the CLI against diffusers (crates/engine/tests/fixtures/lora): `--lora PATH:W`
/// and a `<lora:NAME:W>` tag found in `--lora-dir`, with `Lora hashes` in the PNG.
#[test]
fn loras_through_the_cli_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = common::fixtures().join("lora");
    let (json, tensors) = fixture_reference("lora");
    let kohya = fixtures.join("sd1-tiny-kohya.safetensors");
    let flag = format!("{}:0.8", kohya.display());
    let tagged = format!("{} <lora:sdxl-tiny-peft:0.7>", json["prompt"].as_str().unwrap());
    let lora_dir = fixtures.to_str().unwrap().to_string();
    // Every case as `--lora PATH:W` flags, and one as a tag found in the folder.
    let mut runs: Vec<(String, String, String, Vec<String>)> = Vec::new();
    for case in json["cases"].as_array().unwrap() {
        let loras = case["loras"].as_array().unwrap();
        if loras.is_empty() {
            continue;
        }
        let mut extra: Vec<String> = Vec::new();
        for l in loras {
            extra.push("--lora".into());
            extra.push(format!("{}:{}", fixtures.join(l[0].as_str().unwrap()).display(), l[1]));
        }
        if let Some(sampler) = case["sampler"].as_str() {
            extra.extend(["--sampler".into(), sampler.into()]);
        }
        // The LCM case has its own steps and guidance.
        extra.extend(["--steps".into(), case["steps"].as_u64().unwrap_or(6).to_string()]);
        extra.extend(["--guidance".into(), case["guidance"].as_f64().unwrap_or(7.5).to_string()]);
        let model = case["model"].as_str().unwrap().to_string();
        runs.push((case["key"].as_str().unwrap().into(), model, json["prompt"].as_str().unwrap().into(), extra));
    }
    let _ = flag;
    let defaults =
        ["--steps".to_string(), json["steps"].to_string(), "--guidance".into(), json["guidance_scale"].to_string()];
    let mut tag_run = vec!["--lora-dir".to_string(), lora_dir.clone()];
    tag_run.extend(defaults);
    runs.push(("sdxl-tiny.peft".into(), "sdxl-tiny".into(), tagged.clone(), tag_run));
    assert!(runs.len() >= 12, "{} LoRA cases", runs.len());
    for (i, (key, model, prompt, extra)) in runs.into_iter().enumerate() {
        let key = key.as_str();
        let out_path = dir.path().join(format!("{i}-{key}.png"));
        let model_path = model_dir(&model);
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            model_path.to_str().unwrap().into(),
            "--prompt".into(),
            prompt,
            "--negative-prompt".into(),
            json["negative_prompt"].as_str().unwrap().into(),
            "--seed".into(),
            json["seed"].to_string(),
            "--width".into(),
            "64".into(),
            "--height".into(),
            "64".into(),
            "--output".into(),
            out_path.to_str().unwrap().into(),
        ];
        args.extend(extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = easel(&args);
        assert!(out.status.success(), "{key}: {}", stderr(&out));
        assert!(stderr(&out).contains("layers adapted"), "{}", stderr(&out));
        let ours = read_png(&out_path).unwrap();
        let theirs: Vec<u8> = tensors[&format!("{key}.image")].flatten_all().unwrap().to_vec1().unwrap();
        let psnr = common::psnr(&ours.data, &theirs);
        assert!(psnr >= 40.0, "{key}: PSNR {psnr:.1} dB");
        let text = read_png_parameters(&out_path).unwrap().unwrap();
        assert!(text.contains("Lora hashes: \"") && text.contains("<lora:"), "{key}: {text}");
    }
    // Refused before any step: an unknown tag, a tag without a folder, another family's LoRA.
    let sd1 = model_dir("sd1-tiny");
    let out_path = dir.path().join("never.png");
    let with_prompt = |prompt: &str, extra: &[&str]| {
        let mut args = vec!["generate", "--model", sd1.to_str().unwrap(), "--prompt", prompt];
        args.extend_from_slice(&["--output", out_path.to_str().unwrap()]);
        args.extend_from_slice(extra);
        easel(&args)
    };
    let out = with_prompt("a fox <lora:missing:1>", &["--lora-dir", &lora_dir]);
    assert!(stderr(&out).contains("no missing.safetensors"), "{}", stderr(&out));
    let out = with_prompt("a fox <lora:x:1>", &[]);
    assert!(stderr(&out).contains("--lora-dir"), "{}", stderr(&out));
    let xl = format!("{}", fixtures.join("sdxl-tiny-kohya.safetensors").display());
    let out = generate(&sd1, &out_path, &["--lora", &xl]);
    assert!(stderr(&out).contains("for SDXL but the model is SD 1.x"), "{}", stderr(&out));
    assert!(!out_path.exists());
}

/// A textual-inversion embedding from `--embedding-dir`, named in the prompt, against diffusers'
/// `load_textual_inversion`; `TI hashes` in the PNG; a pickle embedding named is refused.
#[test]
fn embeddings_through_the_cli_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = common::fixtures().join("prompts");
    let (json, tensors) = fixture_reference("prompts");
    let case = json["cases"].as_array().unwrap().iter().find(|c| c["key"] == "ti.sd1-tiny").unwrap();
    let emb_dir = fixtures.join("embeddings/sd1-tiny");
    let out_path = dir.path().join("ti.png");
    let model = model_dir("sd1-tiny");
    let steps = json["steps"].to_string();
    let guidance = json["guidance_scale"].to_string();
    let seed = json["seed"].to_string();
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--negative-prompt",
        case["negative"].as_str().unwrap(),
        "--emphasis",
        "none",
        "--steps",
        &steps,
        "--guidance",
        &guidance,
        "--seed",
        &seed,
        "--width",
        "64",
        "--height",
        "64",
        "--embedding-dir",
        emb_dir.to_str().unwrap(),
        "--output",
        out_path.to_str().unwrap(),
    ];
    let out = easel(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let ours = read_png(&out_path).unwrap();
    let theirs: Vec<u8> = tensors["ti.sd1-tiny.image"].flatten_all().unwrap().to_vec1().unwrap();
    let psnr = common::psnr(&ours.data, &theirs);
    assert!(psnr >= 40.0, "PSNR {psnr:.1} dB");
    let text = read_png_parameters(&out_path).unwrap().unwrap();
    assert!(text.contains("TI hashes: \"inkwash: "), "{text}");

    // A pickle embedding the prompt names: refused, unread.
    let pickles = dir.path().join("pickles");
    std::fs::create_dir_all(&pickles).unwrap();
    std::fs::write(pickles.join("badstyle.pt"), b"not read").unwrap();
    let never = dir.path().join("never.png");
    let out = easel(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a fox, badstyle",
        "--embedding-dir",
        pickles.to_str().unwrap(),
        "--output",
        never.to_str().unwrap(),
    ]);
    assert!(!out.status.success() && stderr(&out).contains("pickle"), "{}", stderr(&out));
}
