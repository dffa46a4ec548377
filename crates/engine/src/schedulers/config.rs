//! `scheduler_config.json` and the arithmetic the samplers share: the training noise schedule
//! (betas → alphas_cumprod), timestep spacing, interpolation and Karras sigmas.
//!
//! diffusers builds these with a mix of torch float32 ops and numpy float64 ops; each helper
//! here names the call it mirrors and keeps its precision, because the results feed the U-Net
//! and a last-bit difference in a sigma is a visible difference after 30 steps.

use std::borrow::Cow;
use std::path::Path;

use serde::{Deserialize, Deserializer};

use crate::{Error, Result};

/// What the model predicts (`prediction_type`).
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    /// x0 directly; diffusers' Euler also accepts the old name `original_sample`.
    #[serde(alias = "original_sample")]
    Sample,
}

impl PredictionType {
    /// The `prediction_type` value of a scheduler config.
    pub fn id(&self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
            PredictionType::Sample => "sample",
        }
    }

    /// A scheduler config's `prediction_type` (missing means epsilon, as in diffusers).
    pub fn of_config(config: &serde_json::Value) -> Result<Self> {
        match config.get("prediction_type") {
            None | Some(serde_json::Value::Null) => Ok(PredictionType::Epsilon),
            Some(value) => serde_json::from_value(value.clone())
                .map_err(|_| Error::Scheduler(format!("unknown prediction_type {value}"))),
        }
    }
}

impl std::fmt::Display for PredictionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    Zero,
    SigmaMin,
}

/// `scheduler_config.json` as diffusers reads it. Every field is optional because a key that is
/// absent from the file means "the target class's own default" (diffusers' `_use_default_values`):
/// SD 1.5's file has no `timestep_spacing`, so Euler uses "linspace" while DDIM uses "leading".
/// A `null` value is treated like an absent key. Keys no sampler here reads are kept in `other`.
#[derive(Deserialize, Default, Clone, Debug)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<BetaSchedule>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<PredictionType>,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: Option<i64>,
    pub rescale_betas_zero_snr: Option<bool>,
    // DDIM, LCM
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    // DDIM, DPM-Solver, LCM (not implemented: rejected when true)
    pub thresholding: Option<bool>,
    // Euler
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    // Euler, DPM-Solver
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    /// Karras range overrides; DPM-Solver picks them up too when the file has them.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub final_sigmas_type: Option<FinalSigmasType>,
    // DPM-Solver
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub use_dynamic_shifting: Option<bool>,
    pub variance_type: Option<String>,
    /// diffusers writes the default as `-Infinity`, which is not JSON; see [`Self::from_json_str`].
    #[serde(deserialize_with = "lenient_f64")]
    pub lambda_min_clipped: Option<f64>,
    // LCM
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<f64>,
    /// Keys none of the samplers read (`_class_name`, `skip_prk_steps`, ...).
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl SchedulerConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::Scheduler(m) => Error::Scheduler(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// Parses the file's text. Python's json writes non-finite floats as bare `-Infinity`,
    /// `Infinity` and `NaN` (diffusers' default `lambda_min_clipped`), so those are accepted.
    pub fn from_json_str(text: &str) -> Result<Self> {
        serde_json::from_str(&quote_non_finite(text))
            .map_err(|e| Error::Scheduler(format!("invalid scheduler_config.json: {e}")))
    }

    pub(crate) fn train_steps(&self) -> Result<usize> {
        match self.num_train_timesteps {
            Some(n) if n < 2 => Err(Error::Scheduler("num_train_timesteps must be at least 2".into())),
            Some(n) => Ok(n),
            None => Ok(1000),
        }
    }

    /// Refuses options the samplers here do not implement, instead of silently ignoring them.
    pub(crate) fn reject(&self, what: &str, enabled: Option<bool>) -> Result<()> {
        if enabled == Some(true) {
            return Err(Error::Scheduler(format!("{what} is not supported")));
        }
        Ok(())
    }
}

/// Wraps bare `Infinity`, `-Infinity` and `NaN` tokens (outside strings) in quotes.
fn quote_non_finite(text: &str) -> Cow<'_, str> {
    if !text.contains("Infinity") && !text.contains("NaN") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(tok) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t)) {
            out.push('"');
            out.push_str(tok);
            out.push('"');
            rest = &rest[tok.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    Cow::Owned(out)
}

fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        F(f64),
        S(String),
    }
    Ok(match Option::<Num>::deserialize(d)? {
        None => None,
        Some(Num::F(v)) => Some(v),
        Some(Num::S(s)) => Some(match s.as_str() {
            "-Infinity" => f64::NEG_INFINITY,
            "Infinity" => f64::INFINITY,
            "NaN" => f64::NAN,
            _ => return Err(serde::de::Error::custom(format!("expected a number, got {s:?}"))),
        }),
    })
}

/// The beta defaults of a diffusers class (LCM's differ from the others').
#[derive(Clone, Copy)]
pub(crate) struct BetaDefaults {
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
}

/// Euler, Euler a, DDIM and DPM-Solver: `linear` from 0.0001 to 0.02.
pub(crate) const DEFAULT_BETAS: BetaDefaults =
    BetaDefaults { beta_start: 0.0001, beta_end: 0.02, beta_schedule: BetaSchedule::Linear };

/// `alphas_cumprod` as every class's `__init__` computes it (float32 tensors), including
/// `rescale_betas_zero_snr` (classes that then pin the last value do so themselves).
pub(crate) fn alphas_cumprod(cfg: &SchedulerConfig, d: BetaDefaults) -> Result<Vec<f32>> {
    let n = cfg.train_steps()?;
    let betas: Vec<f32> = if let Some(tb) = &cfg.trained_betas {
        if tb.len() != n {
            return Err(Error::Scheduler(format!(
                "trained_betas has {} values but num_train_timesteps is {n}",
                tb.len()
            )));
        }
        tb.iter().map(|&b| b as f32).collect()
    } else {
        let start = cfg.beta_start.unwrap_or(d.beta_start);
        let end = cfg.beta_end.unwrap_or(d.beta_end);
        match cfg.beta_schedule.unwrap_or(d.beta_schedule) {
            BetaSchedule::Linear => torch_linspace_f32(start, end, n),
            // torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=float32) ** 2
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(start.powf(0.5), end.powf(0.5), n).into_iter().map(|b| b * b).collect()
            }
            BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(n),
        }
    };
    let betas = if cfg.rescale_betas_zero_snr == Some(true) { rescale_zero_terminal_snr(&betas) } else { betas };
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    Ok(cumprod(&alphas))
}

/// `torch.cumprod` of a float32 CPU tensor: torch accumulates in double and rounds each output.
fn cumprod(xs: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    xs.iter()
        .map(|&x| {
            acc *= x as f64;
            acc as f32
        })
        .collect()
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU. torch computes the step
/// in float32 and fills the first half forwards from `start`, the second half backwards from
/// `end`; its AVX2/AVX512 kernels (what desktop CPUs run) fuse the multiply-add, so `mul_add`.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    match steps {
        0 => return Vec::new(),
        1 => return vec![s],
        _ => {}
    }
    let step = (e - s) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| if i < half { step.mul_add(i as f32, s) } else { (-step).mul_add((steps - i - 1) as f32, e) })
        .collect()
}

/// diffusers' `betas_for_alpha_bar(n)` with the cosine transform (`squaredcos_cap_v2`), in
/// Python floats, then `torch.tensor(..., dtype=float32)`.
fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powf(2.0);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (float32 tensor ops), for zero-terminal-SNR models.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_ab: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_ab[0], sqrt_ab[sqrt_ab.len() - 1]);
    let scale = first / (first - last);
    for v in sqrt_ab.iter_mut() {
        *v = (*v - last) * scale;
    }
    let ab: Vec<f32> = sqrt_ab.iter().map(|v| v * v).collect();
    std::iter::once(ab[0]).chain(ab.windows(2).map(|w| w[1] / w[0])).map(|a| 1.0 - a).collect()
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` on the float32 tensor.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.linspace(start, stop, num, endpoint)` in float64, numpy's formula: `i * step + start`,
/// with the last value set to `stop`.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        for v in y.iter_mut() {
            *v = if step == 0.0 { *v / div as f64 * delta } else { *v * step };
        }
    } else {
        for v in y.iter_mut() {
            *v *= delta;
        }
    }
    for v in y.iter_mut() {
        *v += start;
    }
    if endpoint && num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` with a float step: `ceil((stop - start) / step)` values,
/// filled as numpy does (`start + i * ((start + step) - start)`), which is why e.g.
/// `np.arange(1000, 0, -1000 / 61)` has 62 values, not 61.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.round`: halves go to the even neighbour.
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, np.arange(len(fp)), fp)` in float64, with numpy's edge rules.
pub(crate) fn np_interp_arange(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return fp[0];
    }
    if x >= (n - 1) as f64 {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    let r = slope * (x - j as f64) + fp[j];
    if !r.is_nan() {
        return r;
    }
    let r = slope * (x - (j + 1) as f64) + fp[j + 1];
    if r.is_nan() && fp[j] == fp[j + 1] {
        fp[j]
    } else {
        r
    }
}

/// `_convert_to_karras`: Karras et al.'s rho = 7 schedule between `sigma_max` and `sigma_min`.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n, true)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// `np.log` of the float32 training sigmas (stays float32).
pub(crate) fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas.iter().map(|s| s.ln()).collect()
}

/// `_sigma_to_t`: the fractional training timestep whose log-sigma matches, by linear
/// interpolation. Mixed precision as in numpy: `low - log_sigma` is float64, `low - high` float32.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // low_idx = cumsum(dists >= 0).argmax(), clipped to len - 2
    let (mut count, mut best, mut low_idx) = (0usize, 0usize, 0usize);
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            low_idx = i;
        }
    }
    let low_idx = low_idx.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The timestep values a spacing gives, before each class's own conversion (float64, as numpy).
/// Euler, Euler a and DDIM share these formulas; DPM-Solver's differ (it spaces `n + 1` points).
pub(crate) fn spaced_timesteps(spacing: TimestepSpacing, train_steps: usize, n: usize, steps_offset: i64) -> Vec<f64> {
    let t = train_steps as f64;
    match spacing {
        TimestepSpacing::Linspace => {
            let mut v = np_linspace(0.0, t - 1.0, n, true);
            v.reverse();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = train_steps / n;
            (0..n).rev().map(|i| (i * ratio) as f64 + steps_offset as f64).collect()
        }
        TimestepSpacing::Trailing => {
            np_arange(t, 0.0, -(t / n as f64)).into_iter().map(|v| np_round(v) - 1.0).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_tokens_parse() {
        let cfg = SchedulerConfig::from_json_str(
            r#"{"lambda_min_clipped": -Infinity, "_note": "NaN and -Infinity in a string"}"#,
        )
        .unwrap();
        assert_eq!(cfg.lambda_min_clipped, Some(f64::NEG_INFINITY));
        assert_eq!(cfg.other["_note"].as_str(), Some("NaN and -Infinity in a string"));
    }

    #[test]
    fn np_helpers_match_numpy() {
        // np.arange(1000, 0, -1000/61) has 62 values
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(np_linspace(0.0, 999.0, 1, true), vec![0.0]);
        assert_eq!(np_round(812.5), 812.0);
        assert_eq!(np_round(937.5), 938.0);
    }
}
