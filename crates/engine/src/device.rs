//! Choosing where the model runs and in which precision.

use candle_core::{DType, Device};

use crate::models::LoadOptions;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DevicePreference {
    /// The best device this build supports: CUDA, then Metal, then the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
    Metal,
}

impl std::str::FromStr for DevicePreference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            "metal" => Ok(Self::Metal),
            other => {
                Err(Error::InvalidSetting(format!("unknown device \"{other}\" (expected auto, cpu, cuda or metal)")))
            }
        }
    }
}

/// GPUs run the U-Net and text encoders in f16 (the VAE stays f32: SDXL's overflows in f16);
/// the CPU runs everything in f32, which is both exact and, on CPUs, no slower.
pub fn load_options(preference: DevicePreference) -> Result<LoadOptions> {
    let gpu =
        |device: Device| LoadOptions { device, dtype: DType::F16, vae_dtype: DType::F32, ..LoadOptions::default() };
    match preference {
        DevicePreference::Cpu => Ok(LoadOptions::default()),
        DevicePreference::Cuda => Device::new_cuda(0)
            .map(gpu)
            .map_err(|e| Error::InvalidSetting(format!("CUDA is not available: {e} (build with `--features cuda`)"))),
        DevicePreference::Metal => Device::new_metal(0)
            .map(gpu)
            .map_err(|e| Error::InvalidSetting(format!("Metal is not available: {e} (build with `--features metal`)"))),
        DevicePreference::Auto => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(device) = Device::new_cuda(0) {
                    return Ok(gpu(device));
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(device) = Device::new_metal(0) {
                    return Ok(gpu(device));
                }
            }
            Ok(LoadOptions::default())
        }
    }
}
