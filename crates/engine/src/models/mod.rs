//! Model families, loading from disk, and the networks themselves.

pub mod attention;
pub mod checkpoint;
pub mod clip;
pub mod hash;
pub mod library;
pub mod lora;
pub mod mapped;
pub mod nn;
pub mod resnet;
pub mod safetensors_check;
pub mod single_file;
pub mod unet;
pub mod vae;

use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use mapped::{MappedPages, ModelWeights};
use serde::de::DeserializeOwned;

use crate::schedulers::PredictionType;
use crate::{Error, Result};
use clip::{ClipTextConfig, ClipTextModel};
use unet::{UNet2DConditionModel, UNetConfig};
use vae::{VaeConfig, VaeDecoder, VaeEncoder};

/// The architecture family: decides text encoders, conditioning and default settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: one OpenAI CLIP-L text encoder, 768-wide context.
    Sd1,
    /// SD 2.x: one OpenCLIP-H text encoder (gelu), linear projections in the U-Net.
    Sd2,
    /// SDXL: CLIP-L + OpenCLIP-bigG, pooled embedding and size conditioning.
    Sdxl,
}

impl Family {
    pub fn name(&self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Sdxl => "SDXL",
        }
    }

    /// The 4→3 latent-to-RGB projection used for live previews (ComfyUI's latent_formats).
    pub fn latent_rgb_factors(&self) -> ([[f32; 3]; 4], [f32; 3]) {
        match self {
            Family::Sd1 | Family::Sd2 => (
                [
                    [0.3512, 0.2297, 0.3227],
                    [0.3250, 0.4974, 0.2350],
                    [-0.2829, 0.1762, 0.2721],
                    [-0.2120, -0.2616, -0.7177],
                ],
                [0.0; 3],
            ),
            Family::Sdxl => (
                [
                    [0.3651, 0.4232, 0.4341],
                    [-0.2533, -0.0042, 0.1068],
                    [0.1076, 0.1111, -0.0362],
                    [-0.3165, -0.2492, -0.2188],
                ],
                [0.1084, -0.0175, -0.0011],
            ),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone)]
pub enum SchedulerSource {
    File(PathBuf),
    Bundled(&'static str),
}

impl SchedulerSource {
    pub fn load(&self) -> Result<crate::schedulers::SchedulerConfig> {
        match self {
            SchedulerSource::File(path) => crate::schedulers::SchedulerConfig::from_file(path),
            SchedulerSource::Bundled(json) => crate::schedulers::SchedulerConfig::from_json_str(json),
        }
    }
}

/// What was learned about a model (folder or single file) before loading any weights.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub path: PathBuf,
    /// Display name (the folder's name), as written into the PNG metadata.
    pub name: String,
    pub family: Family,
    /// Distilled few-step model (SD-Turbo, SDXL-Turbo): trailing timesteps, no CFG.
    pub turbo: bool,
    /// `prediction_type` from the scheduler config.
    pub prediction_type: PredictionType,
    /// Where the scheduler config comes from: the folder's file, or the original release's
    /// config bundled with Easel for single-file checkpoints (which carry none).
    pub scheduler: SchedulerSource,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text_encoder: ClipTextConfig,
    pub text_encoder_2: Option<ClipTextConfig>,
    /// SDXL pipelines use zero embeddings for an empty negative prompt.
    pub force_zeros_for_empty_prompt: bool,
    /// The model's own latent-to-RGB preview map (`vae/latent_rgb.json`), where it has one.
    pub latent_rgb: Option<LatentRgb>,
}

/// A 4→3 linear map from (scaled) latents to RGB in [-1, 1], plus a bias: what live previews draw.
pub type LatentRgb = ([[f32; 3]; 4], [f32; 3]);

/// `vae/latent_rgb.json`: a model's own preview map (Easel Mini's VAE is not SD's, so the SD 1.x
/// factors would give the wrong colours). Only a preview: a broken file is logged and ignored.
fn read_latent_rgb(path: &Path) -> Option<LatentRgb> {
    #[derive(serde::Deserialize)]
    struct File {
        factors: Vec<[f32; 3]>,
        bias: [f32; 3],
    }
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str::<File>(&text) {
        Ok(File { factors, bias }) if factors.len() == 4 => {
            Some(([factors[0], factors[1], factors[2], factors[3]], bias))
        }
        Ok(_) => {
            log::warn!("{}: expected 4 rows of factors; using the family's", path.display());
            None
        }
        Err(e) => {
            log::warn!("{}: {e}; using the family's preview factors", path.display());
            None
        }
    }
}

impl ModelInfo {
    /// A 9-channel inpainting U-Net (SD 1.5 / 2.x / SDXL inpainting): it needs an image and a mask.
    pub fn is_inpainting(&self) -> bool {
        self.unet.in_channels == 9
    }

    /// The preview map: the model's own, else its family's.
    pub fn latent_rgb_factors(&self) -> LatentRgb {
        self.latent_rgb.unwrap_or_else(|| self.family.latent_rgb_factors())
    }

    /// Settings an artist should start from with this model.
    pub fn default_steps(&self) -> usize {
        match (self.turbo, self.family) {
            (true, _) => 1,
            (false, Family::Sdxl) => 30,
            (false, _) => 25,
        }
    }

    pub fn default_guidance(&self) -> f64 {
        if self.turbo {
            0.0
        } else {
            7.0
        }
    }

    /// Native resolution: 512 for SD 1.x and SD-Turbo, 768 for SD 2.x v-prediction, 1024 for SDXL.
    pub fn default_size(&self) -> usize {
        // As diffusers' pipelines do: the U-Net's trained latent size times the VAE's factor
        // (SDXL-Turbo and Easel Mini differ from their family's usual size).
        if let Some(latent) = self.unet.sample_size.filter(|&s| s > 0) {
            return latent * self.vae.downscale_factor();
        }
        match self.family {
            Family::Sdxl => 1024,
            Family::Sd2 if self.prediction_type == PredictionType::VPrediction => 768,
            _ => 512,
        }
    }
}

fn model_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Model { path: path.to_path_buf(), message: message.into() }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| model_error(path, format!("invalid JSON or unexpected contents: {e}")))
}

/// Reads a diffusers model folder's configs and works out its family, without loading weights.
pub fn inspect_diffusers_folder(folder: &Path) -> Result<ModelInfo> {
    if !folder.exists() {
        return Err(model_error(folder, "no such file or folder"));
    }
    if !folder.is_dir() {
        return Err(model_error(
            folder,
            "expected a diffusers model folder (with model_index.json, unet/, vae/, text_encoder/)",
        ));
    }
    let required =
        ["unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"];
    let missing: Vec<&str> = required.iter().copied().filter(|p| !folder.join(p).is_file()).collect();
    if !missing.is_empty() {
        return Err(model_error(
            folder,
            format!("not a complete diffusers model folder: missing {}", missing.join(", ")),
        ));
    }
    let unet: UNetConfig = read_json(&folder.join("unet/config.json"))?;
    if let Some(what) = unet.unsupported() {
        return Err(model_error(&folder.join("unet/config.json"), format!("unsupported U-Net ({what})")));
    }
    if unet.in_channels != 4 && unet.in_channels != 9 {
        return Err(model_error(
            folder,
            format!(
                "the U-Net takes {} input channels (e.g. instruct-pix2pix): only text-to-image (4) and inpainting (9) models run",
                unet.in_channels
            ),
        ));
    }
    let vae: VaeConfig = read_json(&folder.join("vae/config.json"))?;
    if let Some(problem) = vae.problem() {
        return Err(model_error(&folder.join("vae/config.json"), format!("impossible VAE config: {problem}")));
    }
    let text_encoder = read_text_config(&folder.join("text_encoder/config.json"))?;
    let text_encoder_2 = if folder.join("text_encoder_2/config.json").is_file() {
        Some(read_text_config(&folder.join("text_encoder_2/config.json"))?)
    } else {
        None
    };
    let scheduler_config_path = folder.join("scheduler/scheduler_config.json");
    let scheduler: serde_json::Value = read_json(&scheduler_config_path)?;
    let model_index: serde_json::Value = if folder.join("model_index.json").is_file() {
        read_json(&folder.join("model_index.json"))?
    } else {
        serde_json::Value::Null
    };

    let family = if unet.is_sdxl() {
        if text_encoder_2.is_none() {
            return Err(model_error(folder, "SDXL U-Net but no text_encoder_2/ folder"));
        }
        Family::Sdxl
    } else if text_encoder.hidden_act == "gelu" || unet.use_linear_projection {
        Family::Sd2
    } else {
        Family::Sd1
    };
    let context_needed = unet.context_dim();
    let context_given = text_encoder.hidden_size + text_encoder_2.as_ref().map(|t| t.hidden_size).unwrap_or(0);
    if context_needed != context_given {
        return Err(model_error(
            folder,
            format!(
                "the U-Net expects {context_needed}-wide text embeddings but the text encoders give {context_given}"
            ),
        ));
    }
    let prediction_type =
        PredictionType::of_config(&scheduler).map_err(|e| model_error(&scheduler_config_path, e.to_string()))?;
    // Turbo releases space their timesteps "trailing"; so do zero-terminal-SNR models (Easel
    // Mini, some finetunes), which are not distilled and want the usual steps and guidance.
    let zero_snr = scheduler.get("rescale_betas_zero_snr").and_then(|v| v.as_bool()) == Some(true);
    let turbo = scheduler.get("timestep_spacing").and_then(|v| v.as_str()) == Some("trailing") && !zero_snr;
    let force_zeros_for_empty_prompt = family == Family::Sdxl
        && model_index.get("force_zeros_for_empty_prompt").and_then(|v| v.as_bool()).unwrap_or(true);
    let name = folder
        .canonicalize()
        .ok()
        .as_deref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());

    Ok(ModelInfo {
        path: folder.to_path_buf(),
        name,
        family,
        turbo,
        prediction_type,
        scheduler: SchedulerSource::File(scheduler_config_path),
        unet,
        vae,
        text_encoder,
        text_encoder_2,
        force_zeros_for_empty_prompt,
        latent_rgb: read_latent_rgb(&folder.join("vae").join("latent_rgb.json")),
    })
}

fn read_text_config(path: &Path) -> Result<ClipTextConfig> {
    let config: ClipTextConfig = read_json(path)?;
    match config.problem() {
        Some(problem) => Err(model_error(path, format!("impossible text encoder config: {problem}"))),
        None => Ok(config),
    }
}

/// The weight files of one component folder: the full-precision file if present, else the
/// `fp16` variant; sharded checkpoints through their `.index.json`.
pub fn component_weights(component_dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    for name in [format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors")] {
        let path = component_dir.join(&name);
        if path.is_file() {
            return Ok(vec![path]);
        }
    }
    for name in [format!("{stem}.safetensors.index.json"), format!("{stem}.safetensors.index.fp16.json")] {
        let index_path = component_dir.join(&name);
        if index_path.is_file() {
            let index: serde_json::Value = read_json(&index_path)?;
            let mut shards: Vec<PathBuf> = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| m.values().filter_map(|v| v.as_str()).map(|s| component_dir.join(s)).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            if shards.is_empty() {
                return Err(model_error(&index_path, "shard index lists no files"));
            }
            return Ok(shards);
        }
    }
    let has_pickle = ["bin", "ckpt", "pt"].iter().any(|ext| component_dir.join(format!("{stem}.{ext}")).is_file());
    let hint = if has_pickle {
        " (only a pickle .bin was found: Easel loads .safetensors only, since pickle files can run code)"
    } else {
        ""
    };
    Err(model_error(component_dir, format!("no {stem}.safetensors or {stem}.fp16.safetensors{hint}")))
}

/// Validates the files, then memory-maps them for a model constructor.
pub fn model_weights(files: &[PathBuf], dtype: DType, device: &Device) -> Result<ModelWeights> {
    for file in files {
        safetensors_check::validate_safetensors(file)?;
    }
    // SAFETY: the files were validated above (complete header and data), and Easel never
    // writes model files while they are mapped.
    let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
        .map_err(|e| model_error(files.first().map(PathBuf::as_path).unwrap_or(Path::new("")), e.to_string()))?;
    // Names are already diffusers names.
    let checkpoint = checkpoint::Checkpoint::new(tensors, |name| Some(checkpoint::Source::Plain(name.to_string())));
    Ok(ModelWeights::new(checkpoint, dtype, device))
}

/// How to place the model: device and the dtype of its weights and activations.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// The VAE's dtype; f32 unless the caller knows f16 is safe for this VAE.
    pub vae_dtype: DType,
    /// A VAE to use instead of the model's own: a diffusers `vae/` folder or a `.safetensors` file.
    pub vae_override: Option<PathBuf>,
    /// The CPU bf16 mode: U-Net weights kept in bf16 (half the memory) and multiplied with
    /// AVX-512-BF16, activations and accumulation in f32. Not exact; see docs/PERFORMANCE.md for how far
    /// its images are from the f32 ones.
    pub cpu_bf16: bool,
    /// On the CPU in f32, convolution and linear weights that the checkpoint stores in f16 stay
    /// f16 in memory and are widened as each layer runs: the same numbers (widening is exact)
    /// with half the weight memory. Off: widened once at load, as diffusers does.
    pub keep_f16_weights: bool,
    /// On the CPU, convolution and linear weights are read in place from the memory-mapped
    /// file instead of copied out at load (see [`mapped`]): the same numbers, a load without
    /// the copy. Off: copied, as before (for comparisons).
    pub map_weights: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            vae_dtype: DType::F32,
            vae_override: None,
            cpu_bf16: false,
            keep_f16_weights: true,
            map_weights: true,
        }
    }
}

impl LoadOptions {
    /// The dtype to ask a component's `VarBuilder` for when it computes in `compute`: on the
    /// CPU in f32 with [`Self::keep_f16_weights`], f16, which the loader serves as stored f16
    /// weights or f32 (never narrowing) and the layers widen as they run (see `models::nn`).
    pub fn weights_dtype(&self, compute: DType) -> DType {
        if self.device.is_cpu() && compute == DType::F32 && self.keep_f16_weights {
            DType::F16
        } else {
            compute
        }
    }

    /// The dtype the U-Net's weights are loaded in: bf16 in the CPU bf16 mode (its layers keep
    /// them packed; activations stay in `dtype`).
    pub fn unet_weights_dtype(&self) -> Result<DType> {
        if !self.cpu_bf16 {
            return Ok(self.weights_dtype(self.dtype));
        }
        if !self.device.is_cpu() {
            return Err(Error::InvalidSetting("bf16 mode is for the CPU; GPUs already run in f16".into()));
        }
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::bf16::supported() {
            return Ok(DType::BF16);
        }
        Err(Error::InvalidSetting(
            "bf16 mode needs a CPU with AVX-512 BF16 instructions (AMD Zen 4 or newer, Intel Cooper Lake / Sapphire Rapids or newer)".into(),
        ))
    }
}

/// A loaded text-to-image model: its networks plus what the pipeline needs to drive them.
pub struct StableDiffusion {
    pub info: ModelInfo,
    pub text_encoder: ClipTextModel,
    pub text_encoder_2: Option<ClipTextModel>,
    pub unet: UNet2DConditionModel,
    pub vae: VaeDecoder,
    pub options: LoadOptions,
    /// Bytes of weights read in place from the mapped files rather than copied at load.
    pub weights_in_place: u64,
    /// The pages each component reads in place, released while it is idle.
    pub pages: ComponentPages,
    /// The text encoders' and U-Net's layers LoRAs attach to, by name.
    pub adapters: lora::Adapters,
}

/// The networks of a model, for [`StableDiffusion::keep_resident_only`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    TextEncoders,
    Unet,
    Vae,
}

/// The mapped pages of each component (empty for layers that hold copies: GPU, `--copy-weights`).
#[derive(Debug, Clone, Default)]
pub struct ComponentPages {
    pub text_encoders: MappedPages,
    pub unet: MappedPages,
    pub vae: MappedPages,
}

impl StableDiffusion {
    /// Takes the in-place weights of every component but `active` out of the resident set, so
    /// that each stage of a generation holds only its own network's weights (for SD 1.5 in f32:
    /// 3.4 GB while denoising instead of 4.3 GB, 0.3 GB while decoding instead of 4.3 GB). The
    /// pages stay in the page cache: the next stage maps them back in without a disk read, at
    /// about 0.1 s for the U-Net (measured; nothing next to a step).
    pub fn keep_resident_only(&self, active: Component) {
        for (component, pages) in [
            (Component::TextEncoders, &self.pages.text_encoders),
            (Component::Unet, &self.pages.unet),
            (Component::Vae, &self.pages.vae),
        ] {
            if component != active {
                pages.release();
            }
        }
    }
}

fn load_component<T>(
    folder: &Path,
    component: &str,
    stem: &str,
    dtype: DType,
    options: &LoadOptions,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
) -> Result<(T, MappedPages)> {
    let dir = folder.join(component);
    let files = component_weights(&dir, stem)?;
    let weights = model_weights(&files, dtype, &options.device)?;
    weights
        .build_with_pages(options.map_weights, build)
        .map_err(|e| model_error(&dir, format!("weights do not match the config: {}", crate::error::candle_message(e))))
}

/// Reads what a model path holds without loading weights: a diffusers folder or a single file.
pub fn inspect_model(path: &Path) -> Result<ModelInfo> {
    let extension = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    if path.is_file() && matches!(extension.as_str(), "ckpt" | "pt" | "pth" | "bin" | "pkl") {
        // Never unpickled: a pickle can run any code while it is being read.
        return Err(model_error(
            path,
            "this is a pickle-based checkpoint (.ckpt/.pt/.bin), which can run code when opened, so Easel does not \
             read it. Use the .safetensors version of the model (most are published as both), or convert it \
             once with a trusted tool",
        ));
    }
    if path.is_file() {
        single_file::inspect_single_file(path)
    } else {
        inspect_diffusers_folder(path)
    }
}

impl StableDiffusion {
    /// Loads a diffusers folder or a single-file checkpoint.
    pub fn load(path: &Path, options: LoadOptions) -> Result<Self> {
        let override_path = options.vae_override.clone();
        let (model, adapters) = lora::collect(|| {
            if path.is_file() {
                single_file::load_single_file(path, options)
            } else {
                Self::load_diffusers(path, options)
            }
        });
        let mut model = model?;
        model.adapters = adapters;
        if let Some(vae_path) = override_path {
            // The pipeline scales latents and sizes images by the VAE actually in use.
            let config = model.vae.config().clone();
            if config.latent_channels != model.info.unet.out_channels {
                return Err(model_error(
                    &vae_path,
                    format!(
                        "this VAE has {} latent channels, the model {}: they do not belong together",
                        config.latent_channels, model.info.unet.out_channels
                    ),
                ));
            }
            model.info.vae = config;
        }
        Ok(model)
    }

    pub fn load_diffusers(folder: &Path, options: LoadOptions) -> Result<Self> {
        let in_place_before = mapped::in_place_bytes_on_this_thread();
        let info = inspect_diffusers_folder(folder)?;
        let dtype = options.weights_dtype(options.dtype);
        // Checked first: a refused bf16 mode should not cost a text-encoder load.
        let unet_dtype = options.unet_weights_dtype()?;
        let (text_encoder, mut text_pages) = load_component(folder, "text_encoder", "model", dtype, &options, |vb| {
            let _scope = lora::component("text_encoder");
            ClipTextModel::new(vb, info.text_encoder.clone(), false)
        })?;
        let text_encoder_2 = match &info.text_encoder_2 {
            Some(cfg) => {
                let (model, pages) = load_component(folder, "text_encoder_2", "model", dtype, &options, |vb| {
                    let _scope = lora::component("text_encoder_2");
                    ClipTextModel::new(vb, cfg.clone(), true)
                })?;
                text_pages = text_pages.and(pages);
                Some(model)
            }
            None => None,
        };
        let (unet, unet_pages) =
            load_component(folder, "unet", "diffusion_pytorch_model", unet_dtype, &options, |vb| {
                let _scope = lora::component("unet");
                UNet2DConditionModel::new(vb, info.unet.clone())
            })?;
        let (vae, vae_pages) = load_vae(&info, &options)?;
        let weights_in_place = mapped::in_place_bytes_on_this_thread() - in_place_before;
        let pages = ComponentPages { text_encoders: text_pages, unet: unet_pages, vae: vae_pages };
        let adapters = lora::Adapters::default();
        Ok(Self { info, text_encoder, text_encoder_2, unet, vae, options, weights_in_place, pages, adapters })
    }
}

/// Loads (or reloads, e.g. in f32 after an f16 overflow) the VAE decoder of a model.
pub fn load_vae(info: &ModelInfo, options: &LoadOptions) -> Result<(VaeDecoder, MappedPages)> {
    load_vae_half(info, options, VaeDecoder::new)
}

/// The VAE's encoder (image-to-image), from the same files as its decoder: loaded only when an
/// init image is to be encoded, since text-to-image never needs it.
pub fn load_vae_encoder(info: &ModelInfo, options: &LoadOptions) -> Result<(VaeEncoder, MappedPages)> {
    load_vae_half(info, options, VaeEncoder::new)
}

/// The model's VAE (or the override), built by `build` from the weights and the config.
pub(crate) fn load_vae_half<T>(
    info: &ModelInfo,
    options: &LoadOptions,
    build: fn(VarBuilder<'static>, VaeConfig) -> candle_core::Result<T>,
) -> Result<(T, MappedPages)> {
    if let Some(path) = &options.vae_override {
        return load_vae_override(path, info.family, options, build);
    }
    if info.path.is_file() {
        return single_file::load_checkpoint_vae(info, options, build);
    }
    let dtype = options.weights_dtype(options.vae_dtype);
    load_component(&info.path, "vae", "diffusion_pytorch_model", dtype, options, |vb| build(vb, info.vae.clone()))
}

/// A replacement VAE: a diffusers `vae/` folder (config.json + weights) or a single file in
/// either naming (original `encoder.*`/`decoder.*`, with or without `first_stage_model.`, or
/// diffusers' names as in madebyollin/sdxl-vae-fp16-fix).
pub fn load_vae_override<T>(
    path: &Path,
    family: Family,
    options: &LoadOptions,
    build: fn(VarBuilder<'static>, VaeConfig) -> candle_core::Result<T>,
) -> Result<(T, MappedPages)> {
    if path.is_dir() {
        let config: VaeConfig = read_json(&path.join("config.json"))?;
        if let Some(problem) = config.problem() {
            return Err(model_error(&path.join("config.json"), format!("impossible VAE config: {problem}")));
        }
        let files = component_weights(path, "diffusion_pytorch_model")?;
        let weights = model_weights(&files, options.weights_dtype(options.vae_dtype), &options.device)?;
        return weights.build_with_pages(options.map_weights, |vb| build(vb, config)).map_err(|e| {
            model_error(path, format!("weights do not match the config: {}", crate::error::candle_message(e)))
        });
    }
    if !path.is_file() {
        return Err(model_error(path, "no such VAE file or folder"));
    }
    single_file::load_vae_file(path, family, options, build)
}
