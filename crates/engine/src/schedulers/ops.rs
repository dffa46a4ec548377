//! Tensor-by-scalar arithmetic rounded as torch rounds it.
//!
//! diffusers multiplies latents by 0-d float32 tensors (`sigma * model_output`) and divides by
//! them with a true division. candle's `tensor / f64` multiplies by the reciprocal instead, which
//! rounds differently, so every scalar op here goes through a float32 0-d tensor.

use candle_core::{DType, Tensor};

use crate::rng::NoiseGenerator;
use crate::{Error, Result};

fn scalar(t: &Tensor, s: f32) -> Result<Tensor> {
    Ok(Tensor::new(s, t.device())?)
}

/// `s * t` (float32).
pub(crate) fn mul(t: &Tensor, s: f32) -> Result<Tensor> {
    Ok(t.broadcast_mul(&scalar(t, s)?)?)
}

/// `t / s` (float32 true division).
pub(crate) fn div(t: &Tensor, s: f32) -> Result<Tensor> {
    Ok(t.broadcast_div(&scalar(t, s)?)?)
}

/// The scheduler math runs in float32, as diffusers' does for float32 latents.
pub(crate) fn f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// One `randn_tensor(like.shape)` call, drawn from the caller's generator.
pub(crate) fn randn_like(like: &Tensor, noise: &mut dyn NoiseGenerator) -> Result<Tensor> {
    let n = like.elem_count();
    let values = noise.randn(n);
    if values.len() != n {
        return Err(Error::Scheduler(format!("noise generator returned {} values, expected {n}", values.len())));
    }
    Ok(Tensor::from_vec(values, like.shape(), like.device())?)
}

/// diffusers' x0 estimate from the model output with alpha-bar `a_t` (DDIM and LCM), in its order
/// of operations, then clipped to `clip` when the config asks for it.
pub(crate) fn pred_original_from_alpha(
    prediction: super::PredictionType,
    model: &Tensor,
    sample: &Tensor,
    a_t: f32,
    clip: Option<f32>,
) -> Result<Tensor> {
    use super::PredictionType;
    let b_t = 1.0 - a_t;
    let x0 = match prediction {
        PredictionType::Epsilon => div(&(sample - mul(model, b_t.sqrt())?)?, a_t.sqrt())?,
        PredictionType::Sample => model.clone(),
        PredictionType::VPrediction => (mul(sample, a_t.sqrt())? - mul(model, b_t.sqrt())?)?,
    };
    Ok(match clip {
        Some(r) => x0.clamp(-r, r)?,
        None => x0,
    })
}
