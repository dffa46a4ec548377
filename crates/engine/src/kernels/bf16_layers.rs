//! Convolution and linear layers of the CPU bf16 mode: bf16 weights, f32 activations and
//! outputs, f32 accumulation (see [`super::bf16`]). The weights live here, packed once at load,
//! instead of in candle tensors — half the memory of f32.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};

use super::contiguous_f32;

/// `x · Wᵀ + b` over the last axis of x.
#[derive(Debug)]
pub struct LinearBf16Op {
    #[cfg(target_arch = "x86_64")]
    weight: super::bf16::Panels,
    bias: Option<Vec<f32>>,
    out_dim: usize,
    in_dim: usize,
}

impl LinearBf16Op {
    /// `weight_bits`: the (out_dim × in_dim) weight as bf16 bits, row-major; in_dim even.
    pub fn new(weight_bits: &[u16], bias: Option<Vec<f32>>, out_dim: usize, in_dim: usize) -> Self {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = weight_bits;
        Self {
            #[cfg(target_arch = "x86_64")]
            weight: super::bf16::Panels::from_bf16_rows(weight_bits, out_dim, in_dim),
            bias,
            out_dim,
            in_dim,
        }
    }
}

impl CustomOp1 for LinearBf16Op {
    fn name(&self) -> &'static str {
        "easel-linear-bf16"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(storage, layout, self.name())?;
        let mut dims = layout.shape().dims().to_vec();
        if dims.last() != Some(&self.in_dim) {
            candle_core::bail!("easel-linear-bf16: input {dims:?}, expected last axis {}", self.in_dim);
        }
        let rows = xs.len() / self.in_dim;
        let mut out = match &self.bias {
            Some(bias) => bias.repeat(rows),
            None => vec![0f32; rows * self.out_dim],
        };
        #[cfg(target_arch = "x86_64")]
        {
            let mut pairs = Vec::new();
            super::bf16::pairs_from_f32(xs, rows, self.in_dim, self.in_dim, &mut pairs);
            // SAFETY: bf16 layers are only built when `bf16::supported()`; `out` is rows × out_dim.
            unsafe {
                super::bf16::gemm(rows, &pairs, self.in_dim / 2, &self.weight, out.as_mut_ptr(), self.out_dim, true)
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        candle_core::bail!("easel-linear-bf16 needs an x86-64 CPU with AVX-512-BF16");
        if let Some(last) = dims.last_mut() {
            *last = self.out_dim;
        }
        #[allow(unreachable_code)]
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// A 2-D convolution (NCHW) with bf16 weights.
#[derive(Debug)]
pub struct Conv2dBf16Op {
    /// The weight as bf16 pairs along (c_in·kh·kw), one row per output channel.
    weight: Vec<u32>,
    bias: Vec<f32>,
    c_out: usize,
    c_in: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Conv2dBf16Op {
    /// `weight_bits`: (c_out, c_in, k, k) as bf16 bits; c_in·k·k must be even.
    pub fn new(
        weight_bits: &[u16],
        bias: Vec<f32>,
        c_out: usize,
        c_in: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Self {
        let weight = weight_bits.chunks_exact(2).map(|p| p[0] as u32 | ((p[1] as u32) << 16)).collect();
        Self { weight, bias, c_out, c_in, kernel, stride, padding }
    }
}

impl CustomOp1 for Conv2dBf16Op {
    fn name(&self) -> &'static str {
        "easel-conv2d-bf16"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let (batch, c_in, h, w) = layout.shape().dims4()?;
        let k = self.kernel;
        if c_in != self.c_in || h + 2 * self.padding < k || w + 2 * self.padding < k {
            candle_core::bail!(
                "easel-conv2d-bf16: input {:?} for a {}→{} {k}×{k} conv",
                layout.shape(),
                self.c_in,
                self.c_out
            );
        }
        let geometry = super::conv2d::Geometry::new(batch, c_in, h, w, self.c_out, k, self.stride, self.padding);
        let out = if geometry.winograd(super::conv2d::WINOGRAD_MIN_PIXELS_BF16) {
            // Winograd's GEMMs run on the bf16 kernel too (odd channel counts: f32, the bf16
            // weights widened exactly inside its weight transform).
            let filters = super::winograd::Filters::Bf16Pairs(&self.weight);
            super::conv2d::conv2d_winograd(x, filters, &self.bias, &geometry)
        } else {
            #[cfg(target_arch = "x86_64")]
            {
                super::conv2d::conv2d_bf16(x, &self.weight, &self.bias, &geometry)
            }
            #[cfg(not(target_arch = "x86_64"))]
            candle_core::bail!("easel-conv2d-bf16 needs an x86-64 CPU with AVX-512-BF16")
        };
        #[allow(unreachable_code)]
        Ok((CpuStorage::F32(out), Shape::from((batch, self.c_out, geometry.h_out, geometry.w_out))))
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn round(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| f32::from_bits(crate::kernels::bf16::bf16_bits(x) << 16)).collect()
    }

    fn bits(v: &[f32]) -> Vec<u16> {
        v.iter().map(|&x| crate::kernels::bf16::bf16_bits(x) as u16).collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Both layers equal the f32 computation on bf16-rounded weights and inputs (what the
    /// kernel multiplies), up to f32 summation order.
    #[test]
    fn layers_match_f32_math_on_bf16_rounded_values() {
        if !crate::kernels::bf16::supported() {
            eprintln!("skipped: this CPU has no AVX-512-BF16");
            return;
        }
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 37, 96), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.1, (70, 96), &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bias: Vec<f32> = (0..70).map(|i| i as f32 * 0.01).collect();
        let op = LinearBf16Op::new(&bits(&w), Some(bias.clone()), 70, 96);
        let got = x.apply_op1_no_bwd(&op).unwrap();
        let xr = Tensor::from_vec(round(&x.flatten_all().unwrap().to_vec1().unwrap()), (2, 37, 96), &dev).unwrap();
        let wr = Tensor::from_vec(round(&w), (70, 96), &dev).unwrap();
        let want =
            xr.broadcast_matmul(&wr.t().unwrap()).unwrap().broadcast_add(&Tensor::new(bias, &dev).unwrap()).unwrap();
        assert!(max_diff(&got, &want) < 1e-4, "linear: {}", max_diff(&got, &want));

        // 3×3 (im2col path: below the Winograd size), stride-2 and 1×1 convolutions.
        for (k, stride, padding, h) in [(3, 1, 1, 9), (3, 2, 1, 10), (1, 1, 0, 7), (3, 1, 1, 40)] {
            let x = Tensor::randn(0f32, 1.0, (2, 8, h, h), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.1, (6, 8, k, k), &dev).unwrap();
            let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bias: Vec<f32> = (0..6).map(|i| i as f32 * 0.1).collect();
            let op = Conv2dBf16Op::new(&bits(&wv), bias.clone(), 6, 8, k, stride, padding);
            let got = x.apply_op1_no_bwd(&op).unwrap();
            let xr = Tensor::from_vec(round(&x.flatten_all().unwrap().to_vec1().unwrap()), x.shape(), &dev).unwrap();
            let wr = Tensor::from_vec(round(&wv), w.shape(), &dev).unwrap();
            let cfg = candle_nn::Conv2dConfig { padding, stride, ..Default::default() };
            let reference = candle_nn::Conv2d::new(wr, Some(Tensor::new(bias.clone(), &dev).unwrap()), cfg);
            let want = candle_core::Module::forward(&reference, &xr).unwrap();
            assert_eq!(got.dims(), want.dims());
            if h < 32 {
                assert!(max_diff(&got, &want) < 1e-4, "conv k{k} s{stride} {h}×{h}: {}", max_diff(&got, &want));
            } else {
                // The Winograd size rounds the transformed inputs (not x itself) to bf16: as
                // close to the exact f32 convolution as rounding x is, in relative RMS terms.
                let exact = candle_core::Module::forward(
                    &candle_nn::Conv2d::new(w.clone(), Some(Tensor::new(bias, &dev).unwrap()), cfg),
                    &x,
                )
                .unwrap();
                let rms = |t: &Tensor| t.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
                let winograd_error = rms(&(&got - &exact).unwrap()) / rms(&exact);
                let rounding_error = rms(&(&want - &exact).unwrap()) / rms(&exact);
                eprintln!("Winograd bf16 relative RMS error {winograd_error}, rounding x and w: {rounding_error}");
                assert!(
                    winograd_error > 0.0 && winograd_error < 3.0 * rounding_error,
                    "Winograd bf16 relative RMS error {winograd_error}, rounding x and w: {rounding_error}"
                );
            }
        }
    }
}
