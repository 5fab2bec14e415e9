//! The exact slow path: a uniform U in [0, 1) whose binary digits are drawn
//! only as far as a comparison with exp(−a/b) needs them.
//!
//! The fast paths in `noise` decide almost every comparison from the first
//! 64 digits of U and an f64 estimate. When the estimate is too close to
//! call, the same U goes on here, so the decision is the one exact
//! arithmetic would make, whatever the floating-point error was.

use num_bigint::BigUint;
use num_traits::One;

use super::NoiseRng;

/// A uniform in [0, 1) known to `digits` binary digits: U lies in
/// [prefix, prefix + 1) · 2^-digits.
pub(super) struct LazyUniform {
    prefix: BigUint,
    digits: u32,
}

impl LazyUniform {
    /// A uniform whose first 32 digits are `first`.
    pub(super) fn starting_with(first: u32) -> Self {
        Self {
            prefix: BigUint::from(first),
            digits: 32,
        }
    }

    #[cfg(test)]
    pub(super) fn fresh(rng: &mut NoiseRng) -> Self {
        Self::starting_with(rng.next_u64() as u32)
    }

    fn extend(&mut self, rng: &mut NoiseRng) {
        self.prefix = (std::mem::take(&mut self.prefix) << 64u32) + BigUint::from(rng.next_u64());
        self.digits += 64;
    }

    /// U < exp(−a/b), exactly; draws more digits of U while the two agree.
    /// Terminates with probability 1: each extra word cuts the chance of
    /// needing another by 2^64.
    pub(super) fn less_than_exp_neg(&mut self, rng: &mut NoiseRng, a: u128, b: u128) -> bool {
        debug_assert!(b > 0);
        if a == 0 {
            return true;
        }
        if self.digits < 96 {
            self.extend(rng);
        }
        loop {
            let (low, high) = exp_neg_bounds(a, b, self.digits);
            // U < (prefix + 1)·2^-digits ≤ low·2^-digits ≤ exp(−a/b).
            if self.prefix < low {
                return true;
            }
            if self.prefix >= high {
                return false;
            }
            self.extend(rng);
        }
    }
}

/// Integers (low, high) with low ≤ 2^p · exp(−a/b) ≤ high, and high − low
/// at most a few units.
///
/// exp(a/b) is summed as a positive Taylor series at a/(b·2^s) ≤ 1, with
/// every term rounded down for the lower bound and up for the upper, then
/// squared s times with the same rounding; the reciprocal swaps the bounds.
pub(super) fn exp_neg_bounds(a: u128, b: u128, p: u32) -> (BigUint, BigUint) {
    let a_big = BigUint::from(a);
    let mut halvings = 0u32;
    while a_big > BigUint::from(b) << halvings {
        halvings += 1;
    }
    let denominator = BigUint::from(b) << halvings;
    // Each squaring doubles the relative error; the guard bits absorb it.
    let w = p + 64 + 2 * halvings;
    let one = BigUint::one() << w;
    let (mut term_low, mut term_high) = (one.clone(), one.clone());
    let (mut sum_low, mut sum_high) = (one.clone(), one);
    let mut k = 1u32;
    loop {
        let divisor = &denominator * k;
        term_low = (&term_low * &a_big) / &divisor;
        term_high = div_ceil(&term_high * &a_big, &divisor);
        sum_low += &term_low;
        sum_high += &term_high;
        if term_high <= BigUint::one() {
            // With ratio g/(k+1) ≤ ½, the rest of the series is at most
            // this last term.
            sum_high += &term_high;
            break;
        }
        k += 1;
    }
    let unit = BigUint::one() << w;
    for _ in 0..halvings {
        sum_low = (&sum_low * &sum_low) >> w;
        sum_high = div_ceil(&sum_high * &sum_high, &unit);
    }
    let scale = BigUint::one() << (p + w);
    (&scale / &sum_high, div_ceil(scale, &sum_low))
}

fn div_ceil(num: BigUint, den: &BigUint) -> BigUint {
    let quotient = &num / den;
    if &quotient * den == num {
        quotient
    } else {
        quotient + 1u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_f64(x: &BigUint, p: u32) -> f64 {
        let bits = x.bits() as i32;
        let shift = (bits - 60).max(0) as u32;
        let top: u64 = (x >> shift).try_into().unwrap();
        top as f64 * 2f64.powi(shift as i32 - p as i32)
    }

    #[test]
    fn bounds_bracket_exp_tightly() {
        for (a, b) in [
            (0u128, 1u128),
            (1, 1),
            (1, 3),
            (7, 2),
            (123_456_789, 1_000_000),
            (2_000, 1),
            (1, 1 << 100),
            ((1 << 120) + 17, (1 << 115) + 3),
        ] {
            for p in [64, 128, 320] {
                let (low, high) = exp_neg_bounds(a, b, p);
                assert!(low <= high, "{a}/{b} at {p}");
                assert!(&high - &low <= BigUint::from(4u32), "{a}/{b} at {p}: loose");
                let expected = (-(a as f64 / b as f64)).exp();
                let got = to_f64(&high, p);
                // Relative agreement only where the bounds hold enough digits.
                if expected > 1e6 * 2f64.powi(-(p as i32)) {
                    assert!(
                        (got / expected - 1.0).abs() < 1e-12,
                        "{a}/{b}: {got} vs {expected}"
                    );
                }
            }
        }
    }

    #[test]
    fn more_precision_only_narrows() {
        // The bounds at 2p, halved, must lie inside those at p.
        for (a, b) in [(5u128, 7u128), (41, 3), (1 << 90, 3 << 80)] {
            let (low, high) = exp_neg_bounds(a, b, 100);
            let (low2, high2) = exp_neg_bounds(a, b, 200);
            assert!(
                low <= (&low2 >> 100u32) && (div_ceil(high2, &(BigUint::one() << 100u32))) <= high
            );
        }
    }

    #[test]
    fn comparison_frequency_matches_the_probability() {
        let mut rng = NoiseRng::insecure_from_seed(5);
        let n = 200_000;
        for (a, b) in [(1u128, 2u128), (3, 1), (1, 1_000)] {
            let p = (-(a as f64 / b as f64)).exp();
            let hits = (0..n)
                .filter(|_| LazyUniform::fresh(&mut rng).less_than_exp_neg(&mut rng, a, b))
                .count() as f64;
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                (hits / n as f64 - p).abs() < 5.0 * sd,
                "{a}/{b}: {hits} of {n}, p = {p}"
            );
        }
    }

    #[test]
    fn one_uniform_answers_a_threshold_consistently() {
        // U < exp(−k/t) must hold for every k up to some m and for none above.
        let mut rng = NoiseRng::insecure_from_seed(9);
        for _ in 0..200 {
            let mut u = LazyUniform::fresh(&mut rng);
            let answers: Vec<bool> = (0..40)
                .map(|k| u.less_than_exp_neg(&mut rng, k, 7))
                .collect();
            let first_false = answers.iter().position(|x| !x).unwrap_or(answers.len());
            assert!(answers[first_false..].iter().all(|x| !x), "{answers:?}");
        }
    }
}
