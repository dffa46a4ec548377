//! DPM++ 2M (and its Karras variant): diffusers' `DPMSolverMultistepScheduler`.
//!
//! Besides the SD defaults (dpmsolver++, order 2, midpoint), what a model's config may select is
//! honoured: `solver_order` 1-3, `solver_type` heun, the `sde-dpmsolver++` variant (which draws
//! one `randn` per step), `final_sigmas_type`, `lower_order_final`, `euler_at_final` and
//! `lambda_min_clipped`.

use candle_core::Tensor;

use super::config::{
    alphas_cumprod, karras_sigmas, log_sigmas, np_arange, np_interp_arange, np_linspace, np_round, sigma_to_t,
    train_sigmas, BetaSchedule, FinalSigmasType, PredictionType, SchedulerConfig, TimestepSpacing, DEFAULT_BETAS,
};
use super::{check_index, ops, Scheduler, StepOutput};
use crate::rng::NoiseGenerator;
use crate::{Error, Result};

pub(crate) struct DpmSolverMultistep {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction_type: PredictionType,
    solver_order: usize,
    sde: bool,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigmas_zero: bool,
    /// The last `solver_order` x0 predictions, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    next_step: usize,
}

impl DpmSolverMultistep {
    pub(crate) fn new(cfg: &SchedulerConfig, steps: usize, karras: bool) -> Result<Self> {
        cfg.reject("thresholding", cfg.thresholding)?;
        cfg.reject("use_exponential_sigmas", cfg.use_exponential_sigmas)?;
        cfg.reject("use_beta_sigmas", cfg.use_beta_sigmas)?;
        cfg.reject("use_lu_lambdas", cfg.use_lu_lambdas)?;
        cfg.reject("use_flow_sigmas", cfg.use_flow_sigmas)?;
        if cfg.variance_type.is_some() {
            return Err(Error::Scheduler("DPM-Solver: learned variance_type is not supported".into()));
        }
        let sde = match cfg.algorithm_type.as_deref() {
            None | Some("dpmsolver++") | Some("deis") => false,
            Some("sde-dpmsolver++") => true,
            Some(other) => {
                return Err(Error::Scheduler(format!("DPM-Solver: algorithm_type {other:?} is not supported")))
            }
        };
        let heun = match cfg.solver_type.as_deref() {
            None | Some("midpoint") | Some("logrho") | Some("bh1") | Some("bh2") => false,
            Some("heun") => true,
            Some(other) => return Err(Error::Scheduler(format!("DPM-Solver: solver_type {other:?} is not supported"))),
        };
        let solver_order = cfg.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(Error::Scheduler(format!("DPM-Solver: solver_order {solver_order} is not supported (1 to 3)")));
        }

        let train_steps = cfg.train_steps()?;
        let mut ac = alphas_cumprod(cfg, DEFAULT_BETAS)?;
        if cfg.rescale_betas_zero_snr == Some(true) {
            ac[train_steps - 1] = 2f32.powi(-24);
        }

        // lambda_min_clipped cuts the noisiest timesteps off (searchsorted on the flipped
        // float32 lambda_t)
        let lambda_min = cfg.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY);
        let clipped = ac
            .iter()
            .rev()
            .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
            .collect::<Vec<f32>>()
            .partition_point(|&l| (l as f64) < lambda_min);
        let last_timestep = train_steps - clipped;

        // DPM-Solver spaces n + 1 points and drops the last (unlike Euler and DDIM)
        let offset = cfg.steps_offset.unwrap_or(0) as f64;
        let mut timesteps: Vec<f64> = match cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace) {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> =
                    np_linspace(0.0, last_timestep as f64 - 1.0, steps + 1, true).into_iter().map(np_round).collect();
                v.reverse();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (steps + 1);
                (1..=steps).rev().map(|i| (i * ratio) as f64 + offset).collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train_steps as f64 / steps as f64;
                np_arange(last_timestep as f64, 0.0, -ratio).into_iter().map(|t| np_round(t) - 1.0).collect()
            }
        };

        let train = train_sigmas(&ac);
        let mut sigmas: Vec<f64> = if karras {
            let sigma_min = cfg.sigma_min.unwrap_or(train[0] as f64);
            let sigma_max = cfg.sigma_max.unwrap_or(train[train_steps - 1] as f64);
            let sigmas = karras_sigmas(sigma_min, sigma_max, steps);
            let ls = log_sigmas(&train);
            let round = cfg.beta_schedule.unwrap_or(DEFAULT_BETAS.beta_schedule) != BetaSchedule::SquaredcosCapV2;
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &ls);
                    // then `.to(torch.int64)` truncates
                    (if round { np_round(t) } else { t }).trunc()
                })
                .collect();
            sigmas
        } else {
            let train64: Vec<f64> = train.iter().map(|&s| s as f64).collect();
            timesteps.iter().map(|&t| np_interp_arange(t, &train64)).collect()
        };
        let final_sigmas_type = cfg.final_sigmas_type.unwrap_or(FinalSigmasType::Zero);
        sigmas.push(match final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train[0] as f64,
        });

        Ok(Self {
            timesteps,
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            prediction_type: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            solver_order,
            sde,
            heun,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            euler_at_final: cfg.euler_at_final.unwrap_or(false),
            final_sigmas_zero: final_sigmas_type == FinalSigmasType::Zero,
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
            next_step: 0,
        })
    }

    /// `convert_model_output` for dpmsolver++: the x0 prediction.
    fn convert_model_output(&self, model: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        Ok(match self.prediction_type {
            PredictionType::Epsilon => ops::div(&(sample - ops::mul(model, sigma_t)?)?, alpha_t)?,
            PredictionType::Sample => model.clone(),
            PredictionType::VPrediction => (ops::mul(sample, alpha_t)? - ops::mul(model, sigma_t)?)?,
        })
    }

    fn history(&self, back: usize) -> Result<&Tensor> {
        self.model_outputs[self.solver_order - 1 - back]
            .as_ref()
            .ok_or_else(|| Error::Scheduler("DPM-Solver: missing model output history".into()))
    }

    fn first_order(&self, i: usize, x0: &Tensor, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        match noise {
            None => Ok((ops::mul(sample, sigma_t / sigma_s)? - ops::mul(x0, alpha_t * ((-h).exp() - 1.0))?)?),
            Some(noise) => {
                let e2 = (-2.0 * h).exp();
                Ok(((ops::mul(sample, sigma_t / sigma_s * (-h).exp())? + ops::mul(x0, alpha_t * (1.0 - e2))?)?
                    + ops::mul(noise, sigma_t * (1.0 - e2).sqrt())?)?)
            }
        }
    }

    fn second_order(&self, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let (m0, m1) = (self.history(0)?, self.history(1)?);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d0 = m0;
        let d1 = ops::mul(&(m0 - m1)?, 1.0 / r0)?;
        let e = (-h).exp();
        match noise {
            None => {
                let base = (ops::mul(sample, sigma_t / sigma_s0)? - ops::mul(d0, alpha_t * (e - 1.0))?)?;
                if self.heun {
                    Ok((base + ops::mul(&d1, alpha_t * ((e - 1.0) / h + 1.0))?)?)
                } else {
                    Ok((base - ops::mul(&d1, 0.5 * (alpha_t * (e - 1.0)))?)?)
                }
            }
            Some(noise) => {
                let e2 = (-2.0 * h).exp();
                let base = (ops::mul(sample, sigma_t / sigma_s0 * e)? + ops::mul(d0, alpha_t * (1.0 - e2))?)?;
                let c1 =
                    if self.heun { alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0) } else { 0.5 * (alpha_t * (1.0 - e2)) };
                Ok(((base + ops::mul(&d1, c1)?)? + ops::mul(noise, sigma_t * (1.0 - e2).sqrt())?)?)
            }
        }
    }

    fn third_order(&self, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.sigmas[i - 2]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let lambda_s2 = lambda(alpha_s2, sigma_s2);
        let (m0, m1, m2) = (self.history(0)?, self.history(1)?, self.history(2)?);
        let (h, h_0, h_1) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d0 = m0;
        let d1_0 = ops::mul(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = ops::mul(&(m1 - m2)?, 1.0 / r1)?;
        let d1_diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + ops::mul(&d1_diff, r0 / (r0 + r1))?)?;
        let d2 = ops::mul(&d1_diff, 1.0 / (r0 + r1))?;
        let e = (-h).exp();
        match noise {
            None => Ok((((ops::mul(sample, sigma_t / sigma_s0)? - ops::mul(d0, alpha_t * (e - 1.0))?)?
                + ops::mul(&d1, alpha_t * ((e - 1.0) / h + 1.0))?)?
                - ops::mul(&d2, alpha_t * ((e - 1.0 + h) / (h * h) - 0.5))?)?),
            Some(noise) => {
                let e2 = (-2.0 * h).exp();
                let two_h = 2.0 * h;
                Ok(((((ops::mul(sample, sigma_t / sigma_s0 * e)? + ops::mul(d0, alpha_t * (1.0 - e2))?)?
                    + ops::mul(&d1, alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0))?)?
                    + ops::mul(&d2, alpha_t * ((1.0 - e2 - two_h) / (two_h * two_h) - 0.5))?)?
                    + ops::mul(noise, sigma_t * (1.0 - e2).sqrt())?)?)
            }
        }
    }
}

/// `_sigma_to_alpha_sigma_t`: alpha_t = 1 / sqrt(sigma² + 1), sigma_t = sigma * alpha_t.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// log-SNR: ln(alpha_t) - ln(sigma_t) (+inf at sigma 0, which makes the last step exact x0).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl Scheduler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        Ok(sample.clone())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let (alpha, sigma) = alpha_sigma(self.sigmas[step_index]);
        Ok((ops::mul(&ops::f32(original)?, alpha)? + ops::mul(&ops::f32(noise)?, sigma)?)?)
    }

    fn set_begin_index(&mut self, step_index: usize) -> Result<()> {
        check_index(step_index, self.timesteps.len())?;
        self.next_step = step_index;
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseGenerator,
    ) -> Result<StepOutput> {
        let i = step_index;
        let n = self.timesteps.len();
        check_index(i, n)?;
        if i != self.next_step {
            return Err(Error::Scheduler(format!(
                "DPM-Solver is multistep: expected step {}, got {i}",
                self.next_step
            )));
        }
        let lower_order_final =
            i == n - 1 && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigmas_zero);
        let lower_order_second = i + 2 == n && self.lower_order_final && n < 15;

        let model = ops::f32(model_output)?;
        let sample = ops::f32(sample)?;
        let x0 = self.convert_model_output(&model, &sample, i)?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0.clone()));
        let eps = if self.sde { Some(ops::randn_like(&model, noise)?) } else { None };
        let eps = eps.as_ref();

        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(i, &x0, &sample, eps)?
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(i, &sample, eps)?
        } else {
            self.third_order(i, &sample, eps)?
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.next_step += 1;
        Ok(StepOutput { prev_sample: prev.to_dtype(model_output.dtype())?, pred_original_sample: x0 })
    }
}
