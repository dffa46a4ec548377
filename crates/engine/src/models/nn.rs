//! Thin constructors over candle-nn layers, named the way diffusers names weights.

use candle_core::Result;
pub use candle_nn::{Conv2d, GroupNorm, LayerNorm, Linear};
use candle_nn::{Conv2dConfig, VarBuilder};

pub fn conv2d(
    in_ch: usize,
    out_ch: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    candle_nn::conv2d(in_ch, out_ch, kernel, cfg, vb)
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    candle_nn::group_norm(groups, channels, eps, vb)
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
