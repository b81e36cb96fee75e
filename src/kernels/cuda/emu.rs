//! The emulated GPU (`gpu-emu` feature): "device" memory is host memory, kernels are the
//! CUDA sources compiled for the host with `emu/cuda_emu.h` (every block's threads run as
//! fibers), and GEMMs follow cuBLAS's column-major `gemmEx` contract in plain loops (inputs
//! read in their type, f32 accumulation, the result rounded to its type).
//!
//! Why: no GPU is at hand where ferrotune is developed and tested. With this runtime the
//! whole GPU backend — launch parameters, layouts, offsets, the cuBLAS argument mapping,
//! bf16/fp16 roundings — runs in CI against the CPU backend; only the real driver, real
//! concurrency and speed are left for the GPU machine (`scripts/gpu_check.sh`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use half::{bf16, f16};
use rayon::prelude::*;

use super::runtime::{Gemm, Launch, Runtime};
use crate::error::{Error, Result};
use crate::kernels::Dt;

include!(concat!(env!("OUT_DIR"), "/emu_kernels.rs"));

const ALIGN: usize = 256;

/// Allocations made by every emulated GPU of the process (tests count a step's).
static ALLOCATIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Allocations made so far by the emulated GPUs of this process.
pub fn allocations() -> usize {
    ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The emulated device.
pub struct Emu {
    /// Live allocations: start → bytes.
    allocs: Mutex<BTreeMap<u64, usize>>,
    capability: (u32, u32),
    /// Its memory: `FERROTUNE_EMU_MEMORY` bytes (default 64 GiB), so tests can run out of it.
    total: std::sync::atomic::AtomicUsize,
    /// `FERROTUNE_EMU_FAIL_ALLOC=N`: the N-th allocation of this device fails as out of
    /// memory (an out-of-memory in the middle of a run, for tests).
    fail_at: Option<usize>,
    count: std::sync::atomic::AtomicUsize,
}

impl Emu {
    /// An emulated GPU reporting compute capability `capability` (which only picks the
    /// precision: (7, 0) behaves like a V100, fp16 by default).
    pub fn new(capability: (u32, u32)) -> Self {
        let total = std::env::var("FERROTUNE_EMU_MEMORY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64usize << 30);
        Self::with_memory(capability, total)
    }

    /// An emulated GPU with `total` bytes of memory.
    pub fn with_memory(capability: (u32, u32), total: usize) -> Self {
        Self {
            allocs: Mutex::new(BTreeMap::new()),
            capability,
            total: total.into(),
            fail_at: std::env::var("FERROTUNE_EMU_FAIL_ALLOC")
                .ok()
                .and_then(|v| v.parse().ok()),
            count: 0.into(),
        }
    }

    /// Bytes allocated now.
    pub fn used(&self) -> usize {
        self.allocs.lock().expect("emu allocations").values().sum()
    }

    /// Changes the device's memory size (tests of memory plans).
    pub fn set_memory(&self, total: usize) {
        self.total
            .store(total, std::sync::atomic::Ordering::Relaxed);
    }

    /// The size of kernel `name`'s parameter struct as the C++ compiler laid it out.
    pub fn params_size(name: &str) -> Option<u64> {
        KERNELS
            .iter()
            .find(|k| k.0 == name)
            // SAFETY: a generated function without arguments returning a constant.
            .map(|k| unsafe { (k.2)() })
    }

    /// Checks that `[ptr, ptr + bytes)` lies inside one live allocation.
    fn check(&self, ptr: u64, bytes: usize, what: &str) -> Result<()> {
        let allocs = self.allocs.lock().expect("emu allocations");
        match allocs.range(..=ptr).next_back() {
            Some((&start, &len)) if ptr + bytes as u64 <= start + len.max(1) as u64 => Ok(()),
            _ => Err(Error::Compute(format!(
                "emulated GPU: {what} of {bytes} bytes at {ptr:#x} outside any allocation"
            ))),
        }
    }
}

fn layout(bytes: usize) -> std::alloc::Layout {
    std::alloc::Layout::from_size_align(bytes.max(1), ALIGN).expect("layout")
}

/// Element `i` of a `dt` array at `ptr`, as f32.
///
/// # Safety
/// `ptr` must point at an array of at least `i + 1` elements of `dt`.
unsafe fn read(ptr: u64, i: usize, dt: Dt) -> f32 {
    match dt {
        Dt::F32 => *(ptr as *const f32).add(i),
        Dt::BF16 => bf16::from_bits(*(ptr as *const u16).add(i)).to_f32(),
        Dt::F16 => f16::from_bits(*(ptr as *const u16).add(i)).to_f32(),
        Dt::I32 => *(ptr as *const i32).add(i) as f32,
        Dt::F64 => *(ptr as *const f64).add(i) as f32,
    }
}

/// # Safety
/// As [`read`].
unsafe fn write(ptr: u64, i: usize, dt: Dt, v: f32) {
    match dt {
        Dt::F32 => *(ptr as *mut f32).add(i) = v,
        Dt::BF16 => *(ptr as *mut u16).add(i) = bf16::from_f32(v).to_bits(),
        Dt::F16 => *(ptr as *mut u16).add(i) = f16::from_f32(v).to_bits(),
        Dt::I32 => *(ptr as *mut i32).add(i) = v as i32,
        Dt::F64 => *(ptr as *mut f64).add(i) = v as f64,
    }
}

impl Runtime for Emu {
    fn describe(&self) -> String {
        format!(
            "emulated GPU (sm_{}{})",
            self.capability.0, self.capability.1
        )
    }

    fn capability(&self) -> (u32, u32) {
        self.capability
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        let (free, _) = self.memory()?;
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = self
            .count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if bytes > free || self.fail_at == Some(n) {
            return Err(super::out_of_memory(bytes, Some(free)));
        }
        // SAFETY: a non-zero size with a valid alignment.
        let p = unsafe { std::alloc::alloc(layout(bytes)) };
        if p.is_null() {
            return Err(super::out_of_memory(bytes, None));
        }
        // A GPU's fresh memory (cuMemAllocAsync, often a buffer just freed to the pool) holds
        // whatever was there: all-ones bytes here (NaN in f32, bf16 and f16; -1 in i32), so a
        // read before the first write shows up in every test instead of passing as zeros.
        // SAFETY: `bytes` bytes were just allocated at `p`.
        unsafe { std::ptr::write_bytes(p, 0xFF, bytes) };
        let ptr = p as u64;
        self.allocs
            .lock()
            .expect("emu allocations")
            .insert(ptr, bytes);
        Ok(ptr)
    }

    unsafe fn free(&self, ptr: u64) {
        let bytes = self
            .allocs
            .lock()
            .expect("emu allocations")
            .remove(&ptr)
            .expect("freeing an emulated allocation twice");
        std::alloc::dealloc(ptr as *mut u8, layout(bytes));
    }

    fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.check(dst, src.len(), "upload")?;
        // SAFETY: checked to lie inside a live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.check(src, dst.len(), "download")?;
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.check(dst, bytes, "copy destination")?;
        self.check(src, bytes, "copy source")?;
        // SAFETY: as above (device copies may overlap only if the caller is wrong; `copy`
        // handles that too).
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    fn memset_zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.check(dst, bytes, "memset")?;
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) };
        Ok(())
    }

    fn launch(&self, name: &str, cfg: Launch, params: &[u8]) -> Result<()> {
        let Some(&(_, entry, size)) = KERNELS.iter().find(|k| k.0 == name) else {
            return Err(Error::Compute(format!(
                "emulated GPU: no kernel named {name}"
            )));
        };
        // SAFETY: a generated function without arguments.
        let want = unsafe { size() } as usize;
        if want != params.len() {
            return Err(Error::Compute(format!(
                "emulated GPU: {name} takes {want} bytes of parameters, got {}",
                params.len()
            )));
        }
        let [gx, gy, gz] = cfg.grid;
        let [bx, by, bz] = cfg.block;
        // SAFETY: the parameter bytes have the struct's size; the kernel reads the memory
        // the parameters point at, which the backend allocated through this runtime.
        unsafe { entry(gx, gy, gz, bx, by, bz, cfg.smem, params.as_ptr()) };
        Ok(())
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        let (m, n, k) = (g.m, g.n, g.k);
        let a_cols = if g.trans_a { m } else { k };
        let b_cols = if g.trans_b { k } else { n };
        self.check(
            g.a,
            ((a_cols - 1) * g.lda + if g.trans_a { k } else { m }) * g.ab.size(),
            "gemm A",
        )?;
        self.check(
            g.b,
            ((b_cols - 1) * g.ldb + if g.trans_b { n } else { k }) * g.ab.size(),
            "gemm B",
        )?;
        self.check(g.c, ((n - 1) * g.ldc + m) * g.c_dt.size(), "gemm C")?;
        let (a, b, c) = (g.a, g.b, g.c);
        // Columns of C in parallel: each task writes its own column.
        (0..n).into_par_iter().for_each(|j| {
            for i in 0..m {
                let mut acc = 0f32;
                for l in 0..k {
                    // SAFETY: indices within the extents checked above.
                    let (x, y) = unsafe {
                        let x = if g.trans_a {
                            read(a, l + i * g.lda, g.ab)
                        } else {
                            read(a, i + l * g.lda, g.ab)
                        };
                        let y = if g.trans_b {
                            read(b, j + l * g.ldb, g.ab)
                        } else {
                            read(b, l + j * g.ldb, g.ab)
                        };
                        (x, y)
                    };
                    acc += x * y;
                }
                let at = i + j * g.ldc;
                // SAFETY: as above.
                unsafe {
                    let old = if g.beta == 0.0 {
                        0.0
                    } else {
                        read(c, at, g.c_dt)
                    };
                    write(c, at, g.c_dt, g.alpha * acc + g.beta * old);
                }
            }
        });
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn memory(&self) -> Result<(usize, usize)> {
        let total = self.total.load(std::sync::atomic::Ordering::Relaxed);
        Ok((total.saturating_sub(self.used()), total))
    }
}
