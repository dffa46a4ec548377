//! The samplers against diffusers 0.42.1, on fixtures recorded by
//! `scripts/make_scheduler_fixtures.py` (tests/fixtures/schedulers/).
//!
//! Tolerances: timesteps, sigmas and init_noise_sigma within 1e-6 relative; per-step tensors
//! (model input, prev_sample, x0 estimate) within 1e-5 absolute on unit-scale latents, i.e.
//! `|a - b| <= 1e-5 * max(1, |b|)`, with whole loops chained through our own outputs.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::config::{alphas_cumprod, DEFAULT_BETAS};
use super::*;

const SCHEDULE_RTOL: f64 = 1e-6;
const TENSOR_TOL: f64 = 1e-5;

#[derive(Deserialize)]
struct Fixture {
    config: String,
    config_file: String,
    alphas_cumprod: String,
    schedules: Vec<ScheduleRecord>,
    runs: Vec<RunRecord>,
}

#[derive(Deserialize)]
struct ScheduleRecord {
    sampler: String,
    steps: usize,
    timesteps: Option<Vec<f64>>,
    sigmas: Option<Vec<f64>>,
    init_noise_sigma: Option<f64>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct RunRecord {
    sampler: String,
    steps: usize,
    shape: Vec<usize>,
    init_noise: Option<String>,
    #[serde(default)]
    records: Vec<StepRecord>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct StepRecord {
    t: f64,
    model_input: Option<String>,
    noise: Vec<String>,
    prev_sample: String,
    pred_original_sample: String,
}

/// Fixture paths (and the `config_file` paths inside them) are relative to the engine crate.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn fixtures() -> Vec<Fixture> {
    let dir = repo_root().join("tests/fixtures/schedulers");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 8, "fixtures missing in {}", dir.display());
    paths.iter().map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()).collect()
}

fn config_of(f: &Fixture) -> SchedulerConfig {
    SchedulerConfig::from_file(repo_root().join(&f.config_file)).unwrap()
}

/// Base64 of little-endian float32s, as the fixture script writes tensors.
fn f32s(b64: &str) -> Vec<f32> {
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut bytes = Vec::with_capacity(b64.len() * 3 / 4);
    for c in b64.bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("bad base64 {c}"),
        } as u32;
        bits = (bits << 6) | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            bytes.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Replays the noise diffusers drew, checking each draw's size and that all are used.
struct ReplayNoise(VecDeque<Vec<f32>>);

impl NoiseGenerator for ReplayNoise {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        let v = self.0.pop_front().expect("scheduler drew more noise than diffusers");
        assert_eq!(v.len(), n, "noise draw size");
        v
    }
}

/// The fixture script's stand-in for the U-Net: 0.9*x - 0.05*(x*x) + c(t)*P.
fn fake_model(x: &[f32], t: f64) -> Vec<f32> {
    let c = (0.3 * (t / 97.0).sin()) as f32;
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let p = ((i * 37) % 17) as f32 / 8.0 - 1.0;
            (v * 0.9 - (v * v) * 0.05) + p * c
        })
        .collect()
}

/// A fixture's sampler id (`dpmpp_2m_karras` names the schedule too).
fn sampler(id: &str) -> (SamplerId, Schedule) {
    let (sampler, schedule) = SamplerId::parse_with_schedule(id).unwrap();
    (sampler, schedule.unwrap_or_default())
}

fn rel(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
    }
}

/// Largest `|a - b|` over `max(1, scale, max |b|)`: float32 rounding is relative to the
/// magnitudes in play, which for high-sigma steps are the input latents' (sigma up to 4096).
fn tensor_err(actual: &Tensor, expected: &[f32], scale: f32) -> f64 {
    let a = actual.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), expected.len());
    let scale = expected.iter().fold(scale.max(1.0), |m, b| m.max(b.abs())) as f64;
    a.iter()
        .zip(expected)
        .map(|(&a, &b)| if a.is_nan() && b.is_nan() { 0.0 } else { ((a - b) as f64).abs() / scale })
        .fold(0.0, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) })
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn alphas_cumprod_match_torch() {
    for f in fixtures() {
        let cfg = config_of(&f);
        let mut ac = alphas_cumprod(&cfg, DEFAULT_BETAS).unwrap();
        if cfg.rescale_betas_zero_snr == Some(true) {
            // the fixture holds Euler's, which pins the last value
            *ac.last_mut().unwrap() = 2f32.powi(-24);
        }
        let expected = f32s(&f.alphas_cumprod);
        let diffs = ac.iter().zip(&expected).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        let worst = ac.iter().zip(&expected).map(|(&a, &b)| rel(a as f64, b as f64)).fold(0.0, f64::max);
        eprintln!("{}: {diffs} alphas_cumprod differ, worst {worst:e}", f.config);
        if cfg.rescale_betas_zero_snr == Some(true) {
            // rescaling takes a sqrt of the whole vector, which torch's vectorised kernel does not
            // round correctly (about 1 value in 5 is 1 ulp off), and 1 - ratio amplifies that
            assert!(worst <= 2e-6, "{}: alphas_cumprod off by {worst:e}", f.config);
        } else {
            assert_eq!(diffs, 0, "{}: alphas_cumprod not bit-exact", f.config);
        }
    }
}

/// Differences found, per fixture config: the worst one, and those over tolerance.
#[derive(Default)]
struct Report {
    worst: Vec<(String, f64)>,
    failures: Vec<String>,
}

impl Report {
    fn check(&mut self, config: &str, tol: f64, err: f64, what: impl FnOnce() -> String) {
        match self.worst.iter_mut().find(|(c, _)| c == config) {
            Some((_, w)) => *w = w.max(err),
            None => self.worst.push((config.to_string(), err)),
        }
        if err.is_nan() || err > tol {
            self.failures.push(format!("{} (off by {err:e})", what()));
        }
    }

    fn fail(&mut self, what: String) {
        self.failures.push(what);
    }

    fn finish(self, name: &str) {
        for (config, w) in &self.worst {
            eprintln!("{name}: {config}: worst difference {w:e}");
        }
        assert!(self.failures.is_empty(), "{name}: {} failures:\n{}", self.failures.len(), self.failures.join("\n"));
    }
}

struct Tolerance {
    /// timesteps, sigmas, init_noise_sigma: relative
    schedule: f64,
    /// per-step tensors: absolute on unit-scale latents (see `tensor_err`)
    tensor: f64,
    /// integer timesteps may also be off by this much
    timestep_slack: f64,
}

/// torch's sqrt over a whole tensor (MKL) is not correctly rounded: about 1 value in 5 is 1 ulp
/// off, on every CPU path, while ours is exact. Zero-terminal-SNR rescaling takes such a sqrt
/// and is ill-conditioned (`1 - ab[t] / ab[t-1]`, and the final sigma is
/// `sqrt((1 - ac[0]) / ac[0])` with ac[0] ~ 1 - 4e-5), so there the smallest sigma differs by
/// ~1.4e-3 relative, Karras timesteps can move by one and latents by ~2e-4. No plain config is
/// affected.
fn tolerance(config: &str) -> Tolerance {
    if config == "x_zsnr" {
        Tolerance { schedule: 2e-3, tensor: 1e-3, timestep_slack: 1.0 }
    } else {
        Tolerance { schedule: SCHEDULE_RTOL, tensor: TENSOR_TOL, timestep_slack: 0.0 }
    }
}

fn timestep_err(a: f64, b: f64, tol: &Tolerance) -> f64 {
    if (a - b).abs() <= tol.timestep_slack {
        0.0
    } else {
        rel(a, b)
    }
}

/// Combinations diffusers builds but refuses to step, which we refuse when building.
fn refused_up_front(sampler: &str, cfg: &SchedulerConfig) -> bool {
    sampler == "euler_a" && cfg.prediction_type == Some(PredictionType::Sample)
}

#[test]
fn schedules_match_diffusers() {
    let mut report = Report::default();
    for f in fixtures() {
        let cfg = config_of(&f);
        let tol = tolerance(&f.config);
        let rtol = tol.schedule;
        for r in &f.schedules {
            let what = format!("{} {} {} steps", f.config, r.sampler, r.steps);
            let (id, schedule) = sampler(&r.sampler);
            let built = build_scheduler(id, schedule, &cfg, r.steps);
            if let Some(e) = &r.error {
                if built.is_ok() {
                    report.fail(format!("{what}: diffusers refused ({e}), we did not"));
                }
                continue;
            }
            let s = match built {
                Ok(s) => s,
                Err(_) if refused_up_front(&r.sampler, &cfg) => continue,
                Err(e) => {
                    report.fail(format!("{what}: {e}"));
                    continue;
                }
            };
            let ts = r.timesteps.as_ref().unwrap();
            if s.timesteps().len() != ts.len() {
                report.fail(format!("{what}: {:?} vs {ts:?}", s.timesteps()));
                continue;
            }
            for (i, (a, b)) in s.timesteps().iter().zip(ts).enumerate() {
                report
                    .check(&f.config, rtol, timestep_err(*a, *b, &tol), || format!("{what}: timestep {i}: {a} vs {b}"));
            }
            match (s.sigmas(), &r.sigmas) {
                (Some(a), Some(b)) if a.len() == b.len() => {
                    for (i, (x, y)) in a.iter().zip(b).enumerate() {
                        report.check(&f.config, rtol, rel(*x as f64, *y), || format!("{what}: sigma {i}: {x} vs {y}"));
                    }
                }
                (None, None) => {}
                (a, b) => report.fail(format!("{what}: sigmas {a:?} vs {b:?}")),
            }
            let (a, b) = (s.init_noise_sigma(), r.init_noise_sigma.unwrap());
            report.check(&f.config, rtol, rel(a, b), || format!("{what}: init_noise_sigma {a} vs {b}"));
        }
    }
    report.finish("schedules");
}

#[test]
fn step_loops_match_diffusers() {
    let mut report = Report::default();
    let dev = Device::Cpu;
    for f in fixtures() {
        let cfg = config_of(&f);
        let tol = tolerance(&f.config);
        let rtol = tol.schedule;
        for r in &f.runs {
            let what = format!("{} {} {} steps", f.config, r.sampler, r.steps);
            let (id, schedule) = sampler(&r.sampler);
            let built = build_scheduler(id, schedule, &cfg, r.steps);
            if let Some(e) = &r.error {
                // diffusers may refuse only once stepping; we refuse when building
                if built.is_ok() {
                    report.fail(format!("{what}: diffusers refused ({e}), we did not"));
                }
                continue;
            }
            let mut s = built.unwrap_or_else(|e| panic!("{what}: {e}"));
            let init = f32s(r.init_noise.as_ref().unwrap());
            // the pipeline's `latents * init_noise_sigma`, in float32
            let sigma0 = s.init_noise_sigma() as f32;
            let init: Vec<f32> = init.iter().map(|v| v * sigma0).collect();
            let mut latents = Tensor::from_vec(init, r.shape.as_slice(), &dev).unwrap();
            assert_eq!(s.timesteps().len(), r.records.len(), "{what}: step count");
            for (i, rec) in r.records.iter().enumerate() {
                let t = s.timesteps()[i];
                report.check(&f.config, rtol, timestep_err(t, rec.t, &tol), || {
                    format!("{what}: timestep {i}: {t} vs {}", rec.t)
                });
                let scale = max_abs(&latents);
                let input = s.scale_model_input(&latents, i).unwrap();
                let expected_input = match &rec.model_input {
                    Some(b) => f32s(b),
                    None => latents.flatten_all().unwrap().to_vec1().unwrap(),
                };
                report.check(
                    &format!("{} {}", f.config, r.sampler),
                    tol.tensor,
                    tensor_err(&input, &expected_input, scale),
                    || format!("{what}: step {i}: model input"),
                );
                let out = fake_model(&input.flatten_all().unwrap().to_vec1().unwrap(), t);
                let out = Tensor::from_vec(out, r.shape.as_slice(), &dev).unwrap();
                let mut noise = ReplayNoise(rec.noise.iter().map(|b| f32s(b)).collect());
                let step = s.step(&out, i, &latents, &mut noise).unwrap();
                assert!(noise.0.is_empty(), "{what}: step {i} drew less noise than diffusers");
                let prev = f32s(&rec.prev_sample);
                report.check(
                    &format!("{} {}", f.config, r.sampler),
                    tol.tensor,
                    tensor_err(&step.prev_sample, &prev, scale),
                    || format!("{what}: step {i}: prev_sample"),
                );
                let x0 = f32s(&rec.pred_original_sample);
                let e = tensor_err(&step.pred_original_sample, &x0, scale);
                report.check(&format!("{} {}", f.config, r.sampler), tol.tensor, e, || {
                    format!("{what}: step {i}: pred_original_sample")
                });
                latents = step.prev_sample;
            }
        }
    }
    report.finish("step loops");
}

#[test]
fn sampler_ids_round_trip() {
    for s in SamplerId::ALL {
        assert_eq!(SamplerId::from_id(s.id()), Some(s));
        assert_eq!(s.id().parse::<SamplerId>().unwrap(), s);
    }
    for (s, schedule) in SamplerId::combinations() {
        assert_eq!(SamplerId::from_a1111(s.a1111_name(), schedule.a1111_name()), Some((s, schedule)));
        let combined = s.combined_id(schedule);
        let expected = (schedule != Schedule::Default).then_some(schedule);
        assert_eq!(SamplerId::parse_with_schedule(&combined).unwrap(), (s, expected), "{combined}");
    }
    assert_eq!(SamplerId::combinations().count(), 7);
    let err = "euler_ancestral".parse::<SamplerId>().unwrap_err().to_string();
    assert!(err.contains("euler_a") && err.contains("dpmpp_2m"), "{err}");
    assert!("dpmpp_2m_karras".parse::<SamplerId>().is_err(), "the combined id is not a sampler");
    assert_eq!("Karras".parse::<Schedule>().unwrap(), Schedule::Karras);
    assert!("exponential".parse::<Schedule>().is_err());
}

#[test]
fn a1111_names() {
    use SamplerId::*;
    let karras = Some((DpmPp2m, Schedule::Karras));
    assert_eq!(SamplerId::from_a1111("DPM++ 2M Karras", None), karras);
    assert_eq!(SamplerId::from_a1111("DPM++ 2M", Some("Karras")), karras);
    assert_eq!(SamplerId::from_a1111("DPM++ 2M Karras", Some("Karras")), karras);
    assert_eq!(SamplerId::from_a1111("DPM++ 2M", Some("Automatic")), Some((DpmPp2m, Schedule::Default)));
    assert_eq!(SamplerId::from_a1111("Euler a", None), Some((EulerAncestral, Schedule::Default)));
    assert_eq!(SamplerId::from_a1111("euler a", Some("")), Some((EulerAncestral, Schedule::Default)));
    assert_eq!(SamplerId::from_a1111("Euler", Some("Karras")), Some((Euler, Schedule::Karras)));
    assert_eq!(SamplerId::from_a1111("DDIM", Some("Karras")), None);
    assert_eq!(SamplerId::from_a1111("DPM++ 2M SDE", None), None);
    assert_eq!(SamplerId::from_a1111("DPM++ 2M Karras", Some("Exponential")), None);
}

#[test]
fn a_schedule_a_sampler_does_not_run_is_refused_by_name() {
    let cfg = sd15();
    let err = build_scheduler(SamplerId::Ddim, Schedule::Karras, &cfg, 4).err().unwrap().to_string();
    assert!(err.contains("karras") && err.contains("ddim") && err.contains("dpmpp_2m"), "{err}");
    assert!(build_scheduler(SamplerId::DpmPp2m, Schedule::Karras, &cfg, 4).is_ok());
}

#[test]
fn euler_with_the_karras_schedule_is_euler_on_a_karras_config() {
    let cfg = sd15();
    let karras_config = SchedulerConfig { use_karras_sigmas: Some(true), ..cfg.clone() };
    let chosen = build_scheduler(SamplerId::Euler, Schedule::Karras, &cfg, 9).unwrap();
    let configured = build_scheduler(SamplerId::Euler, Schedule::Default, &karras_config, 9).unwrap();
    let plain = build_scheduler(SamplerId::Euler, Schedule::Default, &cfg, 9).unwrap();
    assert_eq!(chosen.timesteps(), configured.timesteps());
    assert_eq!(chosen.sigmas(), configured.sigmas());
    assert_ne!(chosen.sigmas(), plain.sigmas(), "the schedule changes the sigmas");
}

fn sd15() -> SchedulerConfig {
    SchedulerConfig::from_file(repo_root().join("tests/fixtures/scheduler_configs/sd15.json")).unwrap()
}

/// For samplers that must not draw.
struct NoNoise;

impl NoiseGenerator for NoNoise {
    fn randn(&mut self, _n: usize) -> Vec<f32> {
        panic!("this sampler must not draw noise")
    }
}

/// Returns this many values fewer than asked for.
struct ShortNoise(usize);

impl NoiseGenerator for ShortNoise {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        vec![0.0; n.saturating_sub(self.0)]
    }
}

#[test]
fn absent_keys_take_the_class_default() {
    // SD 1.5's file has no timestep_spacing: Euler uses linspace, DDIM leading
    let cfg = sd15();
    let euler = build_scheduler(SamplerId::Euler, Schedule::Default, &cfg, 4).unwrap();
    assert_eq!(euler.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
    let ddim = build_scheduler(SamplerId::Ddim, Schedule::Default, &cfg, 4).unwrap();
    assert_eq!(ddim.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
}

#[test]
fn refusals() {
    let cfg = sd15();
    for s in SamplerId::ALL {
        assert!(matches!(build_scheduler(s, Schedule::Default, &cfg, 0), Err(Error::InvalidSetting(_))));
    }
    assert!(build_scheduler(SamplerId::Lcm, Schedule::Default, &cfg, 51).is_err());
    assert!(build_scheduler(SamplerId::Lcm, Schedule::Default, &cfg, 50).is_ok());

    let thresholding = SchedulerConfig { thresholding: Some(true), ..cfg.clone() };
    for s in [SamplerId::Ddim, SamplerId::DpmPp2m, SamplerId::Lcm] {
        let e = build_scheduler(s, Schedule::Default, &thresholding, 4).err().unwrap().to_string();
        assert!(e.contains("thresholding"), "{e}");
    }
    // Euler has no such option; diffusers ignores the key there
    assert!(build_scheduler(SamplerId::Euler, Schedule::Default, &thresholding, 4).is_ok());

    let bad = SchedulerConfig::from_json_str(r#"{"prediction_type": "flow_prediction"}"#);
    assert!(matches!(bad, Err(Error::Scheduler(_))));
}

#[test]
fn step_misuse_is_an_error_not_a_panic() {
    let cfg = sd15();
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &dev).unwrap();

    let mut dpm = build_scheduler(SamplerId::DpmPp2m, Schedule::Default, &cfg, 4).unwrap();
    assert!(dpm.step(&x, 1, &x, &mut NoNoise).is_err(), "out of order");
    assert!(dpm.step(&x, 0, &x, &mut NoNoise).is_ok());
    assert!(dpm.step(&x, 0, &x, &mut NoNoise).is_err(), "repeated");

    let mut euler = build_scheduler(SamplerId::Euler, Schedule::Default, &cfg, 4).unwrap();
    assert!(euler.scale_model_input(&x, 4).is_err());
    assert!(euler.step(&x, 4, &x, &mut NoNoise).is_err());

    let mut ancestral = build_scheduler(SamplerId::EulerAncestral, Schedule::Default, &cfg, 4).unwrap();
    assert!(ancestral.step(&x, 0, &x, &mut ShortNoise(1)).is_err());
}

#[test]
fn dtypes_follow_diffusers() {
    use candle_core::DType;
    let cfg = sd15();
    let dev = Device::Cpu;
    let x = Tensor::ones((1, 4, 2, 2), DType::F16, &dev).unwrap();
    let mut s = build_scheduler(SamplerId::Euler, Schedule::Default, &cfg, 4).unwrap();
    assert_eq!(s.scale_model_input(&x, 0).unwrap().dtype(), DType::F16);
    let out = s.step(&x, 0, &x, &mut NoNoise).unwrap();
    assert_eq!(out.prev_sample.dtype(), DType::F16);
    assert_eq!(out.pred_original_sample.dtype(), DType::F32);
}
