//! Matrix products on the CPU in f32: the `gemm` crate called directly, writing into
//! fresh memory or accumulating into the destination, and our own kernel for `x @ w.T` with
//! a few rows of `x` (decoding: one row per conversation).
//!
//! Why our own kernel: the `gemm` crate (candle's CPU matmul) packs the weight matrix into
//! panels on every call. For a handful of rows that packing reads and writes the whole
//! weight once more, so a decoding step moved the weights through memory about twice (a
//! profile of batched decoding: ~50 % of the time in the packing routines). Here every
//! weight row is read once and dotted with all rows of `x` while it is in cache; output
//! columns are split across threads.
//!
//! For more rows `gemm` is called with the destination as is: candle's matmul zero-fills
//! its output first; written into fresh capacity the output is touched once (a prefill
//! profile had ~4 % in that memset), and accumulating needs no separate add.

use rayon::prelude::*;

/// Rows of `x` up to which [`product`] uses the row kernel for `x @ w.T`.
pub const MAX_ROWS: usize = 16;
const LANES: usize = 16;
/// Output columns per parallel task (a 3072-wide weight row is 12 KiB).
const COLS_PER_TASK: usize = 64;

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
    let ((m, k), (_, n)) = (a.used().0, b.used().0);
    if m <= MAX_ROWS && m > 0 && !a.t && b.t && a.data.len() >= m * k {
        let mut y = skinny_xwt(&a.data[..m * k], b.data, m, k, n);
        if beta != 1.0 {
            y.iter_mut().for_each(|v| *v *= beta);
        }
        return y;
    }
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

/// `x` (m ≤ [`MAX_ROWS`], k) @ `w` (n, k)ᵀ by the row kernel.
fn skinny_xwt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    // Computed transposed, (n, m): each task owns a contiguous block of output columns.
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(COLS_PER_TASK * m)
        .enumerate()
        .for_each(|(t, out)| {
            let j0 = t * COLS_PER_TASK;
            let rows = out.len() / m;
            dot_rows(&w[j0 * k..(j0 + rows) * k], x, m, k, out);
        });
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for (j, col) in yt.chunks(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            y[i * n + j] = v;
        }
    }
    y
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

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, bt: bool) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for c in 0..k {
                    let bv = if bt { b[j * k + c] } else { b[c * n + j] };
                    y[i * n + j] += a[i * k + c] as f64 * bv as f64;
                }
            }
        }
        y
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn products_equal_the_definition() {
        for (m, k, n) in [
            (1, 64, 10),
            (4, 100, 130),
            (16, 37, 3),
            (3, 3072, 200),
            (17, 40, 9),
            (300, 96, 130),
        ] {
            let (x, w) = (rand(m * k, 1), rand(n * k, 2));
            let got = product(Mat::new(&x, m, k), Mat::new(&w, n, k).t(), 0.5);
            let want = naive(&x, &w, m, k, n, true);
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (*a as f64 - 0.5 * b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{m}x{k}x{n}"
                );
            }
            let w2 = rand(k * n, 3);
            let mut acc = vec![1f32; m * n];
            add_product(&mut acc, Mat::new(&x, m, k), Mat::new(&w2, k, n), 2.0);
            let want = naive(&x, &w2, m, k, n, false);
            for (a, b) in acc.iter().zip(&want) {
                assert!(
                    (*a as f64 - 1.0 - 2.0 * b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{m}x{k}x{n}"
                );
            }
        }
    }
}
