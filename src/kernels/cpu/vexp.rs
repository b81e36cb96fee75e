//! `exp` over f32 slices, 16 lanes at a time with AVX-512 (the same arithmetic one value at a
//! time elsewhere).
//!
//! Why our own: the fused softmax and SwiGLU called libm's scalar `expf` per element,
//! 8 % of a prefill profile. This is Cephes' `expf` scheme — `2^n · e^r` with `n` the
//! nearest integer to `x / ln 2`, `r` in [−ln 2 / 2, ln 2 / 2], `e^r` by its degree-7
//! polynomial — which stays within 2 ulp of the correctly rounded value over the range
//! where the result is a normal float (checked against f64 below), as torch's
//! vectorized (Sleef) `exp` does. Inputs below −87.3 give the smallest normal float's
//! neighbourhood (about 1e-38) instead of subnormals or 0; NaN stays NaN.

/// `xs[i] = exp(xs[i])`.
pub fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        unsafe { exp_avx512(xs) };
        return;
    }
    // Not libm's `exp`: the same clamped scheme as the vector code, so a CPU without AVX-512
    // gives the same answers at the edges (finite for large inputs, no subnormals).
    for x in xs.iter_mut() {
        *x = exp_scalar(*x);
    }
}

const HI: f32 = 88.376_26;
const LO: f32 = -87.336_55;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// The same arithmetic as the vector code, one value at a time (for the tail and tests).
fn exp_scalar(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let x = x.clamp(LO, HI);
    let n = (x * LOG2E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = P[0];
    for c in &P[1..] {
        p = p * r + c;
    }
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(xs: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = xs.chunks_exact_mut(16);
    for c in &mut chunks {
        let x0 = _mm512_loadu_ps(c.as_ptr());
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x0, x0);
        let x = _mm512_min_ps(_mm512_max_ps(x0, _mm512_set1_ps(LO)), _mm512_set1_ps(HI));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(P[0]);
        for &coef in &P[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(coef));
        }
        let rr = _mm512_mul_ps(r, r);
        let e = _mm512_add_ps(_mm512_fmadd_ps(p, rr, r), _mm512_set1_ps(1.0));
        let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        )));
        let y = _mm512_mask_blend_ps(nan, _mm512_mul_ps(e, pow2), x0);
        _mm512_storeu_ps(c.as_mut_ptr(), y);
    }
    for x in chunks.into_remainder() {
        *x = exp_scalar(*x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        let ulp = (f32::from_bits(b32.to_bits() + 1) - b32).abs() as f64;
        (a as f64 - b).abs() / ulp
    }

    #[test]
    fn within_two_ulp_of_exp_where_the_result_is_normal() {
        let mut xs: Vec<f32> = (0..200_001)
            .map(|i| LO + (HI - LO) * i as f32 / 200_000.0)
            .collect();
        xs.extend([0.0, -0.0, 1.0, -1.0, 1e-8, -1e-8, 0.5, -0.346_573_6]);
        let want: Vec<f64> = xs.iter().map(|&x| (x as f64).exp()).collect();
        let mut got = xs.clone();
        exp_in_place(&mut got);
        let scalar: Vec<f32> = xs.iter().map(|&x| exp_scalar(x)).collect();
        for ((&x, (&g, &s)), &w) in xs.iter().zip(got.iter().zip(&scalar)).zip(&want) {
            if w < f32::MIN_POSITIVE as f64 * 2.0 {
                continue;
            }
            assert!(
                ulps(g, w) <= 2.0,
                "exp({x}) = {g}, want {w} ({} ulp)",
                ulps(g, w)
            );
            assert!(ulps(s, w) <= 2.0, "scalar exp({x}) = {s}, want {w}");
        }
    }

    #[test]
    fn edges() {
        let mut xs = vec![
            f32::NAN,
            f32::NEG_INFINITY,
            -1000.0,
            1000.0,
            f32::INFINITY,
            0.0,
        ];
        xs.extend(std::iter::repeat_n(0.0, 20)); // the vector path too
        let mut a = xs.clone();
        exp_in_place(&mut a);
        // vector path: the first 16 lanes
        assert!(a[0].is_nan());
        assert!(a[1] >= 0.0 && a[1] < 1e-37 && a[2] < 1e-37);
        assert!(a[3] > 2e38 && a[3].is_finite() && a[4] > 2e38 && a[4].is_finite());
        assert_eq!(a[5], 1.0);
        // scalar tail: the same answers
        let tail = [f32::NAN, -1000.0, 1000.0, 0.0];
        let t: Vec<f32> = tail.iter().map(|&x| exp_scalar(x)).collect();
        assert!(t[0].is_nan() && t[1] < 1e-37 && t[2] > 2e38 && t[2].is_finite() && t[3] == 1.0);
    }
}
