//! `#[repr(C)]` mirrors of the kernel parameter structs of `params.cuh` (same field order,
//! types and padding; pointers are device addresses as u64). The emulator exports each
//! struct's C `sizeof`, which the tests compare with these.

/// Bytes of a parameter struct, as the kernel receives them.
pub fn bytes<P: Copy>(p: &P) -> &[u8] {
    // SAFETY: P is a plain #[repr(C)] struct of integers and floats (no padding bytes are
    // read as anything but bytes); the slice lives as long as the borrow.
    unsafe { std::slice::from_raw_parts((p as *const P).cast::<u8>(), std::mem::size_of::<P>()) }
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RmsNormFwd {
    pub x: u64,
    pub w: u64,
    pub y: u64,
    pub rstd: u64,
    pub rows: i32,
    pub width: i32,
    pub eps: f32,
    pub _pad: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RmsNormBwd {
    pub x: u64,
    pub w: u64,
    pub rstd: u64,
    pub dy: u64,
    pub dx: u64,
    pub rows: i32,
    pub width: i32,
    pub accumulate: i32,
    pub _pad: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Rope {
    pub qkv: u64,
    pub pos: u64,
    pub tab: u64,
    pub inv_freq: u64,
    pub rows: i32,
    pub row_stride: i32,
    pub heads: i32,
    pub head_dim: i32,
    pub mscale: f32,
    pub sign: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Swiglu {
    pub gu: u64,
    pub dy: u64,
    pub out: u64,
    pub rows: i32,
    pub inter: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub x: u64,
    pub y: u64,
    pub n: u64,
    pub key: u64,
    pub p: f32,
    pub keep_scale: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Cast {
    pub src: u64,
    pub dst: u64,
    pub n: u64,
    pub scale: f32,
    pub _pad: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Add {
    pub y: u64,
    pub x: u64,
    pub n: u64,
    pub alpha: f32,
    pub _pad: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    pub src: u64,
    pub dst: u64,
    pub idx: u64,
    pub rows: i32,
    pub width: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CeRows {
    pub logits: u64,
    pub targets: u64,
    pub losses: u64,
    pub rows: i32,
    pub vocab: i32,
    pub scale: f32,
    pub need_grad: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Sum {
    pub x: u64,
    pub out: u64,
    pub partial: u64,
    pub n: u64,
    pub square: i32,
    pub parts: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub p: u64,
    pub g: u64,
    pub m: u64,
    pub v: u64,
    pub norm_sq: u64,
    pub status: u64,
    pub n: u64,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub bc1: f32,
    pub bc2_sqrt: f32,
    pub grad_scale: f32,
    pub max_norm: f32,
    pub _pad: i32,
}

/// One segment of an attention call (device memory, an array of them).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AttnSeg {
    pub k: u64,
    pub v: u64,
    pub dk: u64,
    pub dv: u64,
    pub q_row: i32,
    pub len: i32,
    pub past: i32,
    pub kv_stride: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AttnFwd {
    pub q: u64,
    pub out: u64,
    pub lse: u64,
    pub segs: u64,
    pub q_stride: i32,
    pub out_stride: i32,
    pub lse_stride: i32,
    pub n_segs: i32,
    pub heads: i32,
    pub kv_heads: i32,
    pub head_dim: i32,
    pub window: i32,
    pub scale: f32,
    pub _pad: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AttnBwd {
    pub q: u64,
    pub out: u64,
    pub dout: u64,
    pub lse: u64,
    pub delta: u64,
    pub dq: u64,
    pub segs: u64,
    pub q_stride: i32,
    pub out_stride: i32,
    pub dq_stride: i32,
    pub lse_stride: i32,
    pub n_segs: i32,
    pub n_rows: i32,
    pub heads: i32,
    pub kv_heads: i32,
    pub head_dim: i32,
    pub window: i32,
    pub scale: f32,
    pub _pad: i32,
}
