//! Easel's GPU path for what candle does slowly on CUDA (measured with Nsight Compute on an H100,
//! SD 1.5 at 512×512: in a U-Net step, softmax and scaling of materialised attention scores,
//! im2col buffers and group norms built from a dozen generic kernels took more time than every
//! matrix product together; in the f32 VAE, im2col and a non-tensor-core GEMM took 70%).
//!
//! - fused kernels (`easel.cu`, compiled to PTX by build.rs): flash attention in f16 on the
//!   tensor cores, group norm (+ SiLU) in two passes, GEGLU in one;
//! - cuDNN convolutions with descriptors, algorithm and workspace cached per shape
//!   (`cudnn` feature; candle's own cuDNN path re-plans on every call).
//!
//! Each entry point returns `None` when it does not apply (other devices, dtypes or shapes, or
//! not switched on), and the caller takes candle's path.
//!
//! **Opt-in until measured on a GPU**: they were written in a session whose GPU lease ended after
//! the profiling run, so they have been compiled (nvcc, sm_90) and the flash-attention kernel's
//! fragment arithmetic emulated on the CPU (`scripts/cuda/emulate_flash_attention.py`), but
//! never run. `EASEL_CUDA_KERNELS` (a comma list of `attention`, `norm`, `geglu`, `conv`, or
//! `all`) switches them on; `tests.rs` checks each against candle on a GPU.

use candle_core::{Result, Tensor};

#[cfg(feature = "cuda")]
mod ops;

#[cfg(all(feature = "cuda", feature = "cudnn"))]
mod cudnn_conv;

#[cfg(test)]
#[cfg(feature = "cuda")]
mod tests;

/// Which of the GPU kernels a call site asks for (see `EASEL_CUDA_KERNELS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Attention,
    Norm,
    Geglu,
    Conv,
}

#[cfg(feature = "cuda")]
fn switched_on(kernel: Kernel) -> bool {
    static SWITCHED_ON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let on = SWITCHED_ON.get_or_init(|| std::env::var("EASEL_CUDA_KERNELS").unwrap_or_default());
    let name = match kernel {
        Kernel::Attention => "attention",
        Kernel::Norm => "norm",
        Kernel::Geglu => "geglu",
        Kernel::Conv => "conv",
    };
    on.split(',').map(str::trim).any(|f| f == name || f == "all")
}

/// `softmax(q·kᵀ·scale)·v` for f16 q: (B, Nq, d), k, v: (B, Nk, d) on a CUDA device, d even
/// and at most 160, without materialising the scores.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Option<Result<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        if !switched_on(Kernel::Attention) {
            return None;
        }
        ops::attention(q, k, v, scale)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v, scale);
        None
    }
}

/// Group norm of a (B, C, H, W) f16 or f32 CUDA tensor, optionally followed by SiLU.
pub fn group_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Option<Result<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        if !switched_on(Kernel::Norm) {
            return None;
        }
        ops::group_norm(xs, weight, bias, groups, eps, silu)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (xs, weight, bias, groups, eps, silu);
        None
    }
}

/// `a · gelu_erf(g)` for the two halves of the last dimension of a CUDA tensor.
pub fn geglu(projected: &Tensor) -> Option<Result<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        if !switched_on(Kernel::Geglu) {
            return None;
        }
        ops::geglu(projected)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = projected;
        None
    }
}

/// A 2-D convolution (with bias) through cuDNN, for f16 or f32 CUDA tensors.
pub fn conv2d(xs: &Tensor, weight: &Tensor, bias: &Tensor, stride: usize, padding: usize) -> Option<Result<Tensor>> {
    #[cfg(all(feature = "cuda", feature = "cudnn"))]
    {
        if !switched_on(Kernel::Conv) {
            return None;
        }
        cudnn_conv::conv2d(xs, weight, bias, stride, padding)
    }
    #[cfg(not(all(feature = "cuda", feature = "cudnn")))]
    {
        let _ = (xs, weight, bias, stride, padding);
        None
    }
}
