//! Euler a: diffusers' `EulerAncestralDiscreteScheduler`. Draws one `randn` per step.

use candle_core::Tensor;

use super::config::{
    alphas_cumprod, np_interp_arange, spaced_timesteps, train_sigmas, PredictionType, SchedulerConfig, TimestepSpacing,
    DEFAULT_BETAS,
};
use super::euler::{init_noise_sigma, pred_original, scale_by_sigma};
use super::{check_index, ops, Scheduler, StepOutput};
use crate::rng::NoiseGenerator;
use crate::{Error, Result};

pub(crate) struct EulerAncestralDiscrete {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
}

impl EulerAncestralDiscrete {
    pub(crate) fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let prediction_type = cfg.prediction_type.unwrap_or(PredictionType::Epsilon);
        if prediction_type == PredictionType::Sample {
            // diffusers raises NotImplementedError in step()
            return Err(Error::Scheduler("Euler a does not support prediction_type \"sample\"".into()));
        }
        let train_steps = cfg.train_steps()?;
        let mut ac = alphas_cumprod(cfg, DEFAULT_BETAS)?;
        if cfg.rescale_betas_zero_snr == Some(true) {
            ac[train_steps - 1] = 2f32.powi(-24);
        }
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let timesteps: Vec<f32> = spaced_timesteps(spacing, train_steps, steps, cfg.steps_offset.unwrap_or(0))
            .into_iter()
            .map(|t| t as f32)
            .collect();
        let train64: Vec<f64> = train_sigmas(&ac).iter().map(|&s| s as f64).collect();
        let sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| np_interp_arange(t as f64, &train64) as f32)
            .chain(std::iter::once(0.0))
            .collect();
        Ok(Self {
            timesteps: timesteps.into_iter().map(f64::from).collect(),
            init_noise_sigma: init_noise_sigma(&sigmas, spacing),
            sigmas,
            prediction_type,
        })
    }
}

impl Scheduler for EulerAncestralDiscrete {
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
        noise: &mut dyn NoiseGenerator,
    ) -> Result<StepOutput> {
        check_index(step_index, self.timesteps.len())?;
        let model = ops::f32(model_output)?;
        let sample = ops::f32(sample)?;
        let sigma = self.sigmas[step_index];
        let x0 = pred_original(self.prediction_type, &model, &sample, sigma)?;

        // split the step to sigma_to into a deterministic part down to sigma_down and fresh
        // noise of size sigma_up (float32 scalars, diffusers' order of operations)
        let (from2, to) = (sigma * sigma, self.sigmas[step_index + 1]);
        let to2 = to * to;
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();

        let derivative = ops::div(&(&sample - &x0)?, sigma)?;
        let prev = (&sample + ops::mul(&derivative, sigma_down - sigma)?)?;
        let eps = ops::randn_like(&model, noise)?;
        let prev = (prev + ops::mul(&eps, sigma_up)?)?;
        Ok(StepOutput { prev_sample: prev.to_dtype(model_output.dtype())?, pred_original_sample: x0 })
    }
}
