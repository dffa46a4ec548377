//! Noise generators that reproduce torch's, so a seed means the same picture as in other apps.
//!
//! - [`RngKind::Cpu`]: torch's CPU generator (MT19937 + torch's randn) — diffusers with
//!   `torch.Generator("cpu")`, ComfyUI, InvokeAI, A1111 with RNG=CPU. Bit-exact
//!   ([`TorchCpuGenerator`]).
//! - [`RngKind::Nv`]: torch's CUDA generator (Philox4x32-10 + curand's normal), computed on the
//!   CPU — A1111's default on NVIDIA GPUs and its RNG=NV setting ([`PhiloxGenerator`]; within
//!   ~1e-6 of a real GPU, whose sin/cos hardware no CPU reproduces bit for bit, and bit-exact
//!   with A1111's numpy port through [`PhiloxGenerator::a1111`]).
//!
//! Seeds are `u64`. torch's CPU generator uses only the low 32 bits (seed 2^32 gives seed 0's
//! noise); the CUDA one uses all 64.

mod philox;
mod torch_cpu;

use std::fmt;

pub use philox::{PhiloxArithmetic, PhiloxGenerator, TORCH_BLOCK_SIZE};
pub use torch_cpu::TorchCpuGenerator;

use crate::{Error, Result};

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

impl RngKind {
    /// Accepts Easel's names ("cpu", "nv") and A1111's `RNG:` values ("CPU", "NV", "GPU"),
    /// ignoring case and surrounding spaces. A1111's "GPU" means torch on whatever GPU made the
    /// image; it maps to [`RngKind::Nv`], which is right for NVIDIA GPUs (most such images).
    pub fn parse(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "nv" | "gpu" | "cuda" => Ok(Self::Nv),
            _ => Err(Error::InvalidSetting(format!("unknown RNG {text:?} (expected \"cpu\" or \"nv\")"))),
        }
    }

    /// The value A1111 writes after `RNG:` in its infotext.
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Cpu => "CPU",
            Self::Nv => "NV",
        }
    }
}

impl std::str::FromStr for RngKind {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        Self::parse(text)
    }
}

/// Easel's lower-case names: "cpu", "nv" (what [`RngKind::parse`] reads back).
impl fmt::Display for RngKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Nv => "nv",
        })
    }
}

/// A fresh generator of this kind, as torch's right after `manual_seed(seed)`.
pub fn make_generator(kind: RngKind, seed: u64) -> Box<dyn NoiseGenerator> {
    match kind {
        RngKind::Cpu => Box::new(TorchCpuGenerator::new(seed)),
        RngKind::Nv => Box::new(PhiloxGenerator::new(seed)),
    }
}

#[cfg(test)]
mod tests;

/// A fresh seed in torch's effective range (its CPU generator keeps only 32 bits), from the
/// OS-seeded hasher and the clock: no extra dependency for a number that only needs to vary.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    hasher.write_u128(nanos);
    hasher.finish() & 0xFFFF_FFFF
}
