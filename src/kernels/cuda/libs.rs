//! cuBLAS and NCCL, loaded at run time from where pip puts them.
//!
//! Why our own loader (a handful of entry points) instead of cudarc's: cudarc looks for
//! `libcublas.so.12`-style names on the default search path, but pip's NVIDIA wheels put
//! their libraries in `site-packages/nvidia/*/lib` (CUDA 12: `nvidia/cublas/lib`,
//! `nvidia/nccl/lib`; CUDA 13: `nvidia/cu13/lib`), which is on no search path, and NCCL's
//! soname (`libnccl.so.2`) is not among cudarc's candidates. Here every candidate folder
//! next to this extension's site-packages and the system paths are tried, cuBLAS 12 or 13
//! (the entry points used are the same in both), so `pip install ferrotune[+cu12]` works
//! without `LD_LIBRARY_PATH`, and a machine whose PyTorch brought CUDA 13 libraries works
//! too.

use std::ffi::{c_char, c_int, c_void};
use std::path::PathBuf;

use libloading::Library;

use crate::error::{Error, Result};

/// Folders that may hold pip's NVIDIA libraries: `nvidia/*/lib` under the site-packages this
/// extension was loaded from (found with `dladdr`), then under `FERROTUNE_CUDA_LIB_DIRS`.
fn candidate_dirs() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    // SAFETY: dladdr reads the loader's tables for an address inside this library.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        let here = candidate_dirs as *const c_void;
        if libc::dladdr(here, &mut info) != 0 && !info.dli_fname.is_null() {
            let me = PathBuf::from(
                std::ffi::CStr::from_ptr(info.dli_fname)
                    .to_string_lossy()
                    .into_owned(),
            );
            // site-packages/ferrotune/_core.abi3.so → site-packages
            if let Some(site) = me.parent().and_then(|p| p.parent()) {
                roots.push(site.join("nvidia"));
            }
        }
    }
    let mut dirs = Vec::new();
    if let Ok(extra) = std::env::var("FERROTUNE_CUDA_LIB_DIRS") {
        dirs.extend(std::env::split_paths(&extra));
    }
    for root in roots {
        for sub in ["cublas/lib", "nccl/lib", "cu13/lib", "cu12/lib"] {
            dirs.push(root.join(sub));
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs
}

/// Opens the first of `names` found in the candidate folders, then on the system's paths.
fn open(names: &[&str], what: &str, install: &str) -> Result<Library> {
    let dirs = candidate_dirs();
    for name in names {
        for d in &dirs {
            let p = d.join(name);
            if p.is_file() {
                // SAFETY: loading a vendor library runs its initialisers, as any user does.
                if let Ok(lib) = unsafe { Library::new(&p) } {
                    return Ok(lib);
                }
            }
        }
    }
    for name in names {
        // SAFETY: as above.
        if let Ok(lib) = unsafe { Library::new(*name) } {
            return Ok(lib);
        }
    }
    Err(Error::GpuUnavailable(format!(
        "{what} cannot be loaded (looked for {} in {} and on the system's library path): {install}",
        names.join(" / "),
        if dirs.is_empty() {
            "no pip NVIDIA folder".to_string()
        } else {
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    )))
}

macro_rules! symbol {
    ($lib:expr, $name:literal) => {
        // SAFETY: the declared type is the C signature of this entry point.
        *unsafe { $lib.get($name) }.map_err(|e| {
            Error::GpuUnavailable(format!(
                "{} lacks {}: {e}",
                "a CUDA library",
                String::from_utf8_lossy(&$name[..$name.len() - 1])
            ))
        })?
    };
}

pub type Handle = *mut c_void;

type CreateFn = unsafe extern "C" fn(*mut Handle) -> c_int;
type SetStreamFn = unsafe extern "C" fn(Handle, *mut c_void) -> c_int;
type GemmExFn = unsafe extern "C" fn(
    Handle,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    *const c_void,
    *const c_void,
    c_int,
    c_int,
    *const c_void,
    c_int,
    c_int,
    *const c_void,
    *mut c_void,
    c_int,
    c_int,
    c_int,
    c_int,
) -> c_int;

/// cuBLAS: the handle calls ferrotune makes.
pub struct Blas {
    _lib: Library,
    pub create: CreateFn,
    pub set_stream: SetStreamFn,
    pub gemm_ex: GemmExFn,
}

// cuBLAS's enum values (identical in CUDA 12 and 13).
pub const OP_N: c_int = 0;
pub const OP_T: c_int = 1;
pub const R_32F: c_int = 0;
pub const R_16F: c_int = 2;
pub const R_16BF: c_int = 14;
pub const COMPUTE_32F: c_int = 68;
pub const COMPUTE_32F_FAST_TF32: c_int = 77;
pub const GEMM_DEFAULT: c_int = -1;

impl Blas {
    pub fn load() -> Result<Self> {
        let lib = open(
            &["libcublas.so.12", "libcublas.so.13", "libcublas.so"],
            "cuBLAS",
            "pip install nvidia-cublas-cu12 (the CUDA wheel of ferrotune declares it; reinstall it with its dependencies)",
        )?;
        Ok(Self {
            create: symbol!(lib, b"cublasCreate_v2\0"),
            set_stream: symbol!(lib, b"cublasSetStream_v2\0"),
            gemm_ex: symbol!(lib, b"cublasGemmEx\0"),
            _lib: lib,
        })
    }
}

/// NCCL's unique id (`ncclUniqueId`, 128 bytes, passed by value).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NcclId {
    pub internal: [c_char; 128],
}

pub type Comm = *mut c_void;
type GetIdFn = unsafe extern "C" fn(*mut NcclId) -> c_int;
type InitRankFn = unsafe extern "C" fn(*mut Comm, c_int, NcclId, c_int) -> c_int;
type AllReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    Comm,
    *mut c_void,
) -> c_int;

pub const NCCL_FLOAT32: c_int = 7;
pub const NCCL_SUM: c_int = 0;

/// NCCL: the calls for one all-reduce group.
pub struct Nccl {
    _lib: Library,
    pub get_id: GetIdFn,
    pub init_rank: InitRankFn,
    pub all_reduce: AllReduceFn,
}

impl Nccl {
    pub fn load() -> Result<Self> {
        let lib = open(
            &["libnccl.so.2", "libnccl.so"],
            "NCCL",
            "pip install nvidia-nccl-cu12",
        )?;
        Ok(Self {
            get_id: symbol!(lib, b"ncclGetUniqueId\0"),
            init_rank: symbol!(lib, b"ncclCommInitRank\0"),
            all_reduce: symbol!(lib, b"ncclAllReduce\0"),
            _lib: lib,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_a_typed_error_naming_the_pip_package() {
        let err = open(
            &["libferrotune-no-such-library.so.12"],
            "cuBLAS",
            "pip install nvidia-cublas-cu12",
        )
        .expect_err("no such library");
        let msg = err.to_string();
        assert!(matches!(err, Error::GpuUnavailable(_)), "{err:?}");
        assert!(
            msg.starts_with(
                "cuBLAS cannot be loaded (looked for libferrotune-no-such-library.so.12 in "
            ) && msg.ends_with(": pip install nvidia-cublas-cu12")
                && !msg.contains('\n'),
            "{msg}"
        );
    }

    #[test]
    fn the_folders_of_ferrotune_cuda_lib_dirs_are_searched_first() {
        let tmp = tempfile::tempdir().unwrap();
        std::env::set_var("FERROTUNE_CUDA_LIB_DIRS", tmp.path());
        assert!(candidate_dirs().first().is_some_and(|d| d == tmp.path()));
    }
}
