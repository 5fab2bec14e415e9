//! Privacy loss distributions: a tighter accountant than RDP for rounds of
//! the Poisson-subsampled Gaussian (Koskela et al. 2020; Meiser and
//! Mohammadi 2018), with the pessimistic connect-the-dots discretization of
//! Doroshenko, Ghazi, Kamath, Kumar and Manurangsi 2022.
//!
//! Each step's privacy loss is put on a grid of width h as a distribution
//! that dominates the true one: its hockey-stick divergence δ(ε) is at least
//! the mechanism's at every ε, so every ε this module reports is proven.
//! T steps compose by convolution (FFT); mass cut from the tails is counted
//! as infinite loss, which again can only raise ε. Add and remove
//! neighbours have different losses under subsampling; ε is the larger.

use realfft::RealFftPlanner;

use crate::accountant::{Delta, Epsilon, NoiseMultiplier, SamplingRate};

/// Width of the privacy-loss grid; dp_accounting's default, and fine
/// enough that ε moves by well under 1% at any step count.
pub const DISCRETIZATION: f64 = 1e-4;

/// ln of the noise mass each step leaves off its grid, counted as infinite
/// loss.
const LOG_MASS_TRUNCATION: f64 = -50.0;

/// Mass each composition may drop from the tails, counted as infinite loss.
const TAIL_MASS_TRUNCATION: f64 = 1e-15;

/// The most grid points one distribution may take (128 MiB of f64). Where
/// the width [`DISCRETIZATION`] would need more (tiny noise, very many
/// rounds), the width doubles until it fits: a coarser grid still
/// dominates, so ε stays proven, only less tight.
const MAX_GRID: usize = 1 << 24;

/// A discretized privacy loss: `probs[i]` at loss `(lower + i) · h`, and
/// `infinity` at +∞.
#[derive(Clone, Debug, PartialEq)]
struct Pmf {
    lower: i64,
    probs: Vec<f64>,
    infinity: f64,
    h: f64,
}

/// Which neighbour differs: with subsampling the two losses differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Adjacency {
    /// The real data set has one more record than its neighbour.
    Remove,
    /// The real data set has one fewer.
    Add,
}

/// The Poisson-subsampled Gaussian with sensitivity 1 and noise std σ = z.
#[derive(Clone, Copy, Debug)]
struct SubsampledGaussian {
    q: f64,
    sigma: f64,
    adjacency: Adjacency,
}

impl SubsampledGaussian {
    /// ln(q·e^b + 1 − q), without overflow or cancellation.
    fn log_mix(&self, b: f64) -> f64 {
        if self.q >= 1.0 {
            b
        } else if b > 0.0 {
            b + (self.q + (1.0 - self.q) * (-b).exp()).ln()
        } else {
            (self.q * b.exp_m1()).ln_1p()
        }
    }

    /// The privacy loss at output x; non-increasing in x.
    fn loss(&self, x: f64) -> f64 {
        let s2 = self.sigma * self.sigma;
        match self.adjacency {
            Adjacency::Remove => self.log_mix((-0.5 - x) / s2),
            Adjacency::Add => -self.log_mix((x - 0.5) / s2),
        }
    }

    /// The x at which the loss is ε; `None` where the loss never reaches ε.
    fn inverse_loss(&self, epsilon: f64) -> Option<f64> {
        let s2 = self.sigma * self.sigma;
        // Both invert q·e^ℓ + 1 − q = e^(±ε): ℓ = ln((e^(±ε) − 1 + q)/q).
        let base = |e: f64| {
            if self.q >= 1.0 {
                return Some(e);
            }
            let inner = e.exp_m1() + self.q;
            (inner > 0.0).then(|| inner.ln() - self.q.ln())
        };
        match self.adjacency {
            Adjacency::Remove => base(epsilon).map(|l| -0.5 - l * s2),
            Adjacency::Add => base(-epsilon).map(|l| 0.5 + l * s2),
        }
    }

    fn normal_cdf(&self, x: f64) -> f64 {
        0.5 * libm::erfc(-x / (self.sigma * std::f64::consts::SQRT_2))
    }

    fn mixture_cdf(&self, x: f64, shift: f64) -> f64 {
        (1.0 - self.q) * self.normal_cdf(x) + self.q * self.normal_cdf(x + shift)
    }

    /// The hockey-stick divergence δ(ε) = P(L > ε) − e^ε · P'(L > ε).
    fn delta(&self, epsilon: f64) -> f64 {
        let Some(x) = self.inverse_loss(epsilon) else {
            // Remove: every loss exceeds ε; add: none does.
            return match self.adjacency {
                Adjacency::Remove => -epsilon.exp_m1(),
                Adjacency::Add => 0.0,
            }
            .clamp(0.0, 1.0);
        };
        let (upper, lower) = match self.adjacency {
            Adjacency::Remove => (self.mixture_cdf(x, 1.0), self.normal_cdf(x)),
            Adjacency::Add => (self.normal_cdf(x), self.mixture_cdf(x, -1.0)),
        };
        (upper - epsilon.exp() * lower).clamp(0.0, 1.0)
    }

    /// The losses at the ends of the outputs the grid covers: outside
    /// ±tail·σ (shifted by the sensitivity on the side that has it) lies
    /// e^-50 of the mass.
    fn loss_range(&self) -> (f64, f64) {
        let tail = self.sigma * normal_quantile(0.5 * LOG_MASS_TRUNCATION.exp());
        let (mut low_x, mut high_x) = (tail, -tail);
        match self.adjacency {
            Adjacency::Remove => low_x -= 1.0,
            Adjacency::Add => high_x += 1.0,
        }
        (self.loss(high_x), self.loss(low_x))
    }

    /// Connect-the-dots: the pmf on the grid that dominates this loss,
    /// from δ at each grid point (Doroshenko et al., Algorithm 1).
    fn pmf(&self, h: f64) -> Pmf {
        let (low_loss, high_loss) = self.loss_range();
        let lower = (low_loss / h).floor() as i64;
        let upper = (high_loss / h).ceil() as i64;
        let mut deltas: Vec<f64> = (lower..=upper).map(|i| self.delta(i as f64 * h)).collect();
        // δ is non-increasing; keep it so through rounding.
        for i in 1..deltas.len() {
            deltas[i] = deltas[i].min(deltas[i - 1]);
        }
        let last = *deltas.last().unwrap_or(&1.0);
        if deltas.len() == 1 {
            return Pmf {
                lower,
                probs: vec![1.0 - deltas[0]],
                infinity: deltas[0],
                h,
            };
        }
        let diffs: Vec<f64> = deltas.windows(2).map(|w| w[1] - w[0]).collect();
        let em1 = h.exp_m1();
        let mut probs = Vec::with_capacity(deltas.len());
        probs.push(1.0 - deltas[0] + diffs[0] / em1);
        probs.extend(diffs.windows(2).map(|w| (w[1] - w[0] * h.exp()) / em1));
        probs.push(diffs[diffs.len() - 1] / (-h).exp_m1());
        probs.iter_mut().for_each(|p| *p = p.max(0.0));
        Pmf {
            lower,
            probs,
            infinity: last,
            h,
        }
    }
}

impl Pmf {
    /// `times` independent copies composed: the `times`-fold convolution,
    /// kept on the range a Chernoff bound leaves at most
    /// [`TAIL_MASS_TRUNCATION`] outside. `None` when that range passes
    /// [`MAX_GRID`].
    fn self_compose(&self, times: u64) -> Option<Pmf> {
        if times == 1 {
            return Some(self.clone());
        }
        let n = self.probs.len();
        let (low, high) = convolution_bounds(&self.probs, times);
        let out_len = usize::try_from(high - low + 1)
            .ok()
            .filter(|l| *l <= MAX_GRID)?;
        let size = fast_len(out_len.max(n));
        let mut planner = RealFftPlanner::<f64>::new();
        let forward = planner.plan_fft_forward(size);
        let inverse = planner.plan_fft_inverse(size);
        let mut signal = vec![0.0; size];
        signal[..n].copy_from_slice(&self.probs);
        let mut spectrum = forward.make_output_vec();
        // Lengths come from the planner itself, so the transforms cannot fail.
        let _ = forward.process(&mut signal, &mut spectrum);
        let power = i32::try_from(times).ok();
        for c in spectrum.iter_mut() {
            *c = match power {
                Some(p) => c.powi(p),
                None => c.powf(times as f64),
            };
        }
        // realfft wants the imaginary parts of the DC and Nyquist bins zero.
        if let Some(first) = spectrum.first_mut() {
            first.im = 0.0;
        }
        if let Some(last) = spectrum.last_mut().filter(|_| size.is_multiple_of(2)) {
            last.im = 0.0;
        }
        let _ = inverse.process(&mut spectrum, &mut signal);
        let scale = 1.0 / size as f64;
        // The convolution is circular over `size`; index k of the result is
        // loss index low + k.
        let probs = (0..out_len)
            .map(|k| signal[(low as usize + k) % size] * scale)
            .collect();
        Some(Pmf {
            lower: self.lower * times as i64 + low,
            probs,
            infinity: TAIL_MASS_TRUNCATION - (times as f64 * (-self.infinity).ln_1p()).exp_m1(),
            h: self.h,
        })
    }

    /// The smallest ε ≥ 0 whose δ(ε) is at most `delta`.
    fn epsilon_for_delta(&self, delta: f64) -> f64 {
        if self.infinity > delta {
            return f64::INFINITY;
        }
        let (mut mass_upper, mut mass_lower) = (self.infinity, 0.0f64);
        let top = self.lower + self.probs.len() as i64 - 1;
        for (j, &p) in self.probs.iter().rev().enumerate() {
            let loss = (top - j as i64) as f64 * self.h;
            if mass_upper > delta
                && mass_lower > 0.0
                && ((mass_upper - delta) / mass_lower).ln() >= loss
            {
                break;
            }
            mass_upper += p;
            mass_lower += (-loss).exp() * p;
            if mass_upper >= delta && mass_lower == 0.0 {
                return loss.max(0.0);
            }
        }
        if mass_upper <= mass_lower + delta {
            return 0.0;
        }
        ((mass_upper - delta) / mass_lower).ln()
    }
}

/// Index range [low, high] of the `times`-fold convolution of `probs`
/// outside which at most [`TAIL_MASS_TRUNCATION`] lies, by Chernoff bounds
/// at a few orders on each side.
fn convolution_bounds(probs: &[f64], times: u64) -> (i64, i64) {
    let n = probs.len();
    let mut high = (n as i64 - 1) * times as i64;
    let mut low = 0i64;
    let log_tail = (2.0 / TAIL_MASS_TRUNCATION).ln();
    for k in (-20i32..=20).filter(|k| *k != 0) {
        let order = f64::from(k) / n as f64;
        let log_mgf = log_sum_exp(
            probs
                .iter()
                .enumerate()
                .map(|(i, &p)| (i as f64 * order, p)),
        );
        let bound = (times as f64 * log_mgf + log_tail) / order;
        if !bound.is_finite() {
            continue;
        }
        if order > 0.0 {
            high = high.min(bound.ceil() as i64);
        } else {
            low = low.max(bound.floor() as i64);
        }
    }
    (low, high.max(low))
}

/// ln Σ p·e^a over (a, p) with p ≥ 0.
fn log_sum_exp(terms: impl Iterator<Item = (f64, f64)> + Clone) -> f64 {
    let max = terms
        .clone()
        .filter(|(_, p)| *p > 0.0)
        .map(|(a, _)| a)
        .fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return f64::NEG_INFINITY;
    }
    max + terms.map(|(a, p)| p * (a - max).exp()).sum::<f64>().ln()
}

/// The smallest 2^a·3^b·5^c at least n, where FFTs are fastest.
fn fast_len(n: usize) -> usize {
    let mut best = n.next_power_of_two();
    let mut p5 = 1usize;
    while p5 < best {
        let mut p35 = p5;
        while p35 < best {
            let mut candidate = p35;
            while candidate < n {
                candidate *= 2;
            }
            best = best.min(candidate);
            p35 *= 3;
        }
        p5 *= 5;
    }
    best
}

/// Φ⁻¹(p) for p in (0, ½], by bisection on erfc, which stays accurate in
/// the far tail where the quantile is needed.
fn normal_quantile(p: f64) -> f64 {
    let cdf = |x: f64| 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
    let (mut low, mut high) = (-40.0f64, 0.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (low + high);
        if cdf(mid) < p {
            low = mid;
        } else {
            high = mid;
        }
    }
    low
}

/// ε after `rounds` of the Poisson-subsampled Gaussian, by PLD; `None`
/// when more than δ of the loss is unbounded, so no finite ε holds.
pub fn pld_epsilon(
    q: SamplingRate,
    z: NoiseMultiplier,
    rounds: u64,
    delta: Delta,
) -> Option<Epsilon> {
    if rounds == 0 {
        return Epsilon::new(0.0).ok();
    }
    let adjacencies: &[Adjacency] = if q.get() >= 1.0 {
        // Without subsampling the two losses are the same.
        &[Adjacency::Remove]
    } else {
        &[Adjacency::Remove, Adjacency::Add]
    };
    let eps = adjacencies
        .iter()
        .map(|&adjacency| {
            let g = SubsampledGaussian {
                q: q.get(),
                sigma: z.get(),
                adjacency,
            };
            let (low, high) = g.loss_range();
            let mut h = DISCRETIZATION.max((high - low) / MAX_GRID as f64);
            loop {
                if let Some(composed) = g.pmf(h).self_compose(rounds) {
                    return composed.epsilon_for_delta(delta.get());
                }
                h *= 2.0;
            }
        })
        .fold(0.0f64, f64::max);
    Epsilon::new(eps).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(v: f64) -> SamplingRate {
        SamplingRate::new(v).unwrap()
    }
    fn z(v: f64) -> NoiseMultiplier {
        NoiseMultiplier::new(v).unwrap()
    }
    fn d(v: f64) -> Delta {
        Delta::new(v).unwrap()
    }

    #[test]
    fn gaussian_without_sampling_matches_the_closed_form() {
        // Balle and Wang 2018: the Gaussian mechanism's exact δ(ε) is
        // Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ).
        let phi = |x: f64| 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
        for (sigma, eps) in [(1.0, 1.0), (2.0, 0.5), (0.8, 3.0)] {
            let exact =
                phi(0.5 / sigma - eps * sigma) - eps.exp() * phi(-0.5 / sigma - eps * sigma);
            let g = SubsampledGaussian {
                q: 1.0,
                sigma,
                adjacency: Adjacency::Remove,
            };
            assert!((g.delta(eps) / exact - 1.0).abs() < 1e-9);
            // And the ε the discretized PLD gives for that δ is just above eps.
            let got = pld_epsilon(q(1.0), z(sigma), 1, d(exact)).unwrap().get();
            assert!(
                got >= eps - 1e-9 && got < eps + 2e-3,
                "σ={sigma}: {got} for {eps}"
            );
        }
    }

    #[test]
    fn many_gaussians_compose_to_one_of_smaller_noise() {
        // T Gaussians of std σ are one Gaussian of std σ/√T: a check of the
        // FFT composition against the single-step closed form.
        let single = pld_epsilon(q(1.0), z(1.0), 1, d(1e-5)).unwrap().get();
        let composed = pld_epsilon(q(1.0), z(10.0), 100, d(1e-5)).unwrap().get();
        assert!(
            (composed / single - 1.0).abs() < 0.01,
            "{composed} vs {single}"
        );
    }

    #[test]
    fn pmf_is_a_distribution_and_dominates() {
        for adjacency in [Adjacency::Remove, Adjacency::Add] {
            let g = SubsampledGaussian {
                q: 0.05,
                sigma: 1.2,
                adjacency,
            };
            let pmf = g.pmf(1e-3);
            assert!(pmf.probs.len() < MAX_GRID);
            let total: f64 = pmf.probs.iter().sum::<f64>() + pmf.infinity;
            assert!((total - 1.0).abs() < 1e-9, "{adjacency:?}: mass {total}");
            // The discrete δ at each grid point is at least the true one.
            for i in (0..pmf.probs.len()).step_by(37) {
                let eps = (pmf.lower + i as i64) as f64 * pmf.h;
                let discrete = pmf.infinity
                    + pmf
                        .probs
                        .iter()
                        .enumerate()
                        .map(|(j, p)| {
                            let loss = (pmf.lower + j as i64) as f64 * pmf.h;
                            if loss > eps {
                                p * -(eps - loss).exp_m1()
                            } else {
                                0.0
                            }
                        })
                        .sum::<f64>();
                assert!(discrete >= g.delta(eps) - 1e-12, "{adjacency:?} at ε={eps}");
            }
        }
    }

    #[test]
    fn tighter_than_rdp_and_monotone() {
        let rdp = crate::accountant::dp_fedavg_epsilon(q(0.01), z(4.0), 10_000, d(1e-5)).get();
        let pld = pld_epsilon(q(0.01), z(4.0), 10_000, d(1e-5)).unwrap().get();
        assert!(pld < rdp, "pld {pld} rdp {rdp}");
        let mut last = 0.0;
        for t in [1, 10, 100, 1000] {
            let eps = pld_epsilon(q(0.1), z(1.0), t, d(1e-5)).unwrap().get();
            assert!(eps > last, "T={t}: {eps} after {last}");
            last = eps;
        }
        assert_eq!(pld_epsilon(q(0.1), z(1.0), 0, d(1e-5)).unwrap().get(), 0.0);
    }

    #[test]
    fn tiny_noise_coarsens_the_grid_instead_of_exhausting_memory() {
        // z = 0.05 spans losses up to ~400 in one step: 4 M points at 1e-4,
        // and far more composed. The coarser grid must still be an upper
        // bound, so it is at least the single step's exact ε.
        let one = pld_epsilon(q(1.0), z(0.05), 1, d(1e-5)).unwrap().get();
        let many = pld_epsilon(q(0.5), z(0.05), 5_000, d(1e-5)).unwrap().get();
        assert!(one > 50.0 && many > one, "{one} {many}");
    }

    #[test]
    fn fast_lengths() {
        assert_eq!(fast_len(1), 1);
        assert_eq!(fast_len(7), 8);
        assert_eq!(fast_len(11), 12);
        assert_eq!(fast_len(1001), 1024);
        assert_eq!(fast_len(1025), 1080);
    }
}
