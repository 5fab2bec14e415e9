//! Rényi-DP accounting: composition over rounds and conversion to (ε, δ).
//!
//! The Poisson-subsampled Gaussian is accounted with Mironov, Talwar and
//! Zhang 2019 (§3.3): the exact binomial expansion at integer orders and
//! their series at fractional ones, falling back to the next integer order
//! (RDP is non-decreasing in the order) where the series does not settle,
//! which can only make ε larger than what is proven, never smaller. The zCDP of a Gaussian (ρ·α at every order)
//! composes on the same curve.

use serde::{Deserialize, Serialize};

/// A positive, finite noise multiplier z (noise std = z · clip norm).
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct NoiseMultiplier(f64);

/// A sampling rate q in (0, 1].
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct SamplingRate(f64);

/// A δ in (0, 1).
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct Delta(f64);

/// A non-negative ε.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct Epsilon(f64);

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum PrivacyParamError {
    #[error("noise multiplier must be positive and finite, got {0}")]
    NoiseMultiplier(f64),
    #[error("sampling rate must be in (0, 1], got {0}")]
    SamplingRate(f64),
    #[error("delta must be in (0, 1), got {0}")]
    Delta(f64),
    #[error("epsilon must be non-negative and finite, got {0}")]
    Epsilon(f64),
    #[error("rho must be non-negative and finite, got {0}")]
    Rho(f64),
}

macro_rules! checked {
    ($ty:ident, $err:ident, $ok:expr) => {
        impl $ty {
            pub fn new(value: f64) -> Result<Self, PrivacyParamError> {
                let ok: fn(f64) -> bool = $ok;
                if ok(value) {
                    Ok(Self(value))
                } else {
                    Err(PrivacyParamError::$err(value))
                }
            }

            pub fn get(self) -> f64 {
                self.0
            }
        }
    };
}

checked!(NoiseMultiplier, NoiseMultiplier, |v| v.is_finite()
    && v > 0.0);
checked!(SamplingRate, SamplingRate, |v| v > 0.0 && v <= 1.0);
checked!(Delta, Delta, |v| v > 0.0 && v < 1.0);
checked!(Epsilon, Epsilon, |v| v.is_finite() && v >= 0.0);

/// How an RDP curve becomes (ε, δ).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Conversion {
    /// Mironov 2017: ε = RDP(α) + ln(1/δ)/(α−1).
    Classic,
    /// Balle et al. 2020 (Thm 21), as in Canonne, Kamath and Steinke 2020:
    /// ε = RDP(α) + ln((α−1)/α) − (ln δ + ln α)/(α−1). Never larger.
    Improved,
}

/// Accumulated RDP at a fixed set of orders.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl RdpAccountant {
    /// Orders 1.01 to 12 in steps of 0.01, then 13, 14, …, 256 and 320,
    /// 384, 448, 512.
    pub fn new() -> Self {
        let fine = (101..=1200).map(|i| f64::from(i) / 100.0);
        let coarse = (13..=256).chain([320, 384, 448, 512]).map(f64::from);
        let orders: Vec<f64> = fine.chain(coarse).collect();
        Self {
            rdp: vec![0.0; orders.len()],
            orders,
        }
    }

    /// `steps` rounds of the Poisson-subsampled Gaussian mechanism.
    pub fn compose_subsampled_gaussian(&mut self, q: SamplingRate, z: NoiseMultiplier, steps: u64) {
        for (order, rdp) in self.orders.iter().zip(&mut self.rdp) {
            *rdp += steps as f64 * subsampled_gaussian_rdp_at(q.get(), z.get(), *order);
        }
    }

    /// A mechanism satisfying ρ-zCDP (RDP ρ·α at every order α).
    pub fn compose_zcdp(&mut self, rho: f64) -> Result<(), PrivacyParamError> {
        if !(rho.is_finite() && rho >= 0.0) {
            return Err(PrivacyParamError::Rho(rho));
        }
        for (order, rdp) in self.orders.iter().zip(&mut self.rdp) {
            *rdp += rho * order;
        }
        Ok(())
    }

    /// The smallest ε over the orders, and the order that gives it.
    pub fn epsilon(&self, delta: Delta, conversion: Conversion) -> (Epsilon, f64) {
        let (eps, order) = self
            .orders
            .iter()
            .zip(&self.rdp)
            .map(|(&a, &r)| (convert(r, a, delta.get(), conversion), a))
            .filter(|(e, _)| e.is_finite())
            .fold((f64::INFINITY, 0.0), |best, cur| {
                if cur.0 < best.0 { cur } else { best }
            });
        (Epsilon(eps.max(0.0)), order)
    }
}

/// What one committed round costs, as the accountant composes it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum RoundMechanism {
    /// Central DP: the Gaussian mechanism on the sum of a Poisson sample.
    SubsampledGaussian { q: SamplingRate, z: NoiseMultiplier },
    /// Distributed DP: ρ-zCDP per round. No amplification by sampling is
    /// claimed, which can only overstate ε.
    Zcdp { rho: f64 },
}

impl RdpAccountant {
    /// `steps` rounds of `mechanism`.
    pub fn compose(
        &mut self,
        mechanism: RoundMechanism,
        steps: u64,
    ) -> Result<(), PrivacyParamError> {
        match mechanism {
            RoundMechanism::SubsampledGaussian { q, z } => {
                self.compose_subsampled_gaussian(q, z, steps);
                Ok(())
            }
            RoundMechanism::Zcdp { rho } => self.compose_zcdp(rho * steps as f64),
        }
    }
}

/// How many more rounds of `mechanism` fit before ε would pass `target`:
/// the largest k ≤ `cap` with ε(spent + k rounds) ≤ target.
pub fn rounds_within_budget(
    spent: &RdpAccountant,
    mechanism: RoundMechanism,
    target: Epsilon,
    delta: Delta,
    cap: u64,
) -> Result<u64, PrivacyParamError> {
    let fits = |k: u64| -> Result<bool, PrivacyParamError> {
        let mut acc = spent.clone();
        acc.compose(mechanism, k)?;
        Ok(acc.epsilon(delta, Conversion::Improved).0.get() <= target.get())
    };
    if !fits(0)? {
        return Ok(0);
    }
    // ε grows with k: binary search for the last k that fits.
    let (mut good, mut bad) = (0u64, cap.saturating_add(1));
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if fits(mid)? {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Ok(good)
}

/// Andrew et al. 2021 (Thm 1): when the clipped-count query gets noise
/// σ_b, the update must use z_Δ = (z⁻² − (2σ_b)⁻²)^(−½) for the pair to
/// cost what the Gaussian mechanism with noise z alone would. `None` when
/// σ_b is too small to fit inside z.
pub fn adaptive_clip_update_noise(z: NoiseMultiplier, count_sigma: f64) -> Option<NoiseMultiplier> {
    let rest = z.get().powi(-2) - (2.0 * count_sigma).powi(-2);
    (count_sigma.is_finite() && count_sigma > 0.0 && rest > 0.0)
        .then(|| NoiseMultiplier(rest.powf(-0.5)))
}

/// ρ-zCDP of the sum of `n` clients' discrete Gaussians of scale `sigma`
/// (integer units) in `dim` coordinates, for a change of L2 norm `l2` and
/// L1 norm `l1` (Kairouz, Liu and Steinke 2021, Theorem 1): ρ = ε²/2 with
/// ε = min(√(Δ₂²/(nσ²) + τd/2), Δ₂/(√n·σ) + τΔ₁) and
/// τ = 10·Σ_{k=1}^{n−1} exp(−2π²σ²·k/(k+1)). Needs σ ≥ ½.
pub fn distributed_discrete_gaussian_rho(
    n: u64,
    sigma: f64,
    dim: u64,
    l2: f64,
    l1: f64,
) -> Option<f64> {
    if n == 0 || !(sigma >= 0.5 && sigma.is_finite()) || !(l2 >= 0.0 && l1 >= 0.0) {
        return None;
    }
    let pi2s2 = 2.0 * std::f64::consts::PI.powi(2) * sigma * sigma;
    // The terms fall fast; past 1e-300 they no longer change the sum.
    let tau = 10.0
        * (1..n)
            .map(|k| (-pi2s2 * k as f64 / (k as f64 + 1.0)).exp())
            .take_while(|t| *t > 1e-300)
            .sum::<f64>();
    let n = n as f64;
    let first = (l2 * l2 / (n * sigma * sigma) + tau * dim as f64 / 2.0).sqrt();
    let second = l2 / (n.sqrt() * sigma) + tau * l1;
    let eps = first.min(second);
    Some(eps * eps / 2.0)
}

/// ε after `rounds` of the subsampled Gaussian, improved conversion.
pub fn dp_fedavg_epsilon(
    q: SamplingRate,
    z: NoiseMultiplier,
    rounds: u64,
    delta: Delta,
) -> Epsilon {
    let mut acc = RdpAccountant::new();
    acc.compose_subsampled_gaussian(q, z, rounds);
    acc.epsilon(delta, Conversion::Improved).0
}

/// The smallest noise multiplier (to 0.1%) whose ε after `rounds` is at most
/// `target`; `None` when even z = 1000 is not enough.
pub fn noise_for_epsilon(
    target: Epsilon,
    q: SamplingRate,
    rounds: u64,
    delta: Delta,
) -> Option<NoiseMultiplier> {
    smallest_noise(target, |z| dp_fedavg_epsilon(q, z, rounds, delta).get())
}

/// The smallest z in [0.01, 1000] (to 0.1%) with `epsilon(z)` at most
/// `target`, for any accountant whose ε falls as z grows.
pub fn smallest_noise(
    target: Epsilon,
    epsilon: impl Fn(NoiseMultiplier) -> f64,
) -> Option<NoiseMultiplier> {
    let eps = |z: f64| epsilon(NoiseMultiplier(z));
    let (mut low, mut high) = (1e-2, 1e3);
    if eps(high) > target.get() {
        return None;
    }
    // Bisect on a log scale, keeping the side that meets the target.
    while high / low > 1.001 {
        let mid = (low * high).sqrt();
        if eps(mid) <= target.get() {
            high = mid;
        } else {
            low = mid;
        }
    }
    Some(NoiseMultiplier(high))
}

fn convert(rdp: f64, alpha: f64, delta: f64, conversion: Conversion) -> f64 {
    match conversion {
        Conversion::Classic => rdp + (1.0 / delta).ln() / (alpha - 1.0),
        Conversion::Improved => {
            rdp + ((alpha - 1.0) / alpha).ln() - (delta.ln() + alpha.ln()) / (alpha - 1.0)
        }
    }
}

/// ln C(n, k) via ln Γ, exact enough for n ≤ a few thousand.
fn ln_binomial(n: u32, k: u32) -> f64 {
    ln_factorial(n) - ln_factorial(k) - ln_factorial(n - k)
}

fn ln_factorial(n: u32) -> f64 {
    (2..=n).map(|i| f64::from(i).ln()).sum()
}

/// RDP of one step of the Poisson-subsampled Gaussian at any order α > 1.
///
/// A fractional order uses Mironov, Talwar and Zhang's series (§3.3). When
/// that series does not settle, or lands above the next integer order's
/// value, the integer order's value is used instead: RDP is non-decreasing
/// in the order, so that bound is sound, only looser.
pub fn subsampled_gaussian_rdp_at(q: f64, z: f64, alpha: f64) -> f64 {
    let upper = subsampled_gaussian_rdp(q, z, alpha.ceil() as u32);
    if alpha.fract() == 0.0 || q >= 1.0 {
        return if q >= 1.0 {
            alpha / (2.0 * z * z)
        } else {
            upper
        };
    }
    match fractional_log_a(q, z, alpha) {
        Some(log_a) if log_a / (alpha - 1.0) <= upper => (log_a / (alpha - 1.0)).max(0.0),
        _ => upper,
    }
}

/// ln A_α for fractional α (Mironov, Talwar and Zhang 2019, §3.3): two
/// series over i ≥ 0, each term weighted by a Gaussian tail. Every term is
/// added with the absolute value of its generalized binomial coefficient,
/// as dp_accounting now does: an upper bound, never an underestimate that a
/// cancelling subtraction in floating point could produce. `None` when the
/// series does not settle.
fn fractional_log_a(q: f64, z: f64, alpha: f64) -> Option<f64> {
    let z2 = z * z;
    let threshold = z2 * (1.0 / q - 1.0).ln() + 0.5;
    let (log_q, log_1q) = (q.ln(), (-q).ln_1p());
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    // ln |C(α, i)|, updated term by term.
    let mut log_coef = 0.0f64;
    for i in 0..10_000u32 {
        let i_f = f64::from(i);
        if i > 0 {
            let factor = (alpha - (i_f - 1.0)) / i_f;
            if factor == 0.0 {
                break;
            }
            log_coef += factor.abs().ln();
        }
        let j = alpha - i_f;
        let log_t0 = log_coef + i_f * log_q + j * log_1q;
        let log_t1 = log_coef + j * log_q + i_f * log_1q;
        let log_e0 = 0.5f64.ln() + log_erfc((i_f - threshold) / (std::f64::consts::SQRT_2 * z));
        let log_e1 = 0.5f64.ln() + log_erfc((threshold - j) / (std::f64::consts::SQRT_2 * z));
        let log_s0 = log_t0 + (i_f * i_f - i_f) / (2.0 * z2) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * z2) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total.is_finite().then_some(total);
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    None
}

fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// ln erfc(x), with the asymptotic series where erfc underflows.
fn log_erfc(x: f64) -> f64 {
    let e = libm::erfc(x);
    if e > 1e-300 {
        return e.ln();
    }
    let x2 = x * x;
    -x2 - x.ln() - 0.5 * std::f64::consts::PI.ln()
        + (1.0 - 1.0 / (2.0 * x2) + 3.0 / (4.0 * x2 * x2) - 15.0 / (8.0 * x2 * x2 * x2)).ln()
}

/// RDP of one step of the Poisson-subsampled Gaussian at integer order α:
/// ln(Σₖ C(α,k) (1−q)^(α−k) q^k exp((k²−k)/(2z²))) / (α−1).
pub fn subsampled_gaussian_rdp(q: f64, z: f64, alpha: u32) -> f64 {
    let a = f64::from(alpha);
    if q >= 1.0 {
        return a / (2.0 * z * z);
    }
    let terms: Vec<f64> = (0..=alpha)
        .map(|k| {
            let k_f = f64::from(k);
            ln_binomial(alpha, k)
                + (a - k_f) * (1.0 - q).ln()
                + k_f * q.ln()
                + (k_f * k_f - k_f) / (2.0 * z * z)
        })
        .collect();
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let log_sum = max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln();
    log_sum / (a - 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abadi(steps: u64, conversion: Conversion) -> f64 {
        let mut acc = RdpAccountant::new();
        acc.compose_subsampled_gaussian(
            SamplingRate::new(0.01).unwrap(),
            NoiseMultiplier::new(4.0).unwrap(),
            steps,
        );
        acc.epsilon(Delta::new(1e-5).unwrap(), conversion).0.get()
    }

    #[test]
    fn abadi_et_al_published_values() {
        // Abadi et al. 2016 (q = 0.01, σ = 4, δ = 1e-5), via RDP.
        for (steps, classic, improved) in [(10_000, 1.26, 1.04), (40_000, 2.55, 2.21)] {
            let c = abadi(steps, Conversion::Classic);
            let i = abadi(steps, Conversion::Improved);
            assert!(
                (c - classic).abs() / classic < 0.02,
                "{steps} steps classic: {c}"
            );
            assert!(
                (i - improved).abs() / improved < 0.02,
                "{steps} steps improved: {i}"
            );
            assert!(i <= c);
        }
    }

    #[test]
    fn zcdp_half_at_1e5_gives_the_tight_conversion() {
        let mut acc = RdpAccountant::new();
        acc.compose_zcdp(0.5).unwrap();
        let (eps, _) = acc.epsilon(Delta::new(1e-5).unwrap(), Conversion::Improved);
        assert!((eps.get() - 4.728).abs() < 0.01, "{}", eps.get());
    }

    #[test]
    fn full_batch_matches_the_gaussian_mechanism() {
        for alpha in [2, 10, 50] {
            let r = subsampled_gaussian_rdp(1.0, 2.0, alpha);
            assert!((r - f64::from(alpha) / 8.0).abs() < 1e-12);
            // Subsampling can only help.
            assert!(subsampled_gaussian_rdp(0.1, 2.0, alpha) < r);
        }
    }

    #[test]
    fn epsilon_grows_with_steps_and_shrinks_with_noise() {
        let eps = |z: f64, steps: u64| {
            let mut acc = RdpAccountant::new();
            acc.compose_subsampled_gaussian(
                SamplingRate::new(0.1).unwrap(),
                NoiseMultiplier::new(z).unwrap(),
                steps,
            );
            acc.epsilon(Delta::new(1e-5).unwrap(), Conversion::Improved)
                .0
                .get()
        };
        assert!(eps(1.0, 100) < eps(1.0, 200));
        assert!(eps(2.0, 100) < eps(1.0, 100));
    }

    #[test]
    fn the_noise_search_meets_its_target_and_is_tight() {
        let (q, d) = (SamplingRate::new(0.01).unwrap(), Delta::new(1e-5).unwrap());
        let target = Epsilon::new(1.04).unwrap();
        let z = noise_for_epsilon(target, q, 10_000, d).unwrap();
        assert!(dp_fedavg_epsilon(q, z, 10_000, d) <= target);
        // Abadi's σ = 4 gives about this ε, so the search lands near 4.
        assert!((z.get() - 4.0).abs() < 0.2, "{}", z.get());
        assert!(noise_for_epsilon(Epsilon::new(1e-6).unwrap(), q, 10_000, d).is_none());
    }

    #[test]
    fn the_budget_admits_exactly_the_rounds_that_fit() {
        let m = RoundMechanism::SubsampledGaussian {
            q: SamplingRate::new(0.05).unwrap(),
            z: NoiseMultiplier::new(1.5).unwrap(),
        };
        let delta = Delta::new(1e-5).unwrap();
        let target = Epsilon::new(1.0).unwrap();
        let acc = RdpAccountant::new();
        let k = rounds_within_budget(&acc, m, target, delta, 10_000).unwrap();
        let eps = |rounds| {
            let mut a = acc.clone();
            a.compose(m, rounds).unwrap();
            a.epsilon(delta, Conversion::Improved).0.get()
        };
        assert!(k > 0);
        assert!(eps(k) <= 1.0, "{k} rounds give {}", eps(k));
        assert!(eps(k + 1) > 1.0);
        // Spent rounds count against the same budget.
        let mut half = acc.clone();
        half.compose(m, k / 2).unwrap();
        assert_eq!(
            rounds_within_budget(&half, m, target, delta, 10_000).unwrap(),
            k - k / 2
        );
        assert_eq!(rounds_within_budget(&acc, m, target, delta, 3).unwrap(), 3);
    }

    #[test]
    fn adaptive_clipping_spends_part_of_the_noise_on_the_count() {
        let z = NoiseMultiplier::new(1.0).unwrap();
        // Andrew et al.'s example: σ_b = m/20 with m = 100 leaves z_Δ ≈ 1.0050.
        let z_delta = adaptive_clip_update_noise(z, 5.0).unwrap();
        assert!(
            (z_delta.get() - 1.005_037_8).abs() < 1e-6,
            "{}",
            z_delta.get()
        );
        assert!(adaptive_clip_update_noise(z, 0.4).is_none());
    }

    #[test]
    fn distributed_discrete_gaussian_approaches_the_gaussian() {
        // Large σ: τ vanishes and ρ is Δ²/(2nσ²), the continuous value.
        let rho = distributed_discrete_gaussian_rho(100, 10.0, 1 << 20, 50.0, 2500.0).unwrap();
        assert!((rho - 50.0f64.powi(2) / (2.0 * 100.0 * 100.0)).abs() < 1e-12);
        // Small σ: the term for the sum of discrete Gaussians shows.
        let tight = distributed_discrete_gaussian_rho(1, 0.6, 1000, 3.0, 9.0).unwrap();
        let summed = distributed_discrete_gaussian_rho(10, 0.6, 1000, 3.0, 9.0).unwrap();
        assert!(
            (tight - 9.0 / (2.0 * 0.36)).abs() < 1e-9,
            "n = 1 has no τ term"
        );
        assert!(summed > 9.0 / (2.0 * 10.0 * 0.36));
        assert!(distributed_discrete_gaussian_rho(10, 0.4, 10, 1.0, 1.0).is_none());
    }

    #[test]
    fn zcdp_conversion_agrees_with_opendp() {
        use opendp::{
            combinators::{make_fix_delta, make_zCDP_to_approxDP},
            domains::{AtomDomain, VectorDomain},
            measurements::make_gaussian,
            measures::ZeroConcentratedDivergence,
            metrics::L2Distance,
        };
        for (scale, sens) in [(1.0f64, 1.0f64), (4.0, 1.0), (0.5, 2.0)] {
            let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
                VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
                L2Distance::<f64>::default(),
                scale,
                None,
            )
            .unwrap();
            let rho = m.map(&sens).unwrap();
            let approx = make_fix_delta(&make_zCDP_to_approxDP(m).unwrap(), 1e-5).unwrap();
            let (opendp_eps, _) = approx.map(&sens).unwrap();
            let mut acc = RdpAccountant::new();
            acc.compose_zcdp(rho).unwrap();
            let ours = acc
                .epsilon(Delta::new(1e-5).unwrap(), Conversion::Improved)
                .0
                .get();
            // Ours is the RDP grid's minimum; opendp solves the conversion
            // exactly. Ours may be larger, never smaller by more than rounding.
            assert!(
                ours >= opendp_eps * (1.0 - 1e-6),
                "ρ={rho}: {ours} < {opendp_eps}"
            );
            assert!(ours <= opendp_eps * 1.01, "ρ={rho}: {ours} vs {opendp_eps}");
        }
    }

    #[test]
    fn bad_parameters_are_named() {
        assert_eq!(
            SamplingRate::new(0.0),
            Err(PrivacyParamError::SamplingRate(0.0))
        );
        assert!(SamplingRate::new(1.5).is_err());
        assert!(NoiseMultiplier::new(f64::NAN).is_err());
        assert!(Delta::new(1.0).is_err());
        assert_eq!(
            RdpAccountant::new().compose_zcdp(-1.0),
            Err(PrivacyParamError::Rho(-1.0))
        );
    }
}
