//! Cheap live previews: the family's 4→3 linear map from latents to RGB (the CPU reference of
//! the app's WGSL shader).

use candle_core::{DType, Tensor};

use crate::metadata::RgbImage;
use crate::models::Family;
use crate::Result;

/// Projects the first latent of `latents` (N, 4, h, w) to an RGB8 image of size h×w.
pub fn latent_to_rgb(latents: &Tensor, family: Family) -> Result<RgbImage> {
    let (factors, bias) = family.latent_rgb_factors();
    let latent = latents.narrow(0, 0, 1)?.squeeze(0)?.to_dtype(DType::F32)?;
    let (c, h, w) = latent.dims3()?;
    let values = latent.flatten_all()?.to_vec1::<f32>()?;
    let plane = h * w;
    let mut data = Vec::with_capacity(plane * 3);
    for p in 0..plane {
        for (rgb, &b) in bias.iter().enumerate() {
            let mut v = b;
            for (ch, row) in factors.iter().enumerate().take(c) {
                v += values[ch * plane + p] * row[rgb];
            }
            data.push((((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8);
        }
    }
    Ok(RgbImage { width: w as u32, height: h as u32, data })
}

/// The first latent of a batch copied to host memory, channel-major — what a UI needs to draw a
/// preview without touching tensors. A copy, never a view, so a preview cannot alias the
/// sampler's state.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentPlanes {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

pub fn latent_planes(latents: &Tensor) -> Result<LatentPlanes> {
    let first = latents.narrow(0, 0, 1)?.squeeze(0)?.to_dtype(DType::F32)?;
    let (channels, height, width) = first.dims3()?;
    let data = first.flatten_all()?.to_vec1::<f32>()?;
    Ok(LatentPlanes { channels, height, width, data })
}
