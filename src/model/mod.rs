//! The model: Phi-3 configuration and weights, ops with explicit backward, LoRA, and
//! PEFT / Hugging Face export.

pub mod attention;
mod attention_cpu;
pub mod config;
pub mod export;
mod layer_cpu;
pub mod lora;
pub mod ops;
pub mod phi3;
pub mod random;
pub mod skinny;
mod vexp;
pub mod weights;

pub use config::Phi3Config;
pub use lora::{LoraConfig, TARGETS};
pub use phi3::{Batch, Phi3};

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// Picks the device: "cpu", "cuda" / "cuda:N", or "auto" (CUDA when available).
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        // A CUDA build reports CUDA as available even on a machine without a GPU: fall
        // back to the CPU when the device cannot be opened.
        "auto" => Ok(candle_core::utils::cuda_is_available()
            .then(|| Device::new_cuda(0).ok())
            .flatten()
            .unwrap_or(Device::Cpu)),
        s if s == "cuda" || s.starts_with("cuda:") => {
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::InvalidArgument(format!(
                    "device '{s}' asked for, but this ferrotune build has no CUDA support; install the CUDA build (see README) or use device='cpu'"
                )));
            }
            let ordinal = s.strip_prefix("cuda:").map_or(Ok(0), |o| {
                o.parse::<usize>()
                    .map_err(|_| Error::InvalidArgument(format!("bad device '{s}'")))
            })?;
            Device::new_cuda(ordinal).map_err(|e| {
                Error::InvalidArgument(format!("device '{s}': no usable CUDA GPU ({e})"))
            })
        }
        other => Err(Error::InvalidArgument(format!(
            "unknown device '{other}'; use 'auto', 'cpu' or 'cuda'"
        ))),
    }
}

/// The device's name as users write it: "cpu", "cuda:0", "metal:0".
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Base-weight dtype for a precision setting: bf16 on CUDA when asked ("16"/"bf16", or
/// "auto"), f32 otherwise (CPUs have no fast bf16 GEMM).
pub fn base_dtype(device: &Device, precision: &str) -> Result<DType> {
    match precision {
        "32" | "fp32" | "f32" => Ok(DType::F32),
        "16" | "bf16" | "bfloat16" | "auto" => Ok(if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        }),
        other => Err(Error::InvalidArgument(format!(
            "precision must be \"32\", \"16\"/\"bf16\" or \"auto\", got {other:?}"
        ))),
    }
}
