//! GELU and its derivative in f32 arithmetic, for f32 tensors on the CPU: branch-free code that
//! the compiler vectorises (the f64 path calls libm's erf once per element and runs scalar; on the
//! `study` model GELU and its derivative took 6% of a step). Accuracy, checked against the f64
//! form by the tests below: within 8 ulps (the worst on their grid: 6.1 for GELU, 6.7 for GELU' in
//! ulps of its larger term), also in the negative tail, where x Phi(x) is small and a plain
//! `1 + erf` would cancel; values under 1e-36 in magnitude (x below about -13.2) may come
//! out as 0. NaN in gives NaN out, as in f64; +-inf as in f64.
//!
//! Phi(x) = 1 - Q(x) for x >= 0 and Q(-x) for x < 0, with the upper tail
//! Q(a) = erfc(a / sqrt 2) / 2 by Numerical Recipes' `erfcc` (a Chebyshev fit of
//! erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), fractional error under 1.2e-7 for all z),
//! and exp(-a^2 / 2) split as exp(-hi) exp(-lo), hi exact, so that the tail's relative accuracy
//! does not hang on the rounding of a^2.

use rayon::prelude::*;

/// 1 / sqrt(2 pi)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// Past this |x| the tail Q(|x|) is below f32's smallest normal: Phi is 0 or 1 and phi is 0.
const TAIL_END: f32 = 14.0;

/// e^x in f32 (Cephes' expf: x = n ln 2 + r with |r| <= ln 2 / 2, a degree-6 polynomial in r,
/// 2^n through the exponent bits), within 2 ulp; 0 below -87 (where e^x leaves the normals).
#[inline(always)]
fn exp(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer (ties to even), which then sits in the low bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let shifted = xc * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    let er = p * r * r + r + 1.0;
    // n in [-126, 127]: 2^n is a normal number.
    let two_n = f32::from_bits(((shifted.to_bits() as i32 - ROUND.to_bits() as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        er * two_n
    }
}

/// (Phi(x), phi(x) when `density`, else 0): the normal CDF and density.
// The erfcc coefficients as published (f32 rounds two of them).
#[allow(clippy::excessive_precision)]
#[inline(always)]
fn normal(x: f32, density: bool) -> (f32, f32) {
    // |x| capped, so that inf and NaN do not make NaN here (the callers multiply by x, which
    // carries them through).
    let a = x.abs().min(TAIL_END);
    // a^2 / 2 = hi + lo: `ah` keeps 12 significant bits, so ah^2 / 2 is exact.
    let ah = f32::from_bits(a.to_bits() & 0xFFFF_F000);
    let hi = 0.5 * ah * ah;
    let lo = 0.5 * (a - ah) * (a + ah);
    let e_hi = exp(-hi);
    let t = 1.0 / (1.0 + 0.5 * std::f32::consts::FRAC_1_SQRT_2 * a);
    let p = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06 + t * (0.278_868_07 + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let q = 0.5 * t * e_hi * exp(p - lo);
    let cdf = if x < 0.0 { q } else { 1.0 - q };
    let pdf = if density { FRAC_1_SQRT_2PI * e_hi * exp(-lo) } else { 0.0 };
    (cdf, pdf)
}

/// GELU(x) = x Phi(x).
#[inline(always)]
fn gelu(x: f32) -> f32 {
    x * normal(x, false).0
}

/// GELU'(x) = Phi(x) + x phi(x).
#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    let (cdf, pdf) = normal(x, true);
    cdf + x * pdf
}

/// Values per parallel piece: GELU costs about 2 ns a value on one core, so a piece of 4,096
/// (8 us) outweighs handing it to another thread, and the deep levels' maps (16,384 values at
/// 64 channels of 4 x 4, batch 16) still split across threads, where the memory-bound ops'
/// `CHUNK` keeps them whole. Values do not depend on the split.
const PIECE: usize = 4096;

/// y = GELU(x), element by element, in parallel pieces.
pub(super) fn forward(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(PIECE).zip(x.par_chunks(PIECE)).for_each(|(y, x)| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { forward_avx2(x, y) };
        }
        forward_piece(x, y)
    });
}

/// dx = dy GELU'(x), element by element, in parallel pieces.
pub(super) fn backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    dx.par_chunks_mut(PIECE).zip(x.par_chunks(PIECE).zip(dy.par_chunks(PIECE))).for_each(|(dx, (x, dy))| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { backward_avx2(x, dy, dx) };
        }
        backward_piece(x, dy, dx)
    });
}

// The pieces compiled twice: for the baseline (SSE2, 4 lanes) and for AVX2 (8 lanes) where the
// CPU has it. The same operations in the same order either way (Rust never contracts a * b + c
// into an FMA), so the results are the same on both.

// Plain `for` loops: an iterator adapter's `fold` is a function of its own, which would be
// compiled once, for the baseline, and called from both.

#[inline(always)]
fn forward_piece(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = gelu(x);
    }
}

#[inline(always)]
fn backward_piece(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
        *dx = g * gelu_grad(x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn forward_avx2(x: &[f32], y: &mut [f32]) {
    forward_piece(x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn backward_avx2(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    backward_piece(x, dy, dx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: f64 = 1e-36;

    // Phi through erfc, which keeps its relative accuracy in the negative tail (1 + erf cancels).
    fn cdf64(x: f64) -> f64 {
        0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
    }
    fn gelu64(x: f64) -> f64 {
        x * cdf64(x)
    }
    fn gelu_grad64(x: f64) -> f64 {
        cdf64(x) + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
    }

    /// |got - want| in units of f32's spacing at `want` (its ulp), or 0 where both are under
    /// TINY in magnitude (the f32 forms flush there).
    fn ulps(got: f32, want: f64) -> f64 {
        if want.abs() < TINY && (got as f64).abs() < TINY {
            return 0.0;
        }
        let ulp = 2f64.powi(want.abs().log2().floor() as i32 - 23);
        (got as f64 - want).abs() / ulp
    }

    /// The largest [`ulps`] error of `f` over a grid, measured at `scale(x)` (at least |want|).
    fn worst(f: fn(f32) -> f32, f64_form: fn(f64) -> f64, scale: fn(f64) -> f64) -> (f64, f32) {
        let mut worst = (0.0, 0.0);
        // Every 2^-10 step over [-16, 16], and every value in [-2^-10, 2^-10] on a coarser grid.
        let grid = (-16 * 1024..=16 * 1024).map(|i| i as f32 / 1024.0).chain((-1000..=1000).map(|i| i as f32 * 1e-6));
        for x in grid.chain([1e-30, -1e-30, 0.3141, -5.4321, -9.87, 13.9, -13.99, 14.5, -14.5]) {
            let want = f64_form(x as f64);
            let e = ulps(f(x), want) * want.abs() / scale(x as f64).max(want.abs());
            if e > worst.0 {
                worst = (e, x);
            }
        }
        worst
    }

    #[test]
    fn gelu_is_within_8_ulps_of_the_f64_form() {
        let (e, x) = worst(gelu, gelu64, |_| 0.0);
        assert!(e <= 8.0, "GELU is {e} ulp off at x = {x}");
    }

    #[test]
    fn gelu_grad_is_within_8_ulps_of_the_f64_form() {
        // In ulps of the larger of its two terms: near x = -0.75 they cancel to GELU' = 0.
        let (e, x) = worst(gelu_grad, gelu_grad64, |x| cdf64(x).max((x * (-0.5 * x * x).exp()).abs() * 0.4));
        assert!(e <= 8.0, "GELU' is {e} ulp off at x = {x}");
    }

    #[test]
    fn exp_is_within_two_ulps_and_flushes_below_the_normals() {
        for i in -87 * 256..88 * 256 {
            let x = i as f32 / 256.0 + 1.0 / 512.0;
            let e = ulps(exp(x), (x as f64).exp());
            assert!(e <= 2.0, "exp is {e} ulp off at x = {x}");
        }
        assert_eq!(exp(-88.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn the_wide_pieces_give_the_scalar_forms_bits() {
        let x: Vec<f32> = (0..3 * PIECE + 5).map(|i| (i as f32 * 0.618_034).sin() * 9.0).collect();
        let dy: Vec<f32> = x.iter().map(|v| 1.0 - 0.25 * v).collect();
        let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        forward(&x, &mut y);
        backward(&x, &dy, &mut dx);
        for i in 0..x.len() {
            assert_eq!(y[i].to_bits(), gelu(x[i]).to_bits(), "GELU at x = {}", x[i]);
            assert_eq!(dx[i].to_bits(), (dy[i] * gelu_grad(x[i])).to_bits(), "GELU' at x = {}", x[i]);
        }
    }

    #[test]
    fn non_finite_inputs_behave_as_in_f64() {
        assert!(gelu(f32::NAN).is_nan() && gelu_grad(f32::NAN).is_nan());
        assert_eq!(gelu(f32::INFINITY), f32::INFINITY);
        assert_eq!(gelu_grad(40.0), 1.0);
        assert_eq!(gelu(-40.0), 0.0);
        assert_eq!(gelu_grad(-40.0), 0.0);
        // -inf * Phi(-inf) = -inf * 0, NaN, as the f64 form gives.
        assert_eq!(gelu(f32::NEG_INFINITY).is_nan(), gelu64(f64::NEG_INFINITY).is_nan());
    }
}
