//! Loading single-file checkpoints (original LDM layout): the family and every config value are
//! inferred from tensor names and shapes plus the conventions all loaders share (SD 1.x U-Net 8
//! heads; SD 2.x / SDXL U-Net and every CLIP 64 channels per head; GroupNorm 32 groups), and
//! tensors are renamed on the fly by [`super::checkpoint`].

use std::collections::HashSet;
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use serde_json::json;

use super::checkpoint::{ldm_unet_name, ldm_vae_source, open_clip_source, Checkpoint, Source};
use super::clip::{ClipTextConfig, ClipTextModel};
use super::mapped::{MappedPages, ModelWeights};
use super::safetensors_check::validate_safetensors;
use super::unet::{UNet2DConditionModel, UNetConfig};
use super::vae::VaeConfig;
use super::{ComponentPages, Family, LoadOptions, ModelInfo, SchedulerSource, StableDiffusion};
use crate::error::candle_message;
use crate::schedulers::PredictionType;
use crate::{Error, Result};
use candle_nn::VarBuilder;

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const SD1_CLIP: &str = "cond_stage_model.transformer.";
const SD2_CLIP: &str = "cond_stage_model.model.";
const SDXL_CLIP_L: &str = "conditioner.embedders.0.transformer.";
const SDXL_CLIP_G: &str = "conditioner.embedders.1.model.";

/// The scheduler configs of the original releases, used for single files (which carry none).
const SD15_SCHEDULER: &str = include_str!("../../../../assets/scheduler/sd15.json");
const SD21_SCHEDULER: &str = include_str!("../../../../assets/scheduler/sd21.json");
const SDXL_SCHEDULER: &str = include_str!("../../../../assets/scheduler/sdxl.json");
/// SD 2.1's config with epsilon prediction, for the 512 "base" model.
const SD21_BASE_SCHEDULER: &str = include_str!("../../../../assets/scheduler/sd21_base.json");
const SD_TURBO_SCHEDULER: &str = include_str!("../../../../assets/scheduler/sd_turbo.json");
const SDXL_TURBO_SCHEDULER: &str = include_str!("../../../../assets/scheduler/sdxl_turbo.json");

struct Keys<'a> {
    path: &'a Path,
    names: HashSet<String>,
    tensors: MmapedSafetensors,
}

impl Keys<'_> {
    fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    fn any_prefix(&self, prefix: &str) -> bool {
        self.names.iter().any(|n| n.starts_with(prefix))
    }

    fn dims(&self, name: &str) -> Result<Vec<usize>> {
        let view = self.tensors.get(name).map_err(|_| self.error(format!("missing tensor {name}")))?;
        Ok(view.shape().to_vec())
    }

    fn dim(&self, name: &str, index: usize) -> Result<usize> {
        let dims = self.dims(name)?;
        dims.get(index)
            .copied()
            .ok_or_else(|| self.error(format!("tensor {name} has shape {dims:?}, unexpected for its role")))
    }

    fn count(&self, prefix_of: impl Fn(usize) -> String) -> usize {
        (0..).take_while(|i| self.any_prefix(&prefix_of(*i))).count()
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::Model { path: self.path.to_path_buf(), message: message.into() }
    }
}

/// Names the kind of a file that is not a text-to-image checkpoint, for a clear refusal.
fn not_a_checkpoint(keys: &Keys) -> Option<&'static str> {
    if keys.any_prefix("lora_unet_")
        || keys.any_prefix("lora_te")
        || keys.names.iter().any(|n| n.contains(".lora_down."))
    {
        return Some("a LoRA, not a checkpoint: load it as an add-on to a model (not supported yet)");
    }
    if keys.any_prefix("control_model.") {
        return Some("a ControlNet, not a checkpoint (not supported yet)");
    }
    if keys.any_prefix("model.diffusion_model.joint_blocks.") {
        return Some("a Stable Diffusion 3 model, which Easel does not support");
    }
    if keys.any_prefix("conditioner.embedders.0.model.") && !keys.any_prefix(SDXL_CLIP_L) {
        return Some("an SDXL refiner, which Easel does not support yet");
    }
    if keys.has("emb_params") || keys.any_prefix("string_to_param") || keys.has("clip_l") {
        return Some("a textual-inversion embedding, not a checkpoint");
    }
    let has_text_encoder = [SD1_CLIP, SD2_CLIP, SDXL_CLIP_L, SDXL_CLIP_G].iter().any(|p| keys.any_prefix(p));
    if !keys.any_prefix(UNET) && !has_text_encoder && (keys.any_prefix("decoder.") || keys.any_prefix(VAE)) {
        return Some("a VAE only: use it as a VAE override for a model (not supported yet)");
    }
    None
}

/// What the text encoders give the U-Net, for checking the U-Net's shapes against them.
struct TextWidths {
    /// Width of the cross-attention context (both towers' hidden sizes together for SDXL).
    context: usize,
    /// Width of SDXL's pooled embedding (the second tower's projection), with the tensor it
    /// comes from.
    pooled: Option<(usize, String)>,
}

/// The U-Net's first convolution: (its channels, its input channels). Read before anything
/// else, as other input widths are complete models of another kind, named as such.
fn unet_input(keys: &Keys) -> Result<(usize, usize)> {
    let conv_in = format!("{UNET}input_blocks.0.0.weight");
    let conv_in_dims = keys.dims(&conv_in)?;
    if conv_in_dims.len() != 4 {
        return Err(keys.error(format!("{conv_in} has shape {conv_in_dims:?}, expected [channels, in, 3, 3]")));
    }
    match conv_in_dims[1] {
        4 => Ok((conv_in_dims[0], 4)),
        // Inpainting: latents + mask + masked-image latents.
        9 => Ok((conv_in_dims[0], 9)),
        n => Err(keys.error(format!("the U-Net takes {n} input channels (e.g. instruct-pix2pix): not supported"))),
    }
}

fn infer_unet(keys: &Keys, family: Family, text: &TextWidths) -> Result<UNetConfig> {
    let (c0, in_channels) = unet_input(keys)?;
    let per_level = (1..64).find(|n| keys.has(&format!("{UNET}input_blocks.{n}.0.op.weight"))).unwrap_or(0);
    if per_level < 2 {
        return Err(keys.error("the U-Net is missing its input blocks (no downsampler found)"));
    }
    let layers = per_level - 1;
    let inputs = keys.count(|i| format!("{UNET}input_blocks.{i}."));
    // conv_in, then per level its resnets and (but the last) a downsampler.
    if inputs < per_level || !inputs.is_multiple_of(per_level) {
        return Err(keys.error(format!(
            "the U-Net's {inputs} input blocks do not make levels of {layers} resnets and a downsampler \
             (levels with different numbers of resnets are not supported)"
        )));
    }
    let levels = inputs / per_level;
    let attention_depth = |block: &str| keys.count(|k| format!("{UNET}{block}.1.transformer_blocks.{k}."));
    let mut channels = Vec::new();
    let mut down_depths: Vec<Vec<usize>> = Vec::new();
    for level in 0..levels {
        let first = 1 + level * per_level;
        channels.push(keys.dim(&format!("{UNET}input_blocks.{first}.0.out_layers.3.weight"), 0)?);
        down_depths.push((0..layers).map(|j| attention_depth(&format!("input_blocks.{}", first + j))).collect());
    }
    let up_depths: Vec<Vec<usize>> = (0..levels)
        .map(|i| (0..=layers).map(|j| attention_depth(&format!("output_blocks.{}", i * per_level + j))).collect())
        .collect();
    let has_mid = keys.any_prefix(&format!("{UNET}middle_block."));
    let mid_depth = attention_depth("middle_block");
    let partial = |depths: &[Vec<usize>], what: &str| {
        depths.iter().enumerate().find(|(_, d)| d.contains(&0) && d.iter().any(|n| *n > 0)).map(|(i, d)| {
            keys.error(format!(
                "{what} {i} has attention in some of its layers only ({d:?} transformer blocks): not supported"
            ))
        })
    };
    if let Some(error) = partial(&down_depths, "down level").or_else(|| partial(&up_depths, "up block")) {
        return Err(error);
    }
    let with_attention = |d: &Vec<usize>| d.iter().any(|n| *n > 0);
    let Some(attention_level) = down_depths.iter().position(with_attention) else {
        return Err(keys.error("the U-Net has no attention blocks"));
    };
    let attn_prefix = format!("{UNET}input_blocks.{}.1.", 1 + attention_level * per_level);
    let linear = keys.dims(&format!("{attn_prefix}proj_in.weight"))?.len() == 2;
    let to_k = format!("{attn_prefix}transformer_blocks.0.attn2.to_k.weight");
    let context = keys.dim(&to_k, 1)?;
    if context != text.context {
        return Err(keys.error(format!(
            "{to_k} has shape {:?}: its second number must be the text encoders' width {} (the shapes \
             of this file disagree)",
            keys.dims(&to_k)?,
            text.context
        )));
    }
    let heads: Vec<usize> = match family {
        Family::Sd1 => vec![8; levels],
        _ => channels.iter().map(|c| (c / 64).max(1)).collect(),
    };
    // One entry per level: a number, or one per layer where the layers differ (SSD-1B, Vega).
    let level_depth = |d: &[usize]| {
        if d.iter().all(|n| *n == d[0]) {
            json!(d[0].max(1))
        } else {
            json!(d)
        }
    };
    let mut down_entries: Vec<serde_json::Value> = down_depths.iter().map(|d| level_depth(d)).collect();
    // The mid block takes the last level's depth in diffusers' config: where that level has no
    // attention of its own, its entry can carry the mid block's (SDXL's real layout).
    if !with_attention(&down_depths[levels - 1]) {
        down_entries[levels - 1] = json!(mid_depth.max(1));
    }
    let down: Vec<&str> =
        down_depths.iter().map(|d| if with_attention(d) { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect();
    let up: Vec<&str> =
        up_depths.iter().map(|d| if with_attention(d) { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect();
    let time_embed = format!("{UNET}time_embed.0.weight");
    let time_dims = keys.dims(&time_embed)?;
    if time_dims.len() != 2 || time_dims[1] != c0 {
        return Err(keys.error(format!(
            "{time_embed} has shape {time_dims:?}, expected [width, {c0}] (the first level's channels)"
        )));
    }
    let mut config = json!({
        "in_channels": in_channels,
        "out_channels": keys.dim(&format!("{UNET}out.2.weight"), 0)?,
        "block_out_channels": channels,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": if has_mid { json!("UNetMidBlock2DCrossAttn") } else { json!(null) },
        "layers_per_block": layers,
        "num_attention_heads": heads,
        "cross_attention_dim": context,
        "transformer_layers_per_block": down_entries,
        "use_linear_projection": linear,
        "time_embedding_dim": time_dims[0],
    });
    let mirrored = up_depths
        .iter()
        .enumerate()
        .all(|(i, d)| !with_attention(d) || d.iter().all(|n| down_depths[levels - 1 - i].iter().all(|m| m == n)));
    if !mirrored || down_depths.iter().any(|d| !d.iter().all(|n| *n == d[0])) {
        config["reverse_transformer_layers_per_block"] =
            json!(up_depths.iter().map(|d| level_depth(d)).collect::<Vec<_>>());
    }
    if family == Family::Sdxl {
        let label = format!("{UNET}label_emb.0.0.weight");
        let in_dim = keys.dim(&label, 1)?;
        let Some((pooled, pooled_tensor)) = &text.pooled else {
            return Err(keys.error("an SDXL checkpoint without the second text encoder's projection"));
        };
        // The input is the pooled text embedding and six sinusoidal embeddings of the size and
        // crop numbers: its width says how wide each of those is.
        let time_ids = in_dim.checked_sub(*pooled).filter(|w| *w > 0 && w % 6 == 0);
        let Some(time_ids) = time_ids else {
            return Err(keys.error(format!(
                "{label} has shape {:?}: its input must be the pooled text width {pooled} ({pooled_tensor}) \
                 plus 6 time-id embeddings (the shapes of this file disagree)",
                keys.dims(&label)?
            )));
        };
        config["addition_embed_type"] = json!("text_time");
        config["addition_time_embed_dim"] = json!(time_ids / 6);
        config["projection_class_embeddings_input_dim"] = json!(in_dim);
    }
    if c0 != channels[0] {
        return Err(keys.error("the U-Net's first block does not match its input convolution"));
    }
    let config: UNetConfig =
        serde_json::from_value(config).map_err(|e| keys.error(format!("could not describe the U-Net: {e}")))?;
    // The config must give every block the depth the file has (a layout diffusers' config
    // cannot express is refused here, not found missing while loading).
    let depth_error = |what: String, file: usize, config: usize| {
        keys.error(format!(
            "{what} has {file} transformer blocks, which a diffusers config cannot express with the rest ({config})"
        ))
    };
    for (level, d) in down_depths.iter().enumerate().filter(|(_, d)| with_attention(d)) {
        for (j, n) in d.iter().enumerate() {
            if config.down_depth(level, j) != *n {
                return Err(depth_error(
                    format!("input block {}", 1 + level * per_level + j),
                    *n,
                    config.down_depth(level, j),
                ));
            }
        }
    }
    for (i, d) in up_depths.iter().enumerate().filter(|(_, d)| with_attention(d)) {
        for (j, n) in d.iter().enumerate() {
            if config.up_depth(i, j) != *n {
                return Err(depth_error(format!("output block {}", i * per_level + j), *n, config.up_depth(i, j)));
            }
        }
    }
    if has_mid && config.mid_depth() != mid_depth {
        return Err(depth_error("the middle block".into(), mid_depth, config.mid_depth()));
    }
    Ok(config)
}

fn infer_vae(keys: &Keys, family: Family) -> Result<VaeConfig> {
    let levels = keys.count(|i| format!("{VAE}encoder.down.{i}."));
    if levels == 0 {
        return Err(keys.error("the checkpoint has no VAE (first_stage_model.*)"));
    }
    let channels = (0..levels)
        .map(|i| keys.dim(&format!("{VAE}encoder.down.{i}.block.0.conv2.weight"), 0))
        .collect::<Result<Vec<_>>>()?;
    let layers = keys.count(|j| format!("{VAE}encoder.down.0.block.{j}."));
    let config = json!({
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": keys.dim(&format!("{VAE}decoder.conv_in.weight"), 1)?,
        "scaling_factor": if family == Family::Sdxl { 0.13025 } else { 0.18215 },
        "force_upcast": family == Family::Sdxl,
    });
    serde_json::from_value(config).map_err(|e| keys.error(format!("could not describe the VAE: {e}")))
}

/// A CLIP text model in transformers' layout (OpenAI CLIP-L) under `prefix`.
fn infer_clip_l(keys: &Keys, prefix: &str) -> Result<ClipTextConfig> {
    let tm = format!("{prefix}text_model.");
    let embedding = keys.dims(&format!("{tm}embeddings.token_embedding.weight"))?;
    let hidden = embedding.get(1).copied().unwrap_or(0);
    let config = json!({
        "vocab_size": embedding[0],
        "hidden_size": hidden,
        "intermediate_size": keys.dim(&format!("{tm}encoder.layers.0.mlp.fc1.weight"), 0)?,
        "num_hidden_layers": keys.count(|i| format!("{tm}encoder.layers.{i}.")),
        "num_attention_heads": (hidden / 64).max(1),
        "max_position_embeddings": keys.dim(&format!("{tm}embeddings.position_embedding.weight"), 0)?,
        "hidden_act": "quick_gelu",
    });
    serde_json::from_value(config).map_err(|e| keys.error(format!("could not describe the text encoder: {e}")))
}

/// An OpenCLIP text tower under `prefix`; SD 2.x runs all but its last block.
fn infer_open_clip(keys: &Keys, prefix: &str, drop_last_layer: bool) -> Result<ClipTextConfig> {
    let embedding = keys.dims(&format!("{prefix}token_embedding.weight"))?;
    let hidden = embedding.get(1).copied().unwrap_or(0);
    let blocks = keys.count(|i| format!("{prefix}transformer.resblocks.{i}."));
    let mut config = json!({
        "vocab_size": embedding[0],
        "hidden_size": hidden,
        "intermediate_size": keys.dim(&format!("{prefix}transformer.resblocks.0.mlp.c_fc.weight"), 0)?,
        "num_hidden_layers": if drop_last_layer { blocks.saturating_sub(1) } else { blocks },
        "num_attention_heads": (hidden / 64).max(1),
        "max_position_embeddings": keys.dim(&format!("{prefix}positional_embedding"), 0)?,
        "hidden_act": "gelu",
    });
    if keys.has(&format!("{prefix}text_projection")) {
        config["projection_dim"] = json!(keys.dim(&format!("{prefix}text_projection"), 1)?);
    }
    serde_json::from_value(config).map_err(|e| keys.error(format!("could not describe the text encoder: {e}")))
}

/// Maps a file that `validate_safetensors` accepted.
fn map_validated(path: &Path) -> Result<MmapedSafetensors> {
    // SAFETY: the caller validated the file; Easel never writes model files while they are mapped.
    unsafe { MmapedSafetensors::new(path) }
        .map_err(|e| Error::Model { path: path.to_path_buf(), message: e.to_string() })
}

fn open_keys(path: &Path) -> Result<Keys<'_>> {
    let names: HashSet<String> = validate_safetensors(path)?.into_iter().collect();
    Ok(Keys { path, names, tensors: map_validated(path)? })
}

/// Reads a single-file checkpoint's header and works out what it is, without loading weights.
pub fn inspect_single_file(path: &Path) -> Result<ModelInfo> {
    inspect_keys(&open_keys(path)?)
}

fn inspect_keys(keys: &Keys) -> Result<ModelInfo> {
    let path = keys.path;
    if let Some(kind) = not_a_checkpoint(keys) {
        return Err(keys.error(format!("this file is {kind}")));
    }
    let family = if keys.any_prefix(SDXL_CLIP_L) && keys.any_prefix(SDXL_CLIP_G) {
        Family::Sdxl
    } else if keys.any_prefix(SD2_CLIP) {
        Family::Sd2
    } else if keys.any_prefix(SD1_CLIP) {
        Family::Sd1
    } else if !keys.any_prefix(UNET) {
        return Err(keys.error("no U-Net (model.diffusion_model.*) in this file: not a Stable Diffusion checkpoint"));
    } else {
        return Err(
            keys.error("the text encoder is missing or of an unknown kind: not an SD 1.x, SD 2.x or SDXL checkpoint")
        );
    };
    if !keys.any_prefix(UNET) {
        return Err(keys.error("no U-Net (model.diffusion_model.*) in this file"));
    }
    unet_input(keys)?;
    let name = path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    // Turbo models share their base's architecture; only the file name tells them apart (as in
    // the official releases: sd_turbo.safetensors, sd_xl_turbo_1.0_fp16.safetensors).
    let turbo = name.to_ascii_lowercase().contains("turbo");
    let (text_encoder, text_encoder_2, scheduler) = match family {
        Family::Sd1 => (infer_clip_l(keys, SD1_CLIP)?, None, SD15_SCHEDULER),
        Family::Sd2 => {
            let lower = name.to_ascii_lowercase();
            let scheduler = if turbo {
                SD_TURBO_SCHEDULER
            } else if lower.contains("base") || lower.contains("512") {
                SD21_BASE_SCHEDULER
            } else {
                SD21_SCHEDULER
            };
            (infer_open_clip(keys, SD2_CLIP, true)?, None, scheduler)
        }
        Family::Sdxl => (
            infer_clip_l(keys, SDXL_CLIP_L)?,
            Some(infer_open_clip(keys, SDXL_CLIP_G, false)?),
            if turbo { SDXL_TURBO_SCHEDULER } else { SDXL_SCHEDULER },
        ),
    };
    let widths = TextWidths {
        context: text_encoder.hidden_size + text_encoder_2.as_ref().map_or(0, |t| t.hidden_size),
        pooled: text_encoder_2
            .as_ref()
            .map(|t| (t.projection_dim.unwrap_or(t.hidden_size), format!("{SDXL_CLIP_G}text_projection"))),
    };
    let unet = infer_unet(keys, family, &widths)?;
    let vae = infer_vae(keys, family)?;
    if unet.out_channels != vae.latent_channels {
        return Err(keys.error(format!(
            "{UNET}out.2.weight gives {} latent channels, the VAE ({VAE}decoder.conv_in.weight) {}: the shapes \
             of this file disagree",
            unet.out_channels, vae.latent_channels
        )));
    }
    let scheduler_json: serde_json::Value = serde_json::from_str(scheduler).map_err(|e| keys.error(e.to_string()))?;
    Ok(ModelInfo {
        path: path.to_path_buf(),
        name,
        family,
        turbo: turbo && scheduler_json.get("timestep_spacing").and_then(|v| v.as_str()) == Some("trailing"),
        // Nothing in the weights marks v-prediction: SD 2.x files are taken as the 768-v model
        // unless their name says "base"/"512" (the epsilon model) or "turbo".
        prediction_type: PredictionType::of_config(&scheduler_json)?,
        scheduler: SchedulerSource::Bundled(scheduler),
        unet,
        vae,
        text_encoder,
        text_encoder_2,
        force_zeros_for_empty_prompt: family == Family::Sdxl,
        latent_rgb: None,
    })
}

/// The file's tensors under diffusers names, as `resolve` finds them.
fn weights(
    path: &Path,
    resolve: impl Fn(&str) -> Option<Source> + Send + Sync + 'static,
    dtype: DType,
    device: &Device,
) -> Result<ModelWeights> {
    Ok(ModelWeights::new(Checkpoint::new(map_validated(path)?, resolve), dtype, device))
}

/// Loads a single-file checkpoint, renaming its tensors while loading.
pub fn load_single_file(path: &Path, options: LoadOptions) -> Result<StableDiffusion> {
    let in_place_before = super::mapped::in_place_bytes_on_this_thread();
    let keys = open_keys(path)?;
    let info = inspect_keys(&keys)?;
    let names = keys.names;
    let (dtype, device) = (options.weights_dtype(options.dtype), options.device.clone());
    // Checked first: a refused bf16 mode should not cost a text-encoder load.
    let unet_dtype = options.unet_weights_dtype()?;
    let wrap = |what: &str, e: candle_core::Error| Error::Model {
        path: path.to_path_buf(),
        message: format!("{what}: {}", candle_message(e)),
    };

    let layers = info.unet.layers_per_block_count();
    let unet_names = names.clone();
    let unet_weights = weights(
        path,
        move |name| {
            let ldm = ldm_unet_name(name, layers)?;
            let full = format!("{UNET}{ldm}");
            if full.contains(".?.") {
                // The upsampler follows the attention when the block has one.
                let after_attention = full.replace(".?.", ".2.");
                let full =
                    if unet_names.contains(&after_attention) { after_attention } else { full.replace(".?.", ".1.") };
                return Some(Source::Plain(full));
            }
            Some(Source::Plain(full))
        },
        unet_dtype,
        &device,
    )?;
    let (unet, unet_pages) = unet_weights
        .build_with_pages(options.map_weights, |vb| {
            let _scope = super::lora::component("unet");
            UNet2DConditionModel::new(vb, info.unet.clone())
        })
        .map_err(|e| wrap("the U-Net does not match its inferred shape", e))?;

    let (vae, vae_pages) = super::load_vae(&info, &options)?;

    let prefixed = |prefix: &'static str| move |name: &str| Some(Source::Plain(format!("{prefix}{name}")));
    let open_clip = |prefix: &'static str| {
        move |name: &str| {
            Some(match open_clip_source(name)? {
                Source::Plain(s) => Source::Plain(format!("{prefix}{s}")),
                Source::QkvPart { name, index } => Source::QkvPart { name: format!("{prefix}{name}"), index },
                Source::Transposed(s) => Source::Transposed(format!("{prefix}{s}")),
                other => other,
            })
        }
    };
    let (te1, te2) = match info.family {
        Family::Sd1 => (weights(path, prefixed(SD1_CLIP), dtype, &device)?, None),
        Family::Sd2 => (weights(path, open_clip(SD2_CLIP), dtype, &device)?, None),
        Family::Sdxl => (
            weights(path, prefixed(SDXL_CLIP_L), dtype, &device)?,
            Some(weights(path, open_clip(SDXL_CLIP_G), dtype, &device)?),
        ),
    };
    let map = options.map_weights;
    let (text_encoder, mut text_pages) = te1
        .build_with_pages(map, |vb| {
            let _scope = super::lora::component("text_encoder");
            ClipTextModel::new(vb, info.text_encoder.clone(), false)
        })
        .map_err(|e| wrap("the text encoder does not match its inferred shape", e))?;
    let text_encoder_2 = match (te2, &info.text_encoder_2) {
        (Some(weights), Some(config)) => {
            let (model, pages) = weights
                .build_with_pages(map, |vb| {
                    let _scope = super::lora::component("text_encoder_2");
                    ClipTextModel::new(vb, config.clone(), true)
                })
                .map_err(|e| wrap("the second text encoder does not match its inferred shape", e))?;
            text_pages = text_pages.and(pages);
            Some(model)
        }
        _ => None,
    };
    let weights_in_place = super::mapped::in_place_bytes_on_this_thread() - in_place_before;
    let pages = ComponentPages { text_encoders: text_pages, unet: unet_pages, vae: vae_pages };
    let adapters = super::lora::Adapters::default();
    Ok(StableDiffusion { info, text_encoder, text_encoder_2, unet, vae, options, weights_in_place, pages, adapters })
}

/// The VAE inside a single-file checkpoint (also used to redo a decode in f32).
pub fn load_checkpoint_vae<T>(
    info: &ModelInfo,
    options: &LoadOptions,
    build: fn(VarBuilder<'static>, VaeConfig) -> candle_core::Result<T>,
) -> Result<(T, MappedPages)> {
    let path = info.path.as_path();
    let weights = ldm_vae_weights(path, VAE, info.vae.block_out_channels.len(), options)?;
    weights.build_with_pages(options.map_weights, |vb| build(vb, info.vae.clone())).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        message: format!("the VAE does not match its inferred shape: {}", candle_message(e)),
    })
}

/// A standalone VAE file, in the original naming (optionally under `first_stage_model.`) or in
/// diffusers' naming; its shape is inferred, its scaling factor is the family's.
pub fn load_vae_file<T>(
    path: &Path,
    family: Family,
    options: &LoadOptions,
    build: fn(VarBuilder<'static>, VaeConfig) -> candle_core::Result<T>,
) -> Result<(T, MappedPages)> {
    let keys = open_keys(path)?;
    let prefix = if keys.any_prefix(VAE) { VAE } else { "" };
    let diffusers_names = keys.any_prefix("decoder.up_blocks.");
    if !keys.any_prefix(&format!("{prefix}decoder.")) {
        return Err(keys.error("not a VAE: no decoder.* tensors"));
    }
    let config = if diffusers_names {
        let levels = keys.count(|i| format!("decoder.up_blocks.{i}."));
        let mut channels = (0..levels)
            .map(|i| keys.dim(&format!("decoder.up_blocks.{i}.resnets.0.conv2.weight"), 0))
            .collect::<Result<Vec<_>>>()?;
        channels.reverse();
        let layers = keys.count(|j| format!("decoder.up_blocks.0.resnets.{j}.")).saturating_sub(1);
        vae_config(&keys, channels, layers, keys.dim("decoder.conv_in.weight", 1)?, family)?
    } else {
        let levels = keys.count(|i| format!("{prefix}decoder.up.{i}."));
        let channels = (0..levels)
            .map(|i| keys.dim(&format!("{prefix}decoder.up.{i}.block.0.conv2.weight"), 0))
            .collect::<Result<Vec<_>>>()?;
        let layers = keys.count(|j| format!("{prefix}decoder.up.0.block.{j}.")).saturating_sub(1);
        vae_config(&keys, channels, layers, keys.dim(&format!("{prefix}decoder.conv_in.weight"), 1)?, family)?
    };
    let weights = if diffusers_names {
        super::model_weights(&[path.to_path_buf()], options.weights_dtype(options.vae_dtype), &options.device)?
    } else {
        ldm_vae_weights(path, prefix, config.block_out_channels.len(), options)?
    };
    weights
        .build_with_pages(options.map_weights, |vb| build(vb, config))
        .map_err(|e| keys.error(format!("the VAE does not match its inferred shape: {}", candle_message(e))))
}

/// A VAE in the original naming under `prefix` (`first_stage_model.` in checkpoints, none in
/// standalone files), served under diffusers' names.
fn ldm_vae_weights(path: &Path, prefix: &'static str, levels: usize, options: &LoadOptions) -> Result<ModelWeights> {
    let resolve = move |name: &str| {
        Some(match ldm_vae_source(name, levels)? {
            Source::Plain(s) => Source::Plain(format!("{prefix}{s}")),
            Source::Conv1x1AsLinear(s) => Source::Conv1x1AsLinear(format!("{prefix}{s}")),
            other => other,
        })
    };
    weights(path, resolve, options.weights_dtype(options.vae_dtype), &options.device)
}

fn vae_config(keys: &Keys, channels: Vec<usize>, layers: usize, latent: usize, family: Family) -> Result<VaeConfig> {
    let config = json!({
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": latent,
        "scaling_factor": if family == Family::Sdxl { 0.13025 } else { 0.18215 },
        "force_upcast": family == Family::Sdxl,
    });
    serde_json::from_value(config).map_err(|e| keys.error(format!("could not describe the VAE: {e}")))
}
