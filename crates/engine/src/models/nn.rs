//! Thin constructors over candle-nn layers, named the way diffusers names weights.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
pub use candle_nn::LayerNorm;
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::kernels::{self, Conv2dOp, GroupNormOp};

/// Whether a layer built from `vb` keeps its weights in Easel's packed bf16 form: the CPU bf16
/// mode loads the U-Net with dtype bf16 (activations stay f32).
fn packed_bf16(vb: &VarBuilder, even_inner_dim: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        vb.dtype() == DType::BF16 && vb.device().is_cpu() && even_inner_dim && kernels::bf16::supported()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (vb, even_inner_dim);
        false
    }
}

/// A bf16 tensor's raw bits, row-major.
fn bf16_bits(t: &Tensor) -> Result<Vec<u16>> {
    Ok(t.flatten_all()?.to_vec1::<half::bf16>()?.into_iter().map(|v| v.to_bits()).collect())
}

/// Where the layers that are not packed load their weights: in the CPU bf16 mode only the packed
/// convolutions and linear layers keep bf16, everything else (norms, odd-sized layers) is f32
/// like the activations.
fn unpacked(vb: VarBuilder) -> VarBuilder {
    if vb.dtype() == DType::BF16 && vb.device().is_cpu() {
        vb.set_dtype(DType::F32)
    } else {
        vb
    }
}

/// A 2-D convolution: Easel's own CPU kernel for f32 on the CPU, its bf16 kernel in the CPU
/// bf16 mode, and candle's convolution everywhere else (GPU, f16).
#[derive(Debug, Clone)]
pub enum Conv2d {
    Candle { inner: candle_nn::Conv2d, stride: usize, padding: usize },
    Bf16(Arc<kernels::Conv2dBf16Op>),
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Bf16(op) => xs.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(op.as_ref()),
            Self::Candle { inner, stride, padding } => match inner.bias() {
                Some(bias) if kernels::applies_to(xs) && inner.weight().dtype() == xs.dtype() => {
                    let op = Conv2dOp { stride: *stride, padding: *padding };
                    xs.contiguous()?.apply_op3_no_bwd(&inner.weight().contiguous()?, bias, &op)
                }
                _ => inner.forward(xs),
            },
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
    if packed_bf16(&vb, (in_ch * kernel * kernel).is_multiple_of(2)) {
        let weight = vb.get((out_ch, in_ch, kernel, kernel), "weight")?;
        let bias = vb.get(out_ch, "bias")?.to_dtype(DType::F32)?;
        let bits = bf16_bits(&weight)?;
        let op = kernels::Conv2dBf16Op::new(&bits, bias.to_vec1()?, out_ch, in_ch, kernel, stride, padding);
        return Ok(Conv2d::Bf16(Arc::new(op)));
    }
    Ok(Conv2d::Candle { inner: candle_nn::conv2d(in_ch, out_ch, kernel, cfg, unpacked(vb))?, stride, padding })
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let vb = unpacked(vb);
    let weight = vb.get(channels, "weight")?.contiguous()?;
    let bias = vb.get(channels, "bias")?.contiguous()?;
    let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm { inner, weight, bias, groups, eps })
}

pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    candle_nn::layer_norm(size, eps, unpacked(vb))
}

/// A linear layer: candle-nn's, or in the CPU bf16 mode Easel's bf16 kernel with the weight
/// pre-packed once at load.
#[derive(Debug, Clone)]
pub enum Linear {
    Candle(candle_nn::Linear),
    Bf16(Arc<kernels::LinearBf16Op>),
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(inner) => inner.forward(xs),
            Self::Bf16(op) => xs.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(op.as_ref()),
        }
    }
}

fn linear_maybe_bias(in_dim: usize, out_dim: usize, with_bias: bool, vb: VarBuilder) -> Result<Linear> {
    if packed_bf16(&vb, in_dim.is_multiple_of(2)) {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if with_bias { Some(vb.get(out_dim, "bias")?.to_dtype(DType::F32)?.to_vec1()?) } else { None };
        let op = kernels::LinearBf16Op::new(&bf16_bits(&weight)?, bias, out_dim, in_dim);
        return Ok(Linear::Bf16(Arc::new(op)));
    }
    let vb = unpacked(vb);
    let inner = if with_bias {
        candle_nn::linear(in_dim, out_dim, vb)?
    } else {
        candle_nn::linear_no_bias(in_dim, out_dim, vb)?
    };
    Ok(Linear::Candle(inner))
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_maybe_bias(in_dim, out_dim, true, vb)
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_maybe_bias(in_dim, out_dim, false, vb)
}
