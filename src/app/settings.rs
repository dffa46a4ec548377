//! What persists across restarts (kept apart from runtime state). Every field has a default so
//! a settings store from an older or newer Easel, or a corrupt one, still yields usable settings.

use std::path::PathBuf;

use easel_engine::pipeline::fit::ResizeMode;
use easel_engine::pipeline::prompt::Emphasis;
use easel_engine::pipeline::HiresUpscaler;
use easel_engine::rng::RngKind;
use easel_engine::schedulers::{SamplerId, Schedule};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const STORAGE_KEY: &str = "easel-settings";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub model_path: Option<PathBuf>,
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f64,
    #[serde(serialize_with = "by_id", deserialize_with = "lenient")]
    pub sampler: SamplerId,
    /// The noise schedule, chosen apart from the sampler.
    #[serde(serialize_with = "by_id", deserialize_with = "lenient")]
    pub schedule: Schedule,
    pub seed: u64,
    /// Draw a new seed for every image instead of using `seed`.
    pub random_seed: bool,
    pub width: usize,
    pub height: usize,
    pub batch_count: usize,
    #[serde(serialize_with = "by_id", deserialize_with = "lenient")]
    pub rng: RngKind,
    /// Where finished images are saved; `None` means the platform's data folder.
    pub outputs_dir: Option<PathBuf>,
    /// Save every finished image automatically.
    pub autosave: bool,
    /// A folder of checkpoints and diffusers folders to list in the Models panel.
    pub models_dir: Option<PathBuf>,
    /// A VAE used instead of the model's own (diffusers `vae/` folder or .safetensors file).
    pub vae_path: Option<PathBuf>,
    /// The CPU bf16 mode (U-Net weights in bf16: faster, half the memory, not bit-exact).
    pub cpu_bf16: bool,
    /// Image to image: how much of the init image is repainted (A1111's denoising strength).
    pub strength: f64,
    /// How an init image of another size is fitted to the image size.
    #[serde(serialize_with = "by_id", deserialize_with = "lenient")]
    pub resize_mode: ResizeMode,
    /// Inpainting: the mask's soft edge in pixels (A1111's "Mask blur"; 0 = diffusers' hard edge).
    pub mask_blur: f64,
    /// Inpainting renders only the masked region (plus `inpaint_padding`) at the full size.
    pub inpaint_only_masked: bool,
    pub inpaint_padding: u32,
    /// The mask painter's brush diameter, in pixels of the init image.
    pub brush_size: f32,
    /// Hires fix for text to image: paint small, upscale, repaint.
    pub hires_enabled: bool,
    pub hires_scale: f64,
    /// 0: as many steps as the first pass.
    pub hires_steps: usize,
    pub hires_denoise: f64,
    #[serde(serialize_with = "by_id", deserialize_with = "lenient")]
    pub hires_upscaler: HiresUpscaler,
    /// How prompt weights act (A1111's by default).
    #[serde(serialize_with = "by_id", deserialize_with = "lenient")]
    pub emphasis: Emphasis,
    /// A1111's "Clip skip" (1 = the last layer).
    pub clip_skip: u32,
    /// Where `<lora:NAME:…>` tags find NAME.safetensors.
    pub lora_dir: Option<PathBuf>,
    /// Textual-inversion embeddings the prompts can name.
    pub embeddings_dir: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model_path: None,
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 25,
            guidance: 7.0,
            sampler: SamplerId::Euler,
            schedule: Schedule::Default,
            seed: 0,
            random_seed: true,
            width: 512,
            height: 512,
            batch_count: 1,
            rng: RngKind::Cpu,
            outputs_dir: None,
            autosave: true,
            models_dir: None,
            vae_path: None,
            strength: 0.75,
            resize_mode: ResizeMode::Resize,
            cpu_bf16: false,
            mask_blur: 4.0,
            inpaint_only_masked: false,
            inpaint_padding: 32,
            brush_size: 48.0,
            hires_enabled: false,
            hires_scale: 2.0,
            hires_steps: 0,
            hires_denoise: 0.5,
            hires_upscaler: HiresUpscaler::Latent,
            emphasis: Emphasis::A1111,
            clip_skip: 1,
            lora_dir: None,
            embeddings_dir: None,
        }
    }
}

impl Settings {
    /// Parses a stored settings string; anything unreadable gives the defaults.
    pub fn from_stored(text: Option<&str>) -> Self {
        text.and_then(parse_json).unwrap_or_default()
    }

    pub fn to_stored(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn outputs_dir(&self) -> PathBuf {
        self.outputs_dir.clone().unwrap_or_else(default_outputs_dir)
    }
}

/// Settings are stored as JSON inside eframe's key-value store.
fn parse_json(text: &str) -> Option<Settings> {
    let mut value: serde_json::Value = serde_json::from_str(text).ok()?;
    // Before sampler and schedule were separate, `sampler` named both ("dpmpp_2m_karras").
    if let Some(combined) = value.get("sampler").and_then(|v| v.as_str()).map(str::to_string) {
        if let Ok((sampler, Some(schedule))) = SamplerId::parse_with_schedule(&combined) {
            value["sampler"] = sampler.id().into();
            value["schedule"] = schedule.id().into();
        }
    }
    serde_json::from_value(value).ok()
}

/// Stored by their stable ids (`euler`, `karras`, `cpu`), the same as on the command line.
fn by_id<T: std::fmt::Display, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// An id this Easel does not know (from a newer one, or edited by hand) gives the default for
/// that field alone, not for every setting.
fn lenient<'de, T: std::str::FromStr + Default, D: Deserializer<'de>>(deserializer: D) -> Result<T, D::Error> {
    let value = serde_json::Value::deserialize(deserializer)?;
    Ok(value.as_str().and_then(|s| s.parse().ok()).unwrap_or_default())
}

/// `<data dir>/easel/outputs` (e.g. ~/.local/share/easel/outputs on Linux).
pub fn default_outputs_dir() -> PathBuf {
    dirs::data_dir().unwrap_or_else(|| PathBuf::from(".")).join("easel").join("outputs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_or_partial_settings_fall_back_to_defaults() {
        assert_eq!(Settings::from_stored(Some("{not json")), Settings::default());
        assert_eq!(Settings::from_stored(None), Settings::default());
        let partial = Settings::from_stored(Some(r#"{"prompt": "a cat", "unknown_future_key": 3}"#));
        assert_eq!(partial.prompt, "a cat");
        assert_eq!(partial.steps, Settings::default().steps);
    }

    #[test]
    fn settings_of_earlier_versions_still_load() {
        // `sampler` once named the schedule too; `rng` was a plain string.
        let old = r#"{"prompt": "a fox", "sampler": "dpmpp_2m_karras", "rng": "nv", "steps": 30}"#;
        let s = Settings::from_stored(Some(old));
        assert_eq!((s.sampler, s.schedule, s.rng), (SamplerId::DpmPp2m, Schedule::Karras, RngKind::Nv));
        assert_eq!((s.prompt.as_str(), s.steps), ("a fox", 30));
        let unknown = Settings::from_stored(Some(r#"{"prompt": "a fox", "sampler": "dpmpp_3m_sde", "rng": 5}"#));
        assert_eq!((unknown.sampler, unknown.rng, unknown.prompt.as_str()), (SamplerId::Euler, RngKind::Cpu, "a fox"));
    }

    #[test]
    fn settings_round_trip() {
        let settings = Settings {
            prompt: "a fox".into(),
            seed: 42,
            random_seed: false,
            sampler: SamplerId::DpmPp2m,
            schedule: Schedule::Karras,
            rng: RngKind::Nv,
            ..Default::default()
        };
        assert!(settings.to_stored().contains(r#""sampler":"dpmpp_2m","schedule":"karras""#));
        assert_eq!(Settings::from_stored(Some(&settings.to_stored())), settings);
    }
}
