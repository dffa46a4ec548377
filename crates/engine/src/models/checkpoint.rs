//! Single-file checkpoints in the original (LDM / Stability) layout, as civitai ships them:
//! `model.diffusion_model.*` (U-Net), `first_stage_model.*` (VAE), `cond_stage_model.*` (SD 1.x
//! CLIP-L, SD 2.x OpenCLIP-H) and SDXL's `conditioner.embedders.{0,1}.*`.
//!
//! Keys are renamed to the engine's (diffusers') names while loading, through a `VarBuilder`
//! backend: no converted copy is ever written. The mapping follows diffusers'
//! `single_file_utils.py` (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
//! convert_open_clip_checkpoint).

use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

/// How a diffusers tensor is made from checkpoint tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The tensor as stored under this name.
    Plain(String),
    /// Part `index` (0 = q, 1 = k, 2 = v) of OpenCLIP's fused `in_proj_weight` / `in_proj_bias`.
    QkvPart { name: String, index: usize },
    /// The VAE's attention stores q/k/v/out as 1×1 convolutions: drop the two unit dims.
    Conv1x1AsLinear(String),
    /// OpenCLIP's `text_projection` is stored as (in, out); a linear layer wants (out, in).
    Transposed(String),
}

/// The U-Net resnet names: diffusers → LDM.
fn ldm_resnet_part(rest: &str) -> Option<String> {
    let (head, tail) = rest.split_once('.')?;
    let ldm = match head {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    };
    Some(format!("{ldm}.{tail}"))
}

fn split_index(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// The LDM name of a diffusers U-Net tensor (without the `model.diffusion_model.` prefix).
/// `layers_per_block` is the number of resnets per down block (2 in every real SD model).
pub fn ldm_unet_name(name: &str, layers_per_block: usize) -> Option<String> {
    let per_level = layers_per_block + 1;
    let simple = [
        ("conv_in.", "input_blocks.0.0."),
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ];
    for (from, to) in simple {
        if let Some(rest) = name.strip_prefix(from) {
            return Some(format!("{to}{rest}"));
        }
    }
    if let Some(rest) = name.strip_prefix("down_blocks.") {
        let (block, rest) = split_index(rest)?;
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (j, rest) = split_index(rest)?;
            return Some(format!("input_blocks.{}.0.{}", 1 + block * per_level + j, ldm_resnet_part(rest)?));
        }
        if let Some(rest) = rest.strip_prefix("attentions.") {
            let (j, rest) = split_index(rest)?;
            return Some(format!("input_blocks.{}.1.{rest}", 1 + block * per_level + j));
        }
        if let Some(rest) = rest.strip_prefix("downsamplers.0.conv.") {
            return Some(format!("input_blocks.{}.0.op.{rest}", 1 + block * per_level + layers_per_block));
        }
        return None;
    }
    if let Some(rest) = name.strip_prefix("mid_block.") {
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (j, rest) = split_index(rest)?;
            return Some(format!("middle_block.{}.{}", j * 2, ldm_resnet_part(rest)?));
        }
        if let Some(rest) = rest.strip_prefix("attentions.0.") {
            return Some(format!("middle_block.1.{rest}"));
        }
        return None;
    }
    if let Some(rest) = name.strip_prefix("up_blocks.") {
        let (block, rest) = split_index(rest)?;
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (j, rest) = split_index(rest)?;
            return Some(format!("output_blocks.{}.0.{}", block * per_level + j, ldm_resnet_part(rest)?));
        }
        if let Some(rest) = rest.strip_prefix("attentions.") {
            let (j, rest) = split_index(rest)?;
            return Some(format!("output_blocks.{}.1.{rest}", block * per_level + j));
        }
        // The upsampler sits after the last resnet (and its attention, when the block has one);
        // the caller resolves which of the two positions the checkpoint uses.
        if let Some(rest) = rest.strip_prefix("upsamplers.0.conv.") {
            return Some(format!("output_blocks.{}.?.conv.{rest}", block * per_level + layers_per_block));
        }
    }
    None
}

/// The LDM name of a diffusers VAE tensor (without the `first_stage_model.` prefix), for a VAE
/// with `levels` blocks: LDM numbers the decoder's `up` blocks from the bottom, diffusers from
/// the top.
pub fn ldm_vae_source(name: &str, levels: usize) -> Option<Source> {
    let resnet = |rest: &str| -> Option<String> {
        let (head, tail) = rest.split_once('.')?;
        let ldm = match head {
            "norm1" => "norm1",
            "conv1" => "conv1",
            "norm2" => "norm2",
            "conv2" => "conv2",
            "conv_shortcut" => "nin_shortcut",
            _ => return None,
        };
        Some(format!("{ldm}.{tail}"))
    };
    let attention = |prefix: &str, rest: &str| -> Option<Source> {
        let (head, tail) = rest.split_once('.')?;
        let (ldm, tail) = match head {
            "group_norm" => return Some(Source::Plain(format!("{prefix}.norm.{tail}"))),
            "to_q" => ("q", tail),
            "to_k" => ("k", tail),
            "to_v" => ("v", tail),
            "to_out" => ("proj_out", tail.strip_prefix("0.")?),
            _ => return None,
        };
        Some(Source::Conv1x1AsLinear(format!("{prefix}.{ldm}.{tail}")))
    };
    for (from, to) in [("post_quant_conv.", "post_quant_conv."), ("quant_conv.", "quant_conv.")] {
        if let Some(rest) = name.strip_prefix(from) {
            return Some(Source::Plain(format!("{to}{rest}")));
        }
    }
    for part in ["encoder", "decoder"] {
        let Some(rest) = name.strip_prefix(part).and_then(|r| r.strip_prefix('.')) else { continue };
        for same in ["conv_in.", "conv_out."] {
            if rest.starts_with(same) {
                return Some(Source::Plain(format!("{part}.{rest}")));
            }
        }
        if let Some(rest) = rest.strip_prefix("conv_norm_out.") {
            return Some(Source::Plain(format!("{part}.norm_out.{rest}")));
        }
        if let Some(rest) = rest.strip_prefix("mid_block.resnets.") {
            let (j, rest) = split_index(rest)?;
            return Some(Source::Plain(format!("{part}.mid.block_{}.{}", j + 1, resnet(rest)?)));
        }
        if let Some(rest) = rest.strip_prefix("mid_block.attentions.0.") {
            return attention(&format!("{part}.mid.attn_1"), rest);
        }
        let (blocks, ldm_blocks) = if part == "encoder" { ("down_blocks.", "down") } else { ("up_blocks.", "up") };
        if let Some(rest) = rest.strip_prefix(blocks) {
            let (i, rest) = split_index(rest)?;
            let level = if part == "encoder" { i } else { levels.checked_sub(1 + i)? };
            if let Some(rest) = rest.strip_prefix("resnets.") {
                let (j, rest) = split_index(rest)?;
                return Some(Source::Plain(format!("{part}.{ldm_blocks}.{level}.block.{j}.{}", resnet(rest)?)));
            }
            if let Some(rest) = rest.strip_prefix("downsamplers.0.conv.") {
                return Some(Source::Plain(format!("{part}.down.{level}.downsample.conv.{rest}")));
            }
            if let Some(rest) = rest.strip_prefix("upsamplers.0.conv.") {
                return Some(Source::Plain(format!("{part}.up.{level}.upsample.conv.{rest}")));
            }
        }
    }
    None
}

/// The OpenCLIP name of a transformers CLIP text-model tensor (SD 2.x's `cond_stage_model.model.`
/// and SDXL's `conditioner.embedders.1.model.`; the prefix is not included).
pub fn open_clip_source(name: &str) -> Option<Source> {
    let plain = |s: String| Some(Source::Plain(s));
    match name {
        "text_model.embeddings.token_embedding.weight" => return plain("token_embedding.weight".into()),
        "text_model.embeddings.position_embedding.weight" => return plain("positional_embedding".into()),
        "text_model.final_layer_norm.weight" => return plain("ln_final.weight".into()),
        "text_model.final_layer_norm.bias" => return plain("ln_final.bias".into()),
        "text_projection.weight" => return Some(Source::Transposed("text_projection".into())),
        _ => {}
    }
    let rest = name.strip_prefix("text_model.encoder.layers.")?;
    let (layer, rest) = split_index(rest)?;
    let block = format!("transformer.resblocks.{layer}");
    let (module, param) = rest.rsplit_once('.')?;
    let fused = |index: usize| Some(Source::QkvPart { name: format!("{block}.attn.in_proj_{param}"), index });
    match module {
        "self_attn.q_proj" => fused(0),
        "self_attn.k_proj" => fused(1),
        "self_attn.v_proj" => fused(2),
        "self_attn.out_proj" => plain(format!("{block}.attn.out_proj.{param}")),
        "layer_norm1" => plain(format!("{block}.ln_1.{param}")),
        "layer_norm2" => plain(format!("{block}.ln_2.{param}")),
        "mlp.fc1" => plain(format!("{block}.mlp.c_fc.{param}")),
        "mlp.fc2" => plain(format!("{block}.mlp.c_proj.{param}")),
        _ => None,
    }
}

/// Copies one tensor out of the mapped file, then tells the kernel this process is done with
/// those file pages, so they leave its resident set (they stay in the page cache). Without
/// this, loading counts every weight twice — once mapped, once copied — and the peak memory
/// of a load is twice the model.
pub fn load_released(tensors: &MmapedSafetensors, name: &str, dev: &Device) -> Result<Tensor> {
    use candle_core::safetensors::Load;
    let view = tensors.get(name)?;
    let tensor = view.load(dev)?;
    release_pages(view.data());
    Ok(tensor)
}

/// The smallest page size of the platforms Easel runs on; releasing works on whole pages.
const PAGE: usize = 4096;

#[cfg(unix)]
fn release_pages(data: &[u8]) {
    let start = (data.as_ptr() as usize).next_multiple_of(PAGE);
    let end = (data.as_ptr() as usize + data.len()) / PAGE * PAGE;
    if end > start {
        // SAFETY: [start, end) lies inside a read-only shared file mapping that stays mapped;
        // MADV_DONTNEED only drops the page-table entries, and a later read faults the same
        // bytes back in from the file. The return value is ignored: failing to release is harmless.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

#[cfg(not(unix))]
fn release_pages(_: &[u8]) {}

/// `tensor` in the dtype a layer asked for. On the CPU nothing computes in f16, so a request
/// for f16 there means "f16 weights kept as stored" (see `models::nn`): a tensor stored wider
/// is served as f32, never narrowed.
fn served_as(tensor: Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == DType::F16 && tensor.device().is_cpu() && tensor.dtype() != DType::F16 {
        return tensor.to_dtype(DType::F32);
    }
    tensor.to_dtype(dtype)
}

/// How a diffusers name is found in a checkpoint (`None`: not there).
pub type Resolve = dyn Fn(&str) -> Option<Source> + Send + Sync;

/// A checkpoint's memory-mapped files and how diffusers names resolve in them. Shared by the
/// `VarBuilder` backend (which copies tensors out) and the layers that read their weights
/// straight from the mapping (see [`super::mapped`]).
pub struct Checkpoint {
    tensors: MmapedSafetensors,
    resolve: Box<Resolve>,
    /// (address, length) of the slices layers read in place.
    in_place: std::sync::Mutex<Vec<(usize, usize)>>,
}

impl Checkpoint {
    pub fn new(tensors: MmapedSafetensors, resolve: impl Fn(&str) -> Option<Source> + Send + Sync + 'static) -> Self {
        Self { tensors, resolve: Box::new(resolve), in_place: Default::default() }
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.get(name).is_ok()
    }

    /// The file's name for a diffusers name, for messages.
    fn stored_name(&self, name: &str) -> Option<String> {
        match (self.resolve)(name)? {
            Source::Plain(s) | Source::Conv1x1AsLinear(s) | Source::Transposed(s) => Some(s),
            Source::QkvPart { name, .. } => Some(name),
        }
    }

    fn load(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let source =
            (self.resolve)(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
        match source {
            Source::Plain(s) => load_released(&self.tensors, &s, dev),
            Source::Conv1x1AsLinear(s) => {
                let t = load_released(&self.tensors, &s, dev)?;
                if t.rank() == 4 {
                    t.squeeze(3)?.squeeze(2)
                } else {
                    Ok(t)
                }
            }
            Source::Transposed(s) => load_released(&self.tensors, &s, dev)?.t()?.contiguous(),
            Source::QkvPart { name: s, index } => {
                let fused = load_released(&self.tensors, &s, dev)?;
                let third = fused.dim(0)? / 3;
                fused.narrow(0, index * third, third)
            }
        }
    }

    /// The stored bytes behind a diffusers name and their dtype, where they lie in the file as
    /// one row-major block of `shape`: a plain tensor, a 1×1 convolution read as a linear
    /// weight, or one third of a fused q/k/v weight. `None` for anything else (a transpose),
    /// a missing name or a different element count; the caller then copies as usual.
    pub(crate) fn stored_bytes(&self, name: &str, shape: &Shape) -> Option<(&[u8], DType)> {
        let (stored, part) = match (self.resolve)(name)? {
            Source::Plain(s) | Source::Conv1x1AsLinear(s) => (s, None),
            Source::QkvPart { name, index } => (name, Some(index)),
            Source::Transposed(_) => return None,
        };
        let view = self.tensors.get(&stored).ok()?;
        let dtype = DType::try_from(view.dtype()).ok()?;
        // The same number of elements in another shape (a transposed matrix, say) is not the
        // same tensor: the copying load then reports the mismatch.
        let stored_shape = view.shape();
        let same_shape = match part {
            None => {
                stored_shape == shape.dims()
                    || (stored_shape.len() == 4 && stored_shape[2..] == [1, 1] && stored_shape[..2] == *shape.dims())
            }
            Some(_) => {
                stored_shape.first().map(|rows| rows / 3) == shape.dims().first().copied()
                    && stored_shape.get(1..) == shape.dims().get(1..)
            }
        };
        if !same_shape {
            return None;
        }
        let data = view.data();
        let bytes = match part {
            None => data,
            Some(index) => {
                let third = data.len() / 3;
                data.get(index * third..(index + 1) * third)?
            }
        };
        (bytes.len() == shape.elem_count() * dtype.size_in_bytes()).then_some((bytes, dtype))
    }

    /// Records that a layer reads `data` (a slice of this mapping) in place, for [`Self::touch_pages`]
    /// and [`Self::release_in_place_pages`].
    pub(crate) fn note_in_place(&self, data: &[u8]) {
        if let Ok(mut blocks) = self.in_place.lock() {
            blocks.push((data.as_ptr() as usize, data.len()));
        }
    }

    /// The slices layers read in place, in file order, neighbours closer than a page merged (so
    /// that releasing them leaves no page between two tensors behind).
    fn in_place_blocks(&self) -> Vec<(usize, usize)> {
        let mut blocks = self.in_place.lock().map(|blocks| blocks.clone()).unwrap_or_default();
        blocks.sort_by_key(|&(start, _)| start);
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(blocks.len());
        for (start, len) in blocks {
            match merged.last_mut() {
                Some((last_start, last_len)) if start <= *last_start + *last_len + PAGE => {
                    *last_len = (start + len).max(*last_start + *last_len) - *last_start;
                }
                _ => merged.push((start, len)),
            }
        }
        merged
    }

    /// Takes the pages layers read in place out of this process's resident set; they stay in the
    /// page cache (shared, and reclaimable by the kernel under memory pressure), and the next
    /// read maps them back without touching the disk. The pipeline calls this for the components
    /// a stage does not use, so that a generation's peak holds one component's weights, not all.
    pub(crate) fn release_in_place_pages(&self) {
        for (start, len) in self.in_place_blocks() {
            // SAFETY: `note_in_place` recorded slices of this checkpoint's mapping, which lives
            // as long as `self`; merged blocks only span bytes between two of them.
            release_pages(unsafe { std::slice::from_raw_parts(start as *const u8, len) });
        }
    }

    /// How many bytes of the slices layers read in place are mapped into this process now
    /// (Linux, from /proc/self/pagemap's "present" bit; `None` elsewhere or if unreadable).
    /// The whole mapping's resident size would not do: reading a file's header can map a 2 MB
    /// block of its start at once (large page-cache folios), which says nothing about weights.
    #[cfg(target_os = "linux")]
    pub(crate) fn resident_in_place_bytes(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
        let mut present = 0u64;
        for (start, len) in self.in_place_blocks() {
            let (first, last) = (start / PAGE, (start + len).div_ceil(PAGE));
            let mut entries = vec![0u8; (last - first) * 8];
            pagemap.read_exact_at(&mut entries, (first * 8) as u64).ok()?;
            present += entries
                .chunks_exact(8)
                .filter(|e| u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]) >> 63 == 1)
                .count() as u64;
        }
        Some(present * PAGE as u64)
    }

    #[cfg(not(target_os = "linux"))]
    pub(crate) fn resident_in_place_bytes(&self) -> Option<u64> {
        None
    }

    /// Reads every page that layers read in place once, in file order, so that the page cache holds
    /// them before the first step needs them, for as long as `wanted` says (checked per tensor).
    /// Each block is released again once read: warming the cache should not put a component's
    /// weights in the resident set before it runs (see [`Self::release_in_place_pages`]).
    /// A hint to the kernel would not do: `MADV_WILLNEED` reads ahead only a few MB (8 MB
    /// measured on this project's VM).
    pub(crate) fn touch_pages(&self, wanted: impl Fn() -> bool) {
        for (start, len) in self.in_place_blocks() {
            if !wanted() {
                return;
            }
            // SAFETY: as in `release_in_place_pages`.
            let data = unsafe { std::slice::from_raw_parts(start as *const u8, len) };
            for offset in (0..data.len()).step_by(PAGE) {
                // SAFETY: `offset` lies inside `data`; a volatile read so the touch is not optimised away.
                unsafe { std::ptr::read_volatile(data.as_ptr().add(offset)) };
            }
            release_pages(data);
        }
    }
}

/// A `VarBuilder` backend that serves diffusers names from a checkpoint stored under other
/// names, converting as its `resolve` says, and copying each tensor out of the mapping.
pub struct RenamingBackend(pub Arc<Checkpoint>);

impl SimpleBackend for RenamingBackend {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let stored = || match self.0.stored_name(name) {
            Some(stored) if stored != name => format!("{stored} (diffusers' {name})"),
            _ => name.to_string(),
        };
        let tensor = self.0.load(name, dev).map_err(|e| match e {
            candle_core::Error::CannotFindTensor { .. } => {
                candle_core::Error::Msg(format!("missing tensor {}", stored()))
            }
            other => other,
        })?;
        if tensor.shape() != &s {
            candle_core::bail!(
                "{} has shape {:?}, expected {:?} (from the shapes of the other tensors)",
                stored(),
                tensor.dims(),
                s.dims()
            );
        }
        served_as(tensor, dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        served_as(self.0.load(name, dev)?, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match (self.0.resolve)(name) {
            Some(Source::Plain(s) | Source::Conv1x1AsLinear(s) | Source::Transposed(s)) => self.0.has(&s),
            Some(Source::QkvPart { name, .. }) => self.0.has(&name),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_requests_on_the_cpu_keep_f16_and_never_narrow() {
        let dev = Device::Cpu;
        let exact = Tensor::new(&[1.000_1f32, -3.0e-8, 65_504.0], &dev).unwrap();
        let served = served_as(exact.clone(), DType::F16).unwrap();
        assert_eq!(served.dtype(), DType::F32, "an f32 tensor asked for as f16 on the CPU stays f32");
        assert_eq!(served.to_vec1::<f32>().unwrap(), exact.to_vec1::<f32>().unwrap());
        let half = exact.to_dtype(DType::F16).unwrap();
        assert_eq!(served_as(half, DType::F16).unwrap().dtype(), DType::F16);
        let bf16 = exact.to_dtype(DType::BF16).unwrap();
        assert_eq!(served_as(bf16, DType::F16).unwrap().dtype(), DType::F32);
        // Other requests convert as asked (the bf16 mode narrows on purpose).
        assert_eq!(served_as(exact, DType::BF16).unwrap().dtype(), DType::BF16);
    }

    #[test]
    fn unet_names_follow_diffusers_conversion() {
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
            ("down_blocks.0.resnets.0.norm1.weight", "input_blocks.1.0.in_layers.0.weight"),
            ("down_blocks.0.resnets.1.conv2.weight", "input_blocks.2.0.out_layers.3.weight"),
            ("down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
            ("down_blocks.0.attentions.1.proj_in.weight", "input_blocks.2.1.proj_in.weight"),
            ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
            ("down_blocks.3.resnets.1.time_emb_proj.weight", "input_blocks.11.0.emb_layers.1.weight"),
            ("mid_block.resnets.1.norm2.bias", "middle_block.2.out_layers.0.bias"),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            ("up_blocks.0.resnets.2.conv1.weight", "output_blocks.2.0.in_layers.2.weight"),
            ("up_blocks.1.attentions.0.norm.weight", "output_blocks.3.1.norm.weight"),
            ("up_blocks.3.resnets.2.norm1.weight", "output_blocks.11.0.in_layers.0.weight"),
            ("up_blocks.1.upsamplers.0.conv.weight", "output_blocks.5.?.conv.weight"),
            ("conv_norm_out.weight", "out.0.weight"),
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(ldm_unet_name(diffusers, 2).as_deref(), Some(ldm), "{diffusers}");
        }
        assert_eq!(ldm_unet_name("not.a.tensor", 2), None);
    }

    #[test]
    fn vae_names_reverse_the_decoder_levels() {
        let p = |s: &str| Some(Source::Plain(s.to_string()));
        assert_eq!(
            ldm_vae_source("decoder.up_blocks.0.resnets.1.conv1.weight", 4),
            p("decoder.up.3.block.1.conv1.weight")
        );
        assert_eq!(
            ldm_vae_source("decoder.up_blocks.3.resnets.0.conv_shortcut.weight", 4),
            p("decoder.up.0.block.0.nin_shortcut.weight")
        );
        assert_eq!(
            ldm_vae_source("decoder.up_blocks.0.upsamplers.0.conv.bias", 4),
            p("decoder.up.3.upsample.conv.bias")
        );
        assert_eq!(
            ldm_vae_source("decoder.mid_block.resnets.1.norm2.weight", 4),
            p("decoder.mid.block_2.norm2.weight")
        );
        assert_eq!(ldm_vae_source("decoder.conv_norm_out.bias", 4), p("decoder.norm_out.bias"));
        assert_eq!(
            ldm_vae_source("encoder.down_blocks.1.downsamplers.0.conv.weight", 4),
            p("encoder.down.1.downsample.conv.weight")
        );
        assert_eq!(
            ldm_vae_source("decoder.mid_block.attentions.0.to_out.0.weight", 4),
            Some(Source::Conv1x1AsLinear("decoder.mid.attn_1.proj_out.weight".into()))
        );
        assert_eq!(
            ldm_vae_source("decoder.mid_block.attentions.0.group_norm.bias", 4),
            p("decoder.mid.attn_1.norm.bias")
        );
        assert_eq!(ldm_vae_source("post_quant_conv.weight", 4), p("post_quant_conv.weight"));
    }

    #[test]
    fn open_clip_splits_fused_qkv() {
        assert_eq!(
            open_clip_source("text_model.encoder.layers.3.self_attn.k_proj.bias"),
            Some(Source::QkvPart { name: "transformer.resblocks.3.attn.in_proj_bias".into(), index: 1 })
        );
        assert_eq!(
            open_clip_source("text_model.encoder.layers.0.mlp.fc2.weight"),
            Some(Source::Plain("transformer.resblocks.0.mlp.c_proj.weight".into()))
        );
        assert_eq!(open_clip_source("text_projection.weight"), Some(Source::Transposed("text_projection".into())));
        assert_eq!(
            open_clip_source("text_model.embeddings.position_embedding.weight"),
            Some(Source::Plain("positional_embedding".into()))
        );
    }
}
