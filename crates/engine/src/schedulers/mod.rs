//! Samplers: each reproduces its diffusers counterpart built with
//! `from_config(<model's scheduler_config.json>)`. One file per sampler behind [`Scheduler`].
//!
//! The denoising loop a pipeline runs, as diffusers' pipelines do:
//!
//! ```text
//! let mut sched = build_scheduler(sampler, schedule, &config, steps)?;   // a fresh one per image
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

/// The samplers Easel offers (A1111's "Sampling method"); the noise schedule is chosen apart
/// from it ([`Schedule`]), as AUTOMATIC1111 and ComfyUI present them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SamplerId {
    /// `EulerDiscreteScheduler`
    #[default]
    Euler,
    /// `EulerAncestralDiscreteScheduler`
    EulerAncestral,
    /// `DDIMScheduler` with eta 0
    Ddim,
    /// `DPMSolverMultistepScheduler`
    DpmPp2m,
    /// `LCMScheduler`
    Lcm,
}

/// The noise schedule (A1111's "Schedule type"): the model's own, or Karras et al.'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Schedule {
    /// What the model's `scheduler_config.json` says (A1111's "Automatic").
    #[default]
    Default,
    /// Karras sigmas (`use_karras_sigmas=True`).
    Karras,
}

impl Schedule {
    pub const ALL: [Schedule; 2] = [Schedule::Default, Schedule::Karras];

    pub fn id(&self) -> &'static str {
        match self {
            Schedule::Default => "default",
            Schedule::Karras => "karras",
        }
    }

    /// AUTOMATIC1111's `Schedule type` value (none for the model's own schedule).
    pub fn a1111_name(&self) -> Option<&'static str> {
        match self {
            Schedule::Default => None,
            Schedule::Karras => Some("Karras"),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Schedule::Default => "Default",
            Schedule::Karras => "Karras",
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

impl FromStr for Schedule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "default" | "automatic" | "" => Ok(Schedule::Default),
            "karras" => Ok(Schedule::Karras),
            _ => Err(Error::InvalidSetting(format!("unknown schedule {s:?}; expected default or karras"))),
        }
    }
}

impl SamplerId {
    pub const ALL: [SamplerId; 5] =
        [SamplerId::Euler, SamplerId::EulerAncestral, SamplerId::Ddim, SamplerId::DpmPp2m, SamplerId::Lcm];

    /// The stable id used in settings and on the command line.
    pub fn id(&self) -> &'static str {
        match self {
            SamplerId::Euler => "euler",
            SamplerId::EulerAncestral => "euler_a",
            SamplerId::Ddim => "ddim",
            SamplerId::DpmPp2m => "dpmpp_2m",
            SamplerId::Lcm => "lcm",
        }
    }

    pub fn from_id(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.id() == s)
    }

    /// The schedules this sampler runs exactly as diffusers does (checked against it).
    pub fn schedules(&self) -> &'static [Schedule] {
        match self {
            SamplerId::Euler | SamplerId::DpmPp2m => &Schedule::ALL,
            _ => &[Schedule::Default],
        }
    }

    /// Refuses a sampler/schedule pair Easel does not run, with what does.
    pub fn check_schedule(&self, schedule: Schedule) -> Result<()> {
        if self.schedules().contains(&schedule) {
            return Ok(());
        }
        let with: Vec<&str> = Self::ALL.iter().filter(|s| s.schedules().contains(&schedule)).map(|s| s.id()).collect();
        Err(Error::InvalidSetting(format!(
            "the {schedule} schedule does not work with {}; it works with {}",
            self.id(),
            with.join(", ")
        )))
    }

    /// Every sampler with every schedule it runs.
    pub fn combinations() -> impl Iterator<Item = (SamplerId, Schedule)> {
        Self::ALL.into_iter().flat_map(|s| s.schedules().iter().map(move |&schedule| (s, schedule)))
    }

    /// One id for a sampler and schedule (`dpmpp_2m_karras`), as earlier Easel versions and
    /// `--sampler` still accept, and as the reference fixtures are named.
    pub fn combined_id(&self, schedule: Schedule) -> String {
        match schedule {
            Schedule::Default => self.id().to_string(),
            other => format!("{}_{}", self.id(), other.id()),
        }
    }

    /// Reads a sampler id, or a combined one (`dpmpp_2m_karras`) with its schedule.
    pub fn parse_with_schedule(s: &str) -> Result<(SamplerId, Option<Schedule>)> {
        if let Some((sampler, schedule)) =
            Self::combinations().find(|(x, sch)| *sch != Schedule::Default && x.combined_id(*sch) == s)
        {
            return Ok((sampler, Some(schedule)));
        }
        Ok((s.parse()?, None))
    }

    /// AUTOMATIC1111's `Sampler` infotext value.
    pub fn a1111_name(&self) -> &'static str {
        match self {
            SamplerId::Euler => "Euler",
            SamplerId::EulerAncestral => "Euler a",
            SamplerId::Ddim => "DDIM",
            SamplerId::DpmPp2m => "DPM++ 2M",
            SamplerId::Lcm => "LCM",
        }
    }

    /// Reads AUTOMATIC1111's infotext values, new style (`DPM++ 2M` + `Schedule type: Karras`)
    /// or old style (`DPM++ 2M Karras`). `Automatic` counts as the default schedule. Pairs
    /// Easel does not run give None.
    pub fn from_a1111(sampler: &str, schedule_type: Option<&str>) -> Option<(Self, Schedule)> {
        let sampler = sampler.trim();
        let schedule = schedule_type.map(str::trim).filter(|s| !s.is_empty() && !s.eq_ignore_ascii_case("automatic"));
        let (name, schedule) = match sampler.strip_suffix(" Karras") {
            Some(base) if schedule.is_none_or(|s| s.eq_ignore_ascii_case("karras")) => {
                (base.trim_end(), Some("Karras"))
            }
            _ => (sampler, schedule),
        };
        let schedule = match schedule {
            None => Schedule::Default,
            Some(s) => Schedule::ALL.into_iter().find(|x| x.a1111_name().is_some_and(|n| n.eq_ignore_ascii_case(s)))?,
        };
        let found = Self::ALL.into_iter().find(|x| x.a1111_name().eq_ignore_ascii_case(name))?;
        found.schedules().contains(&schedule).then_some((found, schedule))
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

    /// `original` (clean latents) noised to the level of step `step_index`, as diffusers'
    /// `add_noise(original, noise, timesteps[step_index])`: image-to-image starts there. f32.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;

    /// Makes `step_index` the first step taken (diffusers' `set_begin_index`): image-to-image
    /// skips the noisiest steps. Only multistep samplers keep state that needs it.
    fn set_begin_index(&mut self, _step_index: usize) -> Result<()> {
        Ok(())
    }

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
    schedule: Schedule,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>> {
    if num_inference_steps == 0 {
        return Err(Error::InvalidSetting("steps must be at least 1".into()));
    }
    sampler.check_schedule(schedule)?;
    let karras = schedule == Schedule::Karras;
    Ok(match sampler {
        // `EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True)`: the same as a
        // config that says so (checked against diffusers on such a config, x_karras_sample).
        SamplerId::Euler if karras => {
            let config = SchedulerConfig { use_karras_sigmas: Some(true), ..config.clone() };
            Box::new(euler::EulerDiscrete::new(&config, num_inference_steps)?)
        }
        SamplerId::Euler => Box::new(euler::EulerDiscrete::new(config, num_inference_steps)?),
        SamplerId::EulerAncestral => {
            Box::new(euler_ancestral::EulerAncestralDiscrete::new(config, num_inference_steps)?)
        }
        SamplerId::Ddim => Box::new(ddim::Ddim::new(config, num_inference_steps)?),
        SamplerId::DpmPp2m => Box::new(dpmpp_2m::DpmSolverMultistep::new(config, num_inference_steps, karras)?),
        SamplerId::Lcm => Box::new(lcm::Lcm::new(config, num_inference_steps)?),
    })
}

/// `original + noise × sigma`: the k-diffusion samplers' `add_noise` (Euler, Euler a), in f32.
pub(crate) fn add_noise_sigma(original: &Tensor, noise: &Tensor, sigmas: &[f32], step_index: usize) -> Result<Tensor> {
    let sigma = *sigmas.get(step_index).ok_or_else(|| past_end(step_index, sigmas.len()))?;
    Ok((ops::f32(original)? + ops::mul(&ops::f32(noise)?, sigma)?)?)
}

/// `sqrt(ᾱ_t) × original + sqrt(1 − ᾱ_t) × noise` at timestep `t`: DDPM's `add_noise` (DDIM,
/// LCM), the square roots taken of the float32 ᾱ as torch does.
pub(crate) fn add_noise_alpha(original: &Tensor, noise: &Tensor, alphas_cumprod: &[f32], t: f64) -> Result<Tensor> {
    let a = *alphas_cumprod.get(t as usize).ok_or_else(|| past_end(t as usize, alphas_cumprod.len()))?;
    Ok((ops::mul(&ops::f32(original)?, a.sqrt())? + ops::mul(&ops::f32(noise)?, (1.0 - a).sqrt())?)?)
}

fn past_end(index: usize, len: usize) -> Error {
    Error::Scheduler(format!("step {index} is past the last of {len} steps"))
}

/// Refuses a step index past the schedule (a caller bug, reported rather than panicking).
fn check_index(step_index: usize, len: usize) -> Result<()> {
    if step_index >= len {
        return Err(Error::Scheduler(format!("step {step_index} is past the last of {len} steps")));
    }
    Ok(())
}
