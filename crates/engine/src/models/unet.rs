//! diffusers' `UNet2DConditionModel` for SD 1.x, SD 2.x and SDXL (incl. the Turbo variants),
//! built from the model's own `unet/config.json`.
//!
//! Written here instead of using candle-transformers' U-Net: that one lacks SDXL's
//! `text_time` additional embedding (so SDXL cannot match diffusers) and leaves no room for
//! the CPU kernels Easel needs to beat diffusers' speed.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::attention::{SpatialTransformer, SpatialTransformerConfig};
use super::nn::{conv2d, group_norm, linear, Conv2d, GroupNorm, Linear};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};

/// A config value diffusers accepts either once for all blocks or per block (also: one level's
/// transformer depth, once or per layer, as in SSD-1B and Segmind Vega).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn get(&self, block: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v.get(block).or(v.last()).copied().unwrap_or(1),
        }
    }
}

/// `transformer_layers_per_block`: once for all levels, or per level (each once or per layer).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Depths {
    One(usize),
    Each(Vec<PerBlock>),
}

impl Depths {
    fn level(&self, level: usize) -> PerBlock {
        match self {
            Depths::One(v) => PerBlock::One(*v),
            Depths::Each(v) => v.get(level).or(v.last()).cloned().unwrap_or(PerBlock::One(1)),
        }
    }
}

/// diffusers' default mid block when a config does not name one; an explicit `null` means none
/// (BK-SDM removes it).
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

fn nullable<'de, D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Option<String>, D::Error> {
    Option::<String>::deserialize(deserializer)
}

fn default_true() -> bool {
    true
}
fn default_one() -> usize {
    1
}
fn default_eps() -> f64 {
    1e-5
}
fn default_groups() -> usize {
    32
}

#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "default_four")]
    pub in_channels: usize,
    #[serde(default = "default_four")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid_block", deserialize_with = "nullable")]
    pub mid_block_type: Option<String>,
    pub layers_per_block: PerBlock,
    /// Despite the name, diffusers uses this as the number of heads when
    /// `num_attention_heads` is absent (a historical naming bug kept for compatibility).
    #[serde(default)]
    pub attention_head_dim: Option<PerBlock>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: PerBlock,
    #[serde(default)]
    pub transformer_layers_per_block: Option<Depths>,
    /// The up blocks' depths where they do not mirror the down blocks (diffusers requires it
    /// with per-layer depths), per up block, deepest level first.
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<PerBlock>>,
    /// The time embedding's width; diffusers' default is 4 × the first level's channels.
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_one")]
    pub downsample_padding: usize,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn default_four() -> usize {
    4
}

impl UNetConfig {
    /// Settings of `UNet2DConditionModel` that Easel does not implement, named for the user.
    pub fn unsupported(&self) -> Option<String> {
        if let Some(kind) = &self.class_embed_type {
            return Some(format!("class_embed_type \"{kind}\""));
        }
        if let Some(kind) = &self.addition_embed_type {
            if kind != "text_time" {
                return Some(format!("addition_embed_type \"{kind}\""));
            }
        }
        if self.time_cond_proj_dim.is_some() {
            return Some("time_cond_proj_dim (LCM-distilled U-Net)".into());
        }
        if let Some(mid) = &self.mid_block_type {
            if mid != "UNetMidBlock2DCrossAttn" {
                return Some(format!("mid_block_type \"{mid}\""));
            }
        }
        let uneven = match &self.transformer_layers_per_block {
            Some(Depths::Each(levels)) => levels.iter().any(|level| matches!(level, PerBlock::Each(_))),
            _ => false,
        };
        if uneven && self.reverse_transformer_layers_per_block.is_none() {
            // As diffusers: the up blocks' per-layer depths cannot be guessed.
            return Some("per-layer transformer_layers_per_block without reverse_transformer_layers_per_block".into());
        }
        if self.time_embedding_dim == Some(0) {
            return Some("time_embedding_dim is zero".into());
        }
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if !matches!(t.as_str(), "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D") {
                return Some(format!("block type \"{t}\""));
            }
        }
        if self.down_block_types.len() != self.block_out_channels.len()
            || self.up_block_types.len() != self.block_out_channels.len()
        {
            return Some("block_out_channels and block types of different lengths".into());
        }
        // Numbers that would otherwise divide by zero or index past the end while building.
        if self.block_out_channels.is_empty() || self.block_out_channels.contains(&0) {
            return Some("block_out_channels empty or with a zero".into());
        }
        if self.norm_num_groups == 0 || self.block_out_channels.iter().any(|c| c % self.norm_num_groups != 0) {
            return Some(format!(
                "norm_num_groups {} does not divide block_out_channels {:?}",
                self.norm_num_groups, self.block_out_channels
            ));
        }
        let with_attention = self.down_block_types.iter().map(|t| t.starts_with("CrossAttn"));
        for (block, (&channels, _)) in
            self.block_out_channels.iter().zip(with_attention).enumerate().filter(|(_, (_, a))| *a)
        {
            let heads = self.heads(block);
            if heads == 0 || channels % heads != 0 {
                return Some(format!("{heads} attention heads for {channels} channels"));
            }
        }
        if self.layers_per_block_count() == 0 || self.in_channels == 0 || self.context_dim() == 0 {
            return Some("layers_per_block, in_channels or cross_attention_dim is zero".into());
        }
        None
    }

    fn heads(&self, block: usize) -> usize {
        self.num_attention_heads.as_ref().or(self.attention_head_dim.as_ref()).map(|h| h.get(block)).unwrap_or(8)
    }

    /// Transformer blocks in layer `layer` of down block `level`.
    pub fn down_depth(&self, level: usize, layer: usize) -> usize {
        self.transformer_layers_per_block.as_ref().map(|t| t.level(level).get(layer)).unwrap_or(1)
    }

    /// Transformer blocks in the mid block (diffusers: the last level's entry, first layer).
    pub fn mid_depth(&self) -> usize {
        self.down_depth(self.block_out_channels.len().saturating_sub(1), 0)
    }

    /// Transformer blocks in layer `layer` of up block `block` (block 0 mirrors the deepest level).
    pub fn up_depth(&self, block: usize, layer: usize) -> usize {
        match &self.reverse_transformer_layers_per_block {
            Some(reverse) => reverse.get(block).or(reverse.last()).map(|d| d.get(layer)).unwrap_or(1),
            None => self.down_depth(self.block_out_channels.len().saturating_sub(1).saturating_sub(block), layer),
        }
    }

    /// The time embedding's width.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim.unwrap_or(self.block_out_channels.first().copied().unwrap_or(0) * 4)
    }

    /// Resnets per down block (the same at every level in every SD model).
    pub fn layers_per_block_count(&self) -> usize {
        self.layers_per_block.get(0)
    }

    pub fn is_sdxl(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    pub fn context_dim(&self) -> usize {
        self.cross_attention_dim.get(0)
    }
}

/// Sinusoidal embedding of timesteps (diffusers' `get_timestep_embedding`), computed in f32 in
/// the same order of operations as torch so the embedding is bit-compatible.
pub fn timestep_embedding(
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let denom = half as f32 - freq_shift as f32;
    let log_max_period = (10000f64).ln() as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((-log_max_period * i as f32) / denom).exp()).collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
        if flip_sin_to_cos {
            data.extend(cos);
            data.extend(sin);
        } else {
            data.extend(sin);
            data.extend(cos);
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_vec(data, (timesteps.len(), dim), device)
}

#[derive(Debug)]
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: linear(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(xs)?.silu()?)
    }
}

#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Downsample2D>,
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Upsample2D>,
}

#[derive(Debug)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
}

/// SDXL's extra conditioning: pooled text embedding plus the six size/crop numbers.
pub struct AddedCond<'a> {
    pub text_embeds: &'a Tensor,
    pub time_ids: &'a Tensor,
}

#[derive(Debug)]
struct AddEmbedding {
    time_dim: usize,
    embedding: TimestepEmbedding,
}

#[derive(Debug)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<AddEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, config: UNetConfig) -> Result<Self> {
        if let Some(what) = config.unsupported() {
            candle_core::bail!("unsupported U-Net setting: {what}");
        }
        let ch = &config.block_out_channels;
        let n_blocks = ch.len();
        let time_embed_dim = config.time_embed_dim();
        let groups = config.norm_num_groups;
        let context_dim = config.context_dim();
        let resnet = |vb: VarBuilder, cin: usize, cout: usize| {
            ResnetBlock2D::new(
                vb,
                &ResnetConfig {
                    in_channels: cin,
                    out_channels: cout,
                    temb_channels: Some(time_embed_dim),
                    groups,
                    eps: config.norm_eps,
                },
            )
        };
        let transformer = |vb: VarBuilder, channels: usize, block: usize, depth: usize| {
            SpatialTransformer::new(
                vb,
                &SpatialTransformerConfig {
                    channels,
                    heads: config.heads(block),
                    layers: depth,
                    context_dim,
                    norm_groups: groups,
                    use_linear_projection: config.use_linear_projection,
                },
            )
        };

        let conv_in = conv2d(config.in_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], time_embed_dim)?;
        let add_embedding = if config.is_sdxl() {
            let (Some(time_dim), Some(in_dim)) =
                (config.addition_time_embed_dim, config.projection_class_embeddings_input_dim)
            else {
                candle_core::bail!(
                    "SDXL U-Net config lacks addition_time_embed_dim / projection_class_embeddings_input_dim"
                );
            };
            Some(AddEmbedding {
                time_dim,
                embedding: TimestepEmbedding::new(vb.pp("add_embedding"), in_dim, time_embed_dim)?,
            })
        } else {
            None
        };

        let mut down_blocks = Vec::with_capacity(n_blocks);
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let cin_block = if i == 0 { ch[0] } else { ch[i - 1] };
            let cout = ch[i];
            let layers = config.layers_per_block.get(i);
            let with_attention = kind.starts_with("CrossAttn");
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let cin = if j == 0 { cin_block } else { cout };
                resnets.push(resnet(vb.pp(format!("resnets.{j}")), cin, cout)?);
                if with_attention {
                    attentions.push(transformer(vb.pp(format!("attentions.{j}")), cout, i, config.down_depth(i, j))?);
                }
            }
            let downsampler = if i + 1 < n_blocks {
                Some(Downsample2D::new(vb.pp("downsamplers.0"), cout, config.downsample_padding)?)
            } else {
                None
            };
            down_blocks.push(DownBlock { resnets, attentions, downsampler });
        }

        let last = n_blocks - 1;
        let mid_channels = ch[last];
        let mid_vb = vb.pp("mid_block");
        let mid_block = match config.mid_block_type {
            Some(_) => Some(MidBlock {
                resnets: vec![
                    resnet(mid_vb.pp("resnets.0"), mid_channels, mid_channels)?,
                    resnet(mid_vb.pp("resnets.1"), mid_channels, mid_channels)?,
                ],
                attentions: vec![transformer(mid_vb.pp("attentions.0"), mid_channels, last, config.mid_depth())?],
            }),
            None => None,
        };

        let mut up_blocks = Vec::with_capacity(n_blocks);
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let level = last - i; // the down level this up block mirrors
            let cout = ch[level];
            let prev_out = if i == 0 { ch[last] } else { ch[level + 1] };
            let skip_in = ch[level.saturating_sub(1)];
            let layers = config.layers_per_block.get(level) + 1;
            let with_attention = kind.starts_with("CrossAttn");
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { skip_in } else { cout };
                let res_in = if j == 0 { prev_out } else { cout };
                resnets.push(resnet(vb.pp(format!("resnets.{j}")), res_in + skip, cout)?);
                if with_attention {
                    attentions.push(transformer(vb.pp(format!("attentions.{j}")), cout, level, config.up_depth(i, j))?);
                }
            }
            let upsampler = if i < last { Some(Upsample2D::new(vb.pp("upsamplers.0"), cout)?) } else { None };
            up_blocks.push(UpBlock { resnets, attentions, upsampler });
        }

        Ok(Self {
            conv_norm_out: group_norm(groups, ch[0], config.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(ch[0], config.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
            config,
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// One denoiser evaluation. `timestep` is broadcast over the batch, as diffusers does.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f32,
        encoder_hidden_states: &Tensor,
        added: Option<AddedCond>,
    ) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        let device = sample.device();
        let dtype = sample.dtype();
        let t_emb = timestep_embedding(
            &vec![timestep; batch],
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            device,
        )?;
        let mut emb = self.time_embedding.forward(&t_emb.to_dtype(dtype)?)?;
        if let Some(add) = &self.add_embedding {
            let Some(added) = added else {
                candle_core::bail!("SDXL U-Net called without pooled text embeddings and time ids");
            };
            let ids: Vec<f32> = added.time_ids.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let time_embeds =
                timestep_embedding(&ids, add.time_dim, self.config.flip_sin_to_cos, self.config.freq_shift, device)?
                    .reshape((batch, ()))?
                    .to_dtype(dtype)?;
            let add_input = Tensor::cat(&[added.text_embeds.to_dtype(dtype)?, time_embeds], 1)?;
            emb = (emb + add.embedding.forward(&add_input)?)?;
        }
        // Every resnet applies SiLU to the embedding before its projection: do it once.
        let emb = emb.silu()?;

        let mut xs = self.conv_in.forward(sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                xs = resnet.forward(&xs, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, encoder_hidden_states)?;
                }
                skips.push(xs.clone());
            }
            if let Some(down) = &block.downsampler {
                xs = down.forward(&xs)?;
                skips.push(xs.clone());
            }
        }

        if let Some(mid) = &self.mid_block {
            xs = mid.resnets[0].forward(&xs, Some(&emb))?;
            xs = mid.attentions[0].forward(&xs, encoder_hidden_states)?;
            xs = mid.resnets[1].forward(&xs, Some(&emb))?;
        }

        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let Some(skip) = skips.pop() else {
                    candle_core::bail!("U-Net skip connections exhausted");
                };
                // The halves are dropped once concatenated: only the concatenation is needed.
                xs = Tensor::cat(&[&xs, &skip], 1)?;
                drop(skip);
                xs = resnet.forward_owned(xs, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, encoder_hidden_states)?;
                }
            }
            if let Some(up) = &block.upsampler {
                // Upsample to the size of the next skip so odd latent sizes line up (diffusers'
                // forward_upsample_size).
                let size = match skips.last() {
                    Some(s) => {
                        let (_, _, h, w) = s.dims4()?;
                        Some((h, w))
                    }
                    None => None,
                };
                xs = up.forward(&xs, size)?;
            }
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}
