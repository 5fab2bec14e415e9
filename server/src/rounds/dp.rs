//! Differential privacy on the server. Central: noise on the sum of clipped
//! updates (DP-FedAvg, McMahan et al. 2018) and adaptive clipping (Andrew et
//! al. 2021). Distributed: decoding the modular sum of updates the clients
//! quantized and noised (Kairouz et al. 2021). Both: the privacy ledger that
//! enforces the budget.

use covey_privacy::{
    ClipNorm,
    accountant::{
        Conversion, Delta, Epsilon, NoiseMultiplier, RdpAccountant, RoundMechanism, SamplingRate,
        adaptive_clip_update_noise, rounds_within_budget,
    },
    distributed::DistributedPlan,
    noise::{DiscreteGaussian, NoiseError, NoiseRng},
    pld::pld_epsilon,
    quantize::QuantizeError,
};
use serde::{Deserialize, Serialize};

/// Integer steps per noise standard deviation: the noise is exact discrete
/// Gaussian on a grid of σ/1024, a step far below anything f32 weights
/// resolve at that scale.
const GRID_STEPS_PER_SIGMA: f64 = 1024.0;

/// Differential privacy, checked and typed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpSettings {
    pub mode: DpMode,
    /// Clip of the first round; adaptive clipping moves it afterwards.
    pub initial_clip: ClipNorm,
    /// z: the noise on the sum is N(0, (z·C)²), all told.
    pub noise_multiplier: NoiseMultiplier,
    /// Each waiting client joins a round with this probability.
    pub sampling_rate: SamplingRate,
    /// The fixed denominator: the expected cohort, q · population.
    pub expected_cohort: f64,
    pub delta: Delta,
    /// The run stops before ε would exceed this; a DP run always has one.
    pub target_epsilon: Epsilon,
    /// Which accountant turns the rounds into ε.
    pub accountant: AccountantKind,
}

/// How the ledger turns committed rounds into ε.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccountantKind {
    /// RDP with the improved conversion: composes any history.
    Rdp,
    /// Privacy loss distributions: tighter, for a run whose every round
    /// was the same subsampled Gaussian; anything else falls back to RDP.
    Pld,
}

/// Who adds the noise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DpMode {
    /// The server, to the sum of clipped updates.
    Central { adaptive: Option<AdaptiveClip> },
    /// Each client, to its quantized update; the server decodes the sum.
    Distributed(DistributedPlan),
}

/// Andrew et al. 2021: the clip follows a quantile of the update norms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaptiveClip {
    /// The quantile γ of update norms the clip tracks.
    pub target_quantile: f64,
    /// η_C of the geometric update C ← C·exp(−η_C(b̃ − γ)).
    pub learning_rate: f64,
    /// σ_b, the noise on the count of updates within the clip.
    pub count_noise: f64,
    /// z_Δ: the part of z the update noise keeps.
    pub update_noise: NoiseMultiplier,
}

impl AdaptiveClip {
    pub fn new(
        z: NoiseMultiplier,
        target_quantile: f64,
        learning_rate: f64,
        count_noise: f64,
    ) -> Result<Self, String> {
        if !(target_quantile > 0.0 && target_quantile < 1.0) {
            return Err(format!(
                "target_quantile must be in (0, 1), got {target_quantile}"
            ));
        }
        if !(learning_rate.is_finite() && learning_rate > 0.0) {
            return Err(format!(
                "clip_learning_rate must be positive, got {learning_rate}"
            ));
        }
        let update_noise = adaptive_clip_update_noise(z, count_noise).ok_or_else(|| {
            format!(
                "clip_count_noise {count_noise} is too small for noise_multiplier {}: it must exceed z/2",
                z.get()
            )
        })?;
        Ok(Self {
            target_quantile,
            learning_rate,
            count_noise,
            update_noise,
        })
    }
}

impl DpSettings {
    /// What one committed round costs. Central: with adaptive clipping the
    /// count and the update together cost the same as noise z alone
    /// (Andrew et al.). Distributed: Kairouz et al.'s ρ, without
    /// amplification by sampling.
    pub fn mechanism(&self) -> RoundMechanism {
        match self.mode {
            DpMode::Central { .. } => RoundMechanism::SubsampledGaussian {
                q: self.sampling_rate,
                z: self.noise_multiplier,
            },
            DpMode::Distributed(plan) => RoundMechanism::Zcdp { rho: plan.rho },
        }
    }

    fn adaptive(&self) -> Option<AdaptiveClip> {
        match self.mode {
            DpMode::Central { adaptive } => adaptive,
            DpMode::Distributed(_) => None,
        }
    }

    /// The noise multiplier the update sum itself gets.
    fn update_noise(&self) -> NoiseMultiplier {
        self.adaptive()
            .map_or(self.noise_multiplier, |a| a.update_noise)
    }

    /// Distributed: the mean update from the clients' modular sum, and how
    /// many coordinates sit near the ring's edge (a sign of wrap-around).
    pub fn decode_sum(
        &self,
        plan: &DistributedPlan,
        sum: &[u32],
    ) -> Result<(Vec<f32>, usize), QuantizeError> {
        let (mut values, at_risk) = plan.quantizer.decode(sum)?;
        let inv = (1.0 / self.expected_cohort) as f32;
        values.iter_mut().for_each(|v| *v *= inv);
        Ok((values, at_risk))
    }

    /// Adds N_Z(0, (z_Δ·C)²) on a grid of z_Δ·C/1024 to each coordinate of
    /// `sum`, then divides by the expected cohort.
    pub fn privatize(
        &self,
        sum: &mut [f32],
        clip: ClipNorm,
        rng: &mut NoiseRng,
    ) -> Result<(), NoiseError> {
        let sigma = self.update_noise().get() * clip.get();
        let step = sigma / GRID_STEPS_PER_SIGMA;
        let gaussian = DiscreteGaussian::new(GRID_STEPS_PER_SIGMA)?;
        let inv = 1.0 / self.expected_cohort;
        for v in sum.iter_mut() {
            let noise = gaussian.sample(rng) as f64 * step;
            *v = ((f64::from(*v) + noise) * inv) as f32;
        }
        Ok(())
    }

    /// The next round's clip, from how many of this round's updates were
    /// within the clip (noised), or the same clip without adaptation.
    pub fn next_clip(
        &self,
        clip: ClipNorm,
        within: usize,
        rng: &mut NoiseRng,
    ) -> Result<ClipNorm, NoiseError> {
        let Some(a) = self.adaptive() else {
            return Ok(clip);
        };
        let fraction = noisy_count(within, a.count_noise, rng)? / self.expected_cohort;
        let next = clip.get() * (-a.learning_rate * (fraction - a.target_quantile)).exp();
        // A clip cannot reach zero or infinity through finitely many rounds,
        // but keep it a valid norm whatever the noise did.
        Ok(ClipNorm::new(next.clamp(1e-9, 1e9)).unwrap_or(clip))
    }
}

/// `count` plus N_Z(0, σ²) on a grid of σ/1024.
fn noisy_count(count: usize, sigma: f64, rng: &mut NoiseRng) -> Result<f64, NoiseError> {
    let gaussian = DiscreteGaussian::new(GRID_STEPS_PER_SIGMA)?;
    Ok(count as f64 + gaussian.sample(rng) as f64 * sigma / GRID_STEPS_PER_SIGMA)
}

/// What the server remembers about privacy across restarts, written in the
/// same transaction as each committed version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyLedger {
    pub accountant: RdpAccountant,
    /// Committed rounds accounted.
    pub rounds: u64,
    /// Clip of the next round.
    pub clip: ClipNorm,
    /// The rounds as runs of identical mechanisms, oldest first: what the
    /// PLD accountant composes. Empty in ledgers written before it existed.
    pub history: Vec<(RoundMechanism, u64)>,
}

/// A ledger as written before `history` was kept; its rounds are accounted
/// by RDP alone, since their mechanisms are not known one by one.
#[derive(Deserialize)]
pub struct LegacyPrivacyLedger {
    accountant: RdpAccountant,
    rounds: u64,
    clip: ClipNorm,
}

impl From<LegacyPrivacyLedger> for PrivacyLedger {
    fn from(old: LegacyPrivacyLedger) -> Self {
        Self {
            accountant: old.accountant,
            rounds: old.rounds,
            clip: old.clip,
            history: Vec::new(),
        }
    }
}

impl PrivacyLedger {
    pub fn new(clip: ClipNorm) -> Self {
        Self {
            accountant: RdpAccountant::new(),
            rounds: 0,
            clip,
            history: Vec::new(),
        }
    }

    /// ε spent so far, by the run's accountant.
    pub fn epsilon(&self, dp: &DpSettings) -> f64 {
        let rdp = self
            .accountant
            .epsilon(dp.delta, Conversion::Improved)
            .0
            .get();
        match self.pld_case(dp, 0) {
            // Both bounds are proven; the smaller one is the claim.
            Some((q, z, rounds)) => {
                pld_epsilon(q, z, rounds, dp.delta).map_or(rdp, |e| e.get().min(rdp))
            }
            None => rdp,
        }
    }

    /// (q, z, rounds) when PLD applies to the history plus `more` rounds of
    /// `dp`'s mechanism: every round the same subsampled Gaussian.
    fn pld_case(&self, dp: &DpSettings, more: u64) -> Option<(SamplingRate, NoiseMultiplier, u64)> {
        if dp.accountant != AccountantKind::Pld {
            return None;
        }
        let RoundMechanism::SubsampledGaussian { q, z } = dp.mechanism() else {
            return None;
        };
        let known: u64 = self.history.iter().map(|(_, n)| n).sum();
        let same = self.history.iter().all(|(m, _)| *m == dp.mechanism());
        (known == self.rounds && same).then_some((q, z, self.rounds + more))
    }

    /// Accounts one committed round.
    pub fn spend(&mut self, dp: &DpSettings) {
        let mechanism = dp.mechanism();
        // Central mechanisms are valid by construction.
        let _ = self.accountant.compose(mechanism, 1);
        self.rounds += 1;
        match self.history.last_mut() {
            Some((last, n)) if *last == mechanism => *n += 1,
            _ => self.history.push((mechanism, 1)),
        }
    }

    /// Rounds the budget still admits, at most `cap`.
    pub fn rounds_left(&self, dp: &DpSettings, cap: u64) -> u64 {
        let rdp = rounds_within_budget(
            &self.accountant,
            dp.mechanism(),
            dp.target_epsilon,
            dp.delta,
            cap,
        )
        // An invalid mechanism (unreachable: settings are checked) admits nothing.
        .unwrap_or(0);
        let Some((q, z, spent)) = self.pld_case(dp, 0) else {
            return rdp;
        };
        // PLD admits at least what RDP does; search above that.
        let fits = |k: u64| {
            pld_epsilon(q, z, spent + k, dp.delta)
                .is_some_and(|e| e.get() <= dp.target_epsilon.get())
        };
        let (mut good, mut bad) = (rdp, cap.saturating_add(1));
        if good < cap && !fits(good + 1) {
            return good;
        }
        while bad - good > 1 {
            let mid = good + (bad - good) / 2;
            if fits(mid) {
                good = mid;
            } else {
                bad = mid;
            }
        }
        good
    }

    /// ε if one more round were committed.
    pub fn epsilon_after_next(&self, dp: &DpSettings) -> f64 {
        let mut next = self.clone();
        next.spend(dp);
        next.epsilon(dp)
    }
}

/// Central or distributed DP as a server runs it: the settings, what was
/// spent, and the noise source.
pub struct Privacy {
    pub dp: DpSettings,
    pub ledger: PrivacyLedger,
    /// Behind a mutex only so a commit's blocking task can borrow it.
    pub rng: std::sync::Arc<std::sync::Mutex<NoiseRng>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dp(adaptive: bool) -> DpSettings {
        let z = NoiseMultiplier::new(1.0).unwrap();
        DpSettings {
            mode: DpMode::Central {
                adaptive: adaptive.then(|| AdaptiveClip::new(z, 0.5, 0.2, 1.0).unwrap()),
            },
            initial_clip: ClipNorm::new(1.0).unwrap(),
            noise_multiplier: z,
            sampling_rate: SamplingRate::new(1.0).unwrap(),
            expected_cohort: 10.0,
            delta: Delta::new(1e-5).unwrap(),
            target_epsilon: Epsilon::new(5.0).unwrap(),
            accountant: AccountantKind::Rdp,
        }
    }

    #[test]
    fn noise_on_the_mean_has_std_z_c_over_n() {
        let dp = dp(false);
        let mut sum = vec![0f32; 1_000_000];
        let mut rng = NoiseRng::insecure_from_seed(1);
        dp.privatize(&mut sum, ClipNorm::new(1.0).unwrap(), &mut rng)
            .unwrap();
        let n = sum.len() as f64;
        let mean = sum.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let std = (sum
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!((std / 0.1 - 1.0).abs() < 0.01, "std {std}");
        assert!(mean.abs() < 1e-3, "mean {mean}");
    }

    #[test]
    fn the_clip_count_noise_has_std_sigma_b() {
        let mut rng = NoiseRng::insecure_from_seed(3);
        let draws: Vec<f64> = (0..1_000_000)
            .map(|_| noisy_count(7, 2.5, &mut rng).unwrap() - 7.0)
            .collect();
        let n = draws.len() as f64;
        let std = (draws.iter().map(|d| d * d).sum::<f64>() / n).sqrt();
        assert!((std / 2.5 - 1.0).abs() < 0.01, "std {std}");
    }

    #[test]
    fn adaptive_clip_moves_toward_the_quantile() {
        let dp = dp(true);
        let mut rng = NoiseRng::insecure_from_seed(2);
        let clip = ClipNorm::new(1.0).unwrap();
        // Every update within the clip: the clip shrinks; none: it grows.
        let down = dp.next_clip(clip, 10, &mut rng).unwrap();
        let up = dp.next_clip(clip, 0, &mut rng).unwrap();
        assert!(down.get() < 1.0 && up.get() > 1.0, "{down:?} {up:?}");
        assert!((up.get() - (0.2f64 * 0.5).exp()).abs() < 0.1);
        assert_eq!(self::dp(false).next_clip(clip, 0, &mut rng).unwrap(), clip);
        assert!(AdaptiveClip::new(NoiseMultiplier::new(1.0).unwrap(), 0.5, 0.2, 0.3).is_err());
        assert!(AdaptiveClip::new(NoiseMultiplier::new(1.0).unwrap(), 1.5, 0.2, 5.0).is_err());
    }

    #[test]
    fn the_ledger_enforces_the_budget() {
        let dp = dp(false);
        let mut ledger = PrivacyLedger::new(dp.initial_clip);
        let left = ledger.rounds_left(&dp, 1000);
        assert!(left > 0 && left < 1000);
        for _ in 0..left {
            ledger.spend(&dp);
        }
        assert!(ledger.epsilon(&dp) <= 5.0);
        assert_eq!(ledger.rounds_left(&dp, 1000), 0);
        assert!(ledger.epsilon_after_next(&dp) > 5.0);
    }

    #[test]
    fn pld_admits_more_rounds_within_the_same_budget() {
        let rdp = DpSettings {
            sampling_rate: SamplingRate::new(0.1).unwrap(),
            target_epsilon: Epsilon::new(2.0).unwrap(),
            ..dp(false)
        };
        let pld = DpSettings {
            accountant: AccountantKind::Pld,
            ..rdp
        };
        let fresh = PrivacyLedger::new(rdp.initial_clip);
        let (by_rdp, by_pld) = (
            fresh.rounds_left(&rdp, 10_000),
            fresh.rounds_left(&pld, 10_000),
        );
        assert!(by_pld > by_rdp, "pld {by_pld} rdp {by_rdp}");
        let mut ledger = fresh.clone();
        for _ in 0..by_pld {
            ledger.spend(&pld);
        }
        // Exactly at the edge: within the budget now, over it after one more.
        assert!(ledger.epsilon(&pld) <= 2.0);
        assert!(ledger.epsilon_after_next(&pld) > 2.0);
        assert!(ledger.epsilon(&pld) < ledger.epsilon(&rdp));
        assert_eq!(ledger.history, vec![(pld.mechanism(), by_pld)]);
        // A round of another mechanism in the history: back to RDP.
        ledger.spend(&DpSettings {
            noise_multiplier: NoiseMultiplier::new(2.0).unwrap(),
            ..pld
        });
        assert_eq!(ledger.epsilon(&pld), ledger.epsilon(&rdp));
    }

    #[test]
    fn a_ledger_from_before_the_history_still_loads() {
        #[derive(Serialize)]
        struct Old {
            accountant: RdpAccountant,
            rounds: u64,
            clip: ClipNorm,
        }
        let dp = dp(false);
        let mut ledger = PrivacyLedger::new(dp.initial_clip);
        ledger.spend(&dp);
        let old = postcard::to_stdvec(&Old {
            accountant: ledger.accountant.clone(),
            rounds: 1,
            clip: ledger.clip,
        })
        .unwrap();
        assert!(postcard::from_bytes::<PrivacyLedger>(&old).is_err());
        let loaded: PrivacyLedger = postcard::from_bytes::<LegacyPrivacyLedger>(&old)
            .unwrap()
            .into();
        assert_eq!(loaded.rounds, 1);
        assert!(loaded.history.is_empty());
        // With PLD asked for, an unknown history is accounted by RDP.
        let pld = DpSettings {
            accountant: AccountantKind::Pld,
            ..dp
        };
        assert_eq!(loaded.epsilon(&pld), ledger.epsilon(&dp));
    }
}
