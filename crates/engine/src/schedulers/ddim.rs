//! DDIM: diffusers' `DDIMScheduler` with eta = 0 (deterministic, draws no noise).

use candle_core::Tensor;

use super::config::{
    alphas_cumprod, np_round, spaced_timesteps, PredictionType, SchedulerConfig, TimestepSpacing, DEFAULT_BETAS,
};
use super::{check_index, ops, Scheduler, StepOutput};
use crate::rng::NoiseGenerator;
use crate::{Error, Result};

pub(crate) struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// `num_train_timesteps // num_inference_steps`: DDIM steps back by this much whatever the
    /// spacing, so "trailing" and "linspace" do not land on the next timestep exactly.
    step_ratio: i64,
    prediction_type: PredictionType,
    clip_sample_range: Option<f32>,
}

impl Ddim {
    pub(crate) fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        cfg.reject("thresholding", cfg.thresholding)?;
        let train_steps = cfg.train_steps()?;
        if steps > train_steps {
            return Err(Error::Scheduler(format!(
                "DDIM: {steps} steps is more than num_train_timesteps ({train_steps})"
            )));
        }
        let ac = alphas_cumprod(cfg, DEFAULT_BETAS)?;
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        // int64 timesteps; "linspace" is rounded (half to even) before the cast
        let timesteps: Vec<f64> = spaced_timesteps(spacing, train_steps, steps, cfg.steps_offset.unwrap_or(0))
            .into_iter()
            .map(np_round)
            .collect();
        // "trailing" with e.g. 61 steps ends at timestep -1, which diffusers indexes Python-style
        // (the last alphas_cumprod); only what Python would refuse is refused here
        let len = train_steps as f64;
        if let Some(t) = timesteps.iter().find(|&&t| t < -len || t >= len) {
            return Err(Error::Scheduler(format!(
                "DDIM: timestep {t} is outside the {train_steps} training timesteps (check steps_offset)"
            )));
        }
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { ac[0] };
        let clip = cfg.clip_sample.unwrap_or(true);
        Ok(Self {
            timesteps,
            alphas_cumprod: ac,
            final_alpha_cumprod,
            step_ratio: (train_steps / steps) as i64,
            prediction_type: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            clip_sample_range: clip.then(|| cfg.clip_sample_range.unwrap_or(1.0) as f32),
        })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        Ok(sample.clone())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let t = *self.timesteps.get(step_index).ok_or_else(|| Error::Scheduler(format!("no step {step_index}")))?;
        super::add_noise_alpha(original, noise, &self.alphas_cumprod, t)
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
        let t = self.timesteps[step_index] as i64;
        let prev_t = t - self.step_ratio;
        let a_t = self.alphas_cumprod[t.rem_euclid(self.alphas_cumprod.len() as i64) as usize];
        let a_prev = if prev_t >= 0 { self.alphas_cumprod[prev_t as usize] } else { self.final_alpha_cumprod };
        let b_t = 1.0 - a_t;

        let x0 = ops::pred_original_from_alpha(self.prediction_type, &model, &sample, a_t, None)?;
        // diffusers derives the noise estimate from the unclipped x0 (and v from both).
        let eps = match self.prediction_type {
            PredictionType::Epsilon => model,
            PredictionType::Sample => ops::div(&(&sample - ops::mul(&x0, a_t.sqrt())?)?, b_t.sqrt())?,
            PredictionType::VPrediction => (ops::mul(&model, a_t.sqrt())? + ops::mul(&sample, b_t.sqrt())?)?,
        };
        let x0 = match self.clip_sample_range {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        // eta = 0: std_dev_t = 0 * variance**0.5, kept so a NaN variance behaves as in diffusers
        let variance = ((1.0 - a_prev) / b_t) * (1.0 - a_t / a_prev);
        let std_dev_t = 0.0 * variance.sqrt();
        let direction = ops::mul(&eps, (1.0 - a_prev - std_dev_t * std_dev_t).sqrt())?;
        let prev = (ops::mul(&x0, a_prev.sqrt())? + direction)?;
        Ok(StepOutput { prev_sample: prev.to_dtype(model_output.dtype())?, pred_original_sample: x0 })
    }
}
