//! The decoder half of diffusers' `AutoencoderKL` (latents → pixels), built from `vae/config.json`.

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
        let resnet = |vb: VarBuilder, cin: usize, cout: usize| {
            ResnetBlock2D::new(
                vb,
                &ResnetConfig { in_channels: cin, out_channels: cout, temb_channels: None, groups, eps: 1e-6 },
            )
        };
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
