//! Reading generation settings back out of PNGs: Easel's and AUTOMATIC1111's `parameters`
//! text, InvokeAI's `invokeai_metadata` JSON and ComfyUI's `prompt` graph, as far as they map.

use easel_engine::metadata::{parse_infotext, PARAMETERS_KEYWORD};
use easel_engine::pipeline::prompt::Emphasis;
use easel_engine::pipeline::{HiresFix, HiresUpscaler};
use easel_engine::rng::RngKind;
use easel_engine::schedulers::{SamplerId, Schedule};
use serde_json::Value;

/// Settings found in an image; `None` where the source did not say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportedSettings {
    pub source: &'static str,
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub seed: Option<u64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// The sampler and its schedule (pairs Easel does not run are left out).
    pub sampler: Option<(SamplerId, Schedule)>,
    pub rng: Option<RngKind>,
    /// Image to image / inpainting: the denoising strength.
    pub strength: Option<f64>,
    pub mask_blur: Option<f64>,
    /// "Only masked" and its padding.
    pub only_masked: Option<(bool, u32)>,
    /// `Some(None)`: the image says it had no hires fix; `None`: the source cannot say.
    pub hires: Option<Option<HiresFix>>,
    pub clip_skip: Option<u32>,
    pub emphasis: Option<Emphasis>,
}

/// Looks through a PNG's text chunks for settings of any app Easel knows.
pub fn import_settings(chunks: &[(String, String)]) -> Option<ImportedSettings> {
    let find = |key: &str| chunks.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    if let Some(text) = find(PARAMETERS_KEYWORD) {
        if let Some(settings) = from_a1111(text) {
            return Some(settings);
        }
    }
    if let Some(json) = find("invokeai_metadata").and_then(|t| serde_json::from_str::<Value>(t).ok()) {
        return Some(from_invokeai(&json));
    }
    if let Some(json) = find("prompt").and_then(|t| serde_json::from_str::<Value>(t).ok()) {
        return from_comfyui(&json);
    }
    None
}

fn from_a1111(text: &str) -> Option<ImportedSettings> {
    let p = parse_infotext(text).ok()?;
    let rng = match p.rng.as_deref() {
        Some("CPU") => RngKind::Cpu,
        // A1111's default ("GPU", no key) and "NV" both mean torch's CUDA generator.
        _ => RngKind::Nv,
    };
    let is_easel = p.version.as_deref().is_some_and(|v| v.starts_with("easel"));
    let extra = |key: &str| p.extra.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let hires = extra("Hires upscale").and_then(|v| v.parse::<f64>().ok()).map(|scale| HiresFix {
        scale,
        steps: extra("Hires steps").and_then(|v| v.parse().ok()).unwrap_or(0),
        denoise: p.denoising_strength.unwrap_or(0.5),
        // A1111 upscalers Easel does not have (ESRGAN, …) fall back to the latent one.
        upscaler: extra("Hires upscaler").and_then(|v| v.parse::<HiresUpscaler>().ok()).unwrap_or_default(),
    });
    let only_masked = extra("Inpaint area")
        .map(|area| (area == "Only masked", extra("Masked area padding").and_then(|v| v.parse().ok()).unwrap_or(32)));
    Some(ImportedSettings {
        source: if is_easel { "Easel" } else { "AUTOMATIC1111" },
        prompt: Some(p.prompt.clone()),
        negative_prompt: Some(p.negative_prompt.clone()),
        steps: Some(p.steps as usize),
        guidance: Some(p.cfg_scale),
        seed: Some(p.seed),
        width: Some(p.width as usize),
        height: Some(p.height as usize),
        sampler: SamplerId::from_a1111(&p.sampler, p.schedule_type.as_deref()),
        rng: Some(rng),
        strength: if hires.is_some() { None } else { p.denoising_strength },
        mask_blur: extra("Mask blur").and_then(|v| v.parse().ok()),
        only_masked,
        hires: Some(hires),
        clip_skip: Some(p.clip_skip_or_default()),
        // A1111 writes the emphasis only when it is not its default.
        emphasis: Some(extra("Emphasis").and_then(|e| e.parse().ok()).unwrap_or_default()),
    })
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().map(|n| n as usize).or_else(|| v.as_f64().map(|f| f as usize))
}

fn from_invokeai(json: &Value) -> ImportedSettings {
    let sampler = json["scheduler"].as_str().and_then(|s| match s {
        "euler" => Some((SamplerId::Euler, Schedule::Default)),
        "euler_a" => Some((SamplerId::EulerAncestral, Schedule::Default)),
        "ddim" => Some((SamplerId::Ddim, Schedule::Default)),
        "dpmpp_2m" => Some((SamplerId::DpmPp2m, Schedule::Default)),
        "dpmpp_2m_k" => Some((SamplerId::DpmPp2m, Schedule::Karras)),
        "lcm" => Some((SamplerId::Lcm, Schedule::Default)),
        _ => None,
    });
    ImportedSettings {
        source: "InvokeAI",
        prompt: json["positive_prompt"].as_str().map(str::to_string),
        negative_prompt: json["negative_prompt"].as_str().map(str::to_string),
        steps: as_usize(&json["steps"]),
        guidance: json["cfg_scale"].as_f64(),
        seed: json["seed"].as_u64(),
        width: as_usize(&json["width"]),
        height: as_usize(&json["height"]),
        sampler,
        // InvokeAI draws its noise with torch's CPU generator by default.
        rng: Some(RngKind::Cpu),
        ..Default::default()
    }
}

/// ComfyUI's API graph: the first KSampler gives seed/steps/cfg/sampler, its `positive` and
/// `negative` inputs lead to CLIPTextEncode nodes, its latent to an EmptyLatentImage.
fn from_comfyui(graph: &Value) -> Option<ImportedSettings> {
    let nodes = graph.as_object()?;
    let sampler_node =
        nodes.values().find(|n| matches!(n["class_type"].as_str(), Some("KSampler" | "KSamplerAdvanced")))?;
    let inputs = &sampler_node["inputs"];
    let linked = |name: &str| -> Option<&Value> {
        let id = inputs[name].as_array()?.first()?.as_str()?;
        nodes.get(id)
    };
    let text_of = |name: &str| linked(name).and_then(|n| n["inputs"]["text"].as_str()).map(str::to_string);
    let latent = linked("latent_image");
    let sampler = match inputs["sampler_name"].as_str() {
        Some("euler") => Some(SamplerId::Euler),
        Some("euler_ancestral") => Some(SamplerId::EulerAncestral),
        Some("ddim") => Some(SamplerId::Ddim),
        Some("dpmpp_2m") => Some(SamplerId::DpmPp2m),
        Some("lcm") => Some(SamplerId::Lcm),
        _ => None,
    };
    let schedule = match inputs["scheduler"].as_str() {
        Some("karras") => Some(Schedule::Karras),
        // ComfyUI's "normal" follows the model's sigmas, as Easel's default does.
        Some("normal") | None => Some(Schedule::Default),
        _ => None,
    };
    let sampler = sampler.zip(schedule).filter(|(s, schedule)| s.schedules().contains(schedule));
    Some(ImportedSettings {
        source: "ComfyUI",
        prompt: text_of("positive"),
        negative_prompt: text_of("negative"),
        steps: as_usize(&inputs["steps"]),
        guidance: inputs["cfg"].as_f64(),
        seed: inputs["seed"].as_u64().or_else(|| inputs["noise_seed"].as_u64()),
        width: latent.and_then(|n| as_usize(&n["inputs"]["width"])),
        height: latent.and_then(|n| as_usize(&n["inputs"]["height"])),
        sampler,
        // ComfyUI always draws noise with torch's CPU generator.
        rng: Some(RngKind::Cpu),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(k: &str, v: &str) -> Vec<(String, String)> {
        vec![(k.to_string(), v.to_string())]
    }

    #[test]
    fn reads_a1111_parameters() {
        let text = "a castle, sunset\nNegative prompt: blurry\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 123, Size: 512x768, Model: v1-5";
        let s = import_settings(&chunk("parameters", text)).unwrap();
        assert_eq!(s.source, "AUTOMATIC1111");
        assert_eq!(s.prompt.as_deref(), Some("a castle, sunset"));
        assert_eq!(s.negative_prompt.as_deref(), Some("blurry"));
        assert_eq!((s.steps, s.seed, s.width, s.height), (Some(30), Some(123), Some(512), Some(768)));
        assert_eq!(s.guidance, Some(6.5));
        assert_eq!(s.sampler, Some((SamplerId::DpmPp2m, Schedule::Karras)));
        assert_eq!(s.rng, Some(RngKind::Nv), "A1111 without an RNG key used the GPU generator");
    }

    #[test]
    fn reads_strength_mask_and_hires_settings() {
        let inpaint = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.6, Mask blur: 8, Inpaint area: Only masked, Masked area padding: 48";
        let s = import_settings(&chunk("parameters", inpaint)).unwrap();
        assert_eq!((s.strength, s.mask_blur, s.only_masked), (Some(0.6), Some(8.0), Some((true, 48))));
        assert_eq!(s.hires, Some(None), "no hires fix");
        let hires = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.45, Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Latent (nearest)";
        let s = import_settings(&chunk("parameters", hires)).unwrap();
        assert_eq!(s.strength, None, "the strength is the hires pass's, not image to image's");
        let h = s.hires.flatten().unwrap();
        assert_eq!((h.scale, h.steps, h.denoise, h.upscaler), (1.5, 12, 0.45, HiresUpscaler::LatentNearest));
    }

    #[test]
    fn reads_comfyui_graphs() {
        let graph = r#"{
          "3": {"class_type": "KSampler", "inputs": {"seed": 77, "steps": 12, "cfg": 5.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
                 "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "model": ["4", 0]}},
          "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 640, "height": 448, "batch_size": 1}},
          "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
          "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "fog", "clip": ["4", 1]}}
        }"#;
        let s = import_settings(&chunk("prompt", graph)).unwrap();
        assert_eq!(s.source, "ComfyUI");
        assert_eq!(s.prompt.as_deref(), Some("a lighthouse"));
        assert_eq!(s.negative_prompt.as_deref(), Some("fog"));
        assert_eq!((s.steps, s.seed, s.width, s.height), (Some(12), Some(77), Some(640), Some(448)));
        assert_eq!(s.sampler, Some((SamplerId::DpmPp2m, Schedule::Karras)));
    }

    #[test]
    fn reads_invokeai_metadata() {
        let json = r#"{"positive_prompt": "a meadow", "negative_prompt": "", "seed": 5, "steps": 20, "cfg_scale": 7.5, "width": 768, "height": 512, "scheduler": "euler_a"}"#;
        let s = import_settings(&chunk("invokeai_metadata", json)).unwrap();
        assert_eq!(s.source, "InvokeAI");
        assert_eq!(s.prompt.as_deref(), Some("a meadow"));
        assert_eq!(s.sampler, Some((SamplerId::EulerAncestral, Schedule::Default)));
        assert_eq!((s.width, s.height), (Some(768), Some(512)));
    }

    #[test]
    fn images_without_settings_give_none() {
        assert_eq!(import_settings(&[]), None);
        assert_eq!(import_settings(&chunk("parameters", "just some words")), None);
        assert_eq!(import_settings(&chunk("prompt", "{\"1\": {\"class_type\": \"Other\"}}")), None);
    }
}
