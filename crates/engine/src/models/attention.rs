//! Scaled dot-product attention and diffusers' `Attention` / `BasicTransformerBlock` /
//! `Transformer2DModel` for the U-Net, and the single-head attention of the VAE's mid block.
//!
//! Hand-written rather than taken from candle-transformers: its version materialises the whole
//! N×N score matrix for every head at once (over 1 GB at 512×512 with CFG) and cannot be
//! made faster without owning the code.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};

use crate::kernels::add_residual;

use super::nn::{conv2d, group_norm, layer_norm, linear, linear_no_bias, Conv2d, GroupNorm, Linear};

/// Upper bound on the f32 score buffer of one attention chunk, in elements (≈128 MB).
const MAX_SCORE_ELEMENTS: usize = 32 * 1024 * 1024;

/// softmax(q·kᵀ·scale)·v for q: (B, Nq, d), k, v: (B, Nk, d).
///
/// `bf16`: the CPU bf16 mode's attention (products in bf16, see `AttentionOp::bf16`). Queries are processed in chunks so the score buffer stays bounded whatever the image size;
/// each chunk is exact (the softmax runs over the full key axis), so chunking changes nothing
/// in the result.
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bf16: bool) -> Result<Tensor> {
    if crate::kernels::applies_to(q) {
        let op = crate::kernels::AttentionOp { scale: scale as f32, bf16 };
        return q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op);
    }
    if let Some(out) = crate::kernels::cuda::attention(q, k, v, scale) {
        return out;
    }
    let (batch, n_q, _) = q.dims3()?;
    let n_k = k.dim(1)?;
    let k_t = k.t()?.contiguous()?;
    let rows_per_chunk = (MAX_SCORE_ELEMENTS / (batch * n_k).max(1)).clamp(1, n_q);
    let attend = |q: &Tensor| -> Result<Tensor> {
        let scores = (q.matmul(&k_t)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs.matmul(v)
    };
    if rows_per_chunk >= n_q {
        return attend(q);
    }
    let mut chunks = Vec::with_capacity(n_q.div_ceil(rows_per_chunk));
    let mut start = 0;
    while start < n_q {
        let len = rows_per_chunk.min(n_q - start);
        chunks.push(attend(&q.narrow(1, start, len)?.contiguous()?)?);
        start += len;
    }
    Tensor::cat(&chunks, 1)
}

/// diffusers' `Attention` as used by the U-Net: separate q/k/v projections (no bias),
/// `to_out.0` with bias, multi-head.
#[derive(Debug)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl CrossAttention {
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let context_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// (B, N, C) → (B·heads, N, C/heads)
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        x.reshape((b, n, self.heads, c / self.heads))?
            .transpose(1, 2)?
            .reshape((b * self.heads, n, c / self.heads))?
            .contiguous()
    }

    fn merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (bh, n, d) = x.dims3()?;
        x.reshape((bh / self.heads, self.heads, n, d))?.transpose(1, 2)?.reshape((bh / self.heads, n, self.heads * d))
    }

    /// Takes the input by value: it is dropped as soon as q, k and v exist, not kept through
    /// the attention (at the U-Net's upper level, 10.5 MB at the step's peak).
    pub fn forward(&self, xs: Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let q = self.split_heads(&self.to_q.forward(&xs)?)?;
        let context = context.unwrap_or(&xs);
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        drop(xs);
        // The bf16 mode's layers (packed projections) also take the bf16 attention.
        let bf16 = matches!(self.to_q.kind, super::nn::LinearKind::Bf16(_));
        let out = scaled_dot_product_attention(&q, &k, &v, self.scale, bf16)?;
        self.to_out.forward(&self.merge_heads(&out)?)
    }
}

/// Bytes of the feed-forward's projection (its widest activation) computed at a time on the
/// CPU. The intermediate is 8× as wide as the input: at the U-Net's upper level of a 512×512
/// CFG step (8192 rows of 320) the projection and the gated half take 126 MB at once, at the
/// next level 63 MB, the largest activations of a step. So, like diffusers'
/// `enable_forward_chunking`, it runs over slices of rows; every row is computed alone either
/// way, so the result is the same to the bit (tested) as long as no slice is small enough to
/// take the GEMM's small-matrix path (256 rows and fewer: hence the floor).
const FF_CHUNK_BYTES: usize = 8 << 20;
const FF_MIN_CHUNK_ROWS: usize = 512;

/// Rows per slice of a feed-forward whose projection is `width` wide.
fn ff_chunk_rows(width: usize) -> usize {
    (FF_CHUNK_BYTES / (4 * width).max(1)).max(FF_MIN_CHUNK_ROWS)
}

/// GEGLU feed-forward: `ff.net.0.proj` (dim → 2·inner), gelu-gated, then `ff.net.2`.
#[derive(Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
    inner: usize,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self { proj: linear(dim, inner * 2, vb.pp("net.0.proj"))?, out: linear(inner, dim, vb.pp("net.2"))?, inner })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let width = xs.dim(D::Minus1)?;
        let rows = xs.elem_count() / width.max(1);
        // Whole slices (rounded down), so none has fewer rows than `ff_chunk_rows` gives.
        let chunks = rows / ff_chunk_rows(self.inner * 2);
        if !crate::kernels::applies_to(xs) || chunks <= 1 {
            return self.forward_rows(xs);
        }
        let flat = xs.contiguous()?.reshape((rows, width))?;
        let outputs = (0..chunks)
            .map(|i| {
                let (start, end) = (i * rows / chunks, (i + 1) * rows / chunks);
                self.forward_rows(&flat.narrow(0, start, end - start)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut dims = xs.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = outputs[0].dim(D::Minus1)?;
        }
        Tensor::cat(&outputs, 0)?.reshape(dims)
    }

    fn forward_rows(&self, xs: &Tensor) -> Result<Tensor> {
        let projected = self.proj.forward(xs)?;
        let gated = if crate::kernels::applies_to(&projected) {
            projected.contiguous()?.apply_op1_no_bwd(&crate::kernels::GegluOp)?
        } else if let Some(gated) = crate::kernels::cuda::geglu(&projected) {
            gated?
        } else {
            let chunks = projected.chunk(2, D::Minus1)?;
            (&chunks[0] * chunks[1].gelu_erf()?)?
        };
        self.out.forward(&gated)
    }
}

#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(vb: VarBuilder, dim: usize, heads: usize, context_dim: usize) -> Result<Self> {
        let head_dim = dim / heads;
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(vb.pp("attn1"), dim, None, heads, head_dim)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(vb.pp("attn2"), dim, Some(context_dim), heads, head_dim)?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    /// Takes the residual stream by value and reassigns it, so each superseded copy is freed as
    /// soon as the next exists (shadowed bindings would live to the end of the function).
    /// Each sublayer's fresh output takes the residual in place (`add_residual`); the
    /// attentions take their normed input by value so it is freed once projected.
    fn forward(&self, mut xs: Tensor, context: &Tensor) -> Result<Tensor> {
        xs = add_residual(self.attn1.forward(self.norm1.forward(&xs)?, None)?, &xs)?;
        xs = add_residual(self.attn2.forward(self.norm2.forward(&xs)?, Some(context))?, &xs)?;
        add_residual(self.ff.forward(&self.norm3.forward(&xs)?)?, &xs)
    }
}

#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel` with continuous input, as the SD U-Nets use it.
#[derive(Debug)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

pub struct SpatialTransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub norm_groups: usize,
    pub use_linear_projection: bool,
}

impl SpatialTransformer {
    pub fn new(vb: VarBuilder, cfg: &SpatialTransformerConfig) -> Result<Self> {
        let c = cfg.channels;
        let projection = |name: &str| -> Result<Projection> {
            Ok(if cfg.use_linear_projection {
                Projection::Linear(linear(c, c, vb.pp(name))?)
            } else {
                Projection::Conv(conv2d(c, c, 1, 1, 0, vb.pp(name))?)
            })
        };
        let blocks = (0..cfg.layers)
            .map(|i| {
                BasicTransformerBlock::new(vb.pp(format!("transformer_blocks.{i}")), c, cfg.heads, cfg.context_dim)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(cfg.norm_groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let residual = xs;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let mut tokens = {
            let normed = self.norm.forward(xs)?;
            match &self.proj_in {
                Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
                Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
            }
        };
        for block in &self.blocks {
            tokens = block.forward(tokens, context)?;
        }
        let from_tokens = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&from_tokens(&tokens)?)?,
            Projection::Linear(lin) => from_tokens(&lin.forward(&tokens)?)?,
        };
        add_residual(out, residual)
    }
}

/// The VAE mid-block attention: one head over all channels, q/k/v/out with bias, group-normed
/// input and a residual connection (diffusers' `Attention` with `_from_deprecated_attn_block`).
#[derive(Debug)]
pub struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    channels: usize,
}

impl VaeAttention {
    pub fn new(vb: VarBuilder, channels: usize, norm_groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(norm_groups, channels, 1e-6, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            to_out: linear(channels, channels, vb.pp("to_out.0"))?,
            channels,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self.group_norm.forward(xs)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let out = scaled_dot_product_attention(&q, &k, &v, 1.0 / (self.channels as f64).sqrt(), false)?;
        let out = self.to_out.forward(&out)?;
        out.transpose(1, 2)?.reshape((b, c, h, w))? + xs
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device};

    use super::*;
    use crate::kernels::test_values;

    #[test]
    fn the_feed_forward_in_chunks_of_rows_gives_the_same_bits() {
        // The U-Net's upper-level width: slices of 819 rows, so 2 × 1024 rows take two.
        let (dim, inner) = (320, 1280);
        let tensor = |shape: &[usize], seed| {
            let len = shape.iter().product();
            Tensor::from_vec(test_values(len, seed), shape, &Device::Cpu).unwrap()
        };
        let weights = HashMap::from([
            ("net.0.proj.weight".to_string(), tensor(&[2 * inner, dim], 1)),
            ("net.0.proj.bias".to_string(), tensor(&[2 * inner], 2)),
            ("net.2.weight".to_string(), tensor(&[dim, inner], 3)),
            ("net.2.bias".to_string(), tensor(&[dim], 4)),
        ]);
        let ff = FeedForward::new(VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu), dim).unwrap();
        let xs = tensor(&[2, 1024, dim], 5);
        assert_eq!(2048 / ff_chunk_rows(2 * inner), 2, "the input must be cut into slices");
        let chunked = ff.forward(&xs).unwrap();
        let whole = ff.forward_rows(&xs).unwrap();
        assert_eq!(chunked.dims(), &[2, 1024, dim]);
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect::<Vec<_>>()
        };
        assert_eq!(bits(&chunked), bits(&whole));
    }
}
