//! Planning distributed DP for a round (Kairouz, Liu and Steinke 2021):
//! the granularity that keeps the sum inside the ring, each client's share
//! of the noise, and what one round costs in zCDP.

use serde::{Deserialize, Serialize};

use crate::{
    ClipNorm,
    accountant::{NoiseMultiplier, distributed_discrete_gaussian_rho},
    noise::MAX_SIGMA,
    quantize::{QuantizeError, Quantizer},
};

/// Standard deviations of the summed coordinates the ring must hold; beyond
/// this the sum wraps with probability about 2·10⁻⁹ per coordinate.
const RING_STDS: f64 = 6.0;

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "{bits} bits cannot hold the sum of {clients} clients at noise multiplier {z}: use at least {needed} bits"
    )]
    RingTooSmall {
        bits: u32,
        clients: u64,
        z: f64,
        needed: u32,
    },
    #[error("the minimum cohort must be between 1 and the largest cohort ({max}), got {min}")]
    Cohort { min: u64, max: u64 },
    #[error(
        "each client's noise scale {0} is outside [0.5, 2^20] integer steps; change bits or the noise multiplier"
    )]
    ClientSigma(f64),
    #[error(transparent)]
    Quantize(#[from] QuantizeError),
}

/// Everything a round of distributed DP needs, fixed before it starts.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistributedPlan {
    pub quantizer: Quantizer,
    /// Each client's discrete Gaussian scale, in integer steps.
    pub client_sigma: f64,
    /// The fewest clients whose noise the guarantee counts on.
    pub min_clients: u64,
    /// zCDP of one round: ρ of Kairouz et al.'s Theorem 1.
    pub rho: f64,
}

impl DistributedPlan {
    /// A plan for `len` values clipped to `clip`, summed over at most
    /// `max_clients` and at least `min_clients` clients in a ring of `bits`
    /// bits, with total noise z·Δ₂ once `min_clients` have added theirs.
    pub fn new(
        len: u64,
        clip: ClipNorm,
        z: NoiseMultiplier,
        min_clients: u64,
        max_clients: u64,
        bits: u32,
        rotation_seed: u64,
    ) -> Result<Self, PlanError> {
        if min_clients == 0 || min_clients > max_clients {
            return Err(PlanError::Cohort {
                min: min_clients,
                max: max_clients,
            });
        }
        // The noise is z·r over the minimum cohort, so √(n/min)·z·r when
        // all n take part.
        let n = max_clients as f64;
        let noise2 = z.get() * z.get() * n / min_clients as f64;
        let quantizer = fitted_quantizer(len, clip, noise2, max_clients, bits, rotation_seed)
            .map_err(|e| match e {
                PlanError::RingTooSmall {
                    bits,
                    clients,
                    needed,
                    ..
                } => PlanError::RingTooSmall {
                    bits,
                    clients,
                    z: z.get(),
                    needed,
                },
                other => other,
            })?;
        let l2 = quantizer.norm_bound;
        let client_sigma = z.get() * l2 / (min_clients as f64).sqrt();
        if !(0.5..=MAX_SIGMA).contains(&client_sigma) {
            return Err(PlanError::ClientSigma(client_sigma));
        }
        let rho = distributed_discrete_gaussian_rho(
            min_clients,
            client_sigma,
            quantizer.encoded_len() as u64,
            l2,
            quantizer.l1_bound(),
        )
        .ok_or(PlanError::ClientSigma(client_sigma))?;
        Ok(Self {
            quantizer,
            client_sigma,
            min_clients,
            rho,
        })
    }
}

/// The quantizer whose ring holds the sum of `max_clients` updates
/// clipped to `clip`, plus noise of variance `noise2` (in squared clips).
fn fitted_quantizer(
    len: u64,
    clip: ClipNorm,
    noise2: f64,
    max_clients: u64,
    bits: u32,
    rotation_seed: u64,
) -> Result<Quantizer, PlanError> {
    let d = (len as usize).next_power_of_two() as f64;
    let n = max_clients as f64;
    let half_ring = 2f64.powi(bits.min(32) as i32 - 1);
    // After rotation a client's coordinates are about r/√d each; the worst
    // case adds n of them in the same direction.
    let spread = RING_STDS * (n * n / d + noise2).sqrt();
    let scaled_clip = (half_ring - n) / spread;
    if scaled_clip.is_nan() || scaled_clip < 1.0 {
        // The ring must hold n rounding steps plus the spread at a scale of
        // at least one step per clip.
        let needed = (2.0 * (n + spread)).log2().ceil() as u32;
        return Err(PlanError::RingTooSmall {
            bits,
            clients: max_clients,
            z: noise2.sqrt(),
            needed,
        });
    }
    Ok(Quantizer::new(
        len,
        clip.get(),
        clip.get() / scaled_clip,
        bits,
        Some(rotation_seed),
    )?)
}

/// A quantizer for secure aggregation without DP: updates clipped to
/// `clip`, no noise, the sum of `max_clients` kept inside 2^bits.
pub fn noiseless_quantizer(
    len: u64,
    clip: ClipNorm,
    max_clients: u64,
    bits: u32,
    rotation_seed: u64,
) -> Result<Quantizer, PlanError> {
    if max_clients == 0 {
        return Err(PlanError::Cohort { min: 0, max: 0 });
    }
    fitted_quantizer(len, clip, 0.0, max_clients, bits, rotation_seed)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn plan(bits: u32, min: u64, max: u64) -> Result<DistributedPlan, PlanError> {
        DistributedPlan::new(
            199_210,
            ClipNorm::new(1.0).unwrap(),
            NoiseMultiplier::new(1.0).unwrap(),
            min,
            max,
            bits,
            7,
        )
    }

    #[test]
    fn a_plan_costs_about_what_the_gaussian_would() {
        let p = plan(20, 5, 10).unwrap();
        assert_eq!(p.quantizer.encoded_len(), 262_144);
        // ρ ≈ Δ²/(2·n·σ²) = 1/(2z²) once σ·√n = z·Δ: here 0.5.
        assert!((p.rho - 0.5).abs() < 1e-6, "rho {}", p.rho);
        // The noise of the minimum cohort, in real units, is z·Δ·γ ≈ z·C.
        let real = p.client_sigma * (p.min_clients as f64).sqrt() * p.quantizer.gamma;
        assert!((real - 1.0).abs() < 0.02, "{real}");
    }

    #[test]
    fn a_noiseless_quantizer_round_trips_a_sum() {
        let q = noiseless_quantizer(1000, ClipNorm::new(1.0).unwrap(), 50, 16, 3).unwrap();
        let update: Vec<f32> = (0..1000).map(|i| ((i % 7) as f32 - 3.0) / 200.0).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut sum = vec![0u32; q.encoded_len()];
        for _ in 0..50 {
            q.accumulate(&mut sum, &q.encode(&update, None, &mut rng).unwrap())
                .unwrap();
        }
        let (decoded, at_risk) = q.decode(&sum).unwrap();
        assert_eq!(at_risk, 0);
        for (d, u) in decoded.iter().zip(&update) {
            assert!((d / 50.0 - u).abs() < 0.01, "{d} vs {u}");
        }
        assert!(matches!(
            noiseless_quantizer(1000, ClipNorm::new(1.0).unwrap(), 5000, 8, 3),
            Err(PlanError::RingTooSmall { .. })
        ));
    }

    #[test]
    fn impossible_plans_say_why() {
        let Err(PlanError::RingTooSmall { needed, .. }) = plan(8, 5, 1000) else {
            panic!("8 bits cannot hold 1000 clients");
        };
        // The suggestion is the smallest ring that fits.
        assert!(plan(needed, 5, 1000).is_ok());
        assert!(matches!(
            plan(needed - 1, 5, 1000),
            Err(PlanError::RingTooSmall { .. })
        ));
        assert!(matches!(plan(20, 0, 10), Err(PlanError::Cohort { .. })));
        assert!(matches!(plan(20, 11, 10), Err(PlanError::Cohort { .. })));
    }
}
