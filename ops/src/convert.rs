//! bf16 ⇄ f32 with round-to-nearest-even (NaN stays NaN).
use half::bf16;

pub fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(s);
    }
}

pub fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Rounds an f32 to the nearest bf16 and back (what storing in bf16 does to a value).
pub fn round_to_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_to_nearest_even() {
        let one = 1.0f32;
        let ulp = 2f32.powi(-7); // bf16 spacing at 1.0
        assert_eq!(round_to_bf16(one + ulp / 2.0), one, "tie goes to even (1.0)");
        assert_eq!(round_to_bf16(one + 3.0 * ulp / 2.0), one + 2.0 * ulp, "tie goes to even (1+2ulp)");
        assert_eq!(round_to_bf16(one + ulp / 2.0 + 2f32.powi(-20)), one + ulp, "above the tie rounds up");
        assert_eq!(round_to_bf16(-(one + ulp / 2.0)), -one);
        assert!(round_to_bf16(f32::NAN).is_nan());
        assert_eq!(round_to_bf16(f32::INFINITY), f32::INFINITY);
        assert_eq!(round_to_bf16(f32::MAX), f32::INFINITY, "above the largest bf16 rounds to inf");
        let src = [0.1f32, -3.5, 1e-30];
        let mut b = [bf16::ZERO; 3];
        let mut back = [0.0f32; 3];
        f32_to_bf16(&src, &mut b);
        bf16_to_f32(&b, &mut back);
        assert_eq!(back[1], -3.5);
        assert_eq!(b[0].to_bits(), 0x3dcd, "0.1 = 0x3dcccccd rounds up to 0x3dcd");
    }
}
