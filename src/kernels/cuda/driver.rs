//! The real GPU (`cuda` feature): the CUDA driver API, cuBLAS and NCCL through cudarc,
//! all loaded at run time (`dlopen`), so the same wheel imports on a machine without a GPU
//! and `device="cuda"` there fails with a typed error naming what is missing.
//!
//! Kernels come from `build.rs`: machine code for sm_70, 75, 80, 86, 89, 90 compiled by
//! NVRTC (CUDA 12), and PTX for newer GPUs, which the driver compiles on first use.
//! Minimum driver: 525 (CUDA 12.0).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use cudarc::driver::result as cu;
use cudarc::driver::sys as cu_sys;

use super::libs::{self, Blas, Nccl};
use super::runtime::{out_of_memory, Gemm, Launch, Mark, Runtime};
use crate::error::{Error, Result};
use crate::kernels::{Backend, Dt};

include!(concat!(env!("OUT_DIR"), "/cubins.rs"));

/// The oldest driver API this wheel's kernels and cuBLAS need (12.0 = R525).
const MIN_DRIVER: i32 = 12000;

fn unavailable(msg: String) -> Error {
    Error::GpuUnavailable(msg)
}

fn driver_err(what: &str, e: cu::DriverError) -> Error {
    let name = e
        .error_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{e:?}"));
    if name == "CUDA_ERROR_OUT_OF_MEMORY" {
        return out_of_memory(0, cu::mem_get_info().ok().map(|m| m.0));
    }
    Error::Compute(format!("{what}: {name}"))
}

/// The raw handles of one GPU (plain pointers: shared between threads under the rules of
/// the driver API, which is thread safe for one context and stream).
struct Handles {
    ctx: cu_sys::CUcontext,
    stream: cu_sys::CUstream,
    blas: libs::Handle,
    comm: Mutex<Option<(Nccl, libs::Comm)>>,
}

// SAFETY: CUDA driver, cuBLAS and NCCL handles may be used from any thread once the
// context is current there (`Cuda::bind` makes it so before every call); cuBLAS calls on
// one handle are serialised by the `blas_lock` below.
unsafe impl Send for Handles {}
unsafe impl Sync for Handles {}

/// One GPU.
pub struct Cuda {
    h: Handles,
    cublas: Blas,
    ordinal: usize,
    name: String,
    capability: (u32, u32),
    functions: HashMap<String, FnHandle>,
    blas_lock: Mutex<()>,
    /// Timing events of the profiler (`profile.rs`), reused: `CUevent`s as integers.
    events: Mutex<Vec<u64>>,
}

#[derive(Clone, Copy)]
struct FnHandle(cu_sys::CUfunction);
// SAFETY: a function handle is an immutable driver object.
unsafe impl Send for FnHandle {}
unsafe impl Sync for FnHandle {}

/// A parameter struct copied into 8-byte-aligned storage (what `cuLaunchKernel` points at).
#[repr(C, align(16))]
struct ParamBlock([u8; 512]);

impl Cuda {
    /// Opens GPU `ordinal`, checking the driver, the GPU and the libraries first.
    pub fn open(ordinal: usize) -> Result<Self> {
        // SAFETY: only probes whether the library can be loaded.
        if !unsafe { cu_sys::is_culib_present() } {
            return Err(unavailable(
                "no NVIDIA driver here (libcuda.so.1 cannot be loaded): device='cuda' needs an NVIDIA GPU with driver 525 or newer; use device='cpu' on this machine".into(),
            ));
        }
        cu::init().map_err(|e| {
            unavailable(format!(
                "the NVIDIA driver did not start ({}); check `nvidia-smi`, or use device='cpu'",
                e.error_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ))
        })?;
        let mut version = 0;
        // SAFETY: writes one int.
        unsafe { cu_sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(|e| driver_err("cuDriverGetVersion", e))?;
        if version < MIN_DRIVER {
            return Err(unavailable(format!(
                "the NVIDIA driver supports CUDA {}.{}; this ferrotune wheel needs CUDA 12 (driver 525 or newer): update the driver",
                version / 1000,
                version % 1000 / 10
            )));
        }
        let count = cu::device::get_count().map_err(|e| driver_err("cuDeviceGetCount", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(unavailable(format!(
                "no GPU cuda:{ordinal} here ({count} visible; CUDA_VISIBLE_DEVICES={})",
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
            )));
        }
        let dev = cu::device::get(ordinal as i32).map_err(|e| driver_err("cuDeviceGet", e))?;
        let attr = |a| {
            // SAFETY: a valid device and attribute.
            unsafe { cu::device::get_attribute(dev, a) }
                .map_err(|e| driver_err("cuDeviceGetAttribute", e))
        };
        let major = attr(cu_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(cu_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let gpu = cu::device::get_name(dev).unwrap_or_else(|_| "GPU".into());
        if major < 7 {
            return Err(unavailable(format!(
                "{gpu} (cuda:{ordinal}) has compute capability {major}.{minor}; ferrotune needs 7.0 or newer (V100, T4, A10, A100, L4, H100, ...)"
            )));
        }
        let cublas = Blas::load()?;
        // SAFETY: the device exists; the primary context lives as long as the process.
        let ctx = unsafe { cu::primary_ctx::retain(dev) }
            .map_err(|e| driver_err("cuDevicePrimaryCtxRetain", e))?;
        // SAFETY: a context just retained.
        unsafe { cu::ctx::set_current(ctx) }.map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(|e| driver_err("cuStreamCreate", e))?;
        let mut handle: libs::Handle = std::ptr::null_mut();
        // SAFETY: cuBLAS writes the handle; the context is current.
        let status = unsafe { (cublas.create)(&mut handle) };
        if status != 0 {
            return Err(unavailable(format!(
                "cuBLAS did not start (status {status})"
            )));
        }
        // SAFETY: a valid handle and stream.
        let status = unsafe { (cublas.set_stream)(handle, stream.cast()) };
        if status != 0 {
            return Err(Error::Compute(format!("cublasSetStream: status {status}")));
        }
        keep_pool_memory(dev);
        let mut functions = HashMap::new();
        for (stem, names, cubins, ptx) in MODULES {
            let image = pick_image(cubins, ptx, (major as u32, minor as u32));
            // SAFETY: a valid cubin or NUL-terminated PTX image built for this wheel.
            let module = unsafe { cu::module::load_data(image.as_ptr().cast()) }.map_err(|e| {
                driver_err(
                    &format!("loading the {stem} kernels for sm_{major}{minor}"),
                    e,
                )
            })?;
            for name in names.iter() {
                let c = CString::new(*name).expect("kernel name");
                // SAFETY: a module just loaded.
                let f = unsafe { cu::module::get_function(module, c) }
                    .map_err(|e| driver_err(&format!("kernel {name}"), e))?;
                functions.insert(name.to_string(), FnHandle(f));
            }
        }
        Ok(Self {
            h: Handles {
                ctx,
                stream,
                blas: handle,
                comm: Mutex::new(None),
            },
            cublas,
            ordinal,
            name: gpu,
            capability: (major as u32, minor as u32),
            functions,
            blas_lock: Mutex::new(()),
            events: Mutex::new(Vec::new()),
        })
    }

    /// Makes this GPU's context current on the calling thread (driver calls need it).
    fn bind(&self) -> Result<()> {
        thread_local!(static CURRENT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) });
        let key = self.h.ctx as usize;
        if CURRENT.with(|c| c.get()) != key {
            // SAFETY: the context was retained in `open` and is never released.
            unsafe { cu::ctx::set_current(self.h.ctx) }
                .map_err(|e| driver_err("cuCtxSetCurrent", e))?;
            CURRENT.with(|c| c.set(key));
        }
        Ok(())
    }
}

/// Freed memory stays in the stream-ordered pool (the default releases it at every
/// synchronisation, and a training step would allocate it again from the OS).
fn keep_pool_memory(dev: cu_sys::CUdevice) {
    // SAFETY: the default pool of a valid device; failure only costs speed.
    unsafe {
        if let Ok(pool) = cu::device::get_default_mem_pool(dev) {
            let mut threshold: u64 = u64::MAX;
            let _ = cu::mem_pool::set_attribute(
                pool,
                cu_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            );
        }
    }
}

/// The module image for compute capability `cc`: the exact machine code, else machine
/// code of the same major version and an older minor (binary compatible), else the PTX
/// (newer GPUs; NUL-terminated for the driver's JIT).
fn pick_image(cubins: &[(u32, &[u8])], ptx: &[u8], (major, minor): (u32, u32)) -> Vec<u8> {
    let want = major * 10 + minor;
    let best = cubins
        .iter()
        .filter(|(arch, _)| arch / 10 == major && *arch <= want)
        .max_by_key(|(arch, _)| *arch);
    match best {
        Some((_, bin)) => bin.to_vec(),
        None => {
            let mut v = ptx.to_vec();
            v.push(0);
            v
        }
    }
}

fn cuda_type(dt: Dt) -> Result<i32> {
    Ok(match dt {
        Dt::F32 => libs::R_32F,
        Dt::F16 => libs::R_16F,
        Dt::BF16 => libs::R_16BF,
        other => return Err(Error::Compute(format!("internal: no GEMM on {other:?}"))),
    })
}

impl Runtime for Cuda {
    fn describe(&self) -> String {
        format!(
            "cuda:{} ({}, sm_{}{})",
            self.ordinal, self.name, self.capability.0, self.capability.1
        )
    }

    fn capability(&self) -> (u32, u32) {
        self.capability
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.bind()?;
        // SAFETY: our stream; the memory is only used on it.
        match unsafe { cu::malloc_async(self.h.stream, bytes) } {
            Ok(p) => Ok(p),
            Err(_) => {
                // Let queued frees complete, then try once more before giving up.
                self.sync()?;
                // SAFETY: as above.
                unsafe { cu::malloc_async(self.h.stream, bytes) }
                    .map_err(|_| out_of_memory(bytes, self.memory().ok().map(|m| m.0)))
            }
        }
    }

    unsafe fn free(&self, ptr: u64) {
        if self.bind().is_ok() {
            let _ = cu::free_async(ptr, self.h.stream);
        }
    }

    fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: `dst` holds `src.len()` bytes (the backend checks its buffers); from
        // pageable memory the call returns once the bytes are staged.
        unsafe { cu::memcpy_htod_async(dst, src, self.h.stream) }
            .map_err(|e| driver_err("copy to the GPU", e))
    }

    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: as above; the stream is synchronised before the bytes are read.
        unsafe { cu::memcpy_dtoh_async(dst, src, self.h.stream) }
            .map_err(|e| driver_err("copy from the GPU", e))?;
        self.sync()
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: both ranges are inside live buffers.
        unsafe { cu::memcpy_dtod_async(dst, src, bytes, self.h.stream) }
            .map_err(|e| driver_err("copy on the GPU", e))
    }

    fn memset_zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: as above.
        unsafe { cu::memset_d8_async(dst, 0, bytes, self.h.stream) }
            .map_err(|e| driver_err("memset on the GPU", e))
    }

    fn launch(&self, name: &str, cfg: Launch, params: &[u8]) -> Result<()> {
        self.bind()?;
        let f = self
            .functions
            .get(name)
            .ok_or_else(|| Error::Compute(format!("internal: no kernel {name} in this wheel")))?;
        let mut block = ParamBlock([0; 512]);
        block.0[..params.len()].copy_from_slice(params);
        let mut args = [(&mut block as *mut ParamBlock).cast::<c_void>()];
        // SAFETY: the kernel takes one struct parameter of `params.len()` bytes, which
        // the driver copies from `block` before returning.
        unsafe {
            cu::launch_kernel(
                f.0,
                (cfg.grid[0], cfg.grid[1], cfg.grid[2]),
                (cfg.block[0], cfg.block[1], cfg.block[2]),
                cfg.smem,
                self.h.stream,
                &mut args,
            )
        }
        .map_err(|e| driver_err(&format!("launching {name}"), e))
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        self.bind()?;
        let _guard = self.blas_lock.lock().expect("cublas lock");
        let op = |t: bool| if t { libs::OP_T } else { libs::OP_N };
        let compute = if g.ab == Dt::F32 && g.tf32 {
            libs::COMPUTE_32F_FAST_TF32
        } else {
            libs::COMPUTE_32F
        };
        let (alpha, beta) = (g.alpha, g.beta);
        // SAFETY: device pointers of live buffers with the extents the backend checked;
        // alpha and beta are host f32 (the handle's default pointer mode).
        let status = unsafe {
            (self.cublas.gemm_ex)(
                self.h.blas,
                op(g.trans_a),
                op(g.trans_b),
                g.m as i32,
                g.n as i32,
                g.k as i32,
                (&alpha as *const f32).cast(),
                g.a as *const c_void,
                cuda_type(g.ab)?,
                g.lda as i32,
                g.b as *const c_void,
                cuda_type(g.ab)?,
                g.ldb as i32,
                (&beta as *const f32).cast(),
                g.c as *mut c_void,
                cuda_type(g.c_dt)?,
                g.ldc as i32,
                compute,
                libs::GEMM_DEFAULT,
            )
        };
        if status != 0 {
            return Err(Error::Compute(format!(
                "cuBLAS GEMM {}x{}x{} failed (status {status})",
                g.m, g.n, g.k
            )));
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: our stream.
        unsafe { cu::stream::synchronize(self.h.stream) }
            .map_err(|e| driver_err("a GPU kernel failed", e))
    }

    fn memory(&self) -> Result<(usize, usize)> {
        self.bind()?;
        cu::mem_get_info().map_err(|e| driver_err("cuMemGetInfo", e))
    }

    fn mark(&self) -> Result<Mark> {
        self.bind()?;
        let reused = self.events.lock().expect("events").pop();
        let event = match reused {
            Some(e) => e as cu_sys::CUevent,
            None => cu::event::create(cu_sys::CUevent_flags::CU_EVENT_DEFAULT)
                .map_err(|e| driver_err("cuEventCreate", e))?,
        };
        // SAFETY: an event of this context, recorded on our stream.
        if let Err(e) = unsafe { cu::event::record(event, self.h.stream) } {
            self.events.lock().expect("events").push(event as u64);
            return Err(driver_err("cuEventRecord", e));
        }
        Ok(Mark::Device(event as u64))
    }

    fn elapsed(&self, a: &Mark, b: &Mark) -> Result<f64> {
        let (Mark::Device(a), Mark::Device(b)) = (a, b) else {
            return Err(Error::Compute("internal: host marks on a GPU".into()));
        };
        self.bind()?;
        // SAFETY: events created and recorded by `mark` on our stream, not yet released.
        let ms = unsafe { cu::event::elapsed(*a as cu_sys::CUevent, *b as cu_sys::CUevent) }
            .map_err(|e| driver_err("cuEventElapsedTime", e))?;
        Ok(f64::from(ms) / 1e3)
    }

    fn release(&self, m: Mark) {
        if let Mark::Device(e) = m {
            self.events.lock().expect("events").push(e);
        }
    }
}

impl Cuda {
    /// A fresh NCCL unique id, or `None` when NCCL cannot be loaded (then data-parallel
    /// gradients go through the host).
    pub fn nccl_id(&self) -> Result<Option<Vec<u8>>> {
        let Ok(nccl) = Nccl::load() else {
            return Ok(None);
        };
        let mut id = libs::NcclId { internal: [0; 128] };
        // SAFETY: NCCL writes the 128-byte id.
        let status = unsafe { (nccl.get_id)(&mut id) };
        if status != 0 {
            return Err(Error::Compute(format!("ncclGetUniqueId: status {status}")));
        }
        Ok(Some(id.internal.iter().map(|&c| c as u8).collect()))
    }

    pub fn nccl_join(&self, id: &[u8], rank: usize, size: usize) -> Result<()> {
        self.bind()?;
        let nccl = Nccl::load()?;
        let mut raw = libs::NcclId { internal: [0; 128] };
        for (r, b) in raw.internal.iter_mut().zip(id) {
            *r = *b as _;
        }
        let mut comm: libs::Comm = std::ptr::null_mut();
        // SAFETY: NCCL writes the communicator; every rank calls this with the same id.
        let status = unsafe { (nccl.init_rank)(&mut comm, size as i32, raw, rank as i32) };
        if status != 0 {
            return Err(Error::Compute(format!(
                "NCCL could not set up the group (ncclCommInitRank status {status})"
            )));
        }
        *self.h.comm.lock().expect("nccl comm") = Some((nccl, comm));
        Ok(())
    }

    /// Sums `n` f32 at `ptr` over the NCCL group, in place.
    pub fn nccl_sum(&self, ptr: u64, n: usize) -> Result<()> {
        self.bind()?;
        let guard = self.h.comm.lock().expect("nccl comm");
        let (nccl, comm) = guard
            .as_ref()
            .ok_or_else(|| Error::Compute("internal: no NCCL group".into()))?;
        // SAFETY: a live device buffer of n floats on our stream.
        let status = unsafe {
            (nccl.all_reduce)(
                ptr as *const c_void,
                ptr as *mut c_void,
                n,
                libs::NCCL_FLOAT32,
                libs::NCCL_SUM,
                *comm,
                self.h.stream.cast(),
            )
        };
        if status != 0 {
            return Err(Error::Compute(format!("NCCL all-reduce: status {status}")));
        }
        Ok(())
    }
}

/// The backend for GPU `ordinal` at `precision` (see `model::backend`).
pub fn open(ordinal: usize, precision: &str) -> Result<Arc<dyn Backend>> {
    let rt = Arc::new(Cuda::open(ordinal)?);
    let act = super::activation_type(rt.capability(), precision, &rt.describe())?;
    Ok(Arc::new(super::Gpu::new_cuda(
        rt,
        act,
        format!("cuda:{ordinal}"),
    )))
}

/// The first GPU when one can be opened.
pub fn open_if_available(ordinal: usize, precision: &str) -> Result<Option<Arc<dyn Backend>>> {
    match Cuda::open(ordinal) {
        Ok(rt) => {
            let rt = Arc::new(rt);
            let act = super::activation_type(rt.capability(), precision, &rt.describe())?;
            Ok(Some(Arc::new(super::Gpu::new_cuda(
                rt,
                act,
                format!("cuda:{ordinal}"),
            ))))
        }
        Err(Error::GpuUnavailable(_)) => Ok(None),
        Err(e) => Err(e),
    }
}
