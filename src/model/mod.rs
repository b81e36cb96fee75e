//! The model: Phi-3 configuration and weights, ops with explicit backward, LoRA, and
//! PEFT / Hugging Face export.

pub mod config;
pub mod export;
pub mod layer;
pub mod lora;
pub mod phi3;
pub mod random;
pub mod weights;

pub use config::Phi3Config;
pub use lora::{LoraConfig, TARGETS};
pub use phi3::{Batch, Phi3};

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kernels::{cpu::Cpu, Backend};

/// The precision names `finetune` accepts (the Azure ML pipeline's "32"/"16" and more).
pub const PRECISIONS: &[&str] = &["auto", "32", "16", "bf16", "fp16"];

/// Checks a precision name.
pub fn check_precision(precision: &str) -> Result<()> {
    if PRECISIONS.contains(&precision) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "precision must be one of {}, got {precision:?}",
            PRECISIONS.join(", ")
        )))
    }
}

/// The compute backend for `device` ("cpu", "cuda", "cuda:N", or "auto": the first GPU when
/// this build has CUDA support and a usable GPU, else the CPU) at `precision`:
/// - on the CPU everything is float32 (CPUs have no fast 16-bit GEMM);
/// - on a GPU "auto" and "16" mean bfloat16 where the GPU has it (compute capability 8.0+:
///   A100, H100, ...) and float16 with dynamic loss scaling on older ones (V100, T4);
///   "bf16" and "fp16" ask for one of them; "32" keeps float32 activations and weights
///   with TF32 tensor-core GEMMs (slower, twice the memory).
pub fn backend(device: &str, precision: &str) -> Result<Arc<dyn Backend>> {
    check_precision(precision)?;
    match device {
        "cpu" => Ok(Arc::new(Cpu)),
        // The GPU backend on the emulated GPU (test builds with the `gpu-emu` feature):
        // "emu" behaves like an sm_80 GPU (bf16), "emu-sm70" like a V100 (fp16).
        #[cfg(feature = "gpu-emu")]
        "emu" | "emu-sm70" => {
            use crate::kernels::cuda::{activation_type, emu::Emu, Gpu};
            let cc = if device == "emu" { (8, 0) } else { (7, 0) };
            let act = activation_type(cc, precision, device)?;
            Ok(Arc::new(Gpu::new(
                Arc::new(Emu::new(cc)),
                act,
                device.to_string(),
            )))
        }
        "auto" => {
            Ok(crate::kernels::cuda::open_if_available(0, precision)?
                .unwrap_or_else(|| Arc::new(Cpu)))
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s.strip_prefix("cuda:").map_or(Ok(0), |o| {
                o.parse::<usize>().map_err(|_| {
                    Error::InvalidArgument(format!("bad device '{s}'; use cuda or cuda:N"))
                })
            })?;
            crate::kernels::cuda::open(ordinal, precision)
        }
        other => Err(Error::InvalidArgument(format!(
            "unknown device '{other}'; use 'auto', 'cpu' or 'cuda'"
        ))),
    }
}
