//! The scalar types the reference operators run on.
use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// f32 (what runs) or f64 (what finite-difference checks run).
pub trait Real:
    Copy
    + Send
    + Sync
    + Debug
    + Default
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + Sum
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    /// `exp` written as plain arithmetic, so that a loop over it vectorises (libm's `expf` is a
    /// call per element): f32 within 2 ulp of `exp` (see [`exp_f32_poly`]), f64 is `exp` itself.
    fn exp_vectorizable(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn powf(self, e: Self) -> Self;
    fn cos(self) -> Self;
    fn sin(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn is_finite(self) -> bool;
}

macro_rules! impl_real {
    ($t:ty, $exp_vectorizable:expr) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn exp_vectorizable(self) -> Self {
                $exp_vectorizable(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn powf(self, e: Self) -> Self {
                <$t>::powf(self, e)
            }
            #[inline(always)]
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            #[inline(always)]
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
        }
    };
}
impl_real!(f32, exp_f32_poly);
impl_real!(f64, f64::exp);

/// `e^x` in f32 without a libm call: `x = n·ln2 + r` with `|r| ≤ ln2/2` (ln2 in two parts so `r`
/// is exact), `e^r` by its Taylor series to degree 7 (truncation < 1e-8 relative, below half an
/// f32 ulp), then `2^n` put into the exponent bits. Below −87 it returns 0 (`e^x` is subnormal
/// there: what the softmax of a row would lose anyway); NaN stays NaN; above 88.3 (where `2^n` would
/// leave the exponent range) it saturates at `e^88.3` instead of overflowing to infinity.
#[inline(always)]
pub fn exp_f32_poly(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // ln 2 with the low 12 mantissa bits zero: n·LN2_HI is exact.
    const LN2_LO: f32 = 1.428_606_8e-6; // ln 2 − LN2_HI
                                        // Adding 1.5·2²³ rounds to the nearest integer n and leaves n in the low mantissa bits: no
                                        // `round` call and no float-to-int cast (both keep LLVM from vectorising a loop over this).
    const ROUNDER: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.3);
    let rounded = xc * LOG2E + ROUNDER;
    let n = rounded - ROUNDER;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // bits(rounded) = bits(ROUNDER) + n; the biased exponent n + 127 shifted into place is 2ⁿ.
    let scale = f32::from_bits(rounded.to_bits().wrapping_sub(ROUNDER.to_bits() - 127) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// Dot product with eight independent accumulators so that LLVM vectorises it.
#[inline]
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [T::ZERO; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = T::ZERO;
    for i in chunks * 8..a.len() {
        tail += a[i] * b[i];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `y += alpha * x`.
#[inline]
pub fn axpy<T: Real>(alpha: T, x: &[T], y: &mut [T]) {
    debug_assert_eq!(x.len(), y.len());
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_poly_is_within_2_ulp_of_exp_and_handles_the_edges() {
        // Every 97th f32 magnitude up to 87 (negative) and 88.3 (positive): ≈ 22 million values.
        let mut worst = 0.0f64;
        let mut check = |x: f32| {
            let want = (x as f64).exp() as f32;
            let ulp = f32::from_bits(want.to_bits() + 1) - want;
            worst = worst.max(((exp_f32_poly(x) - want) / ulp).abs() as f64);
        };
        (0..=87.0f32.to_bits()).step_by(97).for_each(|b| check(-f32::from_bits(b)));
        (0..=88.3f32.to_bits()).step_by(97).for_each(|b| check(f32::from_bits(b)));
        assert!(worst <= 2.0, "exp_f32_poly: {worst} ulp from exp");
        assert_eq!(exp_f32_poly(0.0), 1.0);
        assert_eq!(exp_f32_poly(-100.0), 0.0);
        assert_eq!(exp_f32_poly(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32_poly(f32::NAN).is_nan());
        assert!(exp_f32_poly(1000.0).is_finite());
    }
}
