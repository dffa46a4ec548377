//! Euler: diffusers' `EulerDiscreteScheduler` (s_churn = 0, so no noise is drawn).

use candle_core::Tensor;

use super::config::{
    alphas_cumprod, karras_sigmas, log_sigmas, np_interp_arange, sigma_to_t, spaced_timesteps, train_sigmas,
    FinalSigmasType, PredictionType, SchedulerConfig, TimestepSpacing, DEFAULT_BETAS,
};
use super::{check_index, ops, Scheduler, StepOutput};
use crate::rng::NoiseGenerator;
use crate::{Error, Result};

pub(crate) struct EulerDiscrete {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
}

impl EulerDiscrete {
    pub(crate) fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        cfg.reject("use_exponential_sigmas", cfg.use_exponential_sigmas)?;
        cfg.reject("use_beta_sigmas", cfg.use_beta_sigmas)?;
        if let Some(t) = cfg.interpolation_type.as_deref().filter(|t| *t != "linear") {
            return Err(Error::Scheduler(format!("Euler: interpolation_type {t:?} is not supported")));
        }
        let prediction_type = cfg.prediction_type.unwrap_or(PredictionType::Epsilon);
        // "continuous" only changes anything (EDM timesteps, as for SVD) with v-prediction
        match cfg.timestep_type.as_deref() {
            None | Some("discrete") => {}
            Some("continuous") if prediction_type != PredictionType::VPrediction => {}
            Some(t) => {
                return Err(Error::Scheduler(format!(
                    "Euler: timestep_type {t:?} is not supported with this prediction_type"
                )))
            }
        }
        let train_steps = cfg.train_steps()?;
        let mut ac = alphas_cumprod(cfg, DEFAULT_BETAS)?;
        if cfg.rescale_betas_zero_snr == Some(true) {
            // diffusers pins the last value so the first sigma stays finite
            ac[train_steps - 1] = 2f32.powi(-24);
        }
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        // timesteps are float32 in diffusers; sigmas come from them by np.interp in float64
        let timesteps: Vec<f32> = spaced_timesteps(spacing, train_steps, steps, cfg.steps_offset.unwrap_or(0))
            .into_iter()
            .map(|t| t as f32)
            .collect();
        let train = train_sigmas(&ac);
        let train64: Vec<f64> = train.iter().map(|&s| s as f64).collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| np_interp_arange(t as f64, &train64)).collect();
        let mut timesteps: Vec<f64> = timesteps.into_iter().map(f64::from).collect();
        if cfg.use_karras_sigmas == Some(true) {
            let sigma_min = cfg.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = cfg.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras_sigmas(sigma_min, sigma_max, steps);
            let ls = log_sigmas(&train);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &ls) as f32 as f64).collect();
        }
        sigmas.push(match cfg.final_sigmas_type.unwrap_or(FinalSigmasType::Zero) {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train[0] as f64,
        });
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        Ok(Self { timesteps, init_noise_sigma: init_noise_sigma(&sigmas, spacing), sigmas, prediction_type })
    }
}

/// The largest sigma, or `sqrt(max² + 1)` for "leading" spacing (float32, as diffusers).
pub(crate) fn init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    }
}

/// `sample / (sigma**2 + 1) ** 0.5`, the k-diffusion input scaling Euler-type samplers share.
pub(crate) fn scale_by_sigma(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    let scaled = ops::div(&ops::f32(sample)?, (sigma * sigma + 1.0).sqrt())?;
    Ok(scaled.to_dtype(sample.dtype())?)
}

/// x0 from the model output at noise level `sigma` (Euler and Euler a share the formulas).
pub(crate) fn pred_original(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction_type {
        PredictionType::Epsilon => (sample - ops::mul(model_output, sigma)?)?,
        PredictionType::VPrediction => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            (ops::mul(model_output, c_out)? + ops::div(sample, sigma * sigma + 1.0)?)?
        }
        PredictionType::Sample => model_output.clone(),
    })
}

impl Scheduler for EulerDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        scale_by_sigma(sample, self.sigmas[step_index])
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        super::add_noise_sigma(original, noise, &self.sigmas, step_index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseGenerator,
    ) -> Result<StepOutput> {
        check_index(step_index, self.timesteps.len())?;
        let model = ops::f32(model_output)?;
        let sample = ops::f32(sample)?;
        // s_churn = 0: gamma = 0, sigma_hat = sigma and no noise
        let sigma_hat = self.sigmas[step_index];
        let x0 = pred_original(self.prediction_type, &model, &sample, sigma_hat)?;
        let derivative = ops::div(&(&sample - &x0)?, sigma_hat)?;
        let dt = self.sigmas[step_index + 1] - sigma_hat;
        let prev = (&sample + ops::mul(&derivative, dt)?)?;
        Ok(StepOutput { prev_sample: prev.to_dtype(model_output.dtype())?, pred_original_sample: x0 })
    }
}
