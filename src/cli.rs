//! The headless command line: the same engine as the window, for scripts, tests and benchmarks.

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use easel_engine::device::{load_options, DevicePreference};
use easel_engine::metadata::{read_png, write_png};
use easel_engine::models::inspect_model;
use easel_engine::pipeline::fit::{fit_image, ResizeMode};
use easel_engine::pipeline::inpaint::{Inpaint, InpaintArea, Mask, Outpaint};
use easel_engine::pipeline::prompt::Emphasis;
use easel_engine::pipeline::{GenerationRequest, HiresFix, HiresUpscaler, ImageToImage, Pipeline, StepProgress, Task};
use easel_engine::rng::RngKind;
use easel_engine::schedulers::{SamplerId, Schedule};

#[derive(Parser, Debug)]
#[command(
    name = "easel",
    version,
    about = "Text-to-image with Stable Diffusion models, natively. With no command, opens the window."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Print the engine's log on stderr: what it loads and why, and the backtraces of errors
    /// (never part of an error message). `EASEL_LOG=debug` does the same.
    #[arg(long, global = true)]
    pub verbose: bool,
}

/// Sends the log to stderr: Easel's own at debug level with `--verbose`, anything as
/// `EASEL_LOG` says (env_logger's syntax, e.g. `debug` or `wgpu=warn`); nothing otherwise, as
/// what a user needs to know is in the messages.
pub fn init_logging(verbose: bool) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(log::LevelFilter::Off);
    if let Ok(spec) = std::env::var("EASEL_LOG") {
        builder.parse_filters(&spec);
    }
    if verbose {
        builder.filter_module("easel", log::LevelFilter::Debug).filter_module("easel_engine", log::LevelFilter::Debug);
    }
    // A second call (tests run several CLIs in one process) keeps the first logger.
    let _ = builder.try_init();
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate one image from a prompt and save it as a PNG with its parameters.
    Generate(Box<GenerateArgs>),
    /// Time text encoding, a U-Net step (with and without CFG), the VAE decode, a whole
    /// generation and peak memory; prints a table (and JSON with --json).
    Bench(BenchArgs),
    /// Models on this machine (Hugging Face cache, a models folder).
    Models {
        #[command(subcommand)]
        action: ModelsCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Download a curated model (sd15, sd21, sdxl, sd-turbo, sdxl-turbo) into the Hugging Face
    /// cache; an interrupted download resumes where it stopped.
    Download {
        /// A curated id, or any diffusers repository as org/name.
        name: String,
        #[arg(long, default_value = "main")]
        revision: String,
    },
    /// List the models in the Hugging Face cache (shared with diffusers) and in a models folder.
    List {
        /// A folder of checkpoints and diffusers folders to list too.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// How to find and load the model: shared by every command that runs one.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A diffusers model folder (model_index.json, unet/, vae/, text_encoder/, scheduler/) or a
    /// single-file .safetensors checkpoint (SD 1.x, SD 2.x, SDXL) [default: Easel Mini, the
    /// small model in assets/models/easel-mini].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Use this VAE instead of the model's own: a diffusers `vae/` folder or a .safetensors file.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// auto, cpu, cuda or metal.
    #[arg(long, default_value = "auto")]
    pub device: DevicePreference,
    /// f32 (exact, the default) or bf16: on CPUs with AVX-512 BF16, U-Net weights in bf16 —
    /// half their memory, faster, images close to but not identical with f32's.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Widen f16 checkpoints to f32 once at load, as diffusers does, instead of keeping their
    /// weights in f16 and widening per layer (same image either way; twice the weight memory).
    #[arg(long)]
    pub widen_f16_weights: bool,
    /// Copy convolution and linear weights out of the model file at load instead of reading
    /// them in place from its memory mapping (same image either way; a slower load).
    #[arg(long)]
    pub copy_weights: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

impl ModelArgs {
    /// `--model`, or Easel Mini when it is left out.
    pub fn model_path(&self) -> Result<PathBuf> {
        match &self.model {
            Some(path) => Ok(path.clone()),
            None => easel_engine::models::library::easel_mini().context(
                "no --model given, and Easel Mini (assets/models/easel-mini) is not beside this program: \
                 pass --model PATH, or set EASEL_MINI_MODEL to its folder",
            ),
        }
    }

    pub fn load_options(&self) -> Result<easel_engine::models::LoadOptions> {
        Ok(easel_engine::models::LoadOptions {
            vae_override: self.vae.clone(),
            cpu_bf16: self.precision == Precision::Bf16,
            keep_f16_weights: !self.widen_f16_weights,
            map_weights: !self.copy_weights,
            ..load_options(self.device)?
        })
    }
}

/// `--sampler` and `--schedule`: chosen apart, as AUTOMATIC1111 and ComfyUI present them.
#[derive(Args, Debug, Clone)]
pub struct SamplerArgs {
    /// euler, euler_a, ddim, dpmpp_2m or lcm (`dpmpp_2m_karras` still means dpmpp_2m with
    /// the Karras schedule).
    #[arg(long, default_value = "euler", value_parser = parse_sampler)]
    pub sampler: (SamplerId, Option<Schedule>),
    /// default (the model's own) or karras [works with: euler, dpmpp_2m].
    #[arg(long)]
    pub schedule: Option<Schedule>,
}

fn parse_sampler(text: &str) -> std::result::Result<(SamplerId, Option<Schedule>), String> {
    SamplerId::parse_with_schedule(text).map_err(|e| e.to_string())
}

impl SamplerArgs {
    pub fn resolve(&self) -> Result<(SamplerId, Schedule)> {
        let (sampler, implied) = self.sampler;
        let schedule = match (implied, self.schedule) {
            (Some(a), Some(b)) if a != b => {
                bail!(
                    "--sampler {} already names the {a} schedule; --schedule {b} contradicts it",
                    sampler.combined_id(a)
                )
            }
            (a, b) => b.or(a).unwrap_or_default(),
        };
        sampler.check_schedule(schedule)?;
        Ok((sampler, schedule))
    }
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    /// Steps of the end-to-end generation.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    /// Runs per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Denoising steps [default: from the model: 25, SDXL 30, Turbo 1].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; ≤ 1 runs one U-Net pass per step [default: 7, Turbo 0].
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Seed for the noise; random (and printed) when left out.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Width in pixels, a multiple of 8 [default: the model's native size].
    #[arg(long)]
    pub width: Option<usize>,
    /// Height in pixels, a multiple of 8 [default: the model's native size].
    #[arg(long)]
    pub height: Option<usize>,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    /// How (word:1.2), [word] and BREAK act: a1111 (the default: weights, then the chunk's mean
    /// restored), a1111-no-norm, comfyui (weights relative to the empty prompt), or none
    /// (brackets are text, as diffusers reads them). Prompts over 75 tokens are chunked in all.
    #[arg(long, default_value = "a1111")]
    pub emphasis: Emphasis,
    /// A LoRA / LyCORIS file to apply, with its weight (default 1); repeatable. The same as
    /// writing `<lora:NAME:WEIGHT>` in the prompt.
    #[arg(long, value_name = "PATH[:WEIGHT]")]
    pub lora: Vec<String>,
    /// Where `<lora:NAME:…>` tags in the prompt find NAME.safetensors (subfolders too).
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,
    /// A folder of textual-inversion embeddings (.safetensors): a file's name written in the
    /// prompt or negative prompt stands for its learned tokens.
    #[arg(long, value_name = "DIR")]
    pub embedding_dir: Option<PathBuf>,
    /// A1111's "Clip skip": 1 conditions on the text encoder's last layer, 2 on the one before
    /// (anime models), up to 12.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub clip_skip: u32,
    /// Noise generator: cpu (torch CPU: diffusers, ComfyUI) or nv (torch CUDA: AUTOMATIC1111 on NVIDIA).
    #[arg(long, default_value = "cpu")]
    pub rng: RngKind,
    /// Where to write the PNG [default: easel-<seed>.png in the current folder].
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// Start from this picture instead of noise (image to image); the size defaults to its own.
    #[arg(long, value_name = "PNG")]
    pub init_image: Option<PathBuf>,
    /// How much of the init image is repainted: above 0, at most 1 (A1111's denoising strength)
    /// [default: 0.75; 1 for outpainting and for inpainting models].
    #[arg(long)]
    pub strength: Option<f64>,
    /// Inpainting: repaint where this picture (the init image's size) is white, keep where black.
    #[arg(long, value_name = "PNG")]
    pub mask: Option<PathBuf>,
    /// Soften the mask's edge by a Gaussian of N pixels, and lay the result over the init image
    /// through it (A1111's "Mask blur"); 0 gives diffusers' hard-edged output as it is.
    #[arg(long, default_value_t = 4.0, value_name = "N")]
    pub mask_blur: f64,
    /// whole: render the whole picture; masked: render only the masked region (plus
    /// --inpaint-padding) at the full size and paste it back (A1111's "Only masked").
    #[arg(long, default_value = "whole", value_parser = ["whole", "masked"])]
    pub inpaint_area: String,
    /// Pixels around the masked region that "--inpaint-area masked" renders too.
    #[arg(long, default_value_t = 32, value_name = "P")]
    pub inpaint_padding: u32,
    /// Outpainting: extend the init image's canvas by LEFT,TOP,RIGHT,BOTTOM pixels (or one number
    /// for all four) and paint the new border.
    #[arg(long, value_name = "L,T,R,B", value_parser = parse_outpaint)]
    pub outpaint: Option<Outpaint>,
    /// How an init image of another size is fitted: resize (stretch), crop (cover, cut evenly)
    /// or fill (fit inside, edges stretched), as AUTOMATIC1111's resize modes.
    #[arg(long, default_value = "resize")]
    pub resize_mode: ResizeMode,
    /// Hires fix: paint at the size, then upscale by this factor (1 to 8) and repaint, as
    /// AUTOMATIC1111's "Hires. fix".
    #[arg(long, value_name = "F")]
    pub hires_scale: Option<f64>,
    /// Steps of the hires pass [default: as many as --steps].
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub hires_steps: usize,
    /// Denoising strength of the hires pass.
    #[arg(long, default_value_t = 0.5, value_name = "D")]
    pub hires_denoise: f64,
    /// What the hires fix upscales: latent (bilinear), latent-nearest, or lanczos (the decoded
    /// picture, encoded again).
    #[arg(long, default_value = "latent")]
    pub hires_upscaler: HiresUpscaler,
}

/// The job's LoRAs: each `--lora PATH[:WEIGHT]` (written into the prompt as its tag, so the PNG
/// carries it as A1111's do), then the prompt's `<lora:NAME:…>` tags found in `--lora-dir`.
fn resolve_loras(
    prompt: &str,
    flags: &[String],
    dir: Option<&Path>,
) -> Result<(String, Vec<easel_engine::models::lora::LoraWeight>)> {
    use easel_engine::models::lora::{extract_lora_tags, find_in_dir, LoraWeight};
    let mut prompt = prompt.to_string();
    let mut loras: Vec<LoraWeight> = Vec::new();
    for flag in flags {
        // PATH:WEIGHT, where PATH itself may hold colons (C:\…): the weight is after the last.
        let (path, weight) = match flag.rsplit_once(':') {
            Some((path, w)) if w.parse::<f64>().is_ok() && !path.is_empty() => (path, w.parse::<f64>()?),
            _ => (flag.as_str(), 1.0),
        };
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("--lora {}: no such file", path.display());
        }
        let lora = LoraWeight { path, text_weight: weight, unet_weight: weight };
        prompt.push_str(&format!(" <lora:{}:{weight}>", lora.name()));
        loras.push(lora);
    }
    for (name, text_weight, unet_weight) in extract_lora_tags(&prompt).1 {
        if loras.iter().any(|l| l.name() == name) {
            continue;
        }
        let Some(dir) = dir else {
            bail!("the prompt asks for <lora:{name}>: say where LoRAs are with --lora-dir DIR (or pass --lora PATH)");
        };
        let Some(path) = find_in_dir(dir, &name) else {
            bail!("the prompt asks for <lora:{name}>, but {} has no {name}.safetensors", dir.display());
        };
        loras.push(LoraWeight { path, text_weight, unet_weight });
    }
    Ok((prompt, loras))
}

fn parse_outpaint(text: &str) -> std::result::Result<Outpaint, String> {
    Outpaint::parse(text).map_err(|e| e.to_string())
}

fn read_picture(path: &Path, what: &str) -> Result<easel_engine::metadata::RgbImage> {
    read_png(path).with_context(|| format!("reading the {what} {}", path.display()))
}

/// The init image (and mask), fitted to `width` × `height` (saying so when they had another size).
fn fit_init(
    image: &easel_engine::metadata::RgbImage,
    mask: Option<&Mask>,
    (width, height): (u32, u32),
    mode: ResizeMode,
) -> Result<(easel_engine::metadata::RgbImage, Option<Mask>)> {
    if (image.width, image.height) != (width, height) {
        eprintln!(
            "note: the init image is {}×{}; fitted to {width}×{height} ({})",
            image.width,
            image.height,
            mode.label()
        );
    }
    let fitted = fit_image(image, width, height, mode)?;
    let mask = match mask {
        Some(mask) => {
            let grey = easel_engine::metadata::RgbImage {
                width: mask.width,
                height: mask.height,
                data: mask.data.iter().flat_map(|&v| [v, v, v]).collect(),
            };
            Some(Mask::from_rgb(&fit_image(&grey, width, height, mode)?))
        }
        None => None,
    };
    Ok((fitted, mask))
}

/// What `generate` was asked to do: image to image, inpainting, outpainting or hires fix.
fn build_task(
    args: &GenerateArgs,
    request: &mut GenerationRequest,
    info: &easel_engine::models::ModelInfo,
) -> Result<Task> {
    let Some(path) = &args.init_image else {
        for (given, flag) in [(args.mask.is_some(), "--mask"), (args.outpaint.is_some(), "--outpaint")] {
            if given {
                bail!("{flag} needs --init-image: the picture to paint into");
            }
        }
        if info.is_inpainting() {
            bail!("{} is an inpainting model: give it --init-image and --mask", info.name);
        }
        return Ok(match args.hires_scale {
            Some(scale) => {
                let hires = HiresFix {
                    scale,
                    steps: args.hires_steps,
                    denoise: args.hires_denoise,
                    upscaler: args.hires_upscaler,
                };
                let second = hires.second_pass(request)?;
                second.validate(info)?;
                easel_engine::pipeline::first_step(hires.denoise, second.steps)?;
                Task::HiresFix(hires)
            }
            None => Task::TextToImage,
        });
    };
    if args.hires_scale.is_some() {
        bail!("--hires-scale is for text to image: leave out --init-image");
    }
    let image = read_picture(path, "init image")?;
    let mask = match &args.mask {
        Some(mask_path) => {
            let mask = Mask::from_rgb(&read_picture(mask_path, "mask")?);
            if (mask.width, mask.height) != (image.width, image.height) {
                bail!(
                    "the mask {} is {}×{} but the init image {}×{}: they must be the same size",
                    mask_path.display(),
                    mask.width,
                    mask.height,
                    image.width,
                    image.height
                );
            }
            Some(mask)
        }
        None => None,
    };
    let (image, mask) =
        fit_init(&image, mask.as_ref(), (request.width as u32, request.height as u32), args.resize_mode)?;
    let (image, mask) = match &args.outpaint {
        Some(outpaint) => {
            let (big, border) = outpaint.extend(&image)?;
            let factor = info.vae.downscale_factor() as u32;
            if big.width % factor != 0 || big.height % factor != 0 {
                bail!(
                    "outpainting {}×{} by {} gives {}×{}: the sides must be multiples of {factor}",
                    image.width,
                    image.height,
                    outpaint.to_param(),
                    big.width,
                    big.height
                );
            }
            // A painted mask is kept, the new border added to it.
            let mask = match mask {
                Some(inner) => {
                    let inner = outpaint.extend_mask(&inner);
                    let data = inner.data.iter().zip(&border.data).map(|(&a, &b)| a.max(b)).collect();
                    Mask { data, ..border }
                }
                None => border,
            };
            request.width = big.width as usize;
            request.height = big.height as usize;
            request.validate(info)?;
            (big, Some(mask))
        }
        None => (image, mask),
    };
    let full = args.outpaint.is_some() || info.is_inpainting();
    let strength = args.strength.unwrap_or(if full { 1.0 } else { 0.75 });
    match mask {
        Some(mask) => {
            let area = match args.inpaint_area.as_str() {
                "masked" => InpaintArea::Masked { padding: args.inpaint_padding },
                _ => InpaintArea::Whole,
            };
            let inpaint = Inpaint { image, mask, strength, mask_blur: args.mask_blur, area };
            inpaint.validate(request)?;
            Ok(Task::Inpaint(inpaint))
        }
        None if info.is_inpainting() => {
            bail!("{} is an inpainting model: give it --mask too (white = repaint)", info.name)
        }
        None => {
            let init = ImageToImage { image, strength };
            init.validate(request)?;
            Ok(Task::ImageToImage(init))
        }
    }
}

pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Generate(args) => generate(*args),
        Command::Bench(args) => bench(args),
        Command::Models { action: ModelsCommand::List { dir } } => list_models(dir.as_deref()),
        Command::Models { action: ModelsCommand::Download { name, revision } } => download_model(&name, &revision),
    }
}

/// Fails early (before minutes of work) when the output cannot be written.
fn check_output(path: &Path, overwrite: bool) -> Result<()> {
    if path.exists() && !overwrite {
        bail!("{} already exists; choose another --output or pass --overwrite", path.display());
    }
    if path.extension().and_then(|e| e.to_str()).map(|e| e.eq_ignore_ascii_case("png")) != Some(true) {
        bail!("{}: the output must be a .png file", path.display());
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!("cannot write {}: folder {} does not exist", path.display(), dir.display());
    }
    tempfile::NamedTempFile::new_in(&dir).with_context(|| format!("cannot write into folder {}", dir.display()))?;
    Ok(())
}

fn generate(args: GenerateArgs) -> Result<()> {
    let (sampler, schedule) = args.sampler.resolve()?;
    let model = &args.model.model_path()?;
    let info = inspect_model(model)?;
    let size = info.default_size();
    // Image to image keeps the init image's size unless told otherwise (sides rounded down to
    // what the model takes).
    let init_size = match &args.init_image {
        Some(path) => {
            let factor = info.vae.downscale_factor();
            let image = read_png(path).with_context(|| format!("reading the init image {}", path.display()))?;
            let round = |v: u32| ((v as usize / factor) * factor).max(factor);
            Some((round(image.width), round(image.height)))
        }
        None => None,
    };
    let seed = args.seed.unwrap_or_else(easel_engine::rng::random_seed);
    let mut request = GenerationRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps.unwrap_or(info.default_steps()),
        guidance_scale: args.guidance.unwrap_or(info.default_guidance()),
        seed,
        width: args.width.or(init_size.map(|s| s.0)).unwrap_or(size),
        height: args.height.or(init_size.map(|s| s.1)).unwrap_or(size),
        sampler,
        schedule,
        rng: args.rng,
        emphasis: args.emphasis,
        clip_skip: args.clip_skip,
        loras: Vec::new(),
        embeddings: Vec::new(),
    };
    let (prompt, loras) = resolve_loras(&request.prompt, &args.lora, args.lora_dir.as_deref())?;
    request.prompt = prompt;
    request.loras = loras;
    if let Some(dir) = &args.embedding_dir {
        if !dir.is_dir() {
            bail!("--embedding-dir {}: no such folder", dir.display());
        }
        let (usable, pickles) = easel_engine::pipeline::embeddings::embedding_files(dir);
        for pickle in pickles {
            let name = pickle.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let texts = [&request.prompt, &request.negative_prompt];
            if texts.iter().any(|t| easel_engine::pipeline::embeddings::mentions(t, &name)) {
                bail!(
                    "the prompt names the embedding {name}, but {} is a pickle file, which can run code when opened: \
                     Easel reads only .safetensors embeddings",
                    pickle.display()
                );
            }
        }
        request.embeddings = usable;
    }
    request.validate(&info)?;
    let task = build_task(&args, &mut request, &info)?;
    let output = args.output.clone().unwrap_or_else(|| PathBuf::from(format!("easel-{seed}.png")));
    check_output(&output, args.overwrite)?;

    let load_start = Instant::now();
    let options = args.model.load_options()?;
    // The A1111 hash of a multi-GB file takes seconds: it is computed while the image is made.
    let hashing = {
        let model = model.clone();
        std::thread::spawn(move || crate::worker::model_hash(&model))
    };
    let pipeline = Pipeline::load(model, options).context("loading the model")?;
    eprintln!(
        "loaded {} model \"{}\" in {:.1} s; seed {seed}, {} steps of {}, guidance {}, {}x{}",
        info.family,
        info.name,
        load_start.elapsed().as_secs_f64(),
        request.steps,
        request.sampler.combined_id(request.schedule),
        request.guidance_scale,
        request.width,
        request.height
    );
    let (chunks, tokens) =
        easel_engine::pipeline::prompt::chunk_prompt(&pipeline.tokenizers().first, &request.prompt, request.emphasis)?;
    if chunks.len() > 1 {
        eprintln!("note: the prompt is {tokens} tokens: {} chunks of 75, encoded one by one", chunks.len());
    }

    if !request.loras.is_empty() {
        let report = pipeline.apply_loras(&request.loras)?;
        let size = if report.bytes >= 1 << 20 {
            format!("{:.1} MB", report.bytes as f64 / 1e6)
        } else {
            format!("{:.1} KB", report.bytes as f64 / 1e3)
        };
        eprintln!("LoRAs: {} layers adapted, {size} of adapter weights (the model's own untouched)", report.layers);
        for (name, keys) in &report.unmatched {
            let shown: Vec<&str> = keys.iter().take(5).map(String::as_str).collect();
            eprintln!(
                "warning: {} of LoRA {name}'s modules match no layer of this model and are not applied: {}{}",
                keys.len(),
                shown.join(", "),
                if keys.len() > 5 { ", …" } else { "" }
            );
        }
    }
    if request.prompt.trim().is_empty() {
        eprintln!("warning: the prompt is empty: the image follows no text");
    }

    let started = Instant::now();
    // On a terminal the progress line rewrites itself; in logs each step gets its own line.
    let interactive = std::io::stderr().is_terminal();
    let mut report = |p: StepProgress| {
        let secs = p.elapsed.as_secs_f64().max(1e-9);
        let rate = p.step as f64 / secs;
        let eta = (p.total - p.step) as f64 / rate.max(1e-9);
        let line = format!("step {}/{}  {:.2} it/s  ETA {:.0} s", p.step, p.total, rate, eta);
        if interactive {
            eprint!("\r{line}   ");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
        ControlFlow::Continue(())
    };
    let image = pipeline.generate_task(&request, &task, &mut report)?;
    if interactive {
        eprintln!();
    }
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());

    let model_hash = hashing.join().ok().flatten();
    let mut params = request.to_params(Some(&info.name), model_hash.as_deref());
    params.vae = args.model.vae.as_deref().and_then(|p| p.file_stem()).map(|n| n.to_string_lossy().into_owned());
    task.write_params(&mut params);
    if let Some(outpaint) = &args.outpaint {
        params.extra.push(("Outpaint".into(), outpaint.to_param()));
    }
    write_png(&output, &image, &[("parameters", &params.to_infotext())], args.overwrite)
        .with_context(|| format!("saving {}", output.display()))?;
    println!("{}", output.display());
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    let (sampler, schedule) = args.sampler.resolve()?;
    let request = GenerationRequest {
        prompt: "a photograph of an astronaut riding a horse".into(),
        negative_prompt: "blurry, low quality".into(),
        steps: args.steps,
        guidance_scale: 7.0,
        seed: 0,
        width: args.width,
        height: args.height,
        sampler,
        schedule,
        rng: RngKind::Cpu,
        emphasis: Default::default(),
        clip_skip: 1,
        loras: Vec::new(),
        embeddings: Vec::new(),
    };
    let options = args.model.load_options()?;
    let load_start = Instant::now();
    let pipeline = Pipeline::load(&args.model.model_path()?, options).context("loading the model")?;
    let load_s = load_start.elapsed().as_secs_f64();
    eprintln!("loaded in {load_s:.1} s; measuring ({} runs each)…", args.runs);
    let report = easel_engine::bench::run(&pipeline, &request, args.runs)?;
    println!("model            {} ({})", report.model, report.family);
    println!("size, steps      {}x{}, {} steps of {}", report.width, report.height, report.steps, report.sampler);
    println!("threads          {}", report.threads);
    let on_cpu = pipeline.model().options.device.is_cpu();
    if on_cpu {
        println!("CPU kernels      {}", report.cpu_vector_isa);
    }
    // `--precision` picks the CPU mode; on a GPU the U-Net and text encoders run in f16.
    let precision = match (on_cpu, args.model.precision) {
        (false, _) => "f16 (GPU)",
        (true, Precision::F32) => "f32",
        (true, Precision::Bf16) => "bf16",
    };
    println!("precision        {precision}");
    let in_place = pipeline.model().weights_in_place;
    println!("model load       {}   ({:.2} GB of weights read in place)", duration(load_s), in_place as f64 / 1e9);
    println!("text encoding    {}", duration(report.text_encoding_s));
    println!("U-Net step, CFG  {}   (batch 2)", duration(report.unet_step_cfg_s));
    println!("U-Net step       {}   (batch 1)", duration(report.unet_step_no_cfg_s));
    println!("VAE decode       {}", duration(report.vae_decode_s));
    println!("latent preview   {:8.2} ms  (per step)", report.preview_s * 1e3);
    println!("end to end       {}", duration(report.end_to_end_s));
    if let Some(bytes) = report.peak_memory_bytes {
        println!("peak RAM         {:8.2} GB   (process, not GPU memory)", bytes as f64 / 1e9);
    }
    if let Some(bytes) = report.peak_private_memory_bytes {
        println!("  of it private  {:8.2} GB   (peak RssAnon: all but the mapped model files)", bytes as f64 / 1e9);
    }
    if let Some(path) = &args.json {
        let mut json = serde_json::to_value(&report)?;
        json["model_load_s"] = serde_json::json!(load_s);
        json["precision"] = serde_json::json!(precision);
        json["widen_f16_weights"] = serde_json::json!(args.model.widen_f16_weights);
        json["copy_weights"] = serde_json::json!(args.model.copy_weights);
        json["weights_in_place_bytes"] = serde_json::json!(in_place);
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Seconds for the bench table: milliseconds below one second (GPU steps take tens of them).
fn duration(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{:8.1} ms", seconds * 1e3)
    } else {
        format!("{seconds:8.2} s ")
    }
}

fn list_models(dir: Option<&Path>) -> Result<()> {
    use easel_engine::models::library::{scan_hf_cache, scan_models_folder, LocalModel};
    let print = |models: &[LocalModel]| {
        for m in models {
            let kind = match (m.family, m.turbo) {
                (Some(family), true) => format!("{family} Turbo"),
                (Some(family), false) => family.to_string(),
                (None, _) => "unusable".to_string(),
            };
            println!("  {:<44} {:<11} {:>7.2} GB  {}", m.name, kind, m.size_bytes as f64 / 1e9, m.path.display());
            if let Some(problem) = &m.problem {
                println!("      {problem}");
            }
        }
    };
    let cache = easel_engine::hub::default_cache_dir();
    let models = scan_hf_cache(&cache);
    println!("Hugging Face cache ({}): {} model(s)", cache.display(), models.len());
    print(&models);
    println!("Downloadable (easel models download ID):");
    for m in easel_engine::hub::CURATED {
        println!("  {:<12} {:<44} {}", m.id, m.repo, m.title);
    }
    if let Some(dir) = dir {
        if !dir.is_dir() {
            bail!("{} is not a folder", dir.display());
        }
        let models = scan_models_folder(dir);
        println!("{}: {} model(s)", dir.display(), models.len());
        print(&models);
    }
    Ok(())
}

fn download_model(name: &str, revision: &str) -> Result<()> {
    let repo = match easel_engine::hub::curated(name) {
        Some(model) => model.repo.to_string(),
        None if name.contains('/') => name.to_string(),
        None => {
            let ids: Vec<&str> = easel_engine::hub::CURATED.iter().map(|m| m.id).collect();
            bail!("unknown model \"{name}\": use one of {} or a repository as org/name", ids.join(", "));
        }
    };
    let downloader = easel_engine::hub::Downloader::from_env();
    eprintln!("downloading {repo} into {}", downloader.cache_dir().display());
    let interactive = std::io::stderr().is_terminal();
    let mut last_report = Instant::now();
    let path = downloader.download(&repo, revision, &mut |p| {
        let done = p.total_bytes >= p.total_expected;
        // Chunks arrive every few KB: report a few times a second, not on every chunk.
        if done || last_report.elapsed().as_millis() >= 500 {
            last_report = Instant::now();
            let line = format!(
                "{:.2}/{:.2} GB  {:.1} MB/s  {}",
                p.total_bytes as f64 / 1e9,
                p.total_expected as f64 / 1e9,
                p.bytes_per_second / 1e6,
                p.file
            );
            if interactive {
                eprint!("\r{line:<100}");
            } else {
                eprintln!("{line}");
            }
        }
        ControlFlow::Continue(())
    })?;
    if interactive {
        eprintln!();
    }
    println!("{}", path.display());
    Ok(())
}
