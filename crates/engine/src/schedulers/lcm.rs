//! LCM: diffusers' `LCMScheduler`. Draws one `randn` per step except the last.
//!
//! Its timesteps come from the distillation schedule (`original_inference_steps`, 50 by
//! default), so `timestep_spacing` and `steps_offset` do not apply and at most
//! `original_inference_steps` steps are possible.

use candle_core::Tensor;

use super::config::{alphas_cumprod, np_linspace, BetaDefaults, BetaSchedule, PredictionType, SchedulerConfig};
use super::{check_index, ops, Scheduler, StepOutput};
use crate::rng::NoiseGenerator;
use crate::{Error, Result};

/// LCMScheduler's own defaults (the SD values, unlike the other classes).
const LCM_BETAS: BetaDefaults =
    BetaDefaults { beta_start: 0.00085, beta_end: 0.012, beta_schedule: BetaSchedule::ScaledLinear };

pub(crate) struct Lcm {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction_type: PredictionType,
    clip_sample_range: Option<f32>,
    timestep_scaling: f32,
}

impl Lcm {
    pub(crate) fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        cfg.reject("thresholding", cfg.thresholding)?;
        let train_steps = cfg.train_steps()?;
        let original_steps = cfg.original_inference_steps.unwrap_or(50);
        if original_steps == 0 || original_steps > train_steps {
            return Err(Error::Scheduler(format!(
                "LCM: original_inference_steps {original_steps} must be between 1 and num_train_timesteps ({train_steps})"
            )));
        }
        if steps > original_steps {
            return Err(Error::Scheduler(format!(
                "LCM supports at most {original_steps} steps (original_inference_steps), not {steps}"
            )));
        }
        let ac = alphas_cumprod(cfg, LCM_BETAS)?;
        // the distillation schedule k-1, 2k-1, ..., T-1, walked backwards at evenly spaced indices
        let k = (train_steps / original_steps) as i64;
        let origin: Vec<i64> = (1..=original_steps as i64).rev().map(|i| i * k - 1).collect();
        let timesteps = np_linspace(0.0, origin.len() as f64, steps, false)
            .into_iter()
            .map(|i| origin[i.floor() as usize] as f64)
            .collect();
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { ac[0] };
        Ok(Self {
            timesteps,
            alphas_cumprod: ac,
            final_alpha_cumprod,
            prediction_type: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            clip_sample_range: (cfg.clip_sample == Some(true)).then(|| cfg.clip_sample_range.unwrap_or(1.0) as f32),
            timestep_scaling: cfg.timestep_scaling.unwrap_or(10.0) as f32,
        })
    }

    fn alpha_at(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl Scheduler for Lcm {
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
        noise: &mut dyn NoiseGenerator,
    ) -> Result<StepOutput> {
        check_index(step_index, self.timesteps.len())?;
        let model = ops::f32(model_output)?;
        let sample = ops::f32(sample)?;
        let last = step_index + 1 == self.timesteps.len();
        let t = self.timesteps[step_index] as i64;
        let prev_t = if last { t } else { self.timesteps[step_index + 1] as i64 };
        let a_t = self.alpha_at(t);
        let a_prev = self.alpha_at(prev_t);
        let b_prev = 1.0 - a_prev;

        // boundary-condition scalings; the int64 timestep tensor times a float gives float32,
        // and `0.25 / x` is torch's reciprocal(x) * 0.25
        let scaled_t = t as f32 * self.timestep_scaling;
        let denom = scaled_t * scaled_t + 0.25;
        let c_skip = (1.0 / denom) * 0.25;
        let c_out = scaled_t / denom.sqrt();

        let x0 = ops::pred_original_from_alpha(self.prediction_type, &model, &sample, a_t, self.clip_sample_range)?;
        let denoised = (ops::mul(&x0, c_out)? + ops::mul(&sample, c_skip)?)?;
        let prev = if last {
            denoised.clone()
        } else {
            let eps = ops::randn_like(&model, noise)?;
            (ops::mul(&denoised, a_prev.sqrt())? + ops::mul(&eps, b_prev.sqrt())?)?
        };
        Ok(StepOutput { prev_sample: prev.to_dtype(model_output.dtype())?, pred_original_sample: denoised })
    }
}
