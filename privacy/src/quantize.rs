//! From a clipped f32 update to integers modulo 2^bits and back: the
//! encoding of distributed DP (Kairouz, Liu and Steinke 2021), which secure
//! aggregation then masks in the same ring.
//!
//! A client rotates its update with a randomized Hadamard transform (which
//! spreads its norm evenly over the coordinates), scales it by 1/γ, rounds
//! each coordinate randomly until the rounded vector's norm is within a
//! bound, adds discrete Gaussian noise and reduces modulo 2^bits. The server
//! adds the clients' vectors modulo 2^bits and decodes only the sum.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::noise::{DiscreteGaussian, NoiseError, NoiseRng};

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum QuantizeError {
    #[error("modulus bits must be in 2..=32, got {0}")]
    Bits(u32),
    #[error("granularity gamma must be positive and finite, got {0}")]
    Gamma(f64),
    #[error("expected {expected} values, got {got}")]
    Length { expected: usize, got: usize },
    #[error("value {value} at index {index} does not fit in {bits} bits")]
    OutOfRange { index: usize, value: u32, bits: u32 },
    #[error("no randomized rounding met the norm bound after {0} tries")]
    RoundingExhausted(u32),
    #[error(transparent)]
    Noise(#[from] NoiseError),
}

/// How updates become integers this round. The server picks it and sends
/// it with the task, so every client and the server agree.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quantizer {
    /// Values in the model.
    pub len: u64,
    /// Real units per integer step.
    pub gamma: f64,
    /// The sum lives in Z / 2^bits.
    pub bits: u32,
    /// Seed of the random signs of the Hadamard rotation; `None` skips it.
    /// Public: the rotation spreads norm, it hides nothing.
    pub rotation_seed: Option<u64>,
    /// Bound on the L2 norm of a rounded vector, in integer units: the
    /// sensitivity that the accountant uses.
    pub norm_bound: f64,
}

/// Kairouz et al.'s β: each rounding is kept with probability at least 1 − β.
const ROUNDING_BETA: f64 = 0.606_530_659_712_633_4; // e^-0.5
const MAX_ROUNDING_TRIES: u32 = 1000;

impl Quantizer {
    /// A quantizer for updates of `len` values clipped to `clip`.
    ///
    /// The bound is Kairouz et al.'s Theorem 2 with β = e^−½:
    /// ‖x̃‖² ≤ (c/γ)² + d/4 + √(2 ln 1/β)·(c/γ + √d/2).
    pub fn new(
        len: u64,
        clip: f64,
        gamma: f64,
        bits: u32,
        rotation_seed: Option<u64>,
    ) -> Result<Self, QuantizeError> {
        if !(2..=32).contains(&bits) {
            return Err(QuantizeError::Bits(bits));
        }
        if !(gamma.is_finite() && gamma > 0.0) {
            return Err(QuantizeError::Gamma(gamma));
        }
        let d = padded_len(len, rotation_seed.is_some()) as f64;
        let c = clip / gamma;
        let slack = (2.0 * (1.0 / ROUNDING_BETA).ln()).sqrt();
        let bound2 = (c * c + d / 4.0 + slack * (c + d.sqrt() / 2.0)).min((c + d.sqrt()).powi(2));
        Ok(Self {
            len,
            gamma,
            bits,
            rotation_seed,
            norm_bound: bound2.sqrt(),
        })
    }

    /// Values on the wire: the rotation pads to a power of two.
    pub fn encoded_len(&self) -> usize {
        padded_len(self.len, self.rotation_seed.is_some())
    }

    /// The L1 bound matching `norm_bound`: a vector of integers has
    /// ‖x‖₁ ≤ min(‖x‖₂², √d·‖x‖₂).
    pub fn l1_bound(&self) -> f64 {
        let l2 = self.norm_bound;
        (l2 * l2).min((self.encoded_len() as f64).sqrt() * l2)
    }

    fn modulus_mask(&self) -> u32 {
        if self.bits == 32 {
            u32::MAX
        } else {
            (1u32 << self.bits) - 1
        }
    }

    /// Rotates, scales and rounds `update`, whose norm must already be
    /// clipped, then adds `noise` (if any) and reduces modulo 2^bits.
    pub fn encode(
        &self,
        update: &[f32],
        noise: Option<(&DiscreteGaussian, &mut NoiseRng)>,
        rng: &mut impl Rng,
    ) -> Result<Vec<u32>, QuantizeError> {
        if update.len() as u64 != self.len {
            return Err(QuantizeError::Length {
                expected: self.len as usize,
                got: update.len(),
            });
        }
        let mut scaled: Vec<f64> = update.iter().map(|&v| f64::from(v)).collect();
        scaled.resize(self.encoded_len(), 0.0);
        if let Some(seed) = self.rotation_seed {
            rotate(&mut scaled, seed);
        }
        let inv = 1.0 / self.gamma;
        scaled.iter_mut().for_each(|v| *v *= inv);
        let rounded = self.round_within_bound(&scaled, rng)?;
        let mut noisy = rounded;
        if let Some((gaussian, noise_rng)) = noise {
            for v in &mut noisy {
                *v += gaussian.sample(noise_rng);
            }
        }
        let mask = self.modulus_mask();
        Ok(noisy.into_iter().map(|v| (v as u32) & mask).collect())
    }

    /// Conditional randomized rounding: unbiased per coordinate, redrawn
    /// until the squared norm is within the bound.
    fn round_within_bound(
        &self,
        scaled: &[f64],
        rng: &mut impl Rng,
    ) -> Result<Vec<i64>, QuantizeError> {
        let bound2 = self.norm_bound * self.norm_bound;
        let mut out = vec![0i64; scaled.len()];
        for _ in 0..MAX_ROUNDING_TRIES {
            let mut norm2 = 0.0;
            for (o, &v) in out.iter_mut().zip(scaled) {
                let low = v.floor();
                let up = rng.random::<f64>() < v - low;
                *o = low as i64 + i64::from(up);
                norm2 += (*o as f64) * (*o as f64);
            }
            if norm2 <= bound2 {
                return Ok(out);
            }
        }
        Err(QuantizeError::RoundingExhausted(MAX_ROUNDING_TRIES))
    }

    /// Adds `values` into `acc`, both modulo 2^bits; checks every value
    /// is in range so that a malformed update is refused, not wrapped.
    pub fn accumulate(&self, acc: &mut [u32], values: &[u32]) -> Result<(), QuantizeError> {
        if acc.len() != values.len() || values.len() != self.encoded_len() {
            return Err(QuantizeError::Length {
                expected: self.encoded_len(),
                got: values.len(),
            });
        }
        let mask = self.modulus_mask();
        if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| **v & !mask != 0) {
            return Err(QuantizeError::OutOfRange {
                index,
                value,
                bits: self.bits,
            });
        }
        for (a, v) in acc.iter_mut().zip(values) {
            *a = a.wrapping_add(*v) & mask;
        }
        Ok(())
    }

    /// Turns a sum modulo 2^bits back into f32s: centres each value on
    /// zero, scales by γ and undoes the rotation. Also returns how many
    /// coordinates sit in the outer eighth of the range, where a wrapped
    /// sum would land: a nonzero count means the modulus is too small.
    pub fn decode(&self, sum: &[u32]) -> Result<(Vec<f32>, usize), QuantizeError> {
        if sum.len() != self.encoded_len() {
            return Err(QuantizeError::Length {
                expected: self.encoded_len(),
                got: sum.len(),
            });
        }
        let modulus = 1i64 << self.bits;
        let half = modulus / 2;
        let near_edge = half - half / 8;
        let mut at_risk = 0;
        let mut values: Vec<f64> = sum
            .iter()
            .map(|&v| {
                let v = i64::from(v);
                let centred = if v >= half { v - modulus } else { v };
                if centred.abs() >= near_edge {
                    at_risk += 1;
                }
                centred as f64 * self.gamma
            })
            .collect();
        if let Some(seed) = self.rotation_seed {
            unrotate(&mut values, seed);
        }
        values.truncate(self.len as usize);
        Ok((values.into_iter().map(|v| v as f32).collect(), at_risk))
    }
}

fn padded_len(len: u64, rotate: bool) -> usize {
    if rotate {
        (len as usize).next_power_of_two()
    } else {
        len as usize
    }
}

fn signs(len: usize, seed: u64) -> impl Iterator<Item = f64> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut bits = 0u64;
    (0..len).map(move |i| {
        if i % 64 == 0 {
            bits = rng.random();
        }
        if bits >> (i % 64) & 1 == 1 { -1.0 } else { 1.0 }
    })
}

/// x ← (1/√n)·H·D·x: orthonormal, so it keeps the L2 norm.
fn rotate(values: &mut [f64], seed: u64) {
    let len = values.len();
    values
        .iter_mut()
        .zip(signs(len, seed))
        .for_each(|(v, s)| *v *= s);
    walsh_hadamard(values);
}

/// The inverse of [`rotate`]: x ← D·(1/√n)·H·x.
fn unrotate(values: &mut [f64], seed: u64) {
    walsh_hadamard(values);
    let len = values.len();
    values
        .iter_mut()
        .zip(signs(len, seed))
        .for_each(|(v, s)| *v *= s);
}

/// In-place normalized fast Walsh–Hadamard transform; its own inverse.
/// The length must be a power of two.
fn walsh_hadamard(values: &mut [f64]) {
    let n = values.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for block in values.chunks_mut(2 * h) {
            let (left, right) = block.split_at_mut(h);
            for (a, b) in left.iter_mut().zip(right.iter_mut()) {
                let (x, y) = (*a, *b);
                *a = x + y;
                *b = x - y;
            }
        }
        h *= 2;
    }
    let scale = 1.0 / (n as f64).sqrt();
    values.iter_mut().for_each(|v| *v *= scale);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClipNorm, clip_l2};
    use proptest::prelude::{prop_assert_eq, proptest};

    fn update(len: usize, seed: u64, clip: f64) -> Vec<f32> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut v: Vec<f32> = (0..len).map(|_| rng.random::<f32>() - 0.5).collect();
        clip_l2(&mut v, ClipNorm::new(clip).unwrap());
        v
    }

    #[test]
    fn rotation_keeps_the_norm_and_inverts() {
        let original: Vec<f64> = (0..1024).map(|i| f64::from(i % 7) - 3.0).collect();
        let mut v = original.clone();
        rotate(&mut v, 9);
        let norm = |x: &[f64]| x.iter().map(|a| a * a).sum::<f64>().sqrt();
        assert!((norm(&v) - norm(&original)).abs() < 1e-9);
        unrotate(&mut v, 9);
        for (a, b) in v.iter().zip(&original) {
            assert!((a - b).abs() < 1e-9);
        }
    }

    #[test]
    fn rotation_flattens_a_spike() {
        let mut v = vec![0.0; 4096];
        v[17] = 1.0;
        rotate(&mut v, 1);
        let max = v.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!((max - 1.0 / 64.0).abs() < 1e-12);
    }

    #[test]
    fn rounded_norm_stays_within_the_bound() {
        let q = Quantizer::new(1000, 1.0, 1e-3, 20, Some(5)).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        for seed in 0..20 {
            let x = update(1000, seed, 1.0);
            let mut scaled: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
            scaled.resize(q.encoded_len(), 0.0);
            rotate(&mut scaled, 5);
            scaled.iter_mut().for_each(|v| *v /= q.gamma);
            let r = q.round_within_bound(&scaled, &mut rng).unwrap();
            let norm = r.iter().map(|&v| (v * v) as f64).sum::<f64>().sqrt();
            assert!(norm <= q.norm_bound);
        }
    }

    #[test]
    fn sum_of_many_decodes_to_the_true_sum() {
        let len = 3000;
        let q = Quantizer::new(len, 1.0, 1e-4, 24, Some(3)).unwrap();
        let mut acc = vec![0u32; q.encoded_len()];
        let mut truth = vec![0f64; len as usize];
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        for client in 0..20 {
            let x = update(len as usize, client, 1.0);
            truth
                .iter_mut()
                .zip(&x)
                .for_each(|(t, v)| *t += f64::from(*v));
            let encoded = q.encode(&x, None, &mut rng).unwrap();
            q.accumulate(&mut acc, &encoded).unwrap();
        }
        let (decoded, at_risk) = q.decode(&acc).unwrap();
        assert_eq!(at_risk, 0);
        // Rounding adds at most γ/2 per value per client, unbiased.
        let max_err = decoded
            .iter()
            .zip(&truth)
            .fold(0f64, |m, (d, t)| m.max((f64::from(*d) - t).abs()));
        assert!(max_err < 20.0 * 1e-4, "max error {max_err}");
    }

    #[test]
    fn noise_on_the_sum_has_the_planned_std() {
        let len = 20_000u64;
        let gamma = 1e-3;
        let q = Quantizer::new(len, 1.0, gamma, 32, None).unwrap();
        let zero = vec![0f32; len as usize];
        let sigma_int = 150.0;
        let g = DiscreteGaussian::new(sigma_int).unwrap();
        let mut noise_rng = NoiseRng::insecure_from_seed(8);
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let mut acc = vec![0u32; q.encoded_len()];
        for _ in 0..4 {
            let encoded = q
                .encode(&zero, Some((&g, &mut noise_rng)), &mut rng)
                .unwrap();
            q.accumulate(&mut acc, &encoded).unwrap();
        }
        let (decoded, _) = q.decode(&acc).unwrap();
        let std = (decoded.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>()
            / decoded.len() as f64)
            .sqrt();
        let expected = 2.0 * sigma_int * gamma; // √4 clients · σ · γ
        assert!(
            (std / expected - 1.0).abs() < 0.03,
            "std {std}, expected {expected}"
        );
    }

    #[test]
    fn wraparound_is_reported() {
        let q = Quantizer::new(4, 1.0, 1.0 / 165.0, 8, None).unwrap();
        let encoded = q
            .encode(
                &[0.7, -0.7, 0.0, 0.1],
                None,
                &mut ChaCha20Rng::seed_from_u64(1),
            )
            .unwrap();
        let (_, at_risk) = q.decode(&encoded).unwrap();
        assert_eq!(at_risk, 2);
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let q = Quantizer::new(2, 1.0, 0.01, 8, None).unwrap();
        let mut acc = vec![0u32; 2];
        assert_eq!(
            q.accumulate(&mut acc, &[1, 256]),
            Err(QuantizeError::OutOfRange {
                index: 1,
                value: 256,
                bits: 8
            })
        );
        assert_eq!(acc, vec![0, 0]);
        assert!(matches!(
            q.accumulate(&mut acc, &[1]),
            Err(QuantizeError::Length { .. })
        ));
    }

    proptest! {
        #[test]
        fn modular_sum_commutes_with_decoding(
            values in proptest::collection::vec(-1000i64..1000, 1..64),
            others in proptest::collection::vec(-1000i64..1000, 1..64),
        ) {
            let n = values.len().min(others.len());
            let q = Quantizer::new(n as u64, 1.0, 1.0, 16, None).unwrap();
            let wrap = |v: &[i64]| v[..n].iter().map(|x| (*x as u32) & 0xffff).collect::<Vec<_>>();
            let mut acc = vec![0u32; n];
            q.accumulate(&mut acc, &wrap(&values)).unwrap();
            q.accumulate(&mut acc, &wrap(&others)).unwrap();
            let (decoded, _) = q.decode(&acc).unwrap();
            for i in 0..n {
                prop_assert_eq!(decoded[i] as i64, values[i] + others[i]);
            }
        }

    }
}
