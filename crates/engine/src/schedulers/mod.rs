//! Samplers: each reproduces its diffusers counterpart built with
//! `from_config(<model's scheduler_config.json>)`. One file per sampler behind [`Scheduler`].
//!
//! The denoising loop a pipeline runs, as diffusers' pipelines do:
//!
//! ```text
//! let mut sched = build_scheduler(sampler, &config, steps)?;   // a fresh one per image
//! latents = randn(shape) * sched.init_noise_sigma()            // multiply in float32
//! for (i, &t) in sched.timesteps().iter().enumerate() {        // may be longer than `steps`
//!     let input = sched.scale_model_input(&latents, i)?;
//!     let model_output = unet(&input, t as f32)?;              // CFG applied here
//!     latents = sched.step(&model_output, i, &latents, &mut noise)?.prev_sample;
//! }
//! ```
//!
//! The U-Net's timestep: Euler and Euler a give float32 values (fractional with "linspace"
//! spacing or Karras sigmas), DDIM, DPM-Solver and LCM integers; diffusers' time embedding casts
//! either to float32, so `t as f32` is exact. Scheduler math runs in float32 whatever the
//! latents' dtype; `prev_sample` comes back in `model_output`'s dtype (as diffusers),
//! `pred_original_sample` in float32. The noise generator is the one that made the initial
//! latents, continued (diffusers passes the same `generator` to `step`).
//!
//! Numerics: schedules are within 1 float32 ulp of diffusers', per-step latents within ~5e-7
//! (see tests.rs). The remaining differences come from torch's sqrt/exp/log (MKL, not
//! correctly rounded and CPU-dependent) where ours are.

mod config;
mod ddim;
mod dpmpp_2m;
mod euler;
mod euler_ancestral;
mod lcm;
mod ops;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;

pub use config::{BetaSchedule, FinalSigmasType, PredictionType, SchedulerConfig, TimestepSpacing};

use crate::rng::NoiseGenerator;
use crate::{Error, Result};

/// The samplers Easel offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerId {
    /// `EulerDiscreteScheduler`
    Euler,
    /// `EulerAncestralDiscreteScheduler`
    EulerAncestral,
    /// `DDIMScheduler` with eta 0
    Ddim,
    /// `DPMSolverMultistepScheduler` with `use_karras_sigmas=False`
    DpmPp2m,
    /// `DPMSolverMultistepScheduler` with `use_karras_sigmas=True`
    DpmPp2mKarras,
    /// `LCMScheduler`
    Lcm,
}

impl SamplerId {
    pub const ALL: [SamplerId; 6] = [
        SamplerId::Euler,
        SamplerId::EulerAncestral,
        SamplerId::Ddim,
        SamplerId::DpmPp2m,
        SamplerId::DpmPp2mKarras,
        SamplerId::Lcm,
    ];

    /// The stable id used in settings and on the command line.
    pub fn id(&self) -> &'static str {
        match self {
            SamplerId::Euler => "euler",
            SamplerId::EulerAncestral => "euler_a",
            SamplerId::Ddim => "ddim",
            SamplerId::DpmPp2m => "dpmpp_2m",
            SamplerId::DpmPp2mKarras => "dpmpp_2m_karras",
            SamplerId::Lcm => "lcm",
        }
    }

    pub fn from_id(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.id() == s)
    }

    /// AUTOMATIC1111's `Sampler` and `Schedule type` infotext values.
    pub fn a1111_name(&self) -> (&'static str, Option<&'static str>) {
        match self {
            SamplerId::Euler => ("Euler", None),
            SamplerId::EulerAncestral => ("Euler a", None),
            SamplerId::Ddim => ("DDIM", None),
            SamplerId::DpmPp2m => ("DPM++ 2M", None),
            SamplerId::DpmPp2mKarras => ("DPM++ 2M", Some("Karras")),
            SamplerId::Lcm => ("LCM", None),
        }
    }

    /// Reads AUTOMATIC1111's infotext values, new style (`DPM++ 2M` + `Schedule type: Karras`)
    /// or old style (`DPM++ 2M Karras`). `Automatic` counts as no schedule type.
    pub fn from_a1111(sampler: &str, schedule_type: Option<&str>) -> Option<Self> {
        let sampler = sampler.trim();
        let schedule = schedule_type.map(str::trim).filter(|s| !s.is_empty() && !s.eq_ignore_ascii_case("automatic"));
        let (name, schedule) = match sampler.strip_suffix(" Karras") {
            Some(base) if schedule.is_none_or(|s| s.eq_ignore_ascii_case("karras")) => {
                (base.trim_end(), Some("Karras"))
            }
            _ => (sampler, schedule),
        };
        Self::ALL.into_iter().find(|x| {
            let (n, s) = x.a1111_name();
            n.eq_ignore_ascii_case(name)
                && match (s, schedule) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                    _ => false,
                }
        })
    }
}

impl fmt::Display for SamplerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

impl FromStr for SamplerId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::from_id(s).ok_or_else(|| {
            let ids: Vec<&str> = Self::ALL.iter().map(|x| x.id()).collect();
            Error::InvalidSetting(format!("unknown sampler {s:?}; expected one of {}", ids.join(", ")))
        })
    }
}

/// What one denoising step produces.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The latents for the next step (after the last step: the result).
    pub prev_sample: Tensor,
    /// The current estimate of the clean latents, for live previews (diffusers'
    /// `pred_original_sample`; LCM's `denoised`; DPM-Solver's converted model output).
    pub pred_original_sample: Tensor,
}

pub trait Scheduler: Send {
    /// Values passed to the U-Net as `timestep`, in order (f64: Euler's are fractional in some
    /// spacings). Its length is the number of steps to run, which diffusers sometimes makes
    /// differ from the steps asked for ("trailing" with 61 steps gives 62).
    fn timesteps(&self) -> &[f64];

    /// The noise levels, one more than the timesteps, for the samplers that have them.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }

    /// The initial noise is `randn * init_noise_sigma` (a float32 value).
    fn init_noise_sigma(&self) -> f64;

    /// The U-Net's input for step `step_index`.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor>;

    /// One denoising step. Draws from `noise` exactly when diffusers' step calls `randn_tensor`:
    /// one `randn(numel)` per call for Euler a, DPM-Solver's SDE variant, and LCM except on its
    /// last step. Steps must be taken in order, each once.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseGenerator,
    ) -> Result<StepOutput>;
}

/// Builds `sampler` as `Class.from_config(config)` would, for `num_inference_steps` steps.
pub fn build_scheduler(
    sampler: SamplerId,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>> {
    if num_inference_steps == 0 {
        return Err(Error::InvalidSetting("steps must be at least 1".into()));
    }
    Ok(match sampler {
        SamplerId::Euler => Box::new(euler::EulerDiscrete::new(config, num_inference_steps)?),
        SamplerId::EulerAncestral => {
            Box::new(euler_ancestral::EulerAncestralDiscrete::new(config, num_inference_steps)?)
        }
        SamplerId::Ddim => Box::new(ddim::Ddim::new(config, num_inference_steps)?),
        SamplerId::DpmPp2m => Box::new(dpmpp_2m::DpmSolverMultistep::new(config, num_inference_steps, false)?),
        SamplerId::DpmPp2mKarras => Box::new(dpmpp_2m::DpmSolverMultistep::new(config, num_inference_steps, true)?),
        SamplerId::Lcm => Box::new(lcm::Lcm::new(config, num_inference_steps)?),
    })
}

/// Refuses a step index past the schedule (a caller bug, reported rather than panicking).
fn check_index(step_index: usize, len: usize) -> Result<()> {
    if step_index >= len {
        return Err(Error::Scheduler(format!("step {step_index} is past the last of {len} steps")));
    }
    Ok(())
}
