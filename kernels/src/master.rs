//! f32 master weights stored as two 16-bit halves (cuda/adamw.cu keeps the same code): the
//! **high half** is the bf16 weight the model computes with (the f32 rounded to nearest, ties
//! away from zero), the **low half** the signed remainder `bits(master) − bits(high) << 16`,
//! which always fits an i16. Together they are the f32 master weight exactly, so mixed
//! precision keeps torch's f32-master semantics while the device holds 2 bytes per parameter
//! for the master instead of 4 (the bf16 copy a model needs anyway is the other half).
//!
//! Why ties away from zero and not bf16's usual ties to even: with ties to even both
//! remainders +2¹⁵ and −2¹⁵ occur, 2¹⁶ + 1 values that no 16 bits hold. The two roundings
//! differ only where the low 16 bits are exactly 0x8000.

use half::bf16;

/// The (high, low) halves of `x`. NaN becomes a quiet NaN with remainder 0 (so it stays NaN).
pub fn split(x: f32) -> (bf16, i16) {
    if x.is_nan() {
        return (bf16::NAN, 0);
    }
    let b = x.to_bits();
    // +0x8000 then truncate: round half away from zero on the magnitude's bits; cannot carry
    // out of 32 bits for a non-NaN (the largest magnitude's bits are 0x7f7fffff).
    let hi = (b.wrapping_add(0x8000) >> 16) as u16;
    let lo = b.wrapping_sub((hi as u32) << 16) as i32 as i16;
    (bf16::from_bits(hi), lo)
}

/// The f32 the halves stand for: `split(join(h, l)) == (h, l)` and `join(split(x)) == x`.
pub fn join(hi: bf16, lo: i16) -> f32 {
    f32::from_bits(((hi.to_bits() as u32) << 16).wrapping_add(lo as i32 as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_join_to_the_exact_f32_and_the_high_half_is_the_nearest_bf16() {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let mut xs: Vec<f32> = (0..200_000)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                f32::from_bits(s as u32)
            })
            .filter(|x| !x.is_nan())
            .collect();
        xs.extend([
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x3f80_8000), // a tie, even high half
            f32::from_bits(0x3f81_8000), // a tie, odd high half
            f32::from_bits(0xbf80_8000), // a negative tie
            f32::from_bits(0x3f7f_ffff), // rounds up into the next binade
            f32::from_bits(0x0000_0001), // the smallest subnormal
        ]);
        for x in xs {
            let (hi, lo) = split(x);
            assert_eq!(join(hi, lo).to_bits(), x.to_bits(), "{x:e}");
            let low = x.to_bits() & 0xffff;
            if low == 0x8000 {
                assert!(
                    hi.to_f32().abs() > x.abs(),
                    "{x:e}: a tie rounds away from zero"
                );
            } else if x.is_finite() && hi.is_finite() {
                assert_eq!(hi, bf16::from_f32(x), "{x:e}: the nearest bf16");
            }
        }
        let (hi, lo) = split(f32::NAN);
        assert!(hi.is_nan() && join(hi, lo).is_nan());
    }
}
