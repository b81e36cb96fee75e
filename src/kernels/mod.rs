//! The device primitives the model is written against, and their implementations.
//!
//! [`Backend`] is the small interface one decoder layer needs — products that write or
//! accumulate into their destination, RMSNorm, RoPE, SwiGLU, dropout, attention, the
//! cross-entropy of a chunk of rows, reductions and the optimizer update — over [`Buf`]s,
//! flat buffers that live where the backend computes. `model::layer` writes the layer's
//! forward and hand-written backward once over this interface; [`cpu::Cpu`] runs it on the
//! CPU in f32 (today's fused kernels), [`cuda::Gpu`] on a GPU in bf16 / fp16 (our CUDA
//! kernels and cuBLAS), through a [`cuda::Runtime`]: the CUDA driver (`cuda` feature) or,
//! for tests without a GPU, an emulator that runs the same kernel sources on the CPU
//! (`gpu-emu` feature).

pub mod cpu;
pub mod cuda;
pub mod dropout;

use crate::error::{Error, Result};

/// Element type of a [`Buf`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dt {
    F32,
    F16,
    BF16,
    I32,
    F64,
}

impl Dt {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dt::F16 | Dt::BF16 => 2,
            Dt::F32 | Dt::I32 => 4,
            Dt::F64 => 8,
        }
    }

    /// The suffix of the CUDA kernels for this activation type.
    pub fn kernel_suffix(self) -> &'static str {
        match self {
            Dt::F32 => "f32",
            Dt::F16 => "f16",
            Dt::BF16 => "bf16",
            Dt::I32 => "i32",
            Dt::F64 => "f64",
        }
    }
}

/// A flat buffer of `len` elements of type `dt`, on the host or on a device.
pub struct Buf {
    dt: Dt,
    len: usize,
    mem: Mem,
}

enum Mem {
    Host(Host),
    Dev(cuda::DevMem),
}

/// Host storage: the CPU backend computes in f32 (indices in i32, sums in f64).
pub(crate) enum Host {
    F32(Vec<f32>),
    I32(Vec<i32>),
    F64(Vec<f64>),
}

impl Buf {
    pub fn dt(&self) -> Dt {
        self.dt
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.len * self.dt.size()
    }

    pub(crate) fn host_f32(v: Vec<f32>) -> Self {
        Self {
            dt: Dt::F32,
            len: v.len(),
            mem: Mem::Host(Host::F32(v)),
        }
    }

    pub(crate) fn host_i32(v: Vec<i32>) -> Self {
        Self {
            dt: Dt::I32,
            len: v.len(),
            mem: Mem::Host(Host::I32(v)),
        }
    }

    pub(crate) fn host_f64(v: Vec<f64>) -> Self {
        Self {
            dt: Dt::F64,
            len: v.len(),
            mem: Mem::Host(Host::F64(v)),
        }
    }

    pub(crate) fn dev(dt: Dt, len: usize, mem: cuda::DevMem) -> Self {
        Self {
            dt,
            len,
            mem: Mem::Dev(mem),
        }
    }

    /// The f32 values of a host buffer (the CPU backend's view).
    pub(crate) fn f32s(&self) -> Result<&[f32]> {
        match &self.mem {
            Mem::Host(Host::F32(v)) => Ok(v),
            _ => Err(wrong("a host f32 buffer", self)),
        }
    }

    pub(crate) fn f32s_mut(&mut self) -> Result<&mut Vec<f32>> {
        let (dt, at) = (self.dt, self.location());
        match &mut self.mem {
            Mem::Host(Host::F32(v)) => Ok(v),
            _ => Err(Error::Compute(format!(
                "internal: a host f32 buffer expected, got {dt:?} {at}"
            ))),
        }
    }

    pub(crate) fn i32s(&self) -> Result<&[i32]> {
        match &self.mem {
            Mem::Host(Host::I32(v)) => Ok(v),
            _ => Err(wrong("a host i32 buffer", self)),
        }
    }

    pub(crate) fn i32s_mut(&mut self) -> Result<&mut Vec<i32>> {
        match &mut self.mem {
            Mem::Host(Host::I32(v)) => Ok(v),
            _ => Err(Error::Compute(
                "internal: a host i32 buffer expected".into(),
            )),
        }
    }

    pub(crate) fn f64s_mut(&mut self) -> Result<&mut Vec<f64>> {
        match &mut self.mem {
            Mem::Host(Host::F64(v)) => Ok(v),
            _ => Err(Error::Compute(
                "internal: a host f64 buffer expected".into(),
            )),
        }
    }

    pub(crate) fn f64s(&self) -> Result<&[f64]> {
        match &self.mem {
            Mem::Host(Host::F64(v)) => Ok(v),
            _ => Err(wrong("a host f64 buffer", self)),
        }
    }

    /// The device memory of a device buffer.
    pub(crate) fn dev_mem(&self) -> Result<&cuda::DevMem> {
        match &self.mem {
            Mem::Dev(m) => Ok(m),
            Mem::Host(_) => Err(wrong("a device buffer", self)),
        }
    }

    fn location(&self) -> &'static str {
        match self.mem {
            Mem::Host(_) => "host",
            Mem::Dev(_) => "device",
        }
    }
}

fn wrong(want: &str, b: &Buf) -> Error {
    Error::Compute(format!(
        "internal: {want} expected, got a {:?} {} buffer",
        b.dt,
        b.location()
    ))
}

/// A row-major matrix `(rows, cols)` inside a buffer (from element `off`), used as is or
/// transposed (`t`) in a product.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub buf: &'a Buf,
    pub off: usize,
    pub rows: usize,
    pub cols: usize,
    pub t: bool,
}

impl<'a> Mat<'a> {
    /// The whole of `buf` as `(rows, cols)`.
    pub fn of(buf: &'a Buf, rows: usize, cols: usize) -> Self {
        Self::at(buf, 0, rows, cols)
    }

    /// `(rows, cols)` starting at element `off` of `buf`.
    pub fn at(buf: &'a Buf, off: usize, rows: usize, cols: usize) -> Self {
        Self {
            buf,
            off,
            rows,
            cols,
            t: false,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self { t: !self.t, ..self }
    }

    /// (rows, cols) as used in a product.
    pub fn shape(&self) -> (usize, usize) {
        if self.t {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    fn check(&self) -> Result<()> {
        if self.off + self.rows * self.cols > self.buf.len() {
            return Err(Error::Compute(format!(
                "internal: a {}x{} matrix at {} does not fit a buffer of {}",
                self.rows,
                self.cols,
                self.off,
                self.buf.len()
            )));
        }
        Ok(())
    }
}

/// Checks `a @ b` shapes and returns `(m, k, n)`.
pub(crate) fn product_shape(a: &Mat, b: &Mat) -> Result<(usize, usize, usize)> {
    a.check()?;
    b.check()?;
    let ((m, k), (k2, n)) = (a.shape(), b.shape());
    if k != k2 {
        return Err(Error::Compute(format!(
            "internal: product of {m}x{k} and {k2}x{n}"
        )));
    }
    Ok((m, k, n))
}

/// Shapes of one attention layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Heads {
    pub q: usize,
    pub kv: usize,
    pub dim: usize,
}

impl Heads {
    /// Width of a fused `qkv` row.
    pub fn qkv_width(&self) -> usize {
        (self.q + 2 * self.kv) * self.dim
    }

    pub fn scale(&self) -> f32 {
        1.0 / (self.dim as f32).sqrt()
    }
}

/// The segments (conversations) of a flat batch and their positions, as the backend keeps
/// them for RoPE and attention (built once per batch by [`Backend::layout`]).
pub struct Layout {
    /// `(first row, rows)` per segment.
    pub segments: Vec<(usize, usize)>,
    /// Tokens already cached per segment (generation; 0 in training).
    pub past: Vec<usize>,
    /// Key `j` is visible from position `p` iff `j <= p` and `p - j < window`.
    pub window: usize,
    pub heads: Heads,
    /// What the backend derived: RoPE tables or device copies of the positions.
    pub(crate) rope: Rope,
}

impl Layout {
    pub fn rows(&self) -> usize {
        self.segments.last().map_or(0, |&(s, l)| s + l)
    }
}

pub(crate) enum Rope {
    /// cos and sin (rows, head_dim / 2), with the attention factor applied.
    Tables { cos: Vec<f32>, sin: Vec<f32> },
    /// Positions, table index per row, inverse frequencies (tables, head_dim / 2).
    Device {
        pos: Buf,
        tab: Buf,
        inv_freq: Buf,
        mscale: f32,
    },
}

/// What a batch's RoPE is made of: per row, its position and which inverse-frequency table
/// applies (LongRoPE picks short or long factors per sequence).
pub struct RopeSpec<'a> {
    pub pos: &'a [i32],
    pub tab: &'a [i32],
    /// `(tables, head_dim / 2)` inverse frequencies, f32 as transformers computes them.
    pub inv_freq: &'a [Vec<f32>],
    pub mscale: f32,
}

/// One sequence's key/value cache for generation: per layer, `(tokens, kv_heads · dim)`
/// keys and values with room for `capacity` tokens.
pub struct KvCache {
    pub(crate) layers: Vec<(Buf, Buf)>,
    pub(crate) len: usize,
    pub(crate) capacity: usize,
}

impl KvCache {
    /// An empty cache of `layers` layers of `(capacity, width)` keys and values on `be`.
    pub(crate) fn new(
        be: &dyn Backend,
        layers: usize,
        width: usize,
        capacity: usize,
    ) -> Result<Self> {
        let capacity = capacity.max(1);
        let buf = || be.zeros(capacity * width, be.act());
        Ok(Self {
            layers: (0..layers)
                .map(|_| Ok((buf()?, buf()?)))
                .collect::<Result<_>>()?,
            len: 0,
            capacity,
        })
    }

    /// Makes room for `rows` tokens of `width` (at least doubling), keeping the cached ones.
    pub(crate) fn reserve(&mut self, be: &dyn Backend, rows: usize, width: usize) -> Result<()> {
        if rows <= self.capacity {
            return Ok(());
        }
        let cap = rows.max(self.capacity * 2);
        for (k, v) in self.layers.iter_mut() {
            for b in [k, v] {
                let mut grown = be.zeros(cap * width, b.dt())?;
                be.copy(&mut grown, 0, b, 0, self.len * width)?;
                *b = grown;
            }
        }
        self.capacity = cap;
        Ok(())
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One AdamW update's hyper-parameters (torch's arithmetic; see `params.cuh`).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// `1 − beta1^t` and `sqrt(1 − beta2^t)` for this step `t`.
    pub bc1: f32,
    pub bc2_sqrt: f32,
    /// Multiplies the gradients first (1 / the loss scale).
    pub grad_scale: f32,
    /// Global-norm clipping (`<= 0`: none).
    pub max_norm: f32,
}

/// The device primitives (see the module doc). Shapes are row-major; every activation
/// buffer has the backend's activation type [`Backend::act`].
pub trait Backend: Send + Sync {
    /// "cpu", "cuda:0", ...
    fn name(&self) -> String;
    /// The activation (and frozen weight) type.
    fn act(&self) -> Dt;

    // --- memory
    /// A buffer of `dt` holding `v` (converted, rounded to nearest even).
    fn upload_f32(&self, v: &[f32], dt: Dt) -> Result<Buf>;
    fn upload_i32(&self, v: &[i32]) -> Result<Buf>;
    /// The values of `b` as f32 (waits for the device).
    fn to_f32(&self, b: &Buf) -> Result<Vec<f32>>;
    /// The values of an f64 buffer (waits for the device).
    fn to_f64(&self, b: &Buf) -> Result<Vec<f64>>;
    fn zeros(&self, len: usize, dt: Dt) -> Result<Buf>;
    fn clone_buf(&self, b: &Buf) -> Result<Buf>;
    /// `dst[dst_off..][..len] = src[src_off..][..len]` (same dtype).
    fn copy(
        &self,
        dst: &mut Buf,
        dst_off: usize,
        src: &Buf,
        src_off: usize,
        len: usize,
    ) -> Result<()>;
    /// `b` converted to `dt` and multiplied by `scale`.
    fn cast(&self, b: &Buf, dt: Dt, scale: f32) -> Result<Buf>;
    /// Sets every element of `b` to zero.
    fn fill_zero(&self, b: &mut Buf) -> Result<()>;

    // --- products
    /// `alpha · a @ b` into a new buffer of type `out`.
    fn matmul(&self, a: Mat, b: Mat, alpha: f32, out: Dt) -> Result<Buf>;
    /// `dst[off..] += alpha · a @ b` (`dst` row-major `(m, n)` from element `off`).
    fn matmul_acc(&self, dst: &mut Buf, off: usize, a: Mat, b: Mat, alpha: f32) -> Result<()>;

    // --- element-wise and row passes
    /// RMSNorm of the rows of `x` (rows, w.len()): `(y, rstd)`, rstd f32 per row.
    fn rms_norm(&self, x: &Buf, w: &Buf, eps: f32) -> Result<(Buf, Buf)>;
    /// `dx (+)= ` RMSNorm's input gradient for the output gradient `dy`.
    fn rms_norm_bwd(
        &self,
        x: &Buf,
        w: &Buf,
        rstd: &Buf,
        dy: &Buf,
        dx: &mut Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// Rotates the q and k heads of the fused `qkv` rows in place (`inverse`: the backward).
    fn rope(&self, qkv: &mut Buf, lay: &Layout, inverse: bool) -> Result<()>;
    /// `silu(gate) · up` of `[gate | up]` rows (rows, 2 · inter) → (rows, inter).
    fn swiglu(&self, gu: &Buf, inter: usize) -> Result<Buf>;
    /// `[d gate | d up]` for the output gradient `dy` (rows, inter).
    fn swiglu_bwd(&self, gu: &Buf, dy: &Buf, inter: usize) -> Result<Buf>;
    /// LoRA dropout: elements dropped by [`dropout::keep`] with `key`, the rest scaled.
    fn dropout(&self, x: &Buf, p: f32, key: u64) -> Result<Buf>;
    /// `y += x`.
    fn add(&self, y: &mut Buf, x: &Buf) -> Result<()>;
    /// Rows `idx` of `src` (·, width) → (idx.len(), width).
    fn gather_rows(&self, src: &Buf, idx: &Buf, width: usize) -> Result<Buf>;
    /// `dst[idx[i]] = src[i]` for rows of `width`.
    fn scatter_rows(&self, dst: &mut Buf, idx: &Buf, src: &Buf, width: usize) -> Result<()>;

    // --- attention
    /// The batch description RoPE and attention use.
    fn layout(
        &self,
        segments: Vec<(usize, usize)>,
        past: Vec<usize>,
        window: usize,
        heads: Heads,
        rope: RopeSpec,
    ) -> Result<Layout>;
    /// Causal attention of the (RoPE'd) fused `qkv` rows → `(out (rows, q · dim), lse)`.
    /// With `caches` (one per segment) the segment's keys and values are appended to its
    /// cache for layer `layer` first and its queries see all of the cache.
    fn attention(
        &self,
        qkv: &Buf,
        lay: &Layout,
        caches: Option<&mut [&mut KvCache]>,
        layer: usize,
    ) -> Result<(Buf, Option<Buf>)>;
    /// d qkv (of the RoPE'd q and k) for the output gradient `dout`.
    fn attention_bwd(
        &self,
        qkv: &Buf,
        out: &Buf,
        lse: Option<&Buf>,
        dout: &Buf,
        lay: &Layout,
    ) -> Result<Buf>;

    // --- loss, reductions, optimizer
    /// Cross-entropy of the rows `h` (rows, hidden) against `targets` (i32, rows) through
    /// the output matrix `w` (vocab, hidden), chunk by chunk (the logits never exist all at
    /// once): adds Σ CE to `loss[0]` (an f64 buffer) and, with `grad_scale`, returns
    /// `d (grad_scale · Σ CE) / d h`.
    fn cross_entropy(
        &self,
        h: &Buf,
        w: &Buf,
        targets: &Buf,
        grad_scale: Option<f32>,
        loss: &mut Buf,
    ) -> Result<Option<Buf>>;
    /// `out[idx] += Σ x` (or `Σ x²`), out an f64 buffer.
    fn sum_into(&self, x: &Buf, square: bool, out: &mut Buf, idx: usize) -> Result<()>;
    /// AdamW with unscaling and clipping by `sqrt(norm_sq.0[norm_sq.1])` (element of an f64
    /// buffer holding Σ g² of the raw gradients); writes 0 to `status[0]` (i32), or 1 and
    /// changes nothing when that norm is not finite.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        p: &mut Buf,
        g: &Buf,
        m: &mut Buf,
        v: &mut Buf,
        step: AdamWStep,
        norm_sq: (&Buf, usize),
        status: &mut Buf,
    ) -> Result<()>;

    // --- data-parallel collectives of the device (NCCL); the host links otherwise
    /// A unique id for a new collective group (asked of rank 0), `None` without one.
    fn collective_id(&self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
    /// Joins the collective group `id` as `rank` of `size`.
    fn collective_join(&self, _id: &[u8], _rank: usize, _size: usize) -> Result<()> {
        Err(Error::Compute(
            "internal: this backend has no collective".into(),
        ))
    }
    /// Sums `b` over the collective group, in place.
    fn collective_sum(&self, _b: &mut Buf) -> Result<()> {
        Err(Error::Compute(
            "internal: this backend has no collective".into(),
        ))
    }

    /// Free and total device memory in bytes (`None` on the CPU).
    fn memory(&self) -> Result<Option<(usize, usize)>> {
        Ok(None)
    }
}
