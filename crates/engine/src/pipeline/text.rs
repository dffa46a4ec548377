//! Prompt → token ids → text embeddings.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::embeddings::Embedding;
use super::prompt::{chunk_prompt_with, EmbeddingName, Emphasis};
use crate::models::clip::{ClipTextModel, EOS_TOKEN_ID};
use crate::models::{Family, StableDiffusion};
use crate::{Error, Result};

/// CLIP's context: BOS + 75 prompt tokens + EOS.
pub const MAX_TOKENS: usize = 77;
/// Prompt tokens that fit in one CLIP window (what the UI counts against).
pub const PROMPT_TOKEN_WINDOW: usize = MAX_TOKENS - 2;

/// The CLIP BPE tokenizer of openai/clip-vit-large-patch14, built offline by
/// `scripts/make_tokenizer.py` and compiled in, so single-file checkpoints work with no network.
const BUNDLED_TOKENIZER: &[u8] = include_bytes!("../../../../assets/tokenizer/clip-vit-large-patch14/tokenizer.json");

/// CLIP tokenization identical to transformers' `CLIPTokenizer`, with the model's pad token.
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: u32,
}

/// Token ids of one prompt, ready for the text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// Exactly [`MAX_TOKENS`] ids: BOS, prompt, EOS, padding.
    pub ids: Vec<u32>,
    /// Prompt tokens beyond the window that were dropped (diffusers truncates too).
    pub dropped_tokens: usize,
}

impl ClipTokenizer {
    /// The bundled tokenizer, padding with `pad_id` (EOS for SD 1.x, 0 = "!" for SD 2.x/SDXL's second).
    pub fn bundled(pad_id: u32) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_bytes(BUNDLED_TOKENIZER).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Self::with_pad(inner, pad_id)
    }

    /// A model folder's own `tokenizer.json`.
    pub fn from_file(path: &Path, pad_id: u32) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::with_pad(inner, pad_id)
    }

    fn with_pad(mut inner: tokenizers::Tokenizer, pad_id: u32) -> Result<Self> {
        if pad_id == 0 {
            // transformers registers a "!" pad token as a special token, so every "!" in a
            // prompt is split off on its own (id 0) instead of merging with its neighbours
            // ("!!!" → three tokens). SD 2.x and SDXL's second tokenizer behave so in diffusers.
            inner
                .add_special_tokens([tokenizers::AddedToken::from("!", true)])
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
        }
        Ok(Self { inner, pad_id })
    }

    /// Loads `<model>/<subfolder>/tokenizer.json` when the folder has one, else the bundled
    /// tokenizer; the pad token comes from `special_tokens_map.json` when present, else the
    /// family's convention.
    pub fn for_model(model_dir: &Path, subfolder: &str, default_pad_id: u32) -> Result<Self> {
        let dir = model_dir.join(subfolder);
        let pad_id = read_pad_token(&dir).map(|p| if p == "!" { 0 } else { EOS_TOKEN_ID }).unwrap_or(default_pad_id);
        let own = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if own.is_file() {
            Self::from_file(&own, pad_id)
        } else if vocab.is_file() && merges.is_file() {
            Self::from_vocab_and_merges(&vocab, &merges, pad_id)
        } else {
            Self::bundled(pad_id)
        }
    }

    /// The model's own BPE files (what most diffusers repos ship) inside CLIP's normalizer,
    /// pre-tokenizer and BOS/EOS post-processor, which are the same for every SD tokenizer.
    pub fn from_vocab_and_merges(vocab: &Path, merges: &Path, pad_id: u32) -> Result<Self> {
        let as_str = |p: &Path| {
            p.to_str()
                .map(str::to_string)
                .ok_or_else(|| Error::Tokenizer(format!("{}: path is not UTF-8", p.display())))
        };
        let bpe = tokenizers::models::bpe::BPE::from_file(&as_str(vocab)?, &as_str(merges)?)
            .unk_token("<|endoftext|>".into())
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", vocab.display())))?;
        let mut inner =
            tokenizers::Tokenizer::from_bytes(BUNDLED_TOKENIZER).map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_model(bpe);
        Self::with_pad(inner, pad_id)
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Ids with BOS and EOS, neither truncated nor padded.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// How many prompt tokens (without BOS/EOS) a text takes: the UI's token counter.
    pub fn count_prompt_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.encode_raw(text)?.len().saturating_sub(2))
    }

    /// Truncated to [`MAX_TOKENS`] keeping EOS last, then padded — as
    /// `tokenizer(text, padding="max_length", max_length=77, truncation=True)`.
    pub fn encode(&self, text: &str) -> Result<Tokenized> {
        let mut ids = self.encode_raw(text)?;
        let mut dropped_tokens = 0;
        if ids.len() > MAX_TOKENS {
            dropped_tokens = ids.len() - MAX_TOKENS;
            ids.truncate(MAX_TOKENS - 1);
            ids.push(EOS_TOKEN_ID);
        }
        ids.resize(MAX_TOKENS, self.pad_id);
        Ok(Tokenized { ids, dropped_tokens })
    }
}

fn read_pad_token(tokenizer_dir: &Path) -> Option<String> {
    for file in ["special_tokens_map.json", "tokenizer_config.json"] {
        let Ok(text) = std::fs::read_to_string(tokenizer_dir.join(file)) else { continue };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
        match json.get("pad_token") {
            Some(serde_json::Value::String(s)) => return Some(s.clone()),
            Some(obj) => {
                if let Some(s) = obj.get("content").and_then(|c| c.as_str()) {
                    return Some(s.to_string());
                }
            }
            None => {}
        }
    }
    None
}

/// The model's tokenizers, one per text encoder.
pub struct Tokenizers {
    pub first: ClipTokenizer,
    pub second: Option<ClipTokenizer>,
}

impl Tokenizers {
    pub fn for_model(model: &StableDiffusion) -> Result<Self> {
        let dir = &model.info.path;
        let (first_pad, second_pad) = match model.info.family {
            Family::Sd1 => (EOS_TOKEN_ID, None),
            Family::Sd2 => (0, None),
            Family::Sdxl => (EOS_TOKEN_ID, Some(0)),
        };
        let first = ClipTokenizer::for_model(dir, "tokenizer", first_pad)?;
        let second = second_pad.map(|pad| ClipTokenizer::for_model(dir, "tokenizer_2", pad)).transpose()?;
        Ok(Self { first, second })
    }
}

impl super::prompt::PieceTokenizer for ClipTokenizer {
    fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }
    fn bos(&self) -> u32 {
        BOS_TOKEN_ID
    }
    fn eos(&self) -> u32 {
        EOS_TOKEN_ID
    }
    fn pad(&self) -> u32 {
        self.pad_id
    }
    fn comma(&self) -> u32 {
        COMMA_TOKEN_ID
    }
}

/// `<|startoftext|>` in CLIP's vocabulary.
pub const BOS_TOKEN_ID: u32 = 49406;
/// `,</w>` in CLIP's vocabulary: where A1111 likes to end a long prompt's chunk.
pub const COMMA_TOKEN_ID: u32 = 267;

/// How a job's prompts are read and encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptOptions {
    pub emphasis: Emphasis,
    /// A1111's "Clip skip": 1 is the last layer; N > 1 stops N − 1 layers earlier.
    pub clip_skip: u32,
}

impl Default for PromptOptions {
    fn default() -> Self {
        Self { emphasis: Emphasis::A1111, clip_skip: 1 }
    }
}

impl PromptOptions {
    /// Prompts as diffusers reads them: brackets are text, the last layer.
    pub const DIFFUSERS: PromptOptions = PromptOptions { emphasis: Emphasis::None, clip_skip: 1 };
}

/// Conditioning for one denoising run: the U-Net's context for the negative prompt and the
/// prompt (each 77 × chunks tokens long, so their lengths may differ) and, for SDXL, the pooled
/// embeddings (row 0 the negative prompt, row 1 the prompt: diffusers' order for CFG).
pub struct TextConditioning {
    pub negative: Tensor,
    pub positive: Tensor,
    pub pooled: Option<Tensor>,
    /// The prompt's tokens and its 75-token chunks (the UI's "92/150").
    pub token_count: usize,
    pub chunks: usize,
}

impl TextConditioning {
    /// Both prompts as one batch `[negative, prompt]`, when their lengths agree.
    pub fn context(&self) -> Result<Option<Tensor>> {
        if self.negative.dim(1)? != self.positive.dim(1)? {
            return Ok(None);
        }
        Ok(Some(Tensor::cat(&[&self.negative, &self.positive], 0)?))
    }
}

/// Which states a tower conditions on: the final layer's after the norm (SD 1.x / 2.x), or
/// the layer before (SDXL); clip skip N moves N − 1 layers earlier (A1111's rule on SD 1.x,
/// diffusers' `clip_skip = N − 1` on every family).
fn conditioning_states(
    model: &ClipTextModel,
    out: &crate::models::clip::ClipOutput,
    penultimate: bool,
    clip_skip: u32,
) -> Result<Tensor> {
    let skip = clip_skip.max(1) as usize - 1;
    let layers = out.hidden_states.len() - 1;
    let from_end = if penultimate { 2 + skip } else { 1 + skip };
    if from_end > layers + 1 {
        return Err(Error::InvalidSetting(format!(
            "clip skip {clip_skip} is more than this text encoder's {layers} layers allow"
        )));
    }
    let states = out.hidden_states[layers + 1 - from_end].clone();
    if penultimate {
        Ok(states)
    } else if skip == 0 {
        Ok(out.last_hidden_state.clone())
    } else {
        Ok(model.final_norm(&states)?)
    }
}

/// One prompt through one text encoder, A1111's way: chunked, each chunk encoded alone, the
/// weights applied as `emphasis` says, the chunks joined along the sequence. Returns the states
/// (1, 77·chunks, width), the first chunk's pooled output, the token count and chunk count.
#[allow(clippy::too_many_arguments)]
fn encode_one(
    model: &ClipTextModel,
    tokenizer: &ClipTokenizer,
    text: &str,
    options: &PromptOptions,
    penultimate: bool,
    device: &Device,
    embeddings: &[Embedding],
    tower: usize,
) -> Result<(Tensor, Tensor, usize, usize)> {
    use super::prompt::PieceTokenizer;
    let names = embeddings
        .iter()
        .map(|e| Ok(EmbeddingName { ids: tokenizer.tokenize(&e.name)?, vectors: e.vector_count() }))
        .collect::<Result<Vec<_>>>()?;
    let (chunks, token_count) = chunk_prompt_with(tokenizer, text, options.emphasis, &names)?;
    let weighted = chunks.iter().any(|c| c.weights.iter().any(|&w| w != 1.0));
    let mut rows: Vec<Vec<u32>> = chunks.iter().map(|c| c.tokens.clone()).collect();
    let comfy = options.emphasis == Emphasis::ComfyUi && weighted;
    if comfy {
        // ComfyUI weighs against the empty prompt's states: BOS, EOS, padding.
        let mut empty = vec![BOS_TOKEN_ID, EOS_TOKEN_ID];
        empty.resize(MAX_TOKENS, tokenizer.pad_id());
        rows.push(empty);
    }
    let fixes: Vec<(usize, usize, Tensor)> = chunks
        .iter()
        .enumerate()
        .flat_map(|(row, c)| c.fixes.iter().map(move |&(at, e)| (row, at, embeddings[e].vectors[tower].clone())))
        .collect();
    let out = model.forward_with_fixes(&rows, device, &fixes)?;
    let states = conditioning_states(model, &out, penultimate, options.clip_skip)?;
    let mut parts = Vec::with_capacity(chunks.len());
    for (i, chunk) in chunks.iter().enumerate() {
        let z = states.narrow(0, i, 1)?;
        let needs = chunk.weights.iter().any(|&w| w != 1.0);
        let z = match options.emphasis {
            _ if !needs => z,
            Emphasis::None => z,
            Emphasis::A1111 | Emphasis::A1111NoNorm => {
                let dtype = z.dtype();
                let z32 = z.to_dtype(candle_core::DType::F32)?;
                let w: Vec<f32> = chunk.weights.iter().map(|&w| w as f32).collect();
                let w = Tensor::from_vec(w, (1, MAX_TOKENS, 1), device)?;
                let scaled = z32.broadcast_mul(&w)?;
                let scaled = if options.emphasis == Emphasis::A1111 {
                    // A1111 "Original": the chunk's mean as it was before the weights.
                    // Means summed in f64: a chunk's mean can sit near zero, where f32
                    // summation order alone moves the ratio by 1e-4.
                    let mean = |t: &Tensor| -> Result<f64> {
                        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
                        Ok(v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64)
                    };
                    let (before, after) = (mean(&z32)?, mean(&scaled)?);
                    (scaled * (before / after) as f32 as f64)?
                } else {
                    scaled
                };
                scaled.to_dtype(dtype)?
            }
            Emphasis::ComfyUi => {
                let empty = states.narrow(0, chunks.len(), 1)?;
                let mut tokens = Vec::with_capacity(MAX_TOKENS);
                for (j, &w) in chunk.weights.iter().enumerate() {
                    let zj = z.narrow(1, j, 1)?;
                    tokens.push(if w == 1.0 {
                        zj
                    } else {
                        let ej = empty.narrow(1, j, 1)?;
                        ((zj - &ej)? * w)?.add(&ej)?
                    });
                }
                Tensor::cat(&tokens, 1)?
            }
        };
        parts.push(z);
    }
    let pooled = out.pooled.narrow(0, 0, 1)?;
    Ok((Tensor::cat(&parts, 1)?, pooled, token_count, chunks.len()))
}

/// Encodes the negative prompt and the prompt with every text encoder of the model.
pub fn encode_prompts(
    model: &StableDiffusion,
    tokenizers: &Tokenizers,
    prompt: &str,
    negative: &str,
    options: &PromptOptions,
    embeddings: &[Embedding],
) -> Result<TextConditioning> {
    let device = &model.options.device;
    let is_sdxl = model.info.family == Family::Sdxl;
    let first =
        |text: &str| encode_one(&model.text_encoder, &tokenizers.first, text, options, is_sdxl, device, embeddings, 0);
    let (neg_1, _, _, _) = first(negative)?;
    let (pos_1, _, token_count, chunks) = first(prompt)?;
    let (Some(encoder_2), Some(tokenizer_2)) = (&model.text_encoder_2, &tokenizers.second) else {
        return Ok(TextConditioning { negative: neg_1, positive: pos_1, pooled: None, token_count, chunks });
    };
    let second = |text: &str| encode_one(encoder_2, tokenizer_2, text, options, true, device, embeddings, 1);
    let (neg_2, neg_pooled, _, _) = second(negative)?;
    let (pos_2, pos_pooled, _, _) = second(prompt)?;
    let mut negative_states = Tensor::cat(&[neg_1, neg_2], 2)?;
    let mut neg_pooled = neg_pooled;
    if negative.is_empty() && model.info.force_zeros_for_empty_prompt {
        // SDXL pipelines condition an empty negative prompt on zeros, not on the encoded "".
        negative_states = negative_states.zeros_like()?;
        neg_pooled = neg_pooled.zeros_like()?;
    }
    Ok(TextConditioning {
        negative: negative_states,
        positive: Tensor::cat(&[pos_1, pos_2], 2)?,
        pooled: Some(Tensor::cat(&[neg_pooled, pos_pooled], 0)?),
        token_count,
        chunks,
    })
}
