//! `x @ w.T` on the CPU without a graph: for a few rows of `x` (decoding: one row per
//! conversation) our own kernel, for more the `gemm` crate called directly.
//!
//! Why our own kernel: candle's CPU matmul (the `gemm` crate) packs the weight matrix into
//! panels on every call. For a handful of rows that packing reads and writes the whole
//! weight once more, so a decoding step moved the weights through memory about twice (a
//! profile of batched decoding: ~50 % of the time in the packing routines). Here every
//! weight row is read once, straight from the safetensors-backed tensor, and dotted with
//! all rows of `x` while it is in cache; output columns are split across threads.
//!
//! For more rows (prefill) `gemm` is what candle would call too, but candle zero-fills the
//! output first; written into fresh capacity the output is touched once (a prefill profile
//! had ~4 % in that memset).

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

/// Rows of `x` up to which [`linear`] uses this kernel.
pub const MAX_ROWS: usize = 16;
const LANES: usize = 16;
/// Output columns per parallel task (a 3072-wide weight row is 12 KiB).
const COLS_PER_TASK: usize = 64;

/// `x @ w.T` for `x` (m, k) and `w` (n, k), both f32, contiguous and on the CPU: the
/// row kernel up to [`MAX_ROWS`] rows, `gemm` above; `None` when neither applies (the
/// caller uses candle's).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (Ok((m, k)), Ok((n, k2))) = (x.dims2(), w.dims2()) else {
        return Ok(None);
    };
    if m == 0
        || k != k2
        || !matches!(x.device(), Device::Cpu)
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || !x.is_contiguous()
        || !w.is_contiguous()
    {
        return Ok(None);
    }
    let compute = |xv: &[f32], wv: &[f32]| -> Result<Tensor> {
        if m > MAX_ROWS {
            return Tensor::from_vec(gemm_xwt(xv, wv, m, k, n), (m, n), &Device::Cpu);
        }
        // Computed transposed, (n, m): each task owns a contiguous block of output columns.
        let mut yt = vec![0f32; n * m];
        yt.par_chunks_mut(COLS_PER_TASK * m)
            .enumerate()
            .for_each(|(t, out)| {
                let j0 = t * COLS_PER_TASK;
                let rows = out.len() / m;
                dot_rows(&wv[j0 * k..(j0 + rows) * k], xv, m, k, out);
            });
        Tensor::from_vec(yt, (n, m), &Device::Cpu)?
            .t()?
            .contiguous()
    };
    with_cpu_f32(x, w, compute).transpose()
}

/// `x` (m, k) @ `w` (n, k)ᵀ with `gemm` on candle's thread count, into new memory.
pub(crate) fn gemm_xwt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    product(Mat::new(x, m, k), Mat::new(w, n, k).t(), 1.0)
}

/// `x` (m, k) @ `w` (k, n) with `gemm`, into new memory.
pub(crate) fn gemm_xw(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    product(Mat::new(x, m, k), Mat::new(w, k, n), 1.0)
}

/// A row-major matrix `(rows, cols)` in `data`, used as is or transposed in [`product`].
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub t: bool,
}

impl<'a> Mat<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(
            data.len() >= rows * cols,
            "{} values for {rows} x {cols}",
            data.len()
        );
        Self {
            data,
            rows,
            cols,
            t: false,
        }
    }

    /// The transpose (no copy: only the strides change).
    pub fn t(self) -> Self {
        Self { t: !self.t, ..self }
    }

    /// (rows, cols) as used, and the (row, column) strides.
    fn used(&self) -> ((usize, usize), (usize, usize)) {
        if self.t {
            ((self.cols, self.rows), (1, self.cols))
        } else {
            ((self.rows, self.cols), (self.cols, 1))
        }
    }
}

/// `beta · a @ b` into new memory, on candle's thread count.
pub(crate) fn product(a: Mat, b: Mat, beta: f32) -> Vec<f32> {
    let ((m, _), (_, n)) = (a.used().0, b.used().0);
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: `y` has capacity for the m·n values `product_into` writes (without
    // accumulating, nothing is read first).
    unsafe {
        product_into(y.as_mut_ptr(), m * n, false, a, b, beta);
        y.set_len(m * n);
    }
    y
}

/// `dst += beta · a @ b`, `dst` row-major (a's rows, b's columns).
pub(crate) fn add_product(dst: &mut [f32], a: Mat, b: Mat, beta: f32) {
    // SAFETY: `dst` is a live, initialised slice of the length passed.
    unsafe { product_into(dst.as_mut_ptr(), dst.len(), true, a, b, beta) }
}

/// # Safety
/// `dst` must be valid for writes of `len` values (and reads, with `accumulate`).
unsafe fn product_into(dst: *mut f32, len: usize, accumulate: bool, a: Mat, b: Mat, beta: f32) {
    let (((m, k), sa), ((k2, n), sb)) = (a.used(), b.used());
    assert!(
        k == k2 && len >= m * n,
        "product: {m}x{k} @ {k2}x{n} into {len}"
    );
    if m * n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            std::ptr::write_bytes(dst, 0, m * n);
        }
        return;
    }
    // SAFETY: the shapes and strides stay inside `a.data`, `b.data` (asserted in
    // `Mat::new`) and `dst` (asserted above).
    mm(
        (m, n, k),
        dst,
        (n, 1),
        accumulate,
        a.data.as_ptr(),
        sa,
        b.data.as_ptr(),
        sb,
        beta,
        candle_core::utils::get_num_threads(),
    )
}

/// `dst (m × n) (+)= beta · lhs (m × k) · rhs (k × n)` through `gemm`, each matrix given by
/// its (row, column) strides, on `threads` threads (1: the calling thread only).
///
/// # Safety
/// Every pointer with its strides must stay inside its buffer for the given shape.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn mm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
    threads: usize,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        },
    )
}

/// Runs `f` on the data of two contiguous f32 CPU tensors; `None` when either is not one.
pub(crate) fn with_cpu_f32<R>(
    a: &Tensor,
    b: &Tensor,
    f: impl FnOnce(&[f32], &[f32]) -> R,
) -> Option<R> {
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(va)), Storage::Cpu(CpuStorage::F32(vb))) = (&*sa, &*sb)
    else {
        return None;
    };
    let ((a0, a1), (b0, b1)) = (la.contiguous_offsets()?, lb.contiguous_offsets()?);
    Some(f(&va[a0..a1], &vb[b0..b1]))
}

/// `x @ w` for `x` (m, k) and `w` (k, n), f32, contiguous, on the CPU, with more than
/// [`MAX_ROWS`] rows, by `gemm` into fresh memory; candle's matmul otherwise (the backward
/// of a frozen linear: `dy @ w`).
pub fn matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let fast = matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.is_contiguous()
        && w.is_contiguous()
        && x.dims2().is_ok_and(|(m, _)| m > MAX_ROWS);
    if !fast {
        return x.matmul(w);
    }
    let ((m, k), (k2, n)) = (x.dims2()?, w.dims2()?);
    if k != k2 {
        return x.matmul(w); // candle's shape error
    }
    match with_cpu_f32(x, w, |xv, wv| gemm_xw(xv, wv, m, k, n)) {
        Some(y) => Tensor::from_vec(y, (m, n), &Device::Cpu),
        None => x.matmul(w),
    }
}

/// `x @ w.T` without a graph: on the CPU in f32 [`linear`]'s paths, candle's matmul
/// otherwise.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    match linear(x, w)? {
        Some(y) => Ok(y),
        None => x.matmul(&w.t()?),
    }
}

/// For every weight row j of `w` (rows × k): `out[j * m + i] = w_j · x_i`.
fn dot_rows(w: &[f32], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function was compiled for.
            return unsafe { dot_rows_avx512(w, x, m, k, out) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { dot_rows_avx2(w, x, m, k, out) };
        }
    }
    by_rows(w, x, m, k, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_rows_avx512(w: &[f32], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    by_rows(w, x, m, k, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2(w: &[f32], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    by_rows(w, x, m, k, out)
}

/// Picks the body compiled for `m` rows (a compile-time count keeps the accumulators in
/// registers).
#[inline(always)]
fn by_rows(w: &[f32], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    macro_rules! dispatch {
        ($($n:literal)*) => {
            match m {
                $($n => body::<$n>(w, x, k, out),)*
                _ => unreachable!("m <= MAX_ROWS is checked by the caller"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
}

/// The portable body, compiled once per instruction set above: lane-wise partial sums
/// that the compiler turns into vector registers.
#[inline(always)]
fn body<const M: usize>(w: &[f32], x: &[f32], k: usize, out: &mut [f32]) {
    let full = k / LANES * LANES;
    for (j, wrow) in w.chunks_exact(k).enumerate() {
        let mut acc = [[0f32; LANES]; M];
        for c in (0..full).step_by(LANES) {
            let wc: &[f32; LANES] = wrow[c..c + LANES].try_into().expect("LANES floats");
            for (i, a) in acc.iter_mut().enumerate() {
                let xc: &[f32; LANES] = x[i * k + c..i * k + c + LANES]
                    .try_into()
                    .expect("LANES floats");
                for l in 0..LANES {
                    a[l] += wc[l] * xc[l];
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let mut s: f32 = a.iter().sum();
            for c in full..k {
                s += wrow[c] * x[i * k + c];
            }
            out[j * M + i] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_candle_matmul() {
        let dev = Device::Cpu;
        for (m, k, n) in [
            (1, 64, 10),
            (4, 100, 130),
            (16, 37, 3),
            (3, 3072, 200),
            (17, 40, 9),
            (300, 96, 130),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let got = linear(&x, &w).unwrap().expect("applies");
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let diff = crate::model::ops::tests::max_diff(&got, &want);
            let scale = crate::model::ops::tests::max_abs(&want);
            assert!(diff <= 1e-5 * scale.max(1.0), "{m}x{k}x{n}: {diff}");
        }
    }

    #[test]
    fn matmul_equals_candle() {
        let dev = Device::Cpu;
        for (m, k, n) in [(3, 8, 5), (40, 96, 130)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (k, n), &dev).unwrap();
            let got = matmul(&x, &w).unwrap().to_vec2::<f32>().unwrap();
            let want = x.matmul(&w).unwrap().to_vec2::<f32>().unwrap();
            for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{m}x{k}x{n}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((8, 4), DType::F32, &dev).unwrap();
        let f64x = Tensor::zeros((2, 4), DType::F64, &dev).unwrap();
        assert!(linear(&f64x, &w).unwrap().is_none());
        let strided = Tensor::zeros((4, 2), DType::F32, &dev)
            .unwrap()
            .t()
            .unwrap();
        assert!(linear(&strided, &w).unwrap().is_none());
    }
}
