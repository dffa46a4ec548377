//! What persists across restarts (kept apart from runtime state). Every field has a default so
//! a settings store from an older or newer Easel, or a corrupt one, still yields usable settings.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const STORAGE_KEY: &str = "easel-settings";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub model_path: Option<PathBuf>,
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f64,
    /// Sampler id (`euler`, `dpmpp_2m_karras`, …).
    pub sampler: String,
    pub seed: u64,
    /// Draw a new seed for every image instead of using `seed`.
    pub random_seed: bool,
    pub width: usize,
    pub height: usize,
    pub batch_count: usize,
    /// `cpu` or `nv`.
    pub rng: String,
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
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model_path: None,
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 25,
            guidance: 7.0,
            sampler: "euler".into(),
            seed: 0,
            random_seed: true,
            width: 512,
            height: 512,
            batch_count: 1,
            rng: "cpu".into(),
            outputs_dir: None,
            autosave: true,
            models_dir: None,
            vae_path: None,
            cpu_bf16: false,
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
    serde_json::from_str(text).ok()
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
    fn settings_round_trip() {
        let settings = Settings { prompt: "a fox".into(), seed: 42, random_seed: false, ..Default::default() };
        assert_eq!(Settings::from_stored(Some(&settings.to_stored())), settings);
    }
}
