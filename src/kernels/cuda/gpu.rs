//! [`Gpu`]: the device primitives on a GPU — our kernels for the row passes, attention,
//! dropout, cross-entropy and the optimizer, cuBLAS for every product (bf16/fp16 inputs,
//! f32 accumulation, written or accumulated into the destination) — over a [`Runtime`]
//! (the CUDA driver, or the emulator in tests).
//!
//! Nothing here waits for the device except the explicit reads (`to_f32`, `to_f64`); per
//! batch only the positions, the targets and the attention segment tables go up.

use std::sync::Arc;

use half::{bf16, f16};

use super::params as p;
use super::runtime::{DevMem, Gemm, Launch, Runtime};
use crate::error::{Error, Result};
use crate::kernels::{
    product_shape, AdamWStep, Backend, Buf, Dt, Heads, KvCache, Layout, Mat, Rope, RopeSpec,
};

/// Threads per block of the 1-D (grid-stride) kernels.
const THREADS: u32 = 256;
/// Query / key rows per attention tile, and threads per attention block (params.cuh's
/// FT_ATTN_TILE, FT_ATTN_TC_THREADS, FT_ATTN_SIMT_THREADS, FT_ATTN_DOT_THREADS).
pub const ATTN_TILE: usize = 64;
const ATTN_TC_THREADS: u32 = 128;
const ATTN_SIMT_THREADS: u32 = 256;
const ATTN_DOT_THREADS: u32 = 128;
/// Rows of logits per cross-entropy chunk (8192 × 32064 × 2 B = 525 MB in bf16).
const CE_CHUNK: usize = 8192;

/// The GPU backend.
pub struct Gpu {
    rt: Arc<dyn Runtime>,
    act: Dt,
    name: String,
    /// Attention through the plain (SIMT) kernels instead of the tensor-core ones
    /// (`FERROTUNE_ATTENTION=simt`; also what f32 activations use).
    attn_simt: bool,
    /// f32 products on TF32 tensor cores (precision "32"); `FERROTUNE_TF32=0` keeps them in
    /// full f32 (for exact comparisons).
    tf32: bool,
    /// The largest grid y / z of the attention launches (CUDA's 65,535; tests lower it).
    attn_grid_yz: u32,
    /// The real GPU behind `rt`, for NCCL.
    #[cfg(feature = "cuda")]
    cuda: Option<Arc<super::driver::Cuda>>,
}

fn grid_for(n: usize) -> u32 {
    n.div_ceil(THREADS as usize).clamp(1, 65535) as u32
}

/// The attention kernels' grid: (tiles of the longest segment, heads, segments), y and z
/// capped at `max_yz` (CUDA's 65,535; the kernels stride over all three, so a smaller grid
/// is only slower: a micro-batch of more than 65,535 conversations is one of very short
/// ones).
fn attn_grid(longest: usize, heads: usize, segments: usize, max_yz: u32) -> [u32; 3] {
    let cap = |n: usize| n.clamp(1, max_yz as usize) as u32;
    [
        longest.div_ceil(ATTN_TILE).clamp(1, i32::MAX as usize) as u32,
        cap(heads),
        cap(segments),
    ]
}

#[cfg(test)]
#[test]
fn attention_grids_keep_within_cuda_limits() {
    assert_eq!(attn_grid(4096, 32, 70_000, 65535), [64, 32, 65535]);
    assert_eq!(attn_grid(1, 32, 3, 65535), [1, 32, 3]);
    assert_eq!(attn_grid(0, 0, 0, 65535), [1, 1, 1]);
}

fn check_i32(what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::InvalidArgument(format!("{what} {n} is too large")))
}

impl Gpu {
    /// A backend computing in `act` (bf16, f16 or f32) on `rt`; `name` is what
    /// [`Backend::name`] says ("cuda:0", "emu"). Its calls are timed while the profiler
    /// (`profile.rs`) is on.
    pub fn new(rt: Arc<dyn Runtime>, act: Dt, name: String) -> Self {
        let simt_env = std::env::var("FERROTUNE_ATTENTION").is_ok_and(|v| v == "simt");
        Self {
            rt: super::profile::Profiled::wrap(rt),
            act,
            name,
            attn_simt: simt_env || act == Dt::F32,
            tf32: std::env::var("FERROTUNE_TF32").map_or(true, |v| v != "0"),
            attn_grid_yz: 65535,
            #[cfg(feature = "cuda")]
            cuda: None,
        }
    }

    /// The backend of a real GPU (which can also sum buffers across GPUs with NCCL).
    #[cfg(feature = "cuda")]
    pub(super) fn new_cuda(rt: Arc<super::driver::Cuda>, act: Dt, name: String) -> Self {
        let mut g = Self::new(rt.clone(), act, name);
        g.cuda = Some(rt);
        g
    }

    fn attn_threads(&self) -> u32 {
        if self.attn_simt {
            ATTN_SIMT_THREADS
        } else {
            ATTN_TC_THREADS
        }
    }

    /// An attention launch over `segments` segments (the longest `longest` rows) and `heads`
    /// heads (no dynamic shared memory).
    fn attn_launch(&self, longest: usize, heads: usize, segments: usize) -> Launch {
        Launch {
            grid: attn_grid(longest, heads, segments, self.attn_grid_yz),
            block: [self.attn_threads(), 1, 1],
            smem: 0,
        }
    }

    /// The same backend with attention grids of at most `max_yz` heads and segments (tests
    /// of the kernels' strides over both).
    #[cfg(test)]
    pub fn with_attn_grid_yz(mut self, max_yz: u32) -> Self {
        self.attn_grid_yz = max_yz;
        self
    }

    /// The same backend with attention through the plain (SIMT) kernels.
    pub fn with_simt_attention(mut self) -> Self {
        self.attn_simt = true;
        self
    }

    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.rt
    }

    fn alloc(&self, len: usize, dt: Dt) -> Result<Buf> {
        Ok(Buf::dev(dt, len, DevMem::alloc(&self.rt, len * dt.size())?))
    }

    /// The device address of element `off` of `b`.
    fn ptr(&self, b: &Buf, off: usize) -> Result<u64> {
        let m = b.dev_mem()?;
        if off > b.len() {
            return Err(Error::Compute(format!(
                "internal: offset {off} past a buffer of {}",
                b.len()
            )));
        }
        Ok(m.ptr + (off * b.dt().size()) as u64)
    }

    fn launch<P: Copy>(&self, kernel: &str, dt: Dt, cfg: Launch, params: &P) -> Result<()> {
        let name = format!("{kernel}_{}", dt.kernel_suffix());
        self.rt.launch(&name, cfg, p::bytes(params))
    }

    fn same(&self, what: &str, b: &Buf, dt: Dt) -> Result<()> {
        if b.dt() != dt {
            return Err(Error::Compute(format!(
                "internal: {what} is {:?}, expected {dt:?}",
                b.dt()
            )));
        }
        Ok(())
    }

    /// `C[off..] = alpha · a @ b + beta · C[off..]` (row-major `(m, n)`), through cuBLAS's
    /// column-major GEMM: row-major C is column-major Cᵀ = op(B)ᵀ op(A)ᵀ, and a row-major
    /// matrix is its own transpose read column-major, so B goes first with its own
    /// transpose flag and leading dimension (its stored column count), then A.
    fn gemm_into(&self, c: &Buf, off: usize, a: Mat, b: Mat, alpha: f32, beta: f32) -> Result<()> {
        let (m, k, n) = product_shape(&a, &b)?;
        if a.buf.dt() != b.buf.dt() {
            return Err(Error::Compute(format!(
                "internal: a product of {:?} and {:?}",
                a.buf.dt(),
                b.buf.dt()
            )));
        }
        if off + m * n > c.len() {
            return Err(Error::Compute(format!(
                "internal: a {m}x{n} product at {off} does not fit {}",
                c.len()
            )));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        self.rt.gemm(&Gemm {
            trans_a: b.t,
            trans_b: a.t,
            m: n,
            n: m,
            k,
            alpha,
            a: self.ptr(b.buf, b.off)?,
            lda: b.cols.max(1),
            b: self.ptr(a.buf, a.off)?,
            ldb: a.cols.max(1),
            beta,
            c: self.ptr(c, off)?,
            ldc: n,
            ab: a.buf.dt(),
            c_dt: c.dt(),
            tf32: self.tf32 && a.buf.dt() == Dt::F32,
        })
    }

    /// Uploads `segs` as a device array of [`p::AttnSeg`].
    fn seg_table(&self, segs: &[p::AttnSeg]) -> Result<DevMem> {
        let bytes: Vec<u8> = segs.iter().flat_map(|s| p::bytes(s).to_vec()).collect();
        let mem = DevMem::alloc(&self.rt, bytes.len())?;
        self.rt.upload(mem.ptr, &bytes)?;
        Ok(mem)
    }

    /// `*out += Σ x` (or `Σ x²`) over `n` f32 at `x`, in double, in an order fixed by `n`
    /// alone (reduce.cu), so that training runs repeat bit for bit.
    fn sum_f32(&self, x: u64, n: usize, square: bool, out: u64) -> Result<()> {
        let parts = grid_for(n).min(1024);
        let partial = DevMem::alloc(&self.rt, parts as usize * 8)?;
        let params = p::Sum {
            x,
            out,
            partial: partial.ptr,
            n: n as u64,
            square: i32::from(square),
            parts: parts as i32,
        };
        let bytes = p::bytes(&params);
        self.rt
            .launch("sum_f32", Launch::linear(parts, THREADS), bytes)?;
        self.rt
            .launch("sum_f32_finish", Launch::linear(1, THREADS), bytes)
    }

    fn attn_kernel(&self, base: &str) -> String {
        if self.attn_simt {
            format!("{base}_simt")
        } else {
            base.to_string()
        }
    }
}

impl Backend for Gpu {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn act(&self) -> Dt {
        self.act
    }

    fn upload_f32(&self, v: &[f32], dt: Dt) -> Result<Buf> {
        let bytes: Vec<u8> = match dt {
            Dt::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dt::BF16 => v
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
            Dt::F16 => v
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
            Dt::F64 => v.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
            Dt::I32 => {
                return Err(Error::Compute("internal: upload_f32 into i32".into()));
            }
        };
        let b = self.alloc(v.len(), dt)?;
        self.rt.upload(self.ptr(&b, 0)?, &bytes)?;
        Ok(b)
    }

    fn upload_i32(&self, v: &[i32]) -> Result<Buf> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let b = self.alloc(v.len(), Dt::I32)?;
        self.rt.upload(self.ptr(&b, 0)?, &bytes)?;
        Ok(b)
    }

    fn to_f32(&self, b: &Buf) -> Result<Vec<f32>> {
        let mut bytes = vec![0u8; b.bytes()];
        self.rt.download(self.ptr(b, 0)?, &mut bytes)?;
        Ok(match b.dt() {
            Dt::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
            Dt::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dt::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dt::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as f32)
                .collect(),
            Dt::F64 => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
        })
    }

    fn to_f64(&self, b: &Buf) -> Result<Vec<f64>> {
        if b.dt() != Dt::F64 {
            return Ok(self.to_f32(b)?.into_iter().map(f64::from).collect());
        }
        let mut bytes = vec![0u8; b.bytes()];
        self.rt.download(self.ptr(b, 0)?, &mut bytes)?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    fn zeros(&self, len: usize, dt: Dt) -> Result<Buf> {
        let b = self.alloc(len, dt)?;
        self.rt.memset_zero(self.ptr(&b, 0)?, b.bytes())?;
        Ok(b)
    }

    fn clone_buf(&self, b: &Buf) -> Result<Buf> {
        let c = self.alloc(b.len(), b.dt())?;
        self.rt.copy(self.ptr(&c, 0)?, self.ptr(b, 0)?, b.bytes())?;
        Ok(c)
    }

    fn copy(
        &self,
        dst: &mut Buf,
        dst_off: usize,
        src: &Buf,
        src_off: usize,
        len: usize,
    ) -> Result<()> {
        self.same("copy source", src, dst.dt())?;
        if dst_off + len > dst.len() || src_off + len > src.len() {
            return Err(Error::Compute("internal: copy out of range".into()));
        }
        if len == 0 {
            return Ok(());
        }
        self.rt.copy(
            self.ptr(dst, dst_off)?,
            self.ptr(src, src_off)?,
            len * src.dt().size(),
        )
    }

    fn cast(&self, b: &Buf, dt: Dt, scale: f32) -> Result<Buf> {
        if b.dt() == dt {
            if scale == 1.0 {
                return self.clone_buf(b);
            }
            // y = 0 + scale · x
            let y = self.zeros(b.len(), dt)?;
            let params = p::Add {
                y: self.ptr(&y, 0)?,
                x: self.ptr(b, 0)?,
                n: b.len() as u64,
                alpha: scale,
                _pad: 0,
            };
            self.launch(
                "add",
                dt,
                Launch::linear(grid_for(b.len()), THREADS),
                &params,
            )?;
            return Ok(y);
        }
        let out = self.alloc(b.len(), dt)?;
        let params = p::Cast {
            src: self.ptr(b, 0)?,
            dst: self.ptr(&out, 0)?,
            n: b.len() as u64,
            scale,
            _pad: 0,
        };
        let name = format!("cast_{}_to_{}", b.dt().kernel_suffix(), dt.kernel_suffix());
        self.rt.launch(
            &name,
            Launch::linear(grid_for(b.len()), THREADS),
            p::bytes(&params),
        )?;
        Ok(out)
    }

    fn fill_zero(&self, b: &mut Buf) -> Result<()> {
        self.rt.memset_zero(self.ptr(b, 0)?, b.bytes())
    }

    fn matmul(&self, a: Mat, b: Mat, alpha: f32, out: Dt) -> Result<Buf> {
        let (m, _, n) = product_shape(&a, &b)?;
        let c = self.alloc(m * n, out)?;
        self.gemm_into(&c, 0, a, b, alpha, 0.0)?;
        Ok(c)
    }

    fn matmul_acc(&self, dst: &mut Buf, off: usize, a: Mat, b: Mat, alpha: f32) -> Result<()> {
        self.gemm_into(dst, off, a, b, alpha, 1.0)
    }

    fn rms_norm(&self, x: &Buf, w: &Buf, eps: f32) -> Result<(Buf, Buf)> {
        self.same("rms_norm input", x, self.act)?;
        let width = w.len();
        let rows = x.len() / width.max(1);
        let y = self.alloc(x.len(), self.act)?;
        let r = self.alloc(rows, Dt::F32)?;
        let params = p::RmsNormFwd {
            x: self.ptr(x, 0)?,
            w: self.ptr(w, 0)?,
            y: self.ptr(&y, 0)?,
            rstd: self.ptr(&r, 0)?,
            rows: check_i32("rows", rows)?,
            width: check_i32("width", width)?,
            eps,
            _pad: 0,
        };
        if rows > 0 {
            self.launch(
                "rms_norm_fwd",
                self.act,
                Launch::linear(rows as u32, 256),
                &params,
            )?;
        }
        Ok((y, r))
    }

    fn rms_norm_bwd(
        &self,
        x: &Buf,
        w: &Buf,
        rstd: &Buf,
        dy: &Buf,
        dx: &mut Buf,
        accumulate: bool,
    ) -> Result<()> {
        let width = w.len();
        let rows = x.len() / width.max(1);
        let params = p::RmsNormBwd {
            x: self.ptr(x, 0)?,
            w: self.ptr(w, 0)?,
            rstd: self.ptr(rstd, 0)?,
            dy: self.ptr(dy, 0)?,
            dx: self.ptr(dx, 0)?,
            rows: check_i32("rows", rows)?,
            width: check_i32("width", width)?,
            accumulate: i32::from(accumulate),
            _pad: 0,
        };
        if rows > 0 {
            self.launch(
                "rms_norm_bwd",
                self.act,
                Launch::linear(rows as u32, 256),
                &params,
            )?;
        }
        Ok(())
    }

    fn rope(&self, qkv: &mut Buf, lay: &Layout, inverse: bool) -> Result<()> {
        let Rope::Device {
            pos,
            tab,
            inv_freq,
            mscale,
        } = &lay.rope
        else {
            return Err(Error::Compute(
                "internal: a CPU RoPE layout on a GPU".into(),
            ));
        };
        let h = lay.heads;
        let rows = lay.rows();
        let params = p::Rope {
            qkv: self.ptr(qkv, 0)?,
            pos: self.ptr(pos, 0)?,
            tab: self.ptr(tab, 0)?,
            inv_freq: self.ptr(inv_freq, 0)?,
            rows: check_i32("rows", rows)?,
            row_stride: h.qkv_width() as i32,
            heads: (h.q + h.kv) as i32,
            head_dim: h.dim as i32,
            mscale: *mscale,
            sign: if inverse { -1.0 } else { 1.0 },
        };
        if rows > 0 {
            self.launch("rope", self.act, Launch::linear(rows as u32, 128), &params)?;
        }
        Ok(())
    }

    fn swiglu(&self, gu: &Buf, inter: usize) -> Result<Buf> {
        let rows = gu.len() / (2 * inter).max(1);
        let out = self.alloc(rows * inter, self.act)?;
        let params = p::Swiglu {
            gu: self.ptr(gu, 0)?,
            dy: 0,
            out: self.ptr(&out, 0)?,
            rows: check_i32("rows", rows)?,
            inter: check_i32("intermediate size", inter)?,
        };
        if rows > 0 {
            let g = (rows * inter).div_ceil(THREADS as usize) as u32;
            self.launch("swiglu_fwd", self.act, Launch::linear(g, THREADS), &params)?;
        }
        Ok(out)
    }

    fn swiglu_bwd(&self, gu: &Buf, dy: &Buf, inter: usize) -> Result<Buf> {
        let rows = gu.len() / (2 * inter).max(1);
        let out = self.alloc(gu.len(), self.act)?;
        let params = p::Swiglu {
            gu: self.ptr(gu, 0)?,
            dy: self.ptr(dy, 0)?,
            out: self.ptr(&out, 0)?,
            rows: check_i32("rows", rows)?,
            inter: check_i32("intermediate size", inter)?,
        };
        if rows > 0 {
            let g = (rows * inter).div_ceil(THREADS as usize) as u32;
            self.launch("swiglu_bwd", self.act, Launch::linear(g, THREADS), &params)?;
        }
        Ok(out)
    }

    fn dropout(&self, x: &Buf, prob: f32, key: u64) -> Result<Buf> {
        let y = self.alloc(x.len(), x.dt())?;
        let params = p::Dropout {
            x: self.ptr(x, 0)?,
            y: self.ptr(&y, 0)?,
            n: x.len() as u64,
            key,
            p: prob,
            keep_scale: (1.0 / (1.0 - prob as f64)) as f32,
        };
        self.launch(
            "dropout",
            x.dt(),
            Launch::linear(grid_for(x.len()), THREADS),
            &params,
        )?;
        Ok(y)
    }

    fn add(&self, y: &mut Buf, x: &Buf) -> Result<()> {
        self.same("add", x, y.dt())?;
        let params = p::Add {
            y: self.ptr(y, 0)?,
            x: self.ptr(x, 0)?,
            n: x.len().min(y.len()) as u64,
            alpha: 1.0,
            _pad: 0,
        };
        self.launch(
            "add",
            y.dt(),
            Launch::linear(grid_for(x.len()), THREADS),
            &params,
        )
    }

    fn gather_rows(&self, src: &Buf, idx: &Buf, width: usize) -> Result<Buf> {
        let rows = idx.len();
        let out = self.alloc(rows * width, src.dt())?;
        let params = p::Rows {
            src: self.ptr(src, 0)?,
            dst: self.ptr(&out, 0)?,
            idx: self.ptr(idx, 0)?,
            rows: check_i32("rows", rows)?,
            width: check_i32("width", width)?,
        };
        if rows > 0 {
            self.launch(
                "gather_rows",
                src.dt(),
                Launch::linear(rows as u32, 128),
                &params,
            )?;
        }
        Ok(out)
    }

    fn scatter_rows(&self, dst: &mut Buf, idx: &Buf, src: &Buf, width: usize) -> Result<()> {
        let rows = idx.len();
        let params = p::Rows {
            src: self.ptr(src, 0)?,
            dst: self.ptr(dst, 0)?,
            idx: self.ptr(idx, 0)?,
            rows: check_i32("rows", rows)?,
            width: check_i32("width", width)?,
        };
        if rows > 0 {
            self.launch(
                "scatter_rows",
                dst.dt(),
                Launch::linear(rows as u32, 128),
                &params,
            )?;
        }
        Ok(())
    }

    fn layout(
        &self,
        segments: Vec<(usize, usize)>,
        past: Vec<usize>,
        window: usize,
        heads: Heads,
        rope: RopeSpec,
    ) -> Result<Layout> {
        let flat: Vec<f32> = rope.inv_freq.iter().flatten().copied().collect();
        Ok(Layout {
            segments,
            past,
            window,
            heads,
            rope: Rope::Device {
                pos: self.upload_i32(rope.pos)?,
                tab: self.upload_i32(rope.tab)?,
                inv_freq: self.upload_f32(&flat, Dt::F32)?,
                mscale: rope.mscale,
            },
        })
    }

    fn attention(
        &self,
        qkv: &Buf,
        lay: &Layout,
        mut caches: Option<&mut [&mut KvCache]>,
        layer: usize,
    ) -> Result<(Buf, Option<Buf>)> {
        let h = lay.heads;
        let (w, d) = (h.qkv_width(), h.dim);
        let n = lay.rows();
        let out = self.alloc(n * h.q * d, self.act)?;
        let lse = self.alloc(h.q * n, Dt::F32)?;
        let kvw = h.kv * d;
        let mut segs = Vec::with_capacity(lay.segments.len());
        for (i, (&(s, len), &past)) in lay.segments.iter().zip(&lay.past).enumerate() {
            let seg = match caches.as_deref_mut() {
                Some(c) => {
                    // the new keys and values go to rows past.. of the cache (kv_append
                    // below writes them through dk / dv), attention reads the whole cache
                    c[i].reserve(self, past + len, kvw)?;
                    let (k, v) = &c[i].layers[layer];
                    let (k, v) = (self.ptr(k, 0)?, self.ptr(v, 0)?);
                    p::AttnSeg {
                        k,
                        v,
                        dk: k,
                        dv: v,
                        q_row: s as i32,
                        len: len as i32,
                        past: past as i32,
                        kv_stride: kvw as i32,
                    }
                }
                None => p::AttnSeg {
                    k: self.ptr(qkv, s * w + h.q * d)?,
                    v: self.ptr(qkv, s * w + (h.q + h.kv) * d)?,
                    dk: 0,
                    dv: 0,
                    q_row: s as i32,
                    len: len as i32,
                    past: past as i32,
                    kv_stride: w as i32,
                },
            };
            segs.push(seg);
        }
        if segs.is_empty() {
            return Ok((out, Some(lse)));
        }
        let table = self.seg_table(&segs)?;
        let longest = lay.segments.iter().map(|s| s.1).max().unwrap_or(1);
        let params = p::AttnFwd {
            q: self.ptr(qkv, 0)?,
            out: self.ptr(&out, 0)?,
            lse: self.ptr(&lse, 0)?,
            segs: table.ptr,
            q_stride: check_i32("qkv width", w)?,
            out_stride: (h.q * d) as i32,
            lse_stride: check_i32("rows", n)?,
            n_segs: check_i32("segments", segs.len())?,
            heads: h.q as i32,
            kv_heads: h.kv as i32,
            head_dim: d as i32,
            window: lay.window.min(i32::MAX as usize) as i32,
            scale: h.scale(),
            _pad: 0,
        };
        if caches.is_some() {
            let cap = |n: usize| n.clamp(1, self.attn_grid_yz as usize) as u32;
            let cfg = Launch {
                grid: [cap(longest), cap(segs.len()), 1],
                block: [128, 1, 1],
                smem: 0,
            };
            self.launch("kv_append", self.act, cfg, &params)?;
        }
        let cfg = self.attn_launch(longest, h.q, segs.len());
        self.launch(&self.attn_kernel("attn_fwd"), self.act, cfg, &params)?;
        drop(table);
        Ok((out, Some(lse)))
    }

    fn attention_bwd(
        &self,
        qkv: &Buf,
        out: &Buf,
        lse: Option<&Buf>,
        dout: &Buf,
        lay: &Layout,
    ) -> Result<Buf> {
        let lse = lse.ok_or_else(|| {
            Error::Compute("internal: the GPU attention backward needs the log-sum-exp".into())
        })?;
        let h = lay.heads;
        let (w, d) = (h.qkv_width(), h.dim);
        let n = lay.rows();
        let dqkv = self.zeros(n * w, self.act)?;
        let delta = self.alloc(h.q * n, Dt::F32)?;
        let mut segs = Vec::with_capacity(lay.segments.len());
        for (&(s, len), &past) in lay.segments.iter().zip(&lay.past) {
            if past != 0 {
                return Err(Error::Compute("internal: a backward after a past".into()));
            }
            segs.push(p::AttnSeg {
                k: self.ptr(qkv, s * w + h.q * d)?,
                v: self.ptr(qkv, s * w + (h.q + h.kv) * d)?,
                dk: self.ptr(&dqkv, s * w + h.q * d)?,
                dv: self.ptr(&dqkv, s * w + (h.q + h.kv) * d)?,
                q_row: s as i32,
                len: len as i32,
                past: 0,
                kv_stride: w as i32,
            });
        }
        if segs.is_empty() {
            return Ok(dqkv);
        }
        let table = self.seg_table(&segs)?;
        let longest = lay.segments.iter().map(|s| s.1).max().unwrap_or(1);
        let params = p::AttnBwd {
            q: self.ptr(qkv, 0)?,
            out: self.ptr(out, 0)?,
            dout: self.ptr(dout, 0)?,
            lse: self.ptr(lse, 0)?,
            delta: self.ptr(&delta, 0)?,
            dq: self.ptr(&dqkv, 0)?,
            segs: table.ptr,
            q_stride: check_i32("qkv width", w)?,
            out_stride: (h.q * d) as i32,
            dq_stride: w as i32,
            lse_stride: check_i32("rows", n)?,
            n_segs: check_i32("segments", segs.len())?,
            n_rows: n as i32,
            heads: h.q as i32,
            kv_heads: h.kv as i32,
            head_dim: d as i32,
            window: lay.window.min(i32::MAX as usize) as i32,
            scale: h.scale(),
            _pad: 0,
        };
        // one kernel for both paths (params.cuh)
        self.launch(
            "attn_bwd_dot_simt",
            self.act,
            Launch::linear(n as u32, ATTN_DOT_THREADS),
            &params,
        )?;
        let dkdv = self.attn_launch(longest, h.kv, segs.len());
        self.launch(&self.attn_kernel("attn_bwd_dkdv"), self.act, dkdv, &params)?;
        let dq = self.attn_launch(longest, h.q, segs.len());
        self.launch(&self.attn_kernel("attn_bwd_dq"), self.act, dq, &params)?;
        drop(table);
        Ok(dqkv)
    }

    fn cross_entropy(
        &self,
        h: &Buf,
        w: &Buf,
        targets: &Buf,
        grad_scale: Option<f32>,
        loss: &mut Buf,
    ) -> Result<Option<Buf>> {
        let rows = targets.len();
        let dh = match grad_scale {
            Some(_) => Some(self.alloc(h.len(), self.act)?),
            None => None,
        };
        if rows == 0 {
            return Ok(dh);
        }
        let hidden = h.len() / rows;
        let vocab = w.len() / hidden;
        let chunk = CE_CHUNK.min(rows);
        let losses = self.alloc(chunk, Dt::F32)?;
        let mut start = 0;
        while start < rows {
            let c = chunk.min(rows - start);
            let logits = self.matmul(
                Mat::at(h, start * hidden, c, hidden),
                Mat::of(w, vocab, hidden).t(),
                1.0,
                self.act,
            )?;
            let params = p::CeRows {
                logits: self.ptr(&logits, 0)?,
                targets: self.ptr(targets, start)?,
                losses: self.ptr(&losses, 0)?,
                rows: c as i32,
                vocab: check_i32("vocabulary", vocab)?,
                scale: grad_scale.unwrap_or(1.0),
                need_grad: i32::from(grad_scale.is_some()),
            };
            self.launch("ce_rows", self.act, Launch::linear(c as u32, 256), &params)?;
            self.sum_f32(self.ptr(&losses, 0)?, c, false, self.ptr(loss, 0)?)?;
            if let Some(dh) = &dh {
                // dh rows = (scale · (softmax − onehot)) @ w, written into place.
                self.gemm_into(
                    dh,
                    start * hidden,
                    Mat::of(&logits, c, vocab),
                    Mat::of(w, vocab, hidden),
                    1.0,
                    0.0,
                )?;
            }
            start += c;
        }
        Ok(dh)
    }

    fn sum_into(&self, x: &Buf, square: bool, out: &mut Buf, idx: usize) -> Result<()> {
        self.same("sum input", x, Dt::F32)?;
        self.same("sum output", out, Dt::F64)?;
        self.sum_f32(self.ptr(x, 0)?, x.len(), square, self.ptr(out, idx)?)
    }

    fn adamw(
        &self,
        prm: &mut Buf,
        g: &Buf,
        m: &mut Buf,
        v: &mut Buf,
        s: AdamWStep,
        norm_sq: (&Buf, usize),
        status: &mut Buf,
    ) -> Result<()> {
        let params = p::AdamW {
            p: self.ptr(prm, 0)?,
            g: self.ptr(g, 0)?,
            m: self.ptr(m, 0)?,
            v: self.ptr(v, 0)?,
            norm_sq: self.ptr(norm_sq.0, norm_sq.1)?,
            status: self.ptr(status, 0)?,
            n: prm.len() as u64,
            lr: s.lr,
            beta1: s.beta1,
            beta2: s.beta2,
            eps: s.eps,
            weight_decay: s.weight_decay,
            bc1: s.bc1,
            bc2_sqrt: s.bc2_sqrt,
            grad_scale: s.grad_scale,
            max_norm: s.max_norm,
            _pad: 0,
        };
        self.rt.launch(
            "adamw_f32",
            Launch::linear(grid_for(prm.len()), THREADS),
            p::bytes(&params),
        )
    }

    fn memory(&self) -> Result<Option<(usize, usize)>> {
        self.rt.memory().map(Some)
    }

    #[cfg(feature = "cuda")]
    fn collective_id(&self) -> Result<Option<Vec<u8>>> {
        match &self.cuda {
            Some(c) => c.nccl_id(),
            None => Ok(None),
        }
    }

    #[cfg(feature = "cuda")]
    fn collective_join(&self, id: &[u8], rank: usize, size: usize) -> Result<()> {
        match &self.cuda {
            Some(c) => c.nccl_join(id, rank, size),
            None => Err(Error::Compute("internal: no GPU for NCCL".into())),
        }
    }

    #[cfg(feature = "cuda")]
    fn collective_sum(&self, b: &mut Buf) -> Result<()> {
        self.same("NCCL sum", b, Dt::F32)?;
        match &self.cuda {
            Some(c) => c.nccl_sum(self.ptr(b, 0)?, b.len()),
            None => Err(Error::Compute("internal: no GPU for NCCL".into())),
        }
    }
}
