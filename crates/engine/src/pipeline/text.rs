//! Prompt → token ids → text embeddings.

use std::path::Path;

use candle_core::{Device, Tensor};

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

/// Conditioning for one denoising run: the U-Net's context and, for SDXL, the pooled embedding.
/// Row 0 is the negative prompt, row 1 the prompt (diffusers' order for CFG).
pub struct TextConditioning {
    pub context: Tensor,
    pub pooled: Option<Tensor>,
    pub dropped_tokens: usize,
}

fn run_encoder(
    model: &ClipTextModel,
    rows: &[Vec<u32>],
    device: &Device,
    penultimate: bool,
) -> Result<(Tensor, Tensor)> {
    let out = model.forward(rows, device)?;
    let hidden = if penultimate { out.penultimate_hidden_state } else { out.last_hidden_state };
    Ok((hidden, out.pooled))
}

/// Encodes `[negative, prompt]` with every text encoder of the model.
pub fn encode_prompts(
    model: &StableDiffusion,
    tokenizers: &Tokenizers,
    prompt: &str,
    negative: &str,
) -> Result<TextConditioning> {
    let device = &model.options.device;
    let first_neg = tokenizers.first.encode(negative)?;
    let first_pos = tokenizers.first.encode(prompt)?;
    let dropped_tokens = first_pos.dropped_tokens;
    let is_sdxl = model.info.family == Family::Sdxl;
    let (context_1, _) = run_encoder(&model.text_encoder, &[first_neg.ids, first_pos.ids], device, is_sdxl)?;
    let (Some(encoder_2), Some(tokenizer_2)) = (&model.text_encoder_2, &tokenizers.second) else {
        return Ok(TextConditioning { context: context_1, pooled: None, dropped_tokens });
    };
    let rows = [tokenizer_2.encode(negative)?.ids, tokenizer_2.encode(prompt)?.ids];
    let (context_2, pooled) = run_encoder(encoder_2, &rows, device, true)?;
    let mut context = Tensor::cat(&[context_1, context_2], 2)?;
    let mut pooled = pooled;
    if negative.is_empty() && model.info.force_zeros_for_empty_prompt {
        // SDXL pipelines condition an empty negative prompt on zeros, not on the encoded "".
        context = Tensor::cat(&[context.narrow(0, 0, 1)?.zeros_like()?, context.narrow(0, 1, 1)?], 0)?;
        pooled = Tensor::cat(&[pooled.narrow(0, 0, 1)?.zeros_like()?, pooled.narrow(0, 1, 1)?], 0)?;
    }
    Ok(TextConditioning { context, pooled: Some(pooled), dropped_tokens })
}
