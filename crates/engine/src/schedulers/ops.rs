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
