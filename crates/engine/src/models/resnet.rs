//! diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::nn::{conv2d, group_norm, linear, Conv2d, GroupNorm, Linear};

#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// `None` for the VAE, whose blocks take no time embedding.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cfg: &ResnetConfig) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let conv_shortcut = if cin != cout { Some(conv2d(cin, cout, 1, 1, 0, vb.pp("conv_shortcut"))?) } else { None };
        Ok(Self {
            norm1: group_norm(cfg.groups, cin, cfg.eps, vb.pp("norm1"))?,
            conv1: conv2d(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: cfg.temb_channels.map(|t| linear(t, cout, vb.pp("time_emb_proj"))).transpose()?,
            norm2: group_norm(cfg.groups, cout, cfg.eps, vb.pp("norm2"))?,
            conv2: conv2d(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    /// `temb` must already have gone through SiLU (the U-Net applies it once for all blocks).
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        self.forward_owned(xs.clone(), temb)
    }

    /// [`Self::forward`] taking the input by value. With a shortcut convolution the input is
    /// needed only by it and the first norm, so both run first and the input — in the U-Net's
    /// up blocks a concatenation with the skip, the widest activation of its level — is freed
    /// (if the caller held no other handle) before the 3×3 convolutions and their scratch.
    pub fn forward_owned(&self, xs: Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let (residual, normed) = match &self.conv_shortcut {
            Some(shortcut) => {
                let residual = shortcut.forward(&xs)?;
                let normed = self.norm1.forward_silu(&xs)?;
                // A parameter lives to the end of the function unless moved: free the (up path's
                // concatenated, widest) input before the convolutions.
                drop(xs);
                (residual, normed)
            }
            None => {
                let normed = self.norm1.forward_silu(&xs)?;
                (xs, normed)
            }
        };
        let mut h = self.conv1.forward(&normed)?;
        drop(normed);
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(temb)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        // Reassigned, not shadowed: a shadowed `h` would stay alive to the end of the block.
        h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        crate::kernels::add_residual(h, &residual)
    }
}

/// Stride-2 3×3 convolution (`downsamplers.0.conv`).
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self { conv: conv2d(channels, channels, 3, 2, padding, vb.pp("conv"))? })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv.forward(xs)
    }

    /// The VAE encoder pads asymmetrically (0,1,0,1) before an unpadded stride-2 conv.
    pub fn forward_asymmetric(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
        self.conv.forward(&xs)
    }
}

/// Nearest-neighbour ×2 (or to an explicit size) followed by a 3×3 conv (`upsamplers.0.conv`).
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self { conv: conv2d(channels, channels, 3, 1, 1, vb.pp("conv"))? })
    }

    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((h * 2, w * 2));
        let up = xs.upsample_nearest2d(th, tw)?;
        self.conv.forward(&up)
    }
}
