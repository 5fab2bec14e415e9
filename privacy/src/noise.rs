//! Exact discrete Gaussian noise drawn from a cryptographically secure RNG.
//!
//! opendp's exact samplers run at about 0.2 M samples/s, so noising one
//! 1.66 M-parameter update would take seconds of a core. This keeps the
//! algorithm (Canonne, Kamath and Steinke 2020, Algorithm 3: a discrete
//! Laplace proposal accepted with probability exp(−…)) but decides each
//! random comparison the way exact arithmetic would, fast:
//! - every event is "U < exp(−a/b)" for a uniform U and rationals a, b;
//! - the first 64 digits of U and an f64 estimate of exp settle it unless
//!   the two lie within a margin thousands of times the float error;
//! - only then does [`lazy::LazyUniform`] draw more digits of the same U and
//!   compare against bounds computed in big integers.
//!
//! So the output distribution is exactly CKS20's, with one 64-bit draw per
//! comparison instead of about twenty exact Bernoulli trials.
//! `tests::matches_opendp` checks it against opendp's sampler, and tests
//! that widen the margin push most comparisons through the slow path.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ring::rand::{SecureRandom, SystemRandom};

mod lazy;
use lazy::LazyUniform;

/// σ² is held as `num / 2^16`, rounded up: the noise is never smaller than
/// the σ asked for.
const SIGMA2_DEN_BITS: u32 = 16;

/// The largest σ this sampler accepts; it keeps every intermediate in `u128`.
pub const MAX_SIGMA: f64 = (1u64 << 20) as f64;

/// How far from an f64 estimate the true value may be before the fast path
/// defers to exact arithmetic. The estimates' own error is below 2^-50, so a
/// libm a thousand times worse than a conforming one still decides exactly.
const FAST_MARGIN: f64 = 1.0 / (1u64 << 40) as f64;

const TWO_POW_M32: f64 = 1.0 / 4_294_967_296.0;

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum NoiseError {
    #[error("noise scale sigma must be in (0, {MAX_SIGMA}], got {0}")]
    Sigma(f64),
    #[error("the operating system's random number generator failed")]
    Entropy,
}

/// ChaCha20 keyed from the operating system: the only source of noise.
///
/// Noise from a predictable generator protects nothing, so production code
/// builds this with [`NoiseRng::from_os`]; a fixed seed exists only for
/// reproducible tests and is named to say so.
pub struct NoiseRng {
    stream: ChaCha20Rng,
    /// Unused random bits, consumed from the low end.
    bits: u64,
    bits_left: u32,
    /// The unused low half of a word [`Self::uniform32`] split.
    spare_half: Option<u32>,
}

impl NoiseRng {
    pub fn from_os() -> Result<Self, NoiseError> {
        let mut seed = [0u8; 32];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| NoiseError::Entropy)?;
        Ok(Self::from_stream(ChaCha20Rng::from_seed(seed)))
    }

    /// Deterministic noise for tests. Never use it to protect real data.
    pub fn insecure_from_seed(seed: u64) -> Self {
        Self::from_stream(ChaCha20Rng::seed_from_u64(seed))
    }

    fn from_stream(stream: ChaCha20Rng) -> Self {
        Self {
            stream,
            bits: 0,
            bits_left: 0,
            spare_half: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.stream.next_u64()
    }

    fn bit(&mut self) -> bool {
        if self.bits_left == 0 {
            self.bits = self.next_u64();
            self.bits_left = 64;
        }
        let bit = self.bits & 1 == 1;
        self.bits >>= 1;
        self.bits_left -= 1;
        bit
    }

    /// The first 32 digits of a fresh uniform: half a ChaCha20 word. The
    /// fast paths below settle all but about one comparison in 2^31 with
    /// that many, so spending 64 would only double the generator's cost.
    fn uniform32(&mut self) -> u32 {
        if let Some(low) = self.spare_half.take() {
            return low;
        }
        let word = self.next_u64();
        self.spare_half = Some(word as u32);
        (word >> 32) as u32
    }

    /// True with probability exp(−a/b) exactly: U < exp(−a/b) for a fresh
    /// uniform U, settled by its first 32 digits unless they fall within
    /// `margin` of exp(−estimate), where `estimate` is a/b to within a
    /// relative 2^-50. `a` comes as √a, squared only on the slow path.
    fn bernoulli_exp(&mut self, sqrt_a: u64, b: u128, estimate: f64, margin: f64) -> bool {
        let first = self.uniform32();
        let p = (-estimate).exp();
        // U lies in [first, first + 1) / 2^32.
        let low = f64::from(first) * TWO_POW_M32;
        let high = (f64::from(first) + 1.0) * TWO_POW_M32;
        if high <= p - margin {
            true
        } else if low >= p + margin {
            false
        } else {
            let a = u128::from(sqrt_a) * u128::from(sqrt_a);
            LazyUniform::starting_with(first).less_than_exp_neg(self, a, b)
        }
    }

    /// m ≥ 0 with P(m ≥ k) = exp(−k/t): the largest k with U < exp(−k/t),
    /// that is ⌈−t·ln U⌉ − 1, from one uniform (CKS20's Algorithm 2 spends
    /// a uniform draw and a geometric run of Bernoulli trials on the same
    /// law). `None` when m would reach `limit`.
    fn geometric(&mut self, g: &DiscreteGaussian) -> Option<u64> {
        let first = self.uniform32();
        if first > 0 {
            // For U in the cell, |ln U − ln(mid)| ≤ 1/first; t·margin and
            // the margin cover the float error of ln and of the product.
            let mid = (f64::from(first) + 0.5) * TWO_POW_M32;
            let estimate = -g.t_f * mid.ln();
            let slack = g.t_f / f64::from(first) + g.slack;
            let (low, high) = (estimate - slack, estimate + slack);
            // Both are non-negative here, so truncation is floor.
            if low >= 0.0 && low as u64 == high as u64 {
                let m = low as u64;
                return (m < g.limit).then_some(m);
            }
        }
        // Too close to call: settle it on the same U, one threshold at a time.
        let t = u128::from(g.t);
        let limit = u128::from(g.limit);
        let mut u = LazyUniform::starting_with(first);
        let start = -g.t_f * ((f64::from(first) + 0.5) * TWO_POW_M32).ln();
        let mut k = (start.max(0.0) as u128).min(limit);
        if u.less_than_exp_neg(self, k, t) {
            while k + 1 < limit {
                if !u.less_than_exp_neg(self, k + 1, t) {
                    return Some(k as u64);
                }
                k += 1;
            }
            None
        } else {
            // U < exp(0) always holds, so this stops at k = 0 at the latest.
            while k > 0 {
                k -= 1;
                if u.less_than_exp_neg(self, k, t) {
                    break;
                }
            }
            Some(k as u64)
        }
    }
}

/// The discrete Gaussian N_Z(0, σ²): P(x) ∝ exp(−x²/(2σ²)) on the integers.
///
/// Its variance is slightly below σ² for small σ and indistinguishable from
/// σ² above σ ≈ 1; its privacy is that of a Gaussian of scale σ (CKS20).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DiscreteGaussian {
    /// σ² = sigma2_num / 2^16.
    sigma2_num: u128,
    /// floor(σ) + 1, the Laplace scale of the proposal.
    t: u64,
    t_f: f64,
    /// [`FAST_MARGIN`]; tests widen it to exercise the exact path.
    margin: f64,
    /// t·margin + margin: the float error −t·ln U may carry.
    slack: f64,
    /// t · 2^16: |y| in the scale of σ².
    scaled_t: u64,
    /// Magnitudes from here on are refused (see [`Self::sample`]).
    limit: u64,
    /// 2 · σ²·2^16 · t² · 2^16, the denominator of the acceptance exponent.
    bias_den: u128,
    bias_den_f: f64,
}

impl DiscreteGaussian {
    pub fn new(sigma: f64) -> Result<Self, NoiseError> {
        if !(sigma.is_finite() && sigma > 0.0 && sigma <= MAX_SIGMA) {
            return Err(NoiseError::Sigma(sigma));
        }
        let sigma2_num = (sigma * sigma * f64::from(1u32 << SIGMA2_DEN_BITS)).ceil() as u128;
        let sigma2_num = sigma2_num.max(1);
        // floor(σ) exactly: the largest m with m² · 2^16 ≤ sigma2_num.
        let mut floor = (sigma2_num as f64 / f64::from(1u32 << SIGMA2_DEN_BITS)).sqrt() as u128;
        while ((floor + 1) * (floor + 1)) << SIGMA2_DEN_BITS <= sigma2_num {
            floor += 1;
        }
        while floor > 0 && (floor * floor) << SIGMA2_DEN_BITS > sigma2_num {
            floor -= 1;
        }
        // σ ≤ 2^20, so t ≤ 2^20 + 1 and t·2^16 fits a u64 with room.
        let t = floor as u64 + 1;
        let scaled_t = t << SIGMA2_DEN_BITS;
        // |y|·t·2^16 below 2^63 keeps the square below 2^126. Candidates
        // past that lie beyond 64σ, where the exact algorithm accepts with
        // probability below exp(−2000); rejecting them cannot be observed.
        let limit = (1u64 << 63) / scaled_t;
        let bias_den = (2 * sigma2_num * u128::from(t) * u128::from(t)) << SIGMA2_DEN_BITS;
        Ok(Self::with_margin(
            Self {
                sigma2_num,
                t,
                t_f: t as f64,
                margin: 0.0,
                slack: 0.0,
                scaled_t,
                limit,
                bias_den,
                bias_den_f: bias_den as f64,
            },
            FAST_MARGIN,
        ))
    }

    fn with_margin(self, margin: f64) -> Self {
        Self {
            margin,
            slack: self.t_f * margin + margin,
            ..self
        }
    }

    /// The σ actually used: the one asked for, rounded up by at most 2^-16 in σ².
    pub fn sigma(&self) -> f64 {
        (self.sigma2_num as f64 / f64::from(1u32 << SIGMA2_DEN_BITS)).sqrt()
    }

    /// One exact sample (CKS20 Algorithm 3).
    pub fn sample(&self, rng: &mut NoiseRng) -> i64 {
        loop {
            // Discrete Laplace of scale t: a geometric magnitude and a sign,
            // with −0 refused so that 0 is not counted twice.
            let Some(magnitude) = rng.geometric(self) else {
                continue;
            };
            let negative = rng.bit();
            if negative && magnitude == 0 {
                continue;
            }
            // Accept with exp(−(|y| − σ²/t)²/(2σ²)), that is
            // (|y|·t·2^16 − σ²·2^16)² / (2 · σ²·2^16 · t² · 2^16);
            // below `limit` the gap is under 2^63.
            let gap = (magnitude * self.scaled_t).abs_diff(self.sigma2_num as u64);
            let gap_f = gap as f64;
            let estimate = gap_f * gap_f / self.bias_den_f;
            if rng.bernoulli_exp(gap, self.bias_den, estimate, self.margin) {
                let magnitude = magnitude as i64;
                return if negative { -magnitude } else { magnitude };
            }
        }
    }

    /// Fills `out` with independent samples.
    pub fn fill(&self, rng: &mut NoiseRng, out: &mut [i64]) {
        out.iter_mut().for_each(|v| *v = self.sample(rng));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments(samples: &[i64]) -> (f64, f64) {
        let n = samples.len() as f64;
        let mean = samples.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = samples
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        (mean, var.sqrt())
    }

    #[test]
    fn rejects_bad_sigma() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, MAX_SIGMA * 2.0] {
            assert!(matches!(
                DiscreteGaussian::new(bad),
                Err(NoiseError::Sigma(_))
            ));
        }
    }

    #[test]
    fn sigma_is_never_rounded_down() {
        for sigma in [0.1, 0.5, 1.0, 1.7, 3.0, 10.5, 1024.0, 123_456.7] {
            let g = DiscreteGaussian::new(sigma).unwrap();
            assert!(g.sigma() >= sigma, "{sigma} became {}", g.sigma());
            assert!(g.sigma() - sigma < 1e-4 * sigma.max(1.0));
            assert_eq!(g.t, sigma.floor() as u64 + 1);
        }
    }

    #[test]
    fn standard_deviation_over_a_million_samples() {
        let mut rng = NoiseRng::insecure_from_seed(7);
        for sigma in [2.0, 37.5, 1024.0, 1e5] {
            let mut out = vec![0i64; 1_000_000];
            DiscreteGaussian::new(sigma)
                .unwrap()
                .fill(&mut rng, &mut out);
            let (mean, std) = moments(&out);
            assert!((std / sigma - 1.0).abs() < 0.01, "σ={sigma}: std {std}");
            assert!(mean.abs() < 5.0 * sigma / 1000.0, "σ={sigma}: mean {mean}");
        }
    }

    #[test]
    fn small_sigma_matches_the_exact_probabilities() {
        // σ = 0.5: P(0) : P(±1) : P(±2) = 1 : e^-2 : e^-8, computed directly.
        let g = DiscreteGaussian::new(0.5).unwrap();
        let mut rng = NoiseRng::insecure_from_seed(3);
        let n = 400_000;
        let mut counts = [0u64; 5];
        for _ in 0..n {
            let v = g.sample(&mut rng);
            counts[(v + 2).clamp(0, 4) as usize] += 1;
        }
        let weights: Vec<f64> = (-2i32..=2)
            .map(|x| (-(f64::from(x * x)) / (2.0 * 0.25)).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let chi2: f64 = counts
            .iter()
            .zip(&weights)
            .map(|(&c, w)| {
                let e = w / total * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum();
        // 4 degrees of freedom: P(χ² > 23.5) ≈ 1e-4.
        assert!(chi2 < 23.5, "chi2 {chi2}, counts {counts:?}");
    }

    /// χ² of `g`'s samples against the exact probabilities ∝ exp(−x²/2σ²)
    /// over [−range, range], the tails pooled into the end buckets.
    fn chi2_against_exact(g: &DiscreteGaussian, range: i64, n: usize, seed: u64) -> f64 {
        let s2 = g.sigma2_num as f64 / f64::from(1u32 << SIGMA2_DEN_BITS);
        let weight = |x: i64| (-((x * x) as f64) / (2.0 * s2)).exp();
        let total: f64 = (-50 * range..=50 * range).map(weight).sum();
        let mut expected = vec![0f64; (2 * range + 1) as usize];
        for x in -50 * range..=50 * range {
            expected[(x.clamp(-range, range) + range) as usize] += weight(x) / total * n as f64;
        }
        let mut counts = vec![0f64; expected.len()];
        let mut rng = NoiseRng::insecure_from_seed(seed);
        for _ in 0..n {
            counts[(g.sample(&mut rng).clamp(-range, range) + range) as usize] += 1.0;
        }
        counts
            .iter()
            .zip(&expected)
            .map(|(c, e)| (c - e).powi(2) / e)
            .sum()
    }

    #[test]
    fn exact_path_alone_gives_the_same_law() {
        // A margin of 2 sends every comparison through the big-integer path.
        let g = DiscreteGaussian::new(1.5).unwrap().with_margin(2.0);
        // 9 buckets, 8 degrees of freedom: P(χ² > 26.1) ≈ 1e-3.
        let chi2 = chi2_against_exact(&g, 4, 30_000, 21);
        assert!(chi2 < 26.1, "chi2 {chi2}");
    }

    #[test]
    fn fast_and_exact_paths_mix_without_bias() {
        // A margin of 2^-6 hands a few percent of the comparisons, the ones
        // nearest their thresholds, to the exact path. Any bias in how the
        // two paths split a uniform would show here.
        let g = DiscreteGaussian::new(3.5).unwrap().with_margin(1.0 / 64.0);
        // 21 buckets, 20 degrees of freedom: P(χ² > 45.3) ≈ 1e-3.
        let chi2 = chi2_against_exact(&g, 10, 300_000, 22);
        assert!(chi2 < 45.3, "chi2 {chi2}");
        // And at the production margin, over more samples.
        let chi2 = chi2_against_exact(&DiscreteGaussian::new(3.5).unwrap(), 10, 1_000_000, 23);
        assert!(chi2 < 45.3, "chi2 {chi2}");
    }

    #[test]
    fn matches_opendp() {
        use opendp::traits::samplers::sample_discrete_gaussian;
        let sigma = 3.5;
        let n = 60_000;
        let ours = DiscreteGaussian::new(sigma).unwrap();
        let mut rng = NoiseRng::insecure_from_seed(11);
        let scale = dashu::rational::RBig::try_from(sigma).unwrap();
        let bucket = |v: i64| (v.clamp(-9, 9) + 9) as usize;
        let mut a = [0f64; 19];
        let mut b = [0f64; 19];
        for _ in 0..n {
            a[bucket(ours.sample(&mut rng))] += 1.0;
            let theirs = sample_discrete_gaussian(scale.clone()).unwrap();
            b[bucket(i64::try_from(theirs).unwrap())] += 1.0;
        }
        // Two-sample chi-square over 19 buckets (18 degrees of freedom):
        // P(χ² > 42.3) ≈ 1e-3.
        let chi2: f64 = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| **x + **y > 0.0)
            .map(|(x, y)| (x - y).powi(2) / (x + y))
            .sum();
        assert!(chi2 < 42.3, "chi2 {chi2}\nours {a:?}\nopendp {b:?}");
    }
}
