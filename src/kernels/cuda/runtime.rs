//! What the GPU backend needs from a device: memory, copies, kernel launches by name with
//! one parameter struct, and cuBLAS-style GEMMs. Two implementations: the CUDA driver
//! (`driver.rs`, `cuda` feature) and the emulator (`emu.rs`, `gpu-emu` feature), which runs
//! the same kernel sources on the CPU so the whole GPU path is tested without a GPU.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kernels::Dt;

/// A cuBLAS `gemmEx` call, in cuBLAS's column-major terms:
/// `C (m × n) = alpha · op(A) · op(B) + beta · C`, with `op(A)` m × k, `op(B)` k × n,
/// leading dimensions in elements. A and B have type `ab`, C type `c`; the products
/// accumulate in f32 (TF32 tensor cores allowed when `ab` is f32 and `tf32`).
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub a: u64,
    pub lda: usize,
    pub b: u64,
    pub ldb: usize,
    pub beta: f32,
    pub c: u64,
    pub ldc: usize,
    pub ab: Dt,
    pub c_dt: Dt,
    pub tf32: bool,
}

/// A kernel launch: grid and block sizes, dynamic shared memory bytes.
#[derive(Debug, Clone, Copy)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub smem: u32,
}

impl Launch {
    /// `blocks` blocks of `threads` threads along x.
    pub fn linear(blocks: u32, threads: u32) -> Self {
        Self {
            grid: [blocks.max(1), 1, 1],
            block: [threads, 1, 1],
            smem: 0,
        }
    }
}

/// A point in a device's queue of work (see [`Runtime::mark`]).
pub enum Mark {
    /// The host clock, for runtimes that finish each call before returning (the emulator).
    Host(std::time::Instant),
    /// A device event recorded in the queue (the CUDA driver's `CUevent`, as an integer).
    Device(u64),
}

/// A device the GPU backend computes on.
pub trait Runtime: Send + Sync {
    /// "cuda:0 (NVIDIA H100 80GB HBM3, sm_90)", "emu".
    fn describe(&self) -> String;
    /// (major, minor) compute capability.
    fn capability(&self) -> (u32, u32);
    fn alloc(&self, bytes: usize) -> Result<u64>;
    /// # Safety
    /// `ptr` must come from [`Runtime::alloc`] of this runtime and not be used afterwards.
    unsafe fn free(&self, ptr: u64);
    fn upload(&self, dst: u64, src: &[u8]) -> Result<()>;
    /// Copies device memory to the host, after all queued work (a synchronisation).
    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()>;
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;
    fn memset_zero(&self, dst: u64, bytes: usize) -> Result<()>;
    /// Launches kernel `name` with its parameter struct's bytes.
    fn launch(&self, name: &str, cfg: Launch, params: &[u8]) -> Result<()>;
    fn gemm(&self, g: &Gemm) -> Result<()>;
    /// Waits for all queued work.
    fn sync(&self) -> Result<()>;
    /// (free, total) device memory in bytes.
    fn memory(&self) -> Result<(usize, usize)>;
    /// Records a mark after the work queued so far: the time between two marks is the
    /// device's time on the work queued between them (for the profiler, `profile.rs`). The
    /// default is the host clock, right for runtimes that finish each call before returning.
    fn mark(&self) -> Result<Mark> {
        Ok(Mark::Host(std::time::Instant::now()))
    }
    /// Seconds from mark `a` to mark `b`, both of this runtime; the work before `b` must be
    /// done ([`Runtime::sync`] first).
    fn elapsed(&self, a: &Mark, b: &Mark) -> Result<f64> {
        match (a, b) {
            (Mark::Host(a), Mark::Host(b)) => Ok(b.saturating_duration_since(*a).as_secs_f64()),
            _ => Err(Error::Compute(
                "internal: device marks on a host-clock runtime".into(),
            )),
        }
    }
    /// Gives back a mark's resources (a device event) once it has been read.
    fn release(&self, _m: Mark) {}
}

/// Device memory owned by a [`crate::kernels::Buf`]: freed when dropped.
pub struct DevMem {
    pub(crate) ptr: u64,
    pub(crate) rt: Arc<dyn Runtime>,
}

impl DevMem {
    pub fn alloc(rt: &Arc<dyn Runtime>, bytes: usize) -> Result<Self> {
        // A zero-byte buffer still gets a distinct, valid pointer.
        let ptr = rt.alloc(bytes.max(16))?;
        Ok(Self {
            ptr,
            rt: Arc::clone(rt),
        })
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        // SAFETY: allocated by this runtime in `alloc`, freed once here.
        unsafe { self.rt.free(self.ptr) }
    }
}

/// The typed error for a device that ran out of memory.
pub fn out_of_memory(bytes: usize, free: Option<usize>) -> Error {
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    Error::OutOfMemory(format!(
        "out of GPU memory allocating {:.2} GiB{}; lower per_device_train_batch_size or max_seq_length, or set gradient_checkpointing=true",
        gib(bytes),
        free.map_or(String::new(), |f| format!(" ({:.2} GiB free)", gib(f)))
    ))
}
