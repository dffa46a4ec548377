//! Thin constructors over candle-nn layers, named the way diffusers names weights.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
pub use candle_nn::{LayerNorm, Linear};

use crate::kernels::{self, Conv2dOp, GroupNormOp};

/// A 2-D convolution that runs Easel's own CPU kernel for f32 on the CPU and candle's
/// convolution everywhere else (GPU, f16/bf16).
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    stride: usize,
    padding: usize,
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self.inner.bias() {
            Some(bias) if kernels::applies_to(xs) && self.inner.weight().dtype() == xs.dtype() => {
                let op = Conv2dOp { stride: self.stride, padding: self.padding };
                xs.contiguous()?.apply_op3_no_bwd(&self.inner.weight().contiguous()?, bias, &op)
            }
            _ => self.inner.forward(xs),
        }
    }
}

/// GroupNorm with an optional fused SiLU (Easel's CPU kernel for f32 on the CPU, candle-nn's
/// GroupNorm otherwise).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// `silu(group_norm(xs))`, the pair every ResNet block starts with.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, true)
    }

    fn forward_with(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        if kernels::applies_to(xs) && self.weight.dtype() == xs.dtype() {
            let op = GroupNormOp { groups: self.groups, eps: self.eps, silu };
            return xs.contiguous()?.apply_op3_no_bwd(&self.weight, &self.bias, &op);
        }
        let normed = self.inner.forward(xs)?;
        if silu {
            normed.silu()
        } else {
            Ok(normed)
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, false)
    }
}

pub fn conv2d(
    in_ch: usize,
    out_ch: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    Ok(Conv2d { inner: candle_nn::conv2d(in_ch, out_ch, kernel, cfg, vb)?, stride, padding })
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get(channels, "weight")?.contiguous()?;
    let bias = vb.get(channels, "bias")?.contiguous()?;
    let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm { inner, weight, bias, groups, eps })
}

pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    candle_nn::layer_norm(size, eps, vb)
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(in_dim, out_dim, vb)
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb)
}
