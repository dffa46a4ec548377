//! The text-to-image pipeline: text encoding → the denoising loop → VAE decoding, written as
//! an explicit loop in the shape of diffusers' `StableDiffusionPipeline.__call__`.

pub mod embeddings;
pub mod fit;
pub mod inpaint;
pub mod preview;
pub mod prompt;
pub mod text;

use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use crate::metadata::RgbImage;
use crate::models::lora::{extract_lora_tags, LoraFile, LoraReport, LoraWeight};
use crate::models::unet::AddedCond;
use crate::models::{Component, Family, LoadOptions, ModelInfo, StableDiffusion};
use crate::rng::{make_generator, RngKind};
use crate::schedulers::{build_scheduler, SamplerId, Schedule, SchedulerConfig};
use crate::{Error, Result};
use inpaint::{crop_for_processing, crop_region, overlay, Inpaint, InpaintArea, Mask};
use prompt::Emphasis;
use text::{encode_prompts, PromptOptions, TextConditioning, Tokenizers};

/// Largest image side accepted (larger runs out of memory long before finishing on any machine).
pub const MAX_SIDE: usize = 4096;
/// More steps than this is never useful and is most likely a typo.
pub const MAX_STEPS: usize = 1000;

/// Everything that decides the picture, besides the model.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub sampler: SamplerId,
    /// The noise schedule, chosen apart from the sampler (A1111's "Schedule type").
    pub schedule: Schedule,
    pub rng: RngKind,
    /// How `(word:1.2)` and friends act (A1111's by default; `None` reads them as text).
    pub emphasis: Emphasis,
    /// A1111's "Clip skip" (1 = the last layer).
    pub clip_skip: u32,
    /// LoRAs for this job (the prompt's `<lora:…>` tags resolved to files, and any others).
    pub loras: Vec<crate::models::lora::LoraWeight>,
    /// Textual-inversion files the prompts may name (an embeddings folder's files).
    pub embeddings: Vec<std::path::PathBuf>,
}

impl GenerationRequest {
    /// Checks the request against the model before any work starts.
    pub fn validate(&self, info: &ModelInfo) -> Result<()> {
        self.validate_for(info.vae.downscale_factor())
    }

    /// The same checks for a model whose image sides must be multiples of `factor`.
    pub fn validate_for(&self, factor: usize) -> Result<()> {
        let invalid = |msg: String| Err(Error::InvalidSetting(msg));
        if self.steps == 0 {
            return invalid("steps must be at least 1".into());
        }
        if self.steps > MAX_STEPS {
            return invalid(format!("steps must be at most {MAX_STEPS}"));
        }
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v > MAX_SIDE {
                return invalid(format!("{name} must be between {factor} and {MAX_SIDE} pixels, got {v}"));
            }
            if !v.is_multiple_of(factor) {
                return invalid(format!(
                    "{name} must be a multiple of {factor}, got {v} (try {})",
                    (v / factor).max(1) * factor
                ));
            }
        }
        for (name, _, _) in extract_lora_tags(&self.prompt).1 {
            if !self.loras.iter().any(|l| l.name() == name) {
                return invalid(format!(
                    "the prompt asks for <lora:{name}>, but no LoRA of that name was found: put {name}.safetensors in the LoRA folder"
                ));
            }
        }
        for lora in &self.loras {
            let weights = [lora.text_weight, lora.unet_weight];
            if weights.iter().any(|w| !w.is_finite() || w.abs() > 100.0) {
                return invalid(format!("LoRA {} has an impossible weight {weights:?}", lora.name()));
            }
        }
        if !(1..=12).contains(&self.clip_skip) {
            return invalid(format!("clip skip must be from 1 to 12, got {}", self.clip_skip));
        }
        if !self.guidance_scale.is_finite() || self.guidance_scale < 0.0 {
            return invalid(format!("guidance must be a number ≥ 0, got {}", self.guidance_scale));
        }
        self.sampler.check_schedule(self.schedule)
    }

    pub fn prompt_options(&self) -> PromptOptions {
        PromptOptions { emphasis: self.emphasis, clip_skip: self.clip_skip }
    }

    /// diffusers runs classifier-free guidance only when guidance > 1 (Turbo: one pass a step).
    pub fn uses_cfg(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

/// Passed to the step callback after every denoising step.
pub struct StepProgress<'a> {
    /// 1-based index of the step just finished.
    pub step: usize,
    pub total: usize,
    pub elapsed: Duration,
    /// The scheduler's current estimate of the clean latents (x0), for live previews.
    pub denoised: &'a Tensor,
}

/// A loaded model plus its tokenizers, ready to generate.
pub struct Pipeline {
    model: StableDiffusion,
    tokenizers: Tokenizers,
    scheduler_config: SchedulerConfig,
    /// Loaded by the first image-to-image job (text to image never needs it).
    vae_encoder: std::sync::OnceLock<crate::models::vae::VaeEncoder>,
    /// The LoRAs the model's layers carry now, and what applying them reported.
    applied_loras: std::sync::Mutex<(Vec<LoraWeight>, LoraReport)>,
    /// The embeddings read for the last job, by their files.
    embeddings: std::sync::Mutex<(Vec<std::path::PathBuf>, Vec<embeddings::Embedding>)>,
}

/// A job's conditioning, prepared once: the text's cross-attention states (and SDXL's pooled
/// vector and size ids), plus the channels an inpainting U-Net takes beside the latents.
struct Conditioning {
    /// The U-Net calls one step makes: `[negative, prompt]` in one batch when their lengths
    /// agree, else one call each, as A1111 does (no padding, so a prompt's picture does not
    /// depend on its negative prompt's length); one call of the prompt without CFG.
    calls: Vec<UnetCall>,
    /// Inpainting models: `cat([mask, masked_image_latents])` for one row.
    concat: Option<Tensor>,
    cfg: bool,
}

/// One U-Net call's text inputs, `rows` rows.
struct UnetCall {
    context: Tensor,
    pooled: Option<Tensor>,
    time_ids: Option<Tensor>,
    rows: usize,
}

/// What a 4-channel model's inpainting keeps: after each step the unmasked latents are put
/// back to the image's, noised to the next step's level (diffusers' "legacy" inpainting).
struct LatentBlend {
    image_latents: Tensor,
    /// The job's initial noise, reused at every level.
    noise: Tensor,
    /// 1 repaints, 0 keeps, at the latents' size (1, 1, h, w).
    mask: Tensor,
}

/// What one job does, besides the request.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    TextToImage,
    ImageToImage(ImageToImage),
    Inpaint(Inpaint),
    HiresFix(HiresFix),
}

impl Task {
    /// Writes what the task adds to the request's parameters, in AUTOMATIC1111's words.
    pub fn write_params(&self, params: &mut crate::metadata::GenerationParams) {
        match self {
            Task::TextToImage => {}
            Task::ImageToImage(init) => params.denoising_strength = Some(init.strength),
            Task::Inpaint(inpaint) => inpaint.write_params(params),
            Task::HiresFix(hires) => hires.write_params(params),
        }
    }
}

/// What image-to-image starts from: a picture of the requested size and how much to change it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageToImage {
    pub image: RgbImage,
    /// 0 < strength ≤ 1: the share of the steps that run (1 = the picture is all noise).
    pub strength: f64,
}

impl ImageToImage {
    /// Checks the init image and strength against the request before any work.
    pub fn validate(&self, req: &GenerationRequest) -> Result<()> {
        if !(self.strength > 0.0 && self.strength <= 1.0) {
            return Err(Error::InvalidSetting(format!(
                "the denoising strength must be above 0 and at most 1, got {}",
                self.strength
            )));
        }
        if (self.image.width as usize, self.image.height as usize) != (req.width, req.height) {
            return Err(Error::InvalidSetting(format!(
                "the init image is {}×{}, the request {}×{}: resize it first",
                self.image.width, self.image.height, req.width, req.height
            )));
        }
        self.first_step(req.steps).map(|_| ())
    }

    /// The first of `steps` steps that runs (see [`first_step`]).
    pub fn first_step(&self, steps: usize) -> Result<usize> {
        first_step(self.strength, steps)
    }
}

/// The first of `steps` steps that runs at `strength`, as diffusers' `get_timesteps`: the last
/// `int(steps × strength)` steps run.
pub fn first_step(strength: f64, steps: usize) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::InvalidSetting(format!(
            "the denoising strength must be above 0 and at most 1, got {strength}"
        )));
    }
    let run = ((steps as f64 * strength) as usize).min(steps);
    if run == 0 {
        return Err(Error::InvalidSetting(format!(
            "strength {strength} of {steps} steps runs no step: raise the strength or the steps"
        )));
    }
    Ok(steps - run)
}

/// What the hires fix upscales (A1111's "Upscaler"): the latents, or the decoded picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HiresUpscaler {
    /// The latents, bilinear ("Latent").
    #[default]
    Latent,
    /// The latents, nearest neighbour ("Latent (nearest)").
    LatentNearest,
    /// The decoded picture, Lanczos, encoded again ("Lanczos").
    Lanczos,
}

impl HiresUpscaler {
    pub const ALL: [HiresUpscaler; 3] = [HiresUpscaler::Latent, HiresUpscaler::LatentNearest, HiresUpscaler::Lanczos];

    pub fn id(&self) -> &'static str {
        match self {
            HiresUpscaler::Latent => "latent",
            HiresUpscaler::LatentNearest => "latent-nearest",
            HiresUpscaler::Lanczos => "lanczos",
        }
    }

    /// AUTOMATIC1111's name, as its PNGs write it (`Hires upscaler: Latent`).
    pub fn a1111_name(&self) -> &'static str {
        match self {
            HiresUpscaler::Latent => "Latent",
            HiresUpscaler::LatentNearest => "Latent (nearest)",
            HiresUpscaler::Lanczos => "Lanczos",
        }
    }
}

impl std::fmt::Display for HiresUpscaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

impl std::str::FromStr for HiresUpscaler {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|u| u.id().eq_ignore_ascii_case(s.trim()) || u.a1111_name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                Error::InvalidSetting(format!(
                    "unknown hires upscaler {s:?}; expected latent, latent-nearest or lanczos"
                ))
            })
    }
}

/// The hires fix's second pass (A1111's "Hires. fix").
#[derive(Debug, Clone, PartialEq)]
pub struct HiresFix {
    /// How much larger the second pass is (A1111's "Upscale by").
    pub scale: f64,
    /// Steps of the second pass; 0 means as many as the first (as A1111).
    pub steps: usize,
    /// Its denoising strength.
    pub denoise: f64,
    pub upscaler: HiresUpscaler,
}

impl HiresFix {
    /// Writes the hires fix into `params` in AUTOMATIC1111's words.
    pub fn write_params(&self, params: &mut crate::metadata::GenerationParams) {
        params.denoising_strength = Some(self.denoise);
        params.extra.push(("Hires upscale".into(), format!("{}", self.scale)));
        if self.steps != 0 {
            params.extra.push(("Hires steps".into(), self.steps.to_string()));
        }
        params.extra.push(("Hires upscaler".into(), self.upscaler.a1111_name().into()));
    }

    /// The second pass's request: the size scaled (sides rounded down to multiples of 8, as
    /// A1111), its steps, all else the same.
    pub fn second_pass(&self, req: &GenerationRequest) -> Result<GenerationRequest> {
        if !(self.scale.is_finite() && self.scale >= 1.0 && self.scale <= 8.0) {
            return Err(Error::InvalidSetting(format!("the hires scale must be from 1 to 8, got {}", self.scale)));
        }
        let side = |v: usize| ((v as f64 * self.scale) as usize / 8) * 8;
        let steps = if self.steps == 0 { req.steps } else { self.steps };
        Ok(GenerationRequest { width: side(req.width), height: side(req.height), steps, ..req.clone() })
    }
}

/// The VAE encoder's dtype: SDXL's VAE (`force_upcast`) overflows in f16, so encodes in f32.
fn encoder_dtype(model: &StableDiffusion) -> DType {
    if model.info.vae.force_upcast {
        DType::F32
    } else {
        model.options.vae_dtype
    }
}

impl Pipeline {
    pub fn load(path: &Path, options: LoadOptions) -> Result<Self> {
        let model = StableDiffusion::load(path, options)?;
        Self::new(model)
    }

    pub fn new(model: StableDiffusion) -> Result<Self> {
        let tokenizers = Tokenizers::for_model(&model)?;
        let scheduler_config = model.info.scheduler.load()?;
        // Loading freed its conversion buffers; do not hold them until the first generation ends.
        crate::memory::release_free_memory();
        Ok(Self {
            model,
            tokenizers,
            scheduler_config,
            vae_encoder: std::sync::OnceLock::new(),
            applied_loras: Default::default(),
            embeddings: Default::default(),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.model.info
    }

    pub fn model(&self) -> &StableDiffusion {
        &self.model
    }

    pub fn tokenizers(&self) -> &Tokenizers {
        &self.tokenizers
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    pub fn encode_text(
        &self,
        prompt: &str,
        negative_prompt: &str,
        options: &PromptOptions,
    ) -> Result<TextConditioning> {
        self.encode_text_with(prompt, negative_prompt, options, &[])
    }

    /// The embeddings of `paths` that `texts` name, read once per list of files.
    pub fn embeddings_for(&self, paths: &[std::path::PathBuf], texts: &[&str]) -> Result<Vec<embeddings::Embedding>> {
        let used: Vec<std::path::PathBuf> = paths
            .iter()
            .filter(|p| {
                let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                texts.iter().any(|t| embeddings::mentions(t, &stem))
            })
            .cloned()
            .collect();
        let mut cache = self.embeddings.lock().map_err(|e| Error::InvalidSetting(e.to_string()))?;
        if cache.0 != used {
            let info = &self.model.info;
            let mut widths = vec![info.text_encoder.hidden_size];
            if let Some(second) = &info.text_encoder_2 {
                widths.push(second.hidden_size);
            }
            let loaded = used.iter().map(|p| embeddings::Embedding::read(p, &widths)).collect::<Result<Vec<_>>>()?;
            *cache = (used, loaded);
        }
        Ok(cache.1.clone())
    }

    /// [`Self::encode_text`] with textual-inversion embeddings.
    pub fn encode_text_with(
        &self,
        prompt: &str,
        negative_prompt: &str,
        options: &PromptOptions,
        embeddings: &[embeddings::Embedding],
    ) -> Result<TextConditioning> {
        self.model.keep_resident_only(Component::TextEncoders);
        // Each layer frees and allocates the same activations (2×77×768 f32 is 0.5 MB): without
        // a hold, each would be faulted in again (measured: 0.15 → 0.21 s in SD 1.5).
        let _hold = crate::memory::HoldFreedMemory::new();
        encode_prompts(&self.model, &self.tokenizers, prompt, negative_prompt, options, embeddings)
    }

    /// The shape of the latents for the request.
    fn latent_shape(&self, req: &GenerationRequest) -> (usize, usize, usize, usize) {
        let factor = self.model.info.vae.downscale_factor();
        (1, self.model.info.vae.latent_channels, req.height / factor, req.width / factor)
    }

    /// Gives the model's layers exactly `loras` (none: the base model), reading each file; the
    /// same list as the last job's is kept as it is. A bad file changes nothing.
    pub fn apply_loras(&self, loras: &[LoraWeight]) -> Result<LoraReport> {
        let mut applied = self.applied_loras.lock().map_err(|e| Error::InvalidSetting(e.to_string()))?;
        if applied.0 == loras {
            return Ok(applied.1.clone());
        }
        let files = loras.iter().map(|l| Ok((LoraFile::read(&l.path)?, l.clone()))).collect::<Result<Vec<_>>>()?;
        let info = &self.model.info;
        let report = self.model.adapters.apply(
            &files,
            info.family,
            info.unet.context_dim(),
            info.unet.layers_per_block_count(),
            &self.model.options.device,
            self.model.options.dtype,
        )?;
        *applied = (loras.to_vec(), report.clone());
        Ok(report)
    }

    /// The text conditioning of a job, prepared once: cross-attention states (and SDXL's
    /// pooled vector and size ids), for the rows classifier-free guidance needs.
    fn conditioning(&self, req: &GenerationRequest) -> Result<Conditioning> {
        let device = &self.model.options.device;
        let dtype = self.model.options.dtype;
        // LoRAs first: they change the text encoders too. Their tags are no text to encode.
        self.apply_loras(&req.loras)?;
        let prompt = extract_lora_tags(&req.prompt).0;
        let negative = extract_lora_tags(&req.negative_prompt).0;
        let embeddings = self.embeddings_for(&req.embeddings, &[&prompt, &negative])?;
        let cond = self.encode_text_with(&prompt, &negative, &req.prompt_options(), &embeddings)?;
        let cfg = req.uses_cfg();
        let time_ids = |rows: usize| -> Result<Option<Tensor>> {
            if self.model.info.family != Family::Sdxl {
                return Ok(None);
            }
            let (h, w) = (req.height as f32, req.width as f32);
            let row = [h, w, 0.0, 0.0, h, w];
            let data: Vec<f32> = (0..rows).flat_map(|_| row).collect();
            Ok(Some(Tensor::from_vec(data, (rows, 6), device)?.to_dtype(dtype)?))
        };
        let pooled_rows = |from: usize, rows: usize| cond.pooled.as_ref().map(|p| p.narrow(0, from, rows)).transpose();
        let calls = match (cfg, cond.context()?) {
            (true, Some(context)) => {
                vec![UnetCall { context, pooled: pooled_rows(0, 2)?, time_ids: time_ids(2)?, rows: 2 }]
            }
            (true, None) => vec![
                UnetCall {
                    context: cond.negative.clone(),
                    pooled: pooled_rows(0, 1)?,
                    time_ids: time_ids(1)?,
                    rows: 1,
                },
                UnetCall {
                    context: cond.positive.clone(),
                    pooled: pooled_rows(1, 1)?,
                    time_ids: time_ids(1)?,
                    rows: 1,
                },
            ],
            // Without CFG only the prompt's row is used.
            (false, _) => vec![UnetCall {
                context: cond.positive.clone(),
                pooled: pooled_rows(1, 1)?,
                time_ids: time_ids(1)?,
                rows: 1,
            }],
        };
        Ok(Conditioning { calls, concat: None, cfg })
    }

    /// Runs the denoising loop (text to image) and returns the final latents (not yet divided
    /// by the VAE's scaling factor). `on_step` may stop the run by returning `ControlFlow::Break`.
    pub fn denoise(
        &self,
        req: &GenerationRequest,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        req.validate(&self.model.info)?;
        self.refuse_inpainting_model()?;
        let start = Instant::now();
        let cond = self.conditioning(req)?;
        let mut scheduler = build_scheduler(req.sampler, req.schedule, &self.scheduler_config, req.steps)?;
        let mut noise = make_generator(req.rng, req.seed);
        // diffusers' `prepare_latents`: randn(shape) from the seeded generator × the initial sigma.
        let initial = self.randn(self.latent_shape(req), noise.as_mut())?;
        let latents = (initial * scheduler.init_noise_sigma())?;
        self.denoise_loop(req, &cond, None, scheduler.as_mut(), latents, 0, noise.as_mut(), start, on_step)
    }

    /// An inpainting model runs only with an image and a mask (as diffusers' pipeline).
    fn refuse_inpainting_model(&self) -> Result<()> {
        if self.model.info.is_inpainting() {
            return Err(Error::InvalidSetting(format!(
                "{} is an inpainting model: give it an init image and a mask (white = repaint)",
                self.model.info.name
            )));
        }
        Ok(())
    }

    /// Image to image: `init.image` encoded, noised to the level `init.strength` asks for and
    /// denoised from there, as diffusers' `StableDiffusionImg2ImgPipeline` (and the SDXL one):
    /// the same timesteps for a strength, the same noising per sampler, the same generator draws
    /// (the VAE posterior's sample, then the noise).
    pub fn denoise_image(
        &self,
        req: &GenerationRequest,
        init: &ImageToImage,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        req.validate(&self.model.info)?;
        init.validate(req)?;
        self.refuse_inpainting_model()?;
        let mut noise = make_generator(req.rng, req.seed);
        let image_latents = self.encode_image(&init.image, noise.as_mut())?;
        self.denoise_latents(req, &image_latents, init.strength, noise.as_mut(), on_step)
    }

    /// Image to image from latents that are already the VAE's (scaled): diffusers' img2img
    /// with a 4-channel `image`. Draws the noise from `noise`, then denoises from the first
    /// step `strength` leaves.
    fn denoise_latents(
        &self,
        req: &GenerationRequest,
        image_latents: &Tensor,
        strength: f64,
        noise: &mut dyn crate::rng::NoiseGenerator,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        let start = Instant::now();
        let mut scheduler = build_scheduler(req.sampler, req.schedule, &self.scheduler_config, req.steps)?;
        let steps = scheduler.timesteps().len();
        let first = first_step(strength, steps)?;
        scheduler.set_begin_index(first)?;
        let cond = self.conditioning(req)?;
        let fresh = self.randn(image_latents.dims4()?, noise)?;
        let latents = scheduler.add_noise(image_latents, &fresh, first)?;
        self.denoise_loop(req, &cond, None, scheduler.as_mut(), latents, first, noise, start, on_step)
    }

    /// Inpainting the latents of `image` where `mask` (binarised, at the request's size) is white,
    /// as diffusers' `StableDiffusionInpaintPipeline` (and the SDXL one): the same generator draws
    /// (the image's posterior when it is needed, the noise, the masked image's posterior), a
    /// 9-channel model fed `cat([latents, mask, masked_image_latents])`, a 4-channel one's
    /// unmasked latents put back after every step.
    pub fn denoise_inpaint(
        &self,
        req: &GenerationRequest,
        image: &RgbImage,
        mask: &Mask,
        strength: f64,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        req.validate(&self.model.info)?;
        let start = Instant::now();
        let device = &self.model.options.device;
        let dtype = self.model.options.dtype;
        let nine = self.model.info.is_inpainting();
        let mut scheduler = build_scheduler(req.sampler, req.schedule, &self.scheduler_config, req.steps)?;
        let steps = scheduler.timesteps().len();
        let first = first_step(strength, steps)?;
        scheduler.set_begin_index(first)?;
        let full_strength = strength == 1.0;
        let mut noise = make_generator(req.rng, req.seed);
        let cond = self.conditioning(req)?;
        // A 4-channel model always needs the image's latents (to blend); a 9-channel one only
        // to start from them.
        let image_latents =
            if !nine || !full_strength { Some(self.encode_image(image, noise.as_mut())?) } else { None };
        let shape = self.latent_shape(req);
        let initial = self.randn(shape, noise.as_mut())?;
        let latents = match (&image_latents, full_strength) {
            (Some(image_latents), false) => scheduler.add_noise(image_latents, &initial, first)?,
            _ => (&initial * scheduler.init_noise_sigma())?,
        };
        let (_, _, h, w) = shape;
        let mask_latent = Tensor::from_vec(mask.latent_mask(w, h), (1, 1, h, w), device)?;
        let mut cond = cond;
        let blend = if nine {
            let masked = self.encode_pixels(&self.pixels(image, Some(mask))?, noise.as_mut())?;
            cond.concat = Some(Tensor::cat(&[&mask_latent, &masked], 1)?.to_dtype(dtype)?);
            None
        } else {
            // diffusers encodes the masked picture for 4-channel models too and never uses it;
            // its posterior draw is taken all the same so later draws (Euler a, LCM) match.
            noise.randn(shape.0 * shape.1 * shape.2 * shape.3);
            let image_latents =
                image_latents.ok_or_else(|| Error::InvalidSetting("inpainting needs the image's latents".into()))?;
            Some(LatentBlend { image_latents, noise: initial, mask: mask_latent })
        };
        self.denoise_loop(
            req,
            &cond,
            blend.as_ref(),
            scheduler.as_mut(),
            latents,
            first,
            noise.as_mut(),
            start,
            on_step,
        )
    }

    /// Hires fix, as AUTOMATIC1111 does it: text to image at the request's size, the result
    /// upscaled by `hires.scale` (the latents, or the decoded picture re-encoded), then image to
    /// image at `hires.denoise` with a generator seeded again with the same seed.
    pub fn denoise_hires(
        &self,
        req: &GenerationRequest,
        hires: &HiresFix,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        self.refuse_inpainting_model()?;
        let second = hires.second_pass(req)?;
        second.validate(&self.model.info)?;
        first_step(hires.denoise, second.steps)?;
        let small = self.denoise(req, on_step)?;
        let factor = self.model.info.vae.downscale_factor();
        let (h, w) = (second.height / factor, second.width / factor);
        let mut noise = make_generator(req.rng, req.seed);
        let upscaled = match hires.upscaler {
            // torch's F.interpolate(size=…, mode="bilinear", align_corners=False)
            HiresUpscaler::Latent => small.upsample_bilinear2d(h, w, false)?,
            HiresUpscaler::LatentNearest => small.upsample_nearest2d(h, w)?,
            HiresUpscaler::Lanczos => {
                let picture = to_rgb8(&self.decode_latents(&small)?)?;
                let big = fit::fit_image(&picture, second.width as u32, second.height as u32, fit::ResizeMode::Resize)?;
                self.encode_image(&big, noise.as_mut())?
            }
        };
        self.denoise_latents(&second, &upscaled, hires.denoise, noise.as_mut(), on_step)
    }

    /// An RGB image as the VAE's scaled latents, sampled from its posterior with `noise` (as
    /// diffusers' `retrieve_latents(vae.encode(image), generator) * scaling_factor`).
    pub fn encode_image(&self, image: &RgbImage, noise: &mut dyn crate::rng::NoiseGenerator) -> Result<Tensor> {
        self.encode_pixels(&self.pixels(image, None)?, noise)
    }

    /// diffusers' image processor: /255 in float32, then 2x − 1, as (1, 3, h, w); with `keep`,
    /// the repainted pixels are 0 (diffusers' `masked_image = image * (mask < 0.5)`).
    fn pixels(&self, image: &RgbImage, keep: Option<&Mask>) -> Result<Tensor> {
        let (w, h) = (image.width as usize, image.height as usize);
        if image.data.len() != w * h * 3 {
            return Err(Error::InvalidSetting(format!("the init image's pixels do not fill {w}×{h}")));
        }
        let pixels: Vec<f32> = image
            .data
            .iter()
            .enumerate()
            .map(|(i, &v)| match keep {
                Some(mask) if Mask::repaints(mask.data[i / 3]) => 0.0,
                _ => 2.0 * (v as f32 / 255.0) - 1.0,
            })
            .collect();
        Ok(Tensor::from_vec(pixels, (1, h, w, 3), &self.model.options.device)?.permute((0, 3, 1, 2))?.contiguous()?)
    }

    /// Pixels in [-1, 1] (1, 3, h, w) as the VAE's scaled latents, sampled with `noise`.
    fn encode_pixels(&self, pixels: &Tensor, noise: &mut dyn crate::rng::NoiseGenerator) -> Result<Tensor> {
        self.model.keep_resident_only(Component::Vae);
        let encoder = self.vae_encoder()?;
        let dist = {
            let _hold = crate::memory::HoldFreedMemory::new();
            encoder.encode(&pixels.to_dtype(encoder_dtype(&self.model))?)?
        };
        let (mean, std) = (dist.mean.to_dtype(DType::F32)?, dist.std.to_dtype(DType::F32)?);
        let sample =
            crate::models::vae::LatentDistribution { mean, std }.sample(&self.randn(dist.mean.dims4()?, noise)?)?;
        if !all_finite(&sample)? {
            return Err(Error::Model {
                path: self.model.info.path.join("vae"),
                message: "the VAE encoder produced NaN/Inf values: its weights look corrupt".into(),
            });
        }
        Ok((sample * self.model.info.vae.scaling_factor)?)
    }

    /// The VAE encoder, loaded the first time an image is encoded.
    fn vae_encoder(&self) -> Result<&crate::models::vae::VaeEncoder> {
        if self.vae_encoder.get().is_none() {
            let options = LoadOptions { vae_dtype: encoder_dtype(&self.model), ..self.model.options.clone() };
            let (encoder, _pages) = crate::models::load_vae_encoder(&self.model.info, &options)?;
            let _ = self.vae_encoder.set(encoder);
        }
        self.vae_encoder.get().ok_or_else(|| Error::InvalidSetting("the VAE encoder could not be kept".into()))
    }

    /// `randn(shape)` from the job's generator, f32 on the model's device.
    fn randn(&self, shape: (usize, usize, usize, usize), noise: &mut dyn crate::rng::NoiseGenerator) -> Result<Tensor> {
        let numel = shape.0 * shape.1 * shape.2 * shape.3;
        Ok(Tensor::from_vec(noise.randn(numel), shape, &self.model.options.device)?)
    }

    /// The denoising loop from step `first` to the end of `scheduler`'s timesteps.
    #[allow(clippy::too_many_arguments)]
    fn denoise_loop(
        &self,
        req: &GenerationRequest,
        cond: &Conditioning,
        blend: Option<&LatentBlend>,
        scheduler: &mut dyn crate::schedulers::Scheduler,
        mut latents: Tensor,
        first: usize,
        noise: &mut dyn crate::rng::NoiseGenerator,
        start: Instant,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        let dtype = self.model.options.dtype;
        self.model.keep_resident_only(Component::Unet);
        let timesteps: Vec<f64> = scheduler.timesteps().to_vec();
        let total = timesteps.len() - first;
        // Steps free and allocate the same activations: keep them until the loop ends.
        let _hold = crate::memory::HoldFreedMemory::new();
        for (i, &t) in timesteps.iter().enumerate().skip(first) {
            let scaled = scheduler.scale_model_input(&latents, i)?.to_dtype(dtype)?;
            // Inpainting models: the mask and the masked picture's latents beside the latents.
            let one_row = match &cond.concat {
                Some(extra) => Tensor::cat(&[&scaled, extra], 1)?,
                None => scaled,
            };
            let mut outputs = Vec::with_capacity(cond.calls.len());
            for call in &cond.calls {
                let model_input =
                    if call.rows == 1 { one_row.clone() } else { Tensor::cat(&vec![&one_row; call.rows], 0)? };
                let added = match (&call.pooled, &call.time_ids) {
                    (Some(text_embeds), Some(time_ids)) => Some(AddedCond { text_embeds, time_ids }),
                    _ => None,
                };
                // The U-Net sees the timestep as f32, as torch does after `timesteps.float()`.
                outputs
                    .push(self.model.unet.forward(&model_input, t as f32, &call.context, added)?.to_dtype(DType::F32)?);
            }
            let out = if outputs.len() == 1 { outputs.remove(0) } else { Tensor::cat(&outputs, 0)? };
            let noise_pred = if cond.cfg {
                let uncond = out.narrow(0, 0, 1)?;
                let text = out.narrow(0, 1, 1)?;
                (&uncond + ((text - &uncond)? * req.guidance_scale)?)?
            } else {
                out
            };
            let step = scheduler.step(&noise_pred, i, &latents, noise)?;
            latents = step.prev_sample;
            if let Some(blend) = blend {
                // diffusers: the kept part is the image noised to the next step's level, or the
                // clean image after the last step.
                let kept = if i + 1 < timesteps.len() {
                    scheduler.add_noise(&blend.image_latents, &blend.noise, i + 1)?
                } else {
                    blend.image_latents.clone()
                };
                let inverse = (1.0 - &blend.mask)?;
                latents = (kept.broadcast_mul(&inverse)? + latents.broadcast_mul(&blend.mask)?)?;
            }
            let progress = StepProgress {
                step: i + 1 - first,
                total,
                elapsed: start.elapsed(),
                denoised: &step.pred_original_sample,
            };
            if on_step(progress).is_break() {
                return Err(Error::Cancelled);
            }
        }
        Ok(latents)
    }

    /// Decodes final latents to pixels in [-1, 1] (N, 3, H, W), f32.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        if !all_finite(latents)? {
            return Err(Error::InvalidSetting(
                "the denoising produced NaN/Inf values; the model weights may be corrupt or the precision too low"
                    .into(),
            ));
        }
        self.model.keep_resident_only(Component::Vae);
        let scaled = (latents / self.model.info.vae.scaling_factor)?;
        let vae_dtype = self.model.options.vae_dtype;
        let image = {
            // The decode's convolutions take fresh scratch per layer (see `winograd`): held, the
            // allocator hands back the last layer's instead of faulting in new pages.
            let _hold = crate::memory::HoldFreedMemory::new();
            self.model.vae.decode(&scaled.to_dtype(vae_dtype)?)?.to_dtype(DType::F32)?
        };
        if all_finite(&image)? {
            return Ok(image);
        }
        if vae_dtype != DType::F32 {
            // Reduced-precision VAEs (SDXL's above all) overflow: redo the decode in f32
            // rather than hand back a black image.
            let options = LoadOptions { vae_dtype: DType::F32, ..self.model.options.clone() };
            let (vae, _pages) = crate::models::load_vae(&self.model.info, &options)?;
            let image = vae.decode(&scaled.to_dtype(DType::F32)?)?;
            if all_finite(&image)? {
                return Ok(image);
            }
        }
        Err(Error::Model {
            path: self.model.info.path.join("vae"),
            message: "the VAE produced NaN/Inf values even in f32: its weights look corrupt".into(),
        })
    }

    /// The whole run: prompt to 8-bit RGB image.
    pub fn generate(
        &self,
        req: &GenerationRequest,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
    ) -> Result<RgbImage> {
        self.generate_from(req, None, on_step)
    }

    /// The whole run, from noise or (image to image) from `init`.
    pub fn generate_from(
        &self,
        req: &GenerationRequest,
        init: Option<&ImageToImage>,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
    ) -> Result<RgbImage> {
        match init {
            Some(init) => self.generate_task(req, &Task::ImageToImage(init.clone()), on_step),
            None => self.generate_task(req, &Task::TextToImage, on_step),
        }
    }

    /// The whole run of one task, to 8-bit RGB.
    pub fn generate_task(
        &self,
        req: &GenerationRequest,
        task: &Task,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
    ) -> Result<RgbImage> {
        let result = match task {
            Task::TextToImage => {
                self.denoise(req, on_step).and_then(|l| self.decode_latents(&l)).and_then(|i| to_rgb8(&i))
            }
            Task::ImageToImage(init) => {
                self.denoise_image(req, init, on_step).and_then(|l| self.decode_latents(&l)).and_then(|i| to_rgb8(&i))
            }
            Task::HiresFix(hires) => {
                self.denoise_hires(req, hires, on_step).and_then(|l| self.decode_latents(&l)).and_then(|i| to_rgb8(&i))
            }
            Task::Inpaint(inpaint) => self.inpaint(req, inpaint, on_step),
        };
        crate::memory::release_free_memory();
        result
    }

    /// Inpainting end to end: the blurred mask, the "only masked" crop when asked, the
    /// denoising, and the result laid over the original through the soft mask (A1111's
    /// overlay; with no blur and the whole picture, diffusers' output as it is).
    fn inpaint(
        &self,
        req: &GenerationRequest,
        inpaint: &Inpaint,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
    ) -> Result<RgbImage> {
        req.validate(&self.model.info)?;
        inpaint.validate(req)?;
        let soft = inpaint.soft_mask()?;
        let (w, h) = (req.width as u32, req.height as u32);
        let region = match inpaint.area {
            InpaintArea::Whole => None,
            InpaintArea::Masked { padding } => Some(
                crop_region(&soft, w, h, padding)
                    .ok_or_else(|| Error::InvalidSetting("the mask is all black: nothing to repaint".into()))?,
            ),
        };
        let (image, mask) = match &region {
            Some(region) => crop_for_processing(&inpaint.image, &soft, region, w, h)?,
            None => (inpaint.image.clone(), soft.clone()),
        };
        let mask = mask.binarized();
        if mask.repainted_pixels() == 0 {
            return Err(Error::InvalidSetting(
                "after its blur the mask repaints no pixel: paint a larger area or lower the blur".into(),
            ));
        }
        let latents = self.denoise_inpaint(req, &image, &mask, inpaint.strength, on_step)?;
        let generated = to_rgb8(&self.decode_latents(&latents)?)?;
        if region.is_none() && inpaint.mask_blur == 0.0 {
            return Ok(generated);
        }
        overlay(&inpaint.image, &generated, &soft, region.as_ref())
    }
}

fn all_finite(t: &Tensor) -> Result<bool> {
    let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(values.iter().all(|v| v.is_finite()))
}

/// [-1, 1] NCHW (first image) → RGB8, rounding as diffusers' `numpy_to_pil` does.
pub fn to_rgb8(image: &Tensor) -> Result<RgbImage> {
    let image = image.to_dtype(DType::F32)?;
    let (_, c, h, w) = image.dims4()?;
    if c != 3 {
        return Err(Error::InvalidSetting(format!("decoded image has {c} channels, expected 3")));
    }
    let first = image.narrow(0, 0, 1)?.squeeze(0)?.permute((1, 2, 0))?.flatten_all()?.to_vec1::<f32>()?;
    let data = first.iter().map(|&v| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    Ok(RgbImage { width: w as u32, height: h as u32, data })
}

impl GenerationRequest {
    /// `Emphasis` when not A1111's default, and `Lora hashes` as A1111 writes them
    /// (`"name: 0123456789ab, …"`, kohya's addnet hash of each file).
    fn extra_params(&self) -> Vec<(String, String)> {
        let mut extra = Vec::new();
        if let Some(name) = self.emphasis.a1111_name() {
            extra.push(("Emphasis".to_string(), name.to_string()));
        }
        let hashes: Vec<String> = self
            .loras
            .iter()
            .filter_map(|l| crate::models::lora::addnet_hash(&l.path).ok().map(|h| format!("{}: {h}", l.name())))
            .collect();
        if !hashes.is_empty() {
            extra.push(("Lora hashes".to_string(), hashes.join(", ")));
        }
        // A1111's `TI hashes`: the embeddings the prompts name, the first 12 hex digits of
        // each file's SHA-256.
        let texts = [extract_lora_tags(&self.prompt).0, self.negative_prompt.clone()];
        let used: Vec<String> = self
            .embeddings
            .iter()
            .filter_map(|p| {
                let name = p.file_stem()?.to_string_lossy().into_owned();
                texts.iter().any(|t| embeddings::mentions(t, &name)).then_some((name, p))
            })
            .filter_map(|(name, p)| crate::models::hash::sha256_file(p).ok().map(|h| format!("{name}: {}", &h[..12])))
            .collect();
        if !used.is_empty() {
            extra.push(("TI hashes".to_string(), used.join(", ")));
        }
        extra
    }

    /// The AUTOMATIC1111-style parameters to store in the PNG.
    pub fn to_params(&self, model_name: Option<&str>, model_hash: Option<&str>) -> crate::metadata::GenerationParams {
        let (sampler, schedule) = (self.sampler.a1111_name(), self.schedule.a1111_name());
        crate::metadata::GenerationParams {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps as u32,
            sampler: sampler.to_string(),
            schedule_type: schedule.map(str::to_string),
            cfg_scale: self.guidance_scale,
            seed: self.seed,
            width: self.width as u32,
            height: self.height as u32,
            model_hash: model_hash.map(str::to_string),
            model: model_name.map(str::to_string),
            rng: Some(match self.rng {
                RngKind::Cpu => "CPU".to_string(),
                RngKind::Nv => "NV".to_string(),
            }),
            version: Some(format!("easel {}", env!("CARGO_PKG_VERSION"))),
            clip_skip: (self.clip_skip > 1).then_some(self.clip_skip),
            extra: self.extra_params(),
            ..Default::default()
        }
    }
}
