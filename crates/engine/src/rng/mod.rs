//! Noise generators that reproduce torch's, so a seed means the same picture as in other apps.
//!
//! - [`RngKind::Cpu`]: torch's CPU generator (MT19937 + torch's randn) — diffusers with
//!   `torch.Generator("cpu")`, ComfyUI, InvokeAI, A1111 with RNG=CPU.
//! - [`RngKind::Nv`]: torch's CUDA generator (Philox4x32-10 + curand's normal), computed on the
//!   CPU — A1111's default on NVIDIA GPUs and its RNG=NV setting.

/// A stream of standard-normal f32 values. Each call is one `torch.randn(shape)` call with
/// `n = shape.numel()`, so the stream advances exactly as torch's generator does.
pub trait NoiseGenerator: Send {
    fn randn(&mut self, n: usize) -> Vec<f32>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RngKind {
    #[default]
    Cpu,
    Nv,
}
