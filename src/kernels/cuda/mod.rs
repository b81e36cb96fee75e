//! The GPU backend: our CUDA kernels (`*.cu`, contract in `params.cuh`) and cuBLAS GEMMs,
//! on a [`Runtime`] (the CUDA driver, or the CPU emulator in tests).

mod gpu;
pub mod params;
pub mod profile;
mod runtime;
pub mod selfcheck;

pub use gpu::Gpu;
pub use runtime::{out_of_memory, DevMem, Gemm, Launch, Mark, Runtime};

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kernels::{Backend, Dt};

#[cfg(feature = "cuda")]
mod driver;
#[cfg(feature = "gpu-emu")]
pub mod emu;
#[cfg(feature = "cuda")]
mod libs;
#[cfg(all(test, feature = "gpu-emu"))]
mod tests;

/// The activation type for a GPU of compute capability `cc` at `precision` (see
/// `model::backend`): bf16 where the GPU has it, fp16 (with loss scaling) before sm_80.
pub fn activation_type((major, minor): (u32, u32), precision: &str, gpu: &str) -> Result<Dt> {
    let bf16 = major >= 8;
    match precision {
        "auto" | "16" => Ok(if bf16 { Dt::BF16 } else { Dt::F16 }),
        "bf16" if bf16 => Ok(Dt::BF16),
        "bf16" => Err(Error::InvalidArgument(format!(
            "precision='bf16' needs a GPU of compute capability 8.0 or newer; {gpu} is {major}.{minor}: use precision='16' (float16 with loss scaling there)"
        ))),
        "fp16" => Ok(Dt::F16),
        "32" => Ok(Dt::F32),
        other => crate::model::check_precision(other).map(|_| Dt::F32),
    }
}

/// The GPU `ordinal` as a backend at `precision` (see `model::backend`).
#[cfg(feature = "cuda")]
pub fn open(ordinal: usize, precision: &str) -> Result<Arc<dyn Backend>> {
    driver::open(ordinal, precision)
}

/// The first GPU when this build can use one and the machine has one.
#[cfg(feature = "cuda")]
pub fn open_if_available(ordinal: usize, precision: &str) -> Result<Option<Arc<dyn Backend>>> {
    driver::open_if_available(ordinal, precision)
}

/// The GPU `ordinal` as a backend at `precision` (see `model::backend`).
#[cfg(not(feature = "cuda"))]
pub fn open(ordinal: usize, _precision: &str) -> Result<Arc<dyn Backend>> {
    Err(Error::GpuUnavailable(format!(
        "device 'cuda:{ordinal}' asked for, but this ferrotune build has no CUDA support; install the CUDA wheel (ferrotune-<version>+cu12, built by scripts/build_cuda.sh; see the README) or use device='cpu'"
    )))
}

/// The first GPU when this build can use one and the machine has one.
#[cfg(not(feature = "cuda"))]
pub fn open_if_available(_ordinal: usize, _precision: &str) -> Result<Option<Arc<dyn Backend>>> {
    Ok(None)
}
