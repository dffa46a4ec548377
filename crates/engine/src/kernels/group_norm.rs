//! GroupNorm, optionally followed by SiLU, in one parallel pass per group.
//!
//! In NCHW a group's channels are one contiguous run of memory, so each (image, group) is an
//! independent task: two reads for the statistics (mean, then the centred variance, in f64 so
//! the result does not depend on the summation order) and one read + write that applies
//! `x·a + b` with torch's per-channel `a = γ/σ`, `b = β − mean·a`, then SiLU if asked.
//! candle-nn's GroupNorm is a dozen tensor ops with as many full-size temporaries.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

use super::contiguous_f32;
use super::simd_math::{multiversion, silu};

#[derive(Debug, Clone, Copy)]
pub struct GroupNormOp {
    pub groups: usize,
    pub eps: f64,
    /// Apply SiLU to the normalised output (every ResNet block and the models' output heads).
    pub silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "easel-group-norm"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        gamma_storage: &CpuStorage,
        gamma_layout: &Layout,
        beta_storage: &CpuStorage,
        beta_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x_storage, x_layout, self.name())?;
        let gamma = contiguous_f32(gamma_storage, gamma_layout, self.name())?;
        let beta = contiguous_f32(beta_storage, beta_layout, self.name())?;
        let dims = x_layout.shape().dims();
        if dims.len() < 2 {
            candle_core::bail!("easel-group-norm: expected (batch, channels, …), got {dims:?}");
        }
        let channels = dims[1];
        if self.groups == 0
            || !channels.is_multiple_of(self.groups)
            || gamma.len() != channels
            || beta.len() != channels
        {
            candle_core::bail!(
                "easel-group-norm: {channels} channels, {} groups, affine {}/{}",
                self.groups,
                gamma.len(),
                beta.len()
            );
        }
        let spatial: usize = dims[2..].iter().product();
        let channels_per_group = channels / self.groups;
        let group_len = channels_per_group * spatial;
        let mut out = vec![0f32; x.len()];
        if group_len > 0 {
            out.par_chunks_mut(group_len).zip(x.par_chunks(group_len)).enumerate().for_each(|(index, (dst, src))| {
                let group = index % self.groups;
                let first_channel = group * channels_per_group;
                let (mean, rstd) = statistics(src, self.eps);
                for (c, (dst, src)) in
                    dst.chunks_exact_mut(spatial.max(1)).zip(src.chunks_exact(spatial.max(1))).enumerate()
                {
                    let scale = rstd * gamma[first_channel + c];
                    let shift = beta[first_channel + c] - mean * scale;
                    scale_shift(dst, src, scale, shift, self.silu);
                }
            });
        }
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

/// (mean, 1/√(var + eps)) of one group, biased variance as torch computes it.
fn statistics(xs: &[f32], eps: f64) -> (f32, f32) {
    let n = xs.len() as f64;
    let mean = sum_f64(xs) / n;
    let var = centred_square_sum(xs, mean) / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

multiversion! {
    fn sum_f64(xs: &[f32]) -> f64 {
        // Eight independent partial sums so the loop vectorises.
        let mut acc = [0f64; 8];
        let mut chunks = xs.chunks_exact(8);
        for chunk in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                *a += v as f64;
            }
        }
        acc.iter().sum::<f64>() + chunks.remainder().iter().map(|&v| v as f64).sum::<f64>()
    }
}

multiversion! {
    fn centred_square_sum(xs: &[f32], mean: f64) -> f64 {
        let mut acc = [0f64; 8];
        let mut chunks = xs.chunks_exact(8);
        for chunk in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                let d = v as f64 - mean;
                *a += d * d;
            }
        }
        let tail: f64 = chunks.remainder().iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum();
        acc.iter().sum::<f64>() + tail
    }
}

multiversion! {
    fn scale_shift(dst: &mut [f32], src: &[f32], scale: f32, shift: f32, with_silu: bool) {
        if with_silu {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = silu(s * scale + shift);
            }
        } else {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = s * scale + shift;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};

    #[test]
    fn matches_candle_nn_group_norm_with_and_without_silu() {
        let dev = Device::Cpu;
        for (batch, channels, h, w, groups) in [(2, 64, 9, 7, 32), (1, 6, 1, 1, 3), (3, 12, 5, 4, 1)] {
            let x = (Tensor::randn(0f32, 3.0, (batch, channels, h, w), &dev).unwrap() + 1.5).unwrap();
            let gamma = Tensor::randn(1f32, 0.5, channels, &dev).unwrap();
            let beta = Tensor::randn(0f32, 0.5, channels, &dev).unwrap();
            let reference = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), channels, groups, 1e-5).unwrap();
            let want = reference.forward(&x).unwrap();
            for silu in [false, true] {
                let op = GroupNormOp { groups, eps: 1e-5, silu };
                let got = x.apply_op3_no_bwd(&gamma, &beta, &op).unwrap();
                let want = if silu { want.silu().unwrap() } else { want.clone() };
                let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 2e-5, "{:?} silu={silu}: max abs diff {diff}", (batch, channels, h, w, groups));
            }
        }
    }
}
