//! Thin constructors over candle-nn layers, named the way diffusers names weights.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
pub use candle_nn::LayerNorm;
use candle_nn::{Conv2dConfig, VarBuilder};

use super::lora;
use super::mapped::{self, MappedConv2d, MappedLinear};
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

/// Where the parameters that stay f32 on the CPU load from. Two CPU load modes ask the
/// `VarBuilder` for a narrower dtype than the f32 activations: the bf16 mode (its packed
/// convolutions and linear layers keep bf16) and f16 weights kept as stored (see
/// [`kernels::half_weights`]: convolution and linear weights stay f16, widened exactly as each
/// layer runs). Everything else — biases, norms, embeddings, odd-sized layers — is f32 like
/// the activations.
pub(crate) fn unpacked(vb: VarBuilder) -> VarBuilder {
    if matches!(vb.dtype(), DType::BF16 | DType::F16) && vb.device().is_cpu() {
        vb.set_dtype(DType::F32)
    } else {
        vb
    }
}

/// Where convolution and linear weights that are not packed load from: f16 kept as stored on
/// the CPU, otherwise like every other parameter.
fn weight_source(vb: VarBuilder) -> VarBuilder {
    if vb.dtype() == DType::F16 && vb.device().is_cpu() {
        vb
    } else {
        unpacked(vb)
    }
}

/// `inner` with its weight and bias in `dtype`, for candle's own layers when a weight kept in
/// f16 meets an input Easel's kernels do not take.
fn widened_conv(inner: &candle_nn::Conv2d, dtype: DType) -> Result<candle_nn::Conv2d> {
    let bias = inner.bias().map(|b| b.to_dtype(dtype)).transpose()?;
    Ok(candle_nn::Conv2d::new(inner.weight().to_dtype(dtype)?, bias, *inner.config()))
}

/// Whether Easel's CPU kernels take this weight with f32 activations: f32, or f16 kept as stored.
fn kernel_weight(weight: &Tensor) -> bool {
    matches!(weight.dtype(), DType::F32 | DType::F16)
}

/// A 2-D convolution: Easel's own CPU kernel for f32 on the CPU (its weight read in place from
/// the mapped checkpoint where it can be, see [`mapped`]), its bf16 kernel in the CPU bf16
/// mode, cuDNN with cached plans on CUDA (`cudnn` feature), and candle's convolution elsewhere.
#[derive(Debug, Clone)]
pub enum Conv2dKind {
    Candle { inner: candle_nn::Conv2d, stride: usize, padding: usize },
    Mapped { op: Arc<MappedConv2d>, bias: Tensor },
    Bf16(Arc<kernels::Conv2dBf16Op>),
}

/// A convolution and the adapters (LoRA) attached to it by name (see [`lora`]).
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub kind: Conv2dKind,
    lora: lora::Slot,
    stride: usize,
    padding: usize,
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let out = self.kind.forward(xs)?;
        self.lora.add_conv(xs, out, self.stride, self.padding)
    }
}

impl Conv2dKind {
    fn candle_forward(inner: &candle_nn::Conv2d, stride: usize, padding: usize, xs: &Tensor) -> Result<Tensor> {
        if let Some(bias) = inner.bias() {
            if let Some(out) = kernels::cuda::conv2d(xs, inner.weight(), bias, stride, padding) {
                return out;
            }
        }
        match inner.bias() {
            Some(bias) if kernels::applies_to(xs) && kernel_weight(inner.weight()) => {
                let op = Conv2dOp { stride, padding };
                xs.contiguous()?.apply_op3_no_bwd(&inner.weight().contiguous()?, bias, &op)
            }
            _ if inner.weight().dtype() != xs.dtype() => widened_conv(inner, xs.dtype())?.forward(xs),
            _ => inner.forward(xs),
        }
    }
}

impl Module for Conv2dKind {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Bf16(op) => xs.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(op.as_ref()),
            Self::Candle { inner, stride, padding } => Self::candle_forward(inner, *stride, *padding, xs),
            Self::Mapped { op, bias } if kernels::applies_to(xs) => {
                xs.contiguous()?.apply_op2_no_bwd(bias, op.as_ref())
            }
            Self::Mapped { op, bias } => {
                let cfg = Conv2dConfig { padding: op.padding, stride: op.stride, ..Default::default() };
                let inner = candle_nn::Conv2d::new(op.weight.to_tensor()?, Some(bias.clone()), cfg);
                Self::candle_forward(&inner, op.stride, op.padding, xs)
            }
        }
    }
}

/// GroupNorm with an optional fused SiLU (Easel's kernels for f32 on the CPU and for f16/f32 on
/// CUDA, candle-nn's GroupNorm otherwise).
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
        if let Some(out) = kernels::cuda::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, silu) {
            return out;
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
    let lora = lora::register(&vb.prefix(), lora::LayerShape::Conv { out_ch, in_ch, kernel });
    let kind = conv2d_kind(in_ch, out_ch, kernel, stride, padding, vb)?;
    Ok(Conv2d { kind, lora, stride, padding })
}

fn conv2d_kind(
    in_ch: usize,
    out_ch: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2dKind> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    if packed_bf16(&vb, (in_ch * kernel * kernel).is_multiple_of(2)) {
        let weight = vb.get((out_ch, in_ch, kernel, kernel), "weight")?;
        let bias = vb.get(out_ch, "bias")?.to_dtype(DType::F32)?;
        let bits = bf16_bits(&weight)?;
        let op = kernels::Conv2dBf16Op::new(&bits, bias.to_vec1()?, out_ch, in_ch, kernel, stride, padding);
        return Ok(Conv2dKind::Bf16(Arc::new(op)));
    }
    // The weight in the VarBuilder's dtype (f16 kept as stored on the CPU), the bias like the activations.
    let weight_vb = weight_source(vb.clone());
    let bias = unpacked(vb).get(out_ch, "bias")?;
    if let Some(weight) = mapped::lookup(&weight_vb, "weight", (out_ch, in_ch, kernel, kernel)) {
        return Ok(Conv2dKind::Mapped { op: Arc::new(MappedConv2d { weight, stride, padding }), bias });
    }
    let weight = weight_vb.get((out_ch, in_ch, kernel, kernel), "weight")?;
    Ok(Conv2dKind::Candle { inner: candle_nn::Conv2d::new(weight, Some(bias), cfg), stride, padding })
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

/// A linear layer: Easel's kernel for f32 activations on the CPU (f32 weights or f16 kept as
/// stored, read in place from the mapped checkpoint where they can be), candle-nn's elsewhere,
/// or in the CPU bf16 mode Easel's bf16 kernel with the weight pre-packed once at load.
#[derive(Debug, Clone)]
pub enum LinearKind {
    Candle(candle_nn::Linear),
    Mapped { op: Arc<MappedLinear>, bias: Option<Tensor> },
    Bf16(Arc<kernels::LinearBf16Op>),
}

/// A linear layer and the adapters (LoRA) attached to it by name (see [`lora`]).
#[derive(Debug, Clone)]
pub struct Linear {
    pub kind: LinearKind,
    lora: lora::Slot,
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let out = self.kind.forward(xs)?;
        self.lora.add_linear(xs, out)
    }
}

impl Module for LinearKind {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Mapped { op, bias } if kernels::applies_to(xs) => match bias {
                Some(bias) => xs.contiguous()?.apply_op2_no_bwd(bias, op.as_ref()),
                None => xs.contiguous()?.apply_op1_no_bwd(op.as_ref()),
            },
            Self::Mapped { op, bias } => {
                Self::Candle(candle_nn::Linear::new(op.weight.to_tensor()?, bias.clone())).forward(xs)
            }
            Self::Candle(inner) if kernels::applies_to(xs) && kernel_weight(inner.weight()) => {
                let (xs, weight) = (xs.contiguous()?, inner.weight().contiguous()?);
                match inner.bias() {
                    Some(bias) => xs.apply_op3_no_bwd(&weight, &bias.contiguous()?, &kernels::LinearOp),
                    None => xs.apply_op2_no_bwd(&weight, &kernels::LinearOp),
                }
            }
            Self::Candle(inner) if inner.weight().dtype() != xs.dtype() => {
                let bias = inner.bias().map(|b| b.to_dtype(xs.dtype())).transpose()?;
                candle_nn::Linear::new(inner.weight().to_dtype(xs.dtype())?, bias).forward(xs)
            }
            Self::Candle(inner) => inner.forward(xs),
            Self::Bf16(op) => xs.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(op.as_ref()),
        }
    }
}

fn linear_maybe_bias(in_dim: usize, out_dim: usize, with_bias: bool, vb: VarBuilder) -> Result<Linear> {
    let lora = lora::register(&vb.prefix(), lora::LayerShape::Linear { out_dim, in_dim });
    Ok(Linear { kind: linear_kind(in_dim, out_dim, with_bias, vb)?, lora })
}

fn linear_kind(in_dim: usize, out_dim: usize, with_bias: bool, vb: VarBuilder) -> Result<LinearKind> {
    if packed_bf16(&vb, in_dim.is_multiple_of(2)) {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if with_bias { Some(vb.get(out_dim, "bias")?.to_dtype(DType::F32)?.to_vec1()?) } else { None };
        let op = kernels::LinearBf16Op::new(&bf16_bits(&weight)?, bias, out_dim, in_dim);
        return Ok(LinearKind::Bf16(Arc::new(op)));
    }
    // The weight in the VarBuilder's dtype (f16 kept as stored on the CPU), the bias like the activations.
    let weight_vb = weight_source(vb.clone());
    let bias = if with_bias { Some(unpacked(vb).get(out_dim, "bias")?) } else { None };
    if let Some(weight) = mapped::lookup(&weight_vb, "weight", (out_dim, in_dim)) {
        return Ok(LinearKind::Mapped { op: Arc::new(MappedLinear { weight }), bias });
    }
    let weight = weight_vb.get((out_dim, in_dim), "weight")?;
    Ok(LinearKind::Candle(candle_nn::Linear::new(weight, bias)))
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_maybe_bias(in_dim, out_dim, true, vb)
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_maybe_bias(in_dim, out_dim, false, vb)
}

/// A token embedding table. SD 1.5's is 49408×768 (152 MB in f32) and a prompt reads 77 of its
/// rows, so on the CPU it is read in place from the mapped file like the linear weights: copied,
/// it would sit in private memory through every step of the denoising loop.
#[derive(Debug, Clone)]
pub enum Embedding {
    Candle(candle_nn::Embedding),
    Mapped { table: mapped::MappedTensor, hidden: usize },
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(inner) => inner.forward(ids),
            Self::Mapped { table, hidden } => gather_rows(table, *hidden, ids),
        }
    }
}

/// The rows of `table` at `ids`, as f32: shape `ids.dims() + [hidden]`.
fn gather_rows(table: &mapped::MappedTensor, hidden: usize, ids: &Tensor) -> Result<Tensor> {
    use kernels::half_weights::WeightData;
    let rows = table.shape().dims()[0];
    let ids_flat = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let mut out = Vec::with_capacity(ids_flat.len() * hidden);
    for &id in &ids_flat {
        let id = id as usize;
        if id >= rows {
            candle_core::bail!("token id {id} is outside the embedding table ({rows} rows)");
        }
        let row = id * hidden..(id + 1) * hidden;
        // f16 widens to f32 exactly, as the copying load would have.
        match table.data() {
            WeightData::F32(w) => out.extend_from_slice(&w[row]),
            WeightData::F16(w) => out.extend(w[row].iter().map(|v| v.to_f32())),
        }
    }
    let mut dims = ids.dims().to_vec();
    dims.push(hidden);
    Tensor::from_vec(out, dims, ids.device())
}

/// A token embedding, read in place where it can be (see [`Embedding`]).
pub fn embedding(rows: usize, hidden: usize, vb: VarBuilder) -> Result<Embedding> {
    if let Some(table) = mapped::lookup(&weight_source(vb.clone()), "weight", (rows, hidden)) {
        return Ok(Embedding::Mapped { table, hidden });
    }
    Ok(Embedding::Candle(candle_nn::embedding(rows, hidden, unpacked(vb))?))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Device;

    use super::*;
    use crate::kernels::test_values;

    /// One convolution (4 → 6, 3×3) and one linear layer (5 → 3), stored in f16.
    fn stored_f16(dev: &Device) -> HashMap<String, Tensor> {
        let tensor = |shape: &[usize], seed| {
            let len = shape.iter().product();
            Tensor::from_vec(test_values(len, seed), shape, dev).unwrap().to_dtype(DType::F16).unwrap()
        };
        HashMap::from([
            ("conv.weight".to_string(), tensor(&[6, 4, 3, 3], 1)),
            ("conv.bias".to_string(), tensor(&[6], 2)),
            ("fc.weight".to_string(), tensor(&[3, 5], 3)),
            ("fc.bias".to_string(), tensor(&[3], 4)),
        ])
    }

    #[test]
    fn f16_weights_stay_f16_on_the_cpu_and_give_the_output_of_widening_them() {
        let dev = Device::Cpu;
        let kept = VarBuilder::from_tensors(stored_f16(&dev), DType::F16, &dev);
        let widened = VarBuilder::from_tensors(stored_f16(&dev), DType::F32, &dev);

        let conv = conv2d(4, 6, 3, 1, 1, kept.pp("conv")).unwrap();
        let Conv2dKind::Candle { inner, .. } = &conv.kind else { panic!("not the f32 convolution") };
        assert_eq!(inner.weight().dtype(), DType::F16);
        assert_eq!(inner.bias().map(Tensor::dtype), Some(DType::F32));
        let x = Tensor::from_vec(test_values(2 * 4 * 7 * 5, 5), (2, 4, 7, 5), &dev).unwrap();
        let reference = conv2d(4, 6, 3, 1, 1, widened.pp("conv")).unwrap().forward(&x).unwrap();
        let out = conv.forward(&x).unwrap();
        assert_eq!(out.dtype(), DType::F32);
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(bits(&out), bits(&reference));

        let fc = linear(5, 3, kept.pp("fc")).unwrap();
        let LinearKind::Candle(inner) = &fc.kind else { panic!("not the f32 linear layer") };
        assert_eq!(inner.weight().dtype(), DType::F16);
        let x = Tensor::from_vec(test_values(2 * 4 * 5, 6), (2, 4, 5), &dev).unwrap();
        let reference = linear(5, 3, widened.pp("fc")).unwrap().forward(&x).unwrap();
        assert_eq!(bits(&fc.forward(&x).unwrap()), bits(&reference));

        // The norms and embeddings of such a model load in f32 like the activations.
        let norm_vb = VarBuilder::from_tensors(
            HashMap::from([
                ("weight".to_string(), Tensor::ones(6, DType::F16, &dev).unwrap()),
                ("bias".to_string(), Tensor::zeros(6, DType::F16, &dev).unwrap()),
            ]),
            DType::F16,
            &dev,
        );
        assert_eq!(group_norm(2, 6, 1e-5, norm_vb).unwrap().weight.dtype(), DType::F32);
    }
}
