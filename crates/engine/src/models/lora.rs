//! LoRA and LyCORIS adapters, attached to the layers they touch by name.
//!
//! While a model is built, every linear and convolution layer of its text encoders and U-Net
//! registers a [`Slot`] under its diffusers name (`unet/down_blocks.0.attentions.0.proj_in`,
//! `text_encoder/text_model.encoder.layers.0.mlp.fc1`), the way [`super::mapped`] finds its
//! weights: a thread-local, since candle's `VarBuilder` carries nothing else. Applying LoRAs
//! fills those slots with deltas; each layer adds `scale · up(down(x))` (or `ΔW·x` for the
//! LyCORIS kinds whose ΔW is not low-rank) to its own output. The mapped checkpoint is never
//! written or copied: the base weights stay as they are, so changing or removing LoRAs between
//! jobs needs no reload and gives the base image back bit for bit, and only the adapters'
//! own tensors take memory (LoHa/LoKr: one ΔW per touched layer).
//!
//! Written by hand because no Rust crate reads these formats. File formats, as artists meet
//! them: kohya-ss LoRA and LoCon (`lora_unet_*`, `lora_te_*`, `lora_te1_*` / `lora_te2_*`; SD 1.x
//! files use diffusers module names, SDXL files the original SGM names), LyCORIS LoHa
//! (`hada_w1_a` …) and LoKr (`lokr_w1` …), and diffusers / PEFT (`lora_A` / `lora_B`, or
//! `lora.down` / `lora.up`). Scale = weight × alpha / rank (alpha = rank when the file has none).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use candle_core::{DType, Device, Tensor};

use super::Family;
use crate::{Error, Result};

/// What a layer is, for checking an adapter's shapes against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerShape {
    Linear { out_dim: usize, in_dim: usize },
    Conv { out_ch: usize, in_ch: usize, kernel: usize },
}

impl LayerShape {
    fn out_in(&self) -> (usize, usize) {
        match *self {
            LayerShape::Linear { out_dim, in_dim } => (out_dim, in_dim),
            LayerShape::Conv { out_ch, in_ch, .. } => (out_ch, in_ch),
        }
    }

    /// The layer's weight shape.
    fn weight_dims(&self) -> Vec<usize> {
        match *self {
            LayerShape::Linear { out_dim, in_dim } => vec![out_dim, in_dim],
            LayerShape::Conv { out_ch, in_ch, kernel } => vec![out_ch, in_ch, kernel, kernel],
        }
    }
}

/// One adapter's contribution to one layer.
#[derive(Debug, Clone)]
pub enum Delta {
    /// `scale · up(down(x))`. Linear: down (r, in), up (out, r). Convolution: down (r, in, k, k)
    /// with the layer's stride and padding, up (out, r, 1, 1).
    LowRank { down: Tensor, up: Tensor, scale: f64 },
    /// `ΔW · x` with ΔW the layer's weight shape, already scaled (LoHa, LoKr, full diffs).
    Full { weight: Tensor },
}

type Deltas = Arc<RwLock<Vec<Delta>>>;

/// A layer's adapters: `None` for layers built outside a model load (nothing can attach).
#[derive(Clone, Default)]
pub struct Slot(Option<Deltas>);

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.as_ref().and_then(|d| d.read().ok().map(|d| d.len())).unwrap_or(0);
        write!(f, "Slot({n} adapters)")
    }
}

fn candle(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl Slot {
    fn deltas(&self) -> candle_core::Result<Option<std::sync::RwLockReadGuard<'_, Vec<Delta>>>> {
        match &self.0 {
            None => Ok(None),
            Some(d) => {
                let guard = d.read().map_err(candle)?;
                Ok(if guard.is_empty() { None } else { Some(guard) })
            }
        }
    }

    /// `out` plus every adapter's share for the linear layer's input `xs`. With no adapter,
    /// `out` untouched (the base layer's bits).
    pub fn add_linear(&self, xs: &Tensor, out: Tensor) -> candle_core::Result<Tensor> {
        let Some(deltas) = self.deltas()? else { return Ok(out) };
        let mut out = out;
        let x = xs.to_dtype(out.dtype())?;
        for delta in deltas.iter() {
            let add = match delta {
                Delta::LowRank { down, up, scale } => {
                    let h = x.broadcast_matmul(&down.t()?)?;
                    (h.broadcast_matmul(&up.t()?)? * *scale)?
                }
                Delta::Full { weight } => x.broadcast_matmul(&weight.t()?)?,
            };
            out = (out + add)?;
        }
        Ok(out)
    }

    /// `out` plus every adapter's share for the convolution's input `xs`.
    pub fn add_conv(&self, xs: &Tensor, out: Tensor, stride: usize, padding: usize) -> candle_core::Result<Tensor> {
        let Some(deltas) = self.deltas()? else { return Ok(out) };
        let mut out = out;
        let x = xs.to_dtype(out.dtype())?;
        for delta in deltas.iter() {
            let add = match delta {
                Delta::LowRank { down, up, scale } => {
                    let h = x.conv2d(down, padding, stride, 1, 1)?;
                    (h.conv2d(up, 0, 1, 1, 1)? * *scale)?
                }
                Delta::Full { weight } => x.conv2d(weight, padding, stride, 1, 1)?,
            };
            out = (out + add)?;
        }
        Ok(out)
    }
}

/// A layer adapters can attach to.
#[derive(Clone)]
struct AdapterLayer {
    shape: LayerShape,
    deltas: Deltas,
}

struct Collecting {
    component: Option<String>,
    layers: BTreeMap<String, AdapterLayer>,
}

thread_local! {
    /// The layers of the model being built on this thread (see [`collect`]).
    static COLLECTING: RefCell<Option<Collecting>> = const { RefCell::new(None) };
}

/// Called by every linear and convolution layer as it is built: a slot under the current
/// component's name for it, when a model load is collecting them.
pub(crate) fn register(prefix: &str, shape: LayerShape) -> Slot {
    COLLECTING.with(|c| {
        let mut c = c.borrow_mut();
        let Some(collecting) = c.as_mut() else { return Slot(None) };
        let Some(component) = &collecting.component else { return Slot(None) };
        let deltas: Deltas = Arc::default();
        collecting.layers.insert(format!("{component}/{prefix}"), AdapterLayer { shape, deltas: deltas.clone() });
        Slot(Some(deltas))
    })
}

/// Runs `build` (a model load) collecting the slots of the layers built inside [`component`]
/// scopes.
pub(crate) fn collect<T>(build: impl FnOnce() -> T) -> (T, Adapters) {
    let previous = COLLECTING.with(|c| c.replace(Some(Collecting { component: None, layers: BTreeMap::new() })));
    let out = build();
    let collected = COLLECTING.with(|c| c.replace(previous));
    let layers = collected.map(|c| c.layers).unwrap_or_default();
    (out, Adapters { layers })
}

/// While alive, layers built on this thread belong to `name` ("unet", "text_encoder", …).
pub(crate) struct ComponentScope(Option<String>);

pub(crate) fn component(name: &str) -> ComponentScope {
    let previous = COLLECTING.with(|c| c.borrow_mut().as_mut().and_then(|c| c.component.replace(name.to_string())));
    ComponentScope(previous)
}

impl Drop for ComponentScope {
    fn drop(&mut self) {
        let previous = self.0.take();
        COLLECTING.with(|c| {
            if let Some(c) = c.borrow_mut().as_mut() {
                c.component = previous;
            }
        });
    }
}

/// A LoRA to apply: its file and the weights for the text encoders and the U-Net.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeight {
    pub path: PathBuf,
    pub text_weight: f64,
    pub unet_weight: f64,
}

impl LoraWeight {
    /// The file's stem: the name `<lora:NAME:…>` uses and A1111 writes.
    pub fn name(&self) -> String {
        self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// What applying LoRAs did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraReport {
    /// Layers changed, over all LoRAs.
    pub layers: usize,
    /// Bytes the adapters' tensors take.
    pub bytes: usize,
    /// Per LoRA, the modules of its file that match no layer of the model (never dropped
    /// silently: the caller shows them).
    pub unmatched: Vec<(String, Vec<String>)>,
}

/// The layers of a loaded model adapters can attach to, by component and diffusers name.
#[derive(Clone, Default)]
pub struct Adapters {
    layers: BTreeMap<String, AdapterLayer>,
}

impl std::fmt::Debug for Adapters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Adapters({} layers)", self.layers.len())
    }
}

/// A module of a LoRA file: its tensors by role and its alpha.
#[derive(Debug, Default)]
struct FileModule {
    tensors: HashMap<&'static str, Tensor>,
    alpha: Option<f64>,
}

/// The roles a module's tensors play, by the suffix their names end with.
const SUFFIXES: &[(&str, &str)] = &[
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".hada_w1_a", "w1a"),
    (".hada_w1_b", "w1b"),
    (".hada_w2_a", "w2a"),
    (".hada_w2_b", "w2b"),
    (".hada_t1", "t1"),
    (".hada_t2", "t2"),
    (".lokr_w1", "kw1"),
    (".lokr_w1_a", "kw1a"),
    (".lokr_w1_b", "kw1b"),
    (".lokr_w2", "kw2"),
    (".lokr_w2_a", "kw2a"),
    (".lokr_w2_b", "kw2b"),
    (".lokr_t2", "kt2"),
    (".diff", "diff"),
];

/// A LoRA file read into memory (they are small: tens of MB).
pub struct LoraFile {
    pub path: PathBuf,
    modules: BTreeMap<String, FileModule>,
}

fn lora_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Model { path: path.to_path_buf(), message: message.into() }
}

impl LoraFile {
    /// Reads and checks a LoRA / LyCORIS file; anything else is refused with what it is.
    pub fn read(path: &Path) -> Result<Self> {
        let extension = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        if extension != "safetensors" {
            return Err(lora_error(
                path,
                "LoRAs are read from .safetensors files only (pickle files can run code when opened)",
            ));
        }
        let names = super::safetensors_check::validate_safetensors(path)?;
        if names.iter().any(|n| n.starts_with("model.diffusion_model."))
            || names.iter().any(|n| n.starts_with("conditioner."))
        {
            return Err(lora_error(path, "this is a checkpoint (a whole model), not a LoRA: open it as the model"));
        }
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| lora_error(path, format!("cannot read it: {}", crate::error::candle_message(e))))?;
        let mut modules: BTreeMap<String, FileModule> = BTreeMap::new();
        for (name, tensor) in tensors {
            if let Some(module) = name.strip_suffix(".alpha") {
                let alpha = tensor.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                modules.entry(module.to_string()).or_default().alpha = alpha.first().copied();
                continue;
            }
            // The longest suffix first (".lokr_w1_a" before ".lokr_w1").
            let found =
                SUFFIXES.iter().filter(|(suffix, _)| name.ends_with(suffix)).max_by_key(|(suffix, _)| suffix.len());
            if let Some((suffix, role)) = found {
                let module = &name[..name.len() - suffix.len()];
                modules.entry(module.to_string()).or_default().tensors.insert(role, tensor.to_dtype(DType::F32)?);
            }
        }
        modules.retain(|_, m| !m.tensors.is_empty());
        if modules.is_empty() {
            return Err(lora_error(
                path,
                "not a LoRA: none of its tensors is a LoRA, LoCon, LoHa or LoKr weight (lora_down/lora_up, lora_A/lora_B, hada_*, lokr_*)",
            ));
        }
        Ok(Self { path: path.to_path_buf(), modules })
    }
}

impl LoraFile {
    /// The family the file was made for, where its names or widths say: a second text encoder
    /// or SGM block names mean SDXL; otherwise the cross-attention width (768 SD 1.x, 1024 SD 2.x).
    pub fn family_hint(&self) -> Option<Family> {
        let names = || self.modules.keys();
        if names().any(|m| {
            m.starts_with("lora_te2_")
                || m.starts_with("text_encoder_2.")
                || m.starts_with("lora_unet_input_blocks_")
                || m.starts_with("lora_unet_output_blocks_")
        }) {
            return Some(Family::Sdxl);
        }
        let width = self.modules.iter().find_map(|(name, m)| {
            let cross = name.ends_with("attn2_to_k") || name.ends_with("attn2.to_k");
            cross.then(|| m.tensors.get("down").and_then(|d| d.dim(1).ok())).flatten()
        })?;
        match width {
            768 => Some(Family::Sd1),
            1024 => Some(Family::Sd2),
            2048 => Some(Family::Sdxl),
            _ => None,
        }
    }
}

/// How a module of a file names its layer: component and the name in one of three spellings.
fn module_target(module: &str) -> Option<(&'static str, String, bool)> {
    for (prefix, component) in [
        ("lora_unet_", "unet"),
        ("lora_te2_", "text_encoder_2"),
        ("lora_te1_", "text_encoder"),
        ("lora_te_", "text_encoder"),
    ] {
        if let Some(rest) = module.strip_prefix(prefix) {
            return Some((component, rest.to_string(), true));
        }
    }
    for (prefix, component) in
        [("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder")]
    {
        if let Some(rest) = module.strip_prefix(prefix) {
            return Some((component, rest.to_string(), false));
        }
    }
    None
}

/// A family's name from its cross-attention width, for "this LoRA is for …" messages.
fn family_of_width(width: usize) -> String {
    match width {
        768 => "SD 1.x".into(),
        1024 => "SD 2.x".into(),
        2048 => "SDXL".into(),
        w => format!("a model with {w}-wide text conditioning"),
    }
}

impl Adapters {
    /// Removes every adapter: the model computes with its base weights only.
    pub fn clear(&self) -> Result<()> {
        for layer in self.layers.values() {
            layer.deltas.write().map_err(|e| Error::InvalidSetting(e.to_string()))?.clear();
        }
        Ok(())
    }

    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Names to find a layer by: diffusers' dotted name, kohya's underscored one, and for the
    /// U-Net also the underscored SGM (LDM) name SDXL files use.
    fn lookup(&self, layers_per_block: usize) -> HashMap<(String, String), String> {
        let mut table = HashMap::new();
        for key in self.layers.keys() {
            let Some((component, name)) = key.split_once('/') else { continue };
            table.insert((component.to_string(), name.to_string()), key.clone());
            table.insert((component.to_string(), name.replace('.', "_")), key.clone());
            // transformers 5 names CLIP's modules without `text_model.`; files saved from it too.
            if let Some(short) = name.strip_prefix("text_model.") {
                table.entry((component.to_string(), short.to_string())).or_insert_with(|| key.clone());
            }
            if component == "unet" {
                if let Some(ldm) = super::checkpoint::ldm_unet_name(&format!("{name}.weight"), layers_per_block) {
                    let ldm = ldm.trim_end_matches(".weight");
                    // The upsampler's position depends on the block (see `ldm_unet_name`).
                    for variant in [ldm.replace('?', "1"), ldm.replace('?', "2")] {
                        table.entry((component.to_string(), variant.replace('.', "_"))).or_insert_with(|| key.clone());
                    }
                }
            }
        }
        table
    }

    /// Replaces the adapters with `loras` (an empty list removes them all). Every LoRA is read
    /// and checked before any layer changes, so a bad file leaves the model as it was.
    pub fn apply(
        &self,
        loras: &[(LoraFile, LoraWeight)],
        family: Family,
        context_width: usize,
        layers_per_block: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<LoraReport> {
        let table = self.lookup(layers_per_block);
        let mut planned: Vec<(String, Delta)> = Vec::new();
        let mut report = LoraReport::default();
        for (file, weight) in loras {
            if let Some(made_for) = file.family_hint().filter(|&f| f != family) {
                return Err(lora_error(&file.path, format!("this LoRA is for {made_for} but the model is {family}")));
            }
            let mut unmatched = Vec::new();
            let mut matched = 0;
            for (module, tensors) in &file.modules {
                let Some((component, name, _kohya)) = module_target(module) else {
                    unmatched.push(module.clone());
                    continue;
                };
                let Some(key) = table.get(&(component.to_string(), name)) else {
                    unmatched.push(module.clone());
                    continue;
                };
                matched += 1;
                let layer = &self.layers[key];
                let w = if component == "unet" { weight.unet_weight } else { weight.text_weight };
                if w == 0.0 {
                    continue;
                }
                let delta = build_delta(&file.path, module, tensors, layer.shape, w, family, context_width, key)?;
                planned.push((key.clone(), delta));
            }
            if !unmatched.is_empty() {
                if matched == 0 {
                    return Err(lora_error(
                        &file.path,
                        format!(
                            "none of its {} modules matches a layer of this {family} model (e.g. {}): it is for another kind of model",
                            file.modules.len(),
                            unmatched[0]
                        ),
                    ));
                }
                report.unmatched.push((weight.name(), unmatched));
            }
        }
        self.clear()?;
        let mut touched = std::collections::BTreeSet::new();
        for (key, delta) in planned {
            let delta = match delta {
                Delta::LowRank { down, up, scale } => {
                    report.bytes += (down.elem_count() + up.elem_count()) * dtype.size_in_bytes();
                    Delta::LowRank {
                        down: down.to_device(device)?.to_dtype(dtype)?,
                        up: up.to_device(device)?.to_dtype(dtype)?,
                        scale,
                    }
                }
                Delta::Full { weight } => {
                    report.bytes += weight.elem_count() * dtype.size_in_bytes();
                    Delta::Full { weight: weight.to_device(device)?.to_dtype(dtype)? }
                }
            };
            self.layers[&key].deltas.write().map_err(|e| Error::InvalidSetting(e.to_string()))?.push(delta);
            touched.insert(key);
        }
        report.layers = touched.len();
        Ok(report)
    }
}

/// `w1 ⊗ w2` (Kronecker) for matrices, or for a matrix and a convolution kernel (out, in, k, k).
fn kron(w1: &Tensor, w2: &Tensor) -> candle_core::Result<Tensor> {
    let (a, b) = w1.dims2()?;
    match w2.dims() {
        &[c, d] => w1.reshape((a, 1, b, 1))?.broadcast_mul(&w2.reshape((1, c, 1, d))?)?.reshape((a * c, b * d)),
        &[c, d, kh, kw] => w1
            .reshape((a, 1, b, 1, 1, 1))?
            .broadcast_mul(&w2.reshape((1, c, 1, d, kh, kw))?)?
            .reshape((a * c, b * d, kh, kw)),
        other => candle_core::bail!("a LoKr w2 of shape {other:?}"),
    }
}

/// One module's delta for its layer, its shapes checked.
#[allow(clippy::too_many_arguments)]
fn build_delta(
    path: &Path,
    module: &str,
    m: &FileModule,
    shape: LayerShape,
    weight: f64,
    family: Family,
    context_width: usize,
    key: &str,
) -> Result<Delta> {
    let bad = |what: String| lora_error(path, format!("{module}: {what}"));
    let (out_dim, in_dim) = shape.out_in();
    let get = |role: &str| m.tensors.get(role);
    if let (Some(down), Some(up)) = (get("down"), get("up")) {
        if get("mid").is_some() {
            return Err(bad("LoCon with a Tucker (lora_mid) weight is not supported yet".into()));
        }
        let rank = down.dim(0)?;
        let down_in = down.dim(1)?;
        if down_in != in_dim || up.dim(0)? != out_dim || up.dim(1)? != rank {
            // The usual cause: a LoRA of another family (its cross-attention width differs).
            if key.ends_with("attn2.to_k") || key.ends_with("attn2.to_v") {
                return Err(lora_error(
                    path,
                    format!(
                        "this LoRA is for {} but the model is {family} ({}): {module} takes {down_in} inputs, the layer {in_dim}",
                        family_of_width(down_in),
                        family_of_width(context_width)
                    ),
                ));
            }
            return Err(bad(format!(
                "shapes down {:?} / up {:?} do not fit the layer {key} ({out_dim} × {in_dim}): a LoRA for another model",
                down.dims(),
                up.dims()
            )));
        }
        let scale = weight * m.alpha.unwrap_or(rank as f64) / rank as f64;
        let (down, up) = match shape {
            LayerShape::Linear { .. } => (down.reshape((rank, in_dim))?, up.reshape((out_dim, rank))?),
            LayerShape::Conv { kernel, .. } => {
                let down = match down.rank() {
                    2 => down.reshape((rank, in_dim, 1, 1))?,
                    _ => down.clone(),
                };
                let dk = down.dim(2)?;
                if dk != kernel && dk != 1 {
                    return Err(bad(format!("a {dk}×{dk} down weight for a {kernel}×{kernel} convolution")));
                }
                if dk != kernel {
                    // A 1×1 LoRA on a k×k convolution (kohya's plain LoRA skips these; be safe).
                    return Err(bad(format!("a 1×1 down weight for the {kernel}×{kernel} convolution {key}")));
                }
                (down, up.reshape((out_dim, rank, 1, 1))?)
            }
        };
        return Ok(Delta::LowRank { down, up, scale });
    }
    let full = |delta: Tensor, rank: Option<usize>| -> Result<Delta> {
        let dims = shape.weight_dims();
        if delta.elem_count() != dims.iter().product::<usize>() {
            return Err(bad(format!("its ΔW has {} values, the layer {key} {dims:?}", delta.elem_count())));
        }
        let scale = match (rank, m.alpha) {
            (Some(r), Some(alpha)) => alpha / r as f64,
            _ => 1.0,
        };
        Ok(Delta::Full { weight: (delta.reshape(dims)? * (weight * scale))? })
    };
    if let (Some(w1a), Some(w1b), Some(w2a), Some(w2b)) = (get("w1a"), get("w1b"), get("w2a"), get("w2b")) {
        if get("t1").is_some() || get("t2").is_some() {
            return Err(bad("LoHa with Tucker (hada_t1/t2) weights is not supported yet".into()));
        }
        // LyCORIS LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha / rank.
        let rank = w1b.dim(0)?;
        let flat = |t: &Tensor| t.flatten_from(1);
        let delta = (w1a.matmul(&flat(w1b)?)? * w2a.matmul(&flat(w2b)?)?)?;
        let delta = full(delta, Some(rank))?;
        return Ok(delta);
    }
    let factor = |w: &str, a: &str, b: &str| -> Result<Option<(Tensor, Option<usize>)>> {
        if let Some(t) = get(w) {
            return Ok(Some((t.clone(), None)));
        }
        match (get(a), get(b)) {
            (Some(a), Some(b)) => {
                let rank = a.dim(1)?;
                let product = match b.rank() {
                    2 => a.matmul(b)?,
                    _ => {
                        // A convolution factor: (out, r) · (r, in, k, k).
                        let (r, i, kh, kw) = b.dims4()?;
                        a.matmul(&b.reshape((r, i * kh * kw))?)?.reshape((a.dim(0)?, i, kh, kw))?
                    }
                };
                Ok(Some((product, Some(rank))))
            }
            _ => Ok(None),
        }
    };
    if let (Some((w1, r1)), Some((w2, r2))) = (factor("kw1", "kw1a", "kw1b")?, factor("kw2", "kw2a", "kw2b")?) {
        if get("kt2").is_some() {
            return Err(bad("LoKr with a Tucker (lokr_t2) weight is not supported yet".into()));
        }
        // LyCORIS LoKr: ΔW = w1 ⊗ w2, scaled by alpha / rank when a factor is decomposed (A1111's rule).
        let delta = kron(&w1, &w2)?;
        return full(delta, r1.or(r2));
    }
    if let Some(diff) = get("diff") {
        return full(diff.clone(), None);
    }
    Err(bad(format!("an incomplete module: it has {:?}", m.tensors.keys().collect::<Vec<_>>())))
}

/// `<lora:NAME:WEIGHT>` and `<lora:NAME:TEXT_WEIGHT:UNET_WEIGHT>` tags taken out of a prompt, as
/// A1111 does: the prompt without them, and each tag's name and weights (1 when left out).
pub fn extract_lora_tags(prompt: &str) -> (String, Vec<(String, f64, f64)>) {
    let mut clean = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        let Some(len) = rest[start..].find('>') else { break };
        let body = &rest[start + "<lora:".len()..start + len];
        let mut parts = body.split(':');
        let name = parts.next().unwrap_or("").trim().to_string();
        let numbers: Vec<f64> = parts.filter_map(|p| p.trim().parse().ok()).collect();
        let text = numbers.first().copied().unwrap_or(1.0);
        let unet = numbers.get(1).copied().unwrap_or(text);
        clean.push_str(&rest[..start]);
        tags.push((name, text, unet));
        rest = &rest[start + len + 1..];
    }
    clean.push_str(rest);
    (clean, tags)
}

/// AUTOMATIC1111's LoRA hash: the first 12 hex digits of the SHA-256 of a safetensors file's
/// data after its header (kohya's "addnet" hash), as `Lora hashes` writes it.
pub fn addnet_hash(path: &Path) -> Result<String> {
    use std::io::Read;
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let mut len = [0u8; 8];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut len)).map_err(io)?;
    let full = super::hash::sha256_file_from(path, 8 + u64::from_le_bytes(len))?;
    Ok(full[..12].to_string())
}

/// Finds `<name>.safetensors` under `dir` (its subfolders too, as A1111's LoRA folder).
pub fn find_in_dir(dir: &Path, name: &str) -> Option<PathBuf> {
    let direct = dir.join(format!("{name}.safetensors"));
    if direct.is_file() {
        return Some(direct);
    }
    let entries = std::fs::read_dir(dir).ok()?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_in_dir(&path, name) {
                return Some(found);
            }
        }
    }
    None
}

/// What a file in a LoRA folder is, from its header alone (fast enough for a list): the
/// kind and family its names show, or why it is no LoRA.
pub fn describe_file(path: &Path) -> std::result::Result<String, String> {
    let names = super::safetensors_check::validate_safetensors(path).map_err(|e| e.to_string())?;
    if names.iter().any(|n| n.starts_with("model.diffusion_model.") || n.starts_with("conditioner.")) {
        return Err("a checkpoint, not a LoRA".into());
    }
    let has = |s: &str| names.iter().any(|n| n.contains(s));
    let kind = if has(".hada_w1_a") {
        "LoHa"
    } else if has(".lokr_w") {
        "LoKr"
    } else if has(".lora_A.") || has(".lora.down.") {
        "LoRA (PEFT)"
    } else if has(".lora_down.") {
        "LoRA"
    } else {
        return Err("not a LoRA".into());
    };
    let xl = names.iter().any(|n| {
        n.starts_with("lora_te2_") || n.starts_with("text_encoder_2.") || n.starts_with("lora_unet_input_blocks_")
    });
    Ok(format!("{kind}, {}", if xl { "SDXL" } else { "SD 1.x / 2.x" }))
}

/// The `.safetensors` files under `dir`, sorted (the app's LoRA browser).
pub fn list_dir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(list_dir(&path));
        } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_come_out_of_the_prompt() {
        let (clean, tags) = extract_lora_tags("a fox <lora:ink:0.8>, snow <lora:style> <lora:two:0.5:1.2>");
        assert_eq!(clean, "a fox , snow  ");
        assert_eq!(tags, vec![("ink".into(), 0.8, 0.8), ("style".into(), 1.0, 1.0), ("two".into(), 0.5, 1.2)]);
        assert_eq!(extract_lora_tags("no tags <lora:open").0, "no tags <lora:open");
    }

    #[test]
    fn kron_is_the_kronecker_product() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let b = Tensor::new(&[[0f32, 1.], [1., 0.]], &dev).unwrap();
        let k: Vec<Vec<f32>> = kron(&a, &b).unwrap().to_vec2().unwrap();
        assert_eq!(k, vec![vec![0., 1., 0., 2.], vec![1., 0., 2., 0.], vec![0., 3., 0., 4.], vec![3., 0., 4., 0.]]);
    }

    #[test]
    fn a_slot_without_adapters_leaves_the_output_alone() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2., 3.]], &dev).unwrap();
        let out = Tensor::new(&[[0.5f32, -1.]], &dev).unwrap();
        let empty = Slot(Some(Arc::default()));
        assert_eq!(empty.add_linear(&x, out.clone()).unwrap().to_vec2::<f32>().unwrap(), vec![vec![0.5, -1.]]);
        let slot = Slot(Some(Arc::new(RwLock::new(vec![Delta::LowRank {
            down: Tensor::new(&[[1f32, 0., 0.]], &dev).unwrap(),
            up: Tensor::new(&[[1f32], [2.]], &dev).unwrap(),
            scale: 0.5,
        }]))));
        // out + 0.5 · up · (down · x) = [0.5 + 0.5, -1 + 1]
        assert_eq!(slot.add_linear(&x, out).unwrap().to_vec2::<f32>().unwrap(), vec![vec![1.0, 0.0]]);
    }
}
