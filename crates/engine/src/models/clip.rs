//! The CLIP text transformer (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`),
//! built from `text_encoder/config.json` with the real checkpoints' `text_model.` key prefix.
//!
//! Written here rather than reusing candle-transformers' CLIP, whose causal mask does not
//! broadcast over a batch and which exposes no penultimate hidden state with the projection.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::nn::{layer_norm, linear, linear_no_bias, LayerNorm, Linear};

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_positions() -> usize {
    77
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

impl ClipTextConfig {
    /// What makes this config impossible to build, if anything.
    pub fn problem(&self) -> Option<String> {
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Some(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_hidden_layers == 0 || self.vocab_size == 0 || self.max_position_embeddings < 77 {
            return Some(format!(
                "num_hidden_layers {}, vocab_size {}, max_position_embeddings {} (at least 77 needed)",
                self.num_hidden_layers, self.vocab_size, self.max_position_embeddings
            ));
        }
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    Gelu,
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    activation: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig, activation: Activation) -> Result<Self> {
        let h = cfg.hidden_size;
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            q_proj: linear(h, h, attn.pp("q_proj"))?,
            k_proj: linear(h, h, attn.pp("k_proj"))?,
            v_proj: linear(h, h, attn.pp("v_proj"))?,
            out_proj: linear(h, h, attn.pp("out_proj"))?,
            layer_norm2: layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(h, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size, h, vb.pp("mlp.fc2"))?,
            heads: cfg.num_attention_heads,
            activation,
        })
    }

    fn attention(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let d = c / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, n, self.heads, d))?.transpose(1, 2)?.reshape((b * self.heads, n, d))?.contiguous()
        };
        let q = split(self.q_proj.forward(xs)?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let scale = 1.0 / (d as f64).sqrt();
        // Prompts are at most 77 tokens: the masked score matrix is tiny, no chunking needed.
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(causal_mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?;
        let out = out.reshape((b, self.heads, n, d))?.transpose(1, 2)?.reshape((b, n, c))?;
        self.out_proj.forward(&out)
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let xs = (self.attention(&self.layer_norm1.forward(xs)?, causal_mask)? + xs)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let h = match self.activation {
            Activation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            Activation::Gelu => h.gelu_erf()?,
        };
        self.fc2.forward(&h)? + xs
    }
}

/// What one text-encoder pass yields.
pub struct ClipOutput {
    /// After the final layer norm (what SD 1.x / 2.x condition on).
    pub last_hidden_state: Tensor,
    /// Output of the layer before last, without the final norm (what SDXL conditions on).
    pub penultimate_hidden_state: Tensor,
    /// The EOS token's final state, through `text_projection` when the model has one.
    pub pooled: Tensor,
    /// transformers' `hidden_states`: the embeddings, then each layer's output (no final norm).
    pub hidden_states: Vec<Tensor>,
}

#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: super::nn::Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    config: ClipTextConfig,
}

/// Id of `<|endoftext|>`, the token whose state CLIP pools.
pub const EOS_TOKEN_ID: u32 = 49407;

impl ClipTextModel {
    /// `vb` points at the root of the checkpoint (the model lives under `text_model.`);
    /// `with_projection` loads `text_projection` (SDXL's second encoder).
    pub fn new(vb: VarBuilder, config: ClipTextConfig, with_projection: bool) -> Result<Self> {
        let activation = match config.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => candle_core::bail!("unsupported CLIP activation \"{other}\""),
        };
        let tm = vb.pp("text_model");
        let token_embedding =
            super::nn::embedding(config.vocab_size, config.hidden_size, tm.pp("embeddings").pp("token_embedding"))?;
        let emb = super::nn::unpacked(tm.pp("embeddings"));
        let position_embedding =
            emb.get((config.max_position_embeddings, config.hidden_size), "position_embedding.weight")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::new(tm.pp(format!("encoder.layers.{i}")), &config, activation))
            .collect::<Result<Vec<_>>>()?;
        let text_projection = if with_projection {
            let dim = config.projection_dim.unwrap_or(config.hidden_size);
            Some(linear_no_bias(config.hidden_size, dim, vb.pp("text_projection"))?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm: layer_norm(config.hidden_size, config.layer_norm_eps, tm.pp("final_layer_norm"))?,
            text_projection,
            config,
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The final layer norm, for states taken from an earlier layer (clip skip).
    pub fn final_norm(&self, xs: &Tensor) -> Result<Tensor> {
        self.final_layer_norm.forward(xs)
    }

    fn causal_mask(n: usize, device: &Device, dtype: DType) -> Result<Tensor> {
        let mask: Vec<f32> =
            (0..n).flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        Tensor::from_vec(mask, (n, n), device)?.to_dtype(dtype)
    }

    /// Encodes one batch of token-id rows (each already padded to the same length).
    pub fn forward(&self, ids: &[Vec<u32>], device: &Device) -> Result<ClipOutput> {
        self.forward_with_fixes(ids, device, &[])
    }

    /// As [`Self::forward`], with token embeddings replaced: each `(row, position, vectors)`
    /// puts `vectors` (n, hidden) in place of the token embeddings of `row` from `position`
    /// (textual inversion, as A1111's `EmbeddingsWithFixes`).
    pub fn forward_with_fixes(
        &self,
        ids: &[Vec<u32>],
        device: &Device,
        fixes: &[(usize, usize, Tensor)],
    ) -> Result<ClipOutput> {
        let batch = ids.len();
        let n = ids.first().map(|r| r.len()).unwrap_or(0);
        if batch == 0 || n == 0 || n > self.config.max_position_embeddings {
            candle_core::bail!("CLIP input must be 1..={} tokens per row", self.config.max_position_embeddings);
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let input = Tensor::from_vec(flat, (batch, n), device)?;
        let positions = self.position_embedding.i(0..n)?;
        let mut tokens = self.token_embedding.forward(&input)?;
        if !fixes.is_empty() {
            let dtype = tokens.dtype();
            let hidden = self.config.hidden_size;
            let mut values: Vec<f32> = tokens.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            for (row, position, vectors) in fixes {
                let v: Vec<f32> = vectors.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let start = (row * n + position) * hidden;
                let end = (start + v.len()).min((row + 1) * n * hidden);
                values[start..end].copy_from_slice(&v[..end - start]);
            }
            tokens = Tensor::from_vec(values, (batch, n, hidden), device)?.to_dtype(dtype)?;
        }
        let mut xs = tokens.broadcast_add(&positions)?;
        let mask = Self::causal_mask(n, device, xs.dtype())?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        for layer in &self.layers {
            hidden_states.push(xs.clone());
            xs = layer.forward(&xs, &mask)?;
        }
        hidden_states.push(xs.clone());
        let penultimate = hidden_states[hidden_states.len().saturating_sub(2)].clone();
        let last_hidden_state = self.final_layer_norm.forward(&xs)?;
        // Pool at the first EOS of each row (transformers takes the argmax id, which is the
        // first EOS since EOS has the largest id in the vocabulary).
        let mut pooled_rows = Vec::with_capacity(batch);
        for (b, row) in ids.iter().enumerate() {
            let eos = row.iter().position(|&t| t == EOS_TOKEN_ID).unwrap_or(n - 1);
            pooled_rows.push(last_hidden_state.i((b, eos))?);
        }
        let mut pooled = Tensor::stack(&pooled_rows, 0)?;
        if let Some(proj) = &self.text_projection {
            pooled = proj.forward(&pooled)?;
        }
        Ok(ClipOutput { last_hidden_state, penultimate_hidden_state: penultimate, pooled, hidden_states })
    }
}
