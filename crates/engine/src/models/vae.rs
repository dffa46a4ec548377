//! diffusers' `AutoencoderKL`, built from `vae/config.json`: the decoder (latents → pixels), and
//! the encoder (pixels → the latent distribution) that image-to-image loads when it needs it.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::attention::VaeAttention;
use super::nn::{conv2d, group_norm, Conv2d, GroupNorm};
use super::resnet::{ResnetBlock2D, ResnetConfig, Upsample2D};

fn default_true() -> bool {
    true
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_groups() -> usize {
    32
}
fn default_four() -> usize {
    4
}
fn default_three() -> usize {
    3
}

#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_three")]
    pub out_channels: usize,
    #[serde(default = "default_four")]
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    /// SDXL's VAE overflows in f16: it must be decoded in f32.
    #[serde(default)]
    pub force_upcast: bool,
}

impl VaeConfig {
    /// How many pixels one latent covers along each axis (8 for every real SD VAE).
    pub fn downscale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// What makes this config impossible to build, if anything (checked when it is read, so
    /// a broken config is a message rather than a division by zero inside a layer).
    pub fn problem(&self) -> Option<String> {
        let ch = &self.block_out_channels;
        if ch.is_empty() || ch.contains(&0) || ch.len() > 6 {
            return Some(format!("block_out_channels {ch:?} (expected 1 to 6 non-zero values)"));
        }
        if self.norm_num_groups == 0 || ch.iter().any(|c| c % self.norm_num_groups != 0) {
            return Some(format!("norm_num_groups {} does not divide block_out_channels {ch:?}", self.norm_num_groups));
        }
        if self.latent_channels == 0 || self.out_channels == 0 || self.layers_per_block == 0 {
            return Some("latent_channels, out_channels or layers_per_block is zero".into());
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return Some(format!("scaling_factor {}", self.scaling_factor));
        }
        None
    }
}

/// A VAE resnet: no time embedding, GroupNorm eps 1e-6 (encoder and decoder alike).
fn vae_resnet(vb: VarBuilder, cin: usize, cout: usize, groups: usize) -> Result<ResnetBlock2D> {
    ResnetBlock2D::new(
        vb,
        &ResnetConfig { in_channels: cin, out_channels: cout, temb_channels: None, groups, eps: 1e-6 },
    )
}

#[derive(Debug)]
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

#[derive(Debug)]
pub struct VaeDecoder {
    config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnets: [ResnetBlock2D; 2],
    mid_attention: Option<VaeAttention>,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    /// `vb` points at the root of the VAE's weights (the decoder lives under `decoder.`).
    pub fn new(vb: VarBuilder, config: VaeConfig) -> Result<Self> {
        let ch = &config.block_out_channels;
        if ch.is_empty() {
            candle_core::bail!("VAE config has no block_out_channels");
        }
        let groups = config.norm_num_groups;
        let latent = config.latent_channels;
        let top = ch[ch.len() - 1];
        let resnet = |vb: VarBuilder, cin: usize, cout: usize| vae_resnet(vb, cin, cout, groups);
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv2d(latent, latent, 1, 1, 0, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        let dec = vb.pp("decoder");
        let mid = dec.pp("mid_block");
        let mid_resnets = [resnet(mid.pp("resnets.0"), top, top)?, resnet(mid.pp("resnets.1"), top, top)?];
        let mid_attention = if config.mid_block_add_attention {
            Some(VaeAttention::new(mid.pp("attentions.0"), top, groups)?)
        } else {
            None
        };
        let reversed: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(ch.len());
        let mut cin = top;
        for (i, &cout) in reversed.iter().enumerate() {
            let vb = dec.pp(format!("up_blocks.{i}"));
            let resnets = (0..=config.layers_per_block)
                .map(|j| resnet(vb.pp(format!("resnets.{j}")), if j == 0 { cin } else { cout }, cout))
                .collect::<Result<Vec<_>>>()?;
            let upsampler =
                if i + 1 < reversed.len() { Some(Upsample2D::new(vb.pp("upsamplers.0"), cout)?) } else { None };
            up_blocks.push(UpDecoderBlock { resnets, upsampler });
            cin = cout;
        }
        Ok(Self {
            conv_in: conv2d(latent, top, 3, 1, 1, dec.pp("conv_in"))?,
            conv_norm_out: group_norm(groups, ch[0], 1e-6, dec.pp("conv_norm_out"))?,
            conv_out: conv2d(ch[0], config.out_channels, 3, 1, 1, dec.pp("conv_out"))?,
            config,
            post_quant_conv,
            mid_resnets,
            mid_attention,
            up_blocks,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Decodes latents that are already divided by the scaling factor (as diffusers'
    /// `vae.decode(latents / scaling_factor)`). Output is in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut xs = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        xs = self.conv_in.forward(&xs)?;
        xs = self.mid_resnets[0].forward(&xs, None)?;
        if let Some(attn) = &self.mid_attention {
            xs = attn.forward(&xs)?;
        }
        xs = self.mid_resnets[1].forward(&xs, None)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(up) = &block.upsampler {
                xs = up.forward(&xs, None)?;
            }
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

#[derive(Debug)]
struct DownEncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    /// diffusers' `Downsample2D` with padding 0: pads one zero row and column at the bottom and
    /// right, then a stride-2 convolution.
    downsampler: Option<Conv2d>,
}

/// The encoder half of `AutoencoderKL`, with `quant_conv`: pixels in [-1, 1] to the mean and
/// log-variance of the latent distribution.
#[derive(Debug)]
pub struct VaeEncoder {
    config: VaeConfig,
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock>,
    mid_resnets: [ResnetBlock2D; 2],
    mid_attention: Option<VaeAttention>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

/// The latent distribution of an image (diffusers' `DiagonalGaussianDistribution`).
pub struct LatentDistribution {
    pub mean: Tensor,
    pub std: Tensor,
}

impl LatentDistribution {
    /// `mean + std × noise`, with `noise` drawn as diffusers' `latent_dist.sample(generator)`.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        self.mean.add(&self.std.mul(noise)?)
    }
}

impl VaeEncoder {
    /// `vb` points at the root of the VAE's weights (the encoder lives under `encoder.`).
    pub fn new(vb: VarBuilder, config: VaeConfig) -> Result<Self> {
        let ch = &config.block_out_channels;
        if ch.is_empty() {
            candle_core::bail!("VAE config has no block_out_channels");
        }
        let groups = config.norm_num_groups;
        let top = ch[ch.len() - 1];
        let resnet = |vb: VarBuilder, cin: usize, cout: usize| vae_resnet(vb, cin, cout, groups);
        let enc = vb.pp("encoder");
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let vb = enc.pp(format!("down_blocks.{i}"));
            let resnets = (0..config.layers_per_block)
                .map(|j| resnet(vb.pp(format!("resnets.{j}")), if j == 0 { cin } else { cout }, cout))
                .collect::<Result<Vec<_>>>()?;
            let downsampler =
                if i + 1 < ch.len() { Some(conv2d(cout, cout, 3, 2, 0, vb.pp("downsamplers.0.conv"))?) } else { None };
            down_blocks.push(DownEncoderBlock { resnets, downsampler });
            cin = cout;
        }
        let mid = enc.pp("mid_block");
        let latent = config.latent_channels;
        Ok(Self {
            conv_in: conv2d(config.in_channels, ch[0], 3, 1, 1, enc.pp("conv_in"))?,
            mid_resnets: [resnet(mid.pp("resnets.0"), top, top)?, resnet(mid.pp("resnets.1"), top, top)?],
            mid_attention: if config.mid_block_add_attention {
                Some(VaeAttention::new(mid.pp("attentions.0"), top, groups)?)
            } else {
                None
            },
            conv_norm_out: group_norm(groups, top, 1e-6, enc.pp("conv_norm_out"))?,
            conv_out: conv2d(top, 2 * latent, 3, 1, 1, enc.pp("conv_out"))?,
            quant_conv: if config.use_quant_conv {
                Some(conv2d(2 * latent, 2 * latent, 1, 1, 0, vb.pp("quant_conv"))?)
            } else {
                None
            },
            down_blocks,
            config,
        })
    }

    /// Pixels in [-1, 1] (N, 3, H, W) to the latent distribution (not yet times the scaling
    /// factor), as diffusers' `vae.encode(image).latent_dist`.
    pub fn encode(&self, image: &Tensor) -> Result<LatentDistribution> {
        let mut xs = self.conv_in.forward(image)?;
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(conv) = &block.downsampler {
                xs = conv.forward(&xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        xs = self.mid_resnets[0].forward(&xs, None)?;
        if let Some(attn) = &self.mid_attention {
            xs = attn.forward(&xs)?;
        }
        xs = self.mid_resnets[1].forward(&xs, None)?;
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        let mut moments = self.conv_out.forward(&xs)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments)?;
        }
        let latent = self.config.latent_channels;
        let mean = moments.narrow(1, 0, latent)?;
        let logvar = moments.narrow(1, latent, latent)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(LatentDistribution { mean, std })
    }
}
