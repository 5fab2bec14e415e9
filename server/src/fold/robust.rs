//! Byzantine-robust aggregation: rules that keep a few malicious updates
//! from steering the model. Each needs every update of the round at once,
//! so a round using one holds cohort × model floats, not one running sum.

use std::{fmt, str::FromStr};

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum RobustError {
    #[error("{rule} needs at least {needed} updates, the round has {got}")]
    TooFew {
        rule: &'static str,
        needed: usize,
        got: usize,
    },
    #[error("updates differ in length: {0} and {1}")]
    Length(usize, usize),
}

/// How the round's updates become one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Aggregator {
    /// Example-weighted mean (FedAvg), folded as updates arrive.
    Mean,
    /// Each update scaled to L2 norm at most `max_norm`, then the weighted
    /// mean (Sun et al. 2019).
    NormBound { max_norm: f64 },
    /// Coordinate-wise median (Yin et al. 2018).
    Median,
    /// Coordinate-wise mean after dropping the `trim` fraction of largest
    /// and of smallest values (Yin et al. 2018).
    TrimmedMean { trim: f64 },
    /// The update closest to its n − f − 2 nearest neighbours (Blanchard et
    /// al. 2017), tolerating `f` attackers.
    Krum { f: usize },
    /// The mean of the `m` best Krum scores.
    MultiKrum { f: usize, m: usize },
    /// Krum selection of n − 2f updates, then a coordinate-wise trimmed
    /// mean of those closest to the median (El Mhamdi et al. 2018).
    Bulyan { f: usize },
}

impl Aggregator {
    /// Whether updates can be folded one at a time into a running sum.
    pub fn is_streaming(&self) -> bool {
        matches!(self, Self::Mean | Self::NormBound { .. })
    }

    /// The fewest updates this rule is defined for.
    pub fn min_updates(&self) -> usize {
        match *self {
            // Trimming a fraction below one half always leaves a value.
            Self::Mean | Self::NormBound { .. } | Self::Median | Self::TrimmedMean { .. } => 1,
            Self::Krum { f } => 2 * f + 3,
            Self::MultiKrum { f, m } => (2 * f + 3).max(m),
            Self::Bulyan { f } => 4 * f + 3,
        }
    }

    /// Combines `updates` (with their example weights, used by the means)
    /// into one update.
    pub fn aggregate(
        &self,
        updates: &[Vec<f32>],
        weights: &[f64],
    ) -> Result<Vec<f32>, RobustError> {
        let n = updates.len();
        if n < self.min_updates() {
            return Err(RobustError::TooFew {
                rule: self.name(),
                needed: self.min_updates(),
                got: n,
            });
        }
        let d = updates[0].len();
        if let Some(u) = updates.iter().find(|u| u.len() != d) {
            return Err(RobustError::Length(d, u.len()));
        }
        Ok(match *self {
            Self::Mean => weighted_mean(updates.iter().map(Vec::as_slice), weights, d),
            Self::NormBound { max_norm } => {
                let bounded: Vec<Vec<f32>> = updates
                    .iter()
                    .map(|u| {
                        let norm = covey_privacy::l2_norm(u);
                        let scale = if norm > max_norm {
                            max_norm / norm
                        } else {
                            1.0
                        };
                        u.iter().map(|v| (f64::from(*v) * scale) as f32).collect()
                    })
                    .collect();
                weighted_mean(bounded.iter().map(Vec::as_slice), weights, d)
            }
            Self::Median => coordinate_wise(updates, d, median),
            Self::TrimmedMean { trim } => {
                let k = (trim * n as f64).floor() as usize;
                coordinate_wise(updates, d, |column| trimmed_mean(column, k))
            }
            Self::Krum { f } => {
                let all: Vec<usize> = (0..n).collect();
                updates[krum_order(&distances(updates), &all, f)[0]].clone()
            }
            Self::MultiKrum { f, m } => {
                let all: Vec<usize> = (0..n).collect();
                let chosen = &krum_order(&distances(updates), &all, f)[..m];
                let w: Vec<f64> = chosen.iter().map(|&i| weights[i]).collect();
                weighted_mean(chosen.iter().map(|&i| updates[i].as_slice()), &w, d)
            }
            Self::Bulyan { f } => {
                // Iterated Krum over one distance matrix: pick θ = n − 2f.
                let dist = distances(updates);
                let mut pool: Vec<usize> = (0..n).collect();
                let mut selected = Vec::new();
                while selected.len() < n - 2 * f {
                    let krum_f = f.min(pool.len().saturating_sub(3) / 2);
                    let best = krum_order(&dist, &pool, krum_f)[0];
                    pool.retain(|&i| i != best);
                    selected.push(updates[best].clone());
                }
                // β = θ − 2f values closest to the median, averaged.
                let beta = selected.len() - 2 * f;
                coordinate_wise(&selected, d, |column| {
                    let m = median(column);
                    column.sort_by(|a, b| (a - m).abs().total_cmp(&(b - m).abs()));
                    column[..beta].iter().sum::<f64>() / beta as f64
                })
            }
        })
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Mean => "mean",
            Self::NormBound { .. } => "norm-bound",
            Self::Median => "median",
            Self::TrimmedMean { .. } => "trimmed-mean",
            Self::Krum { .. } => "krum",
            Self::MultiKrum { .. } => "multi-krum",
            Self::Bulyan { .. } => "bulyan",
        }
    }
}

fn weighted_mean<'a>(
    updates: impl Iterator<Item = &'a [f32]>,
    weights: &[f64],
    d: usize,
) -> Vec<f32> {
    let mut sum = vec![0f64; d];
    let mut total = 0.0;
    for (u, &w) in updates.zip(weights) {
        sum.iter_mut()
            .zip(u)
            .for_each(|(s, v)| *s += w * f64::from(*v));
        total += w;
    }
    sum.into_iter().map(|s| (s / total) as f32).collect()
}

/// Applies `reduce` to each coordinate's column of values.
fn coordinate_wise(
    updates: &[Vec<f32>],
    d: usize,
    mut reduce: impl FnMut(&mut [f64]) -> f64,
) -> Vec<f32> {
    let mut column = vec![0f64; updates.len()];
    (0..d)
        .map(|j| {
            column
                .iter_mut()
                .zip(updates)
                .for_each(|(c, u)| *c = f64::from(u[j]));
            reduce(&mut column) as f32
        })
        .collect()
}

fn median(column: &mut [f64]) -> f64 {
    column.sort_by(f64::total_cmp);
    let n = column.len();
    if n % 2 == 1 {
        column[n / 2]
    } else {
        (column[n / 2 - 1] + column[n / 2]) / 2.0
    }
}

fn trimmed_mean(column: &mut [f64], k: usize) -> f64 {
    column.sort_by(f64::total_cmp);
    let kept = &column[k..column.len() - k];
    kept.iter().sum::<f64>() / kept.len() as f64
}

/// Squared L2 distances between every pair of updates.
fn distances(updates: &[Vec<f32>]) -> Vec<Vec<f64>> {
    let n = updates.len();
    let mut dist = vec![vec![0f64; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let d2: f64 = updates[i]
                .iter()
                .zip(&updates[j])
                .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                .sum();
            dist[i][j] = d2;
            dist[j][i] = d2;
        }
    }
    dist
}

/// The updates in `pool` ordered by Krum score (the sum of squared
/// distances to the |pool| − f − 2 nearest others in the pool), best first.
fn krum_order(dist: &[Vec<f64>], pool: &[usize], f: usize) -> Vec<usize> {
    let neighbours = pool.len().saturating_sub(f + 2).max(1);
    let score = |i: usize| -> f64 {
        let mut others: Vec<f64> = pool
            .iter()
            .filter(|&&j| j != i)
            .map(|&j| dist[i][j])
            .collect();
        others.sort_by(f64::total_cmp);
        others.iter().take(neighbours).sum()
    };
    let mut scored: Vec<(f64, usize)> = pool.iter().map(|&i| (score(i), i)).collect();
    scored.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
    scored.into_iter().map(|(_, i)| i).collect()
}

impl fmt::Display for Aggregator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NormBound { max_norm } => write!(f, "norm-bound:{max_norm}"),
            Self::TrimmedMean { trim } => write!(f, "trimmed-mean:{trim}"),
            Self::Krum { f: byz } => write!(f, "krum:{byz}"),
            Self::MultiKrum { f: byz, m } => write!(f, "multi-krum:{byz}:{m}"),
            Self::Bulyan { f: byz } => write!(f, "bulyan:{byz}"),
            other => f.write_str(other.name()),
        }
    }
}

impl FromStr for Aggregator {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(':');
        let name = parts.next().unwrap_or_default();
        let args: Vec<&str> = parts.collect();
        let usage = "expected mean, norm-bound:C, median, trimmed-mean:FRACTION, krum:F, multi-krum:F:M or bulyan:F";
        let number = |i: usize| -> Result<f64, String> {
            args.get(i)
                .ok_or_else(|| format!("aggregator '{s}' is missing a parameter: {usage}"))?
                .parse::<f64>()
                .map_err(|_| format!("aggregator '{s}': parameter {} is not a number", i + 1))
        };
        let count = |i: usize| -> Result<usize, String> {
            args.get(i)
                .ok_or_else(|| format!("aggregator '{s}' is missing a parameter: {usage}"))?
                .parse::<usize>()
                .map_err(|_| format!("aggregator '{s}': parameter {} is not a count", i + 1))
        };
        let expect_args = |k: usize| {
            if args.len() == k {
                Ok(())
            } else {
                Err(format!("aggregator '{s}' takes {k} parameter(s): {usage}"))
            }
        };
        let agg = match name {
            "mean" => {
                expect_args(0)?;
                Self::Mean
            }
            "median" => {
                expect_args(0)?;
                Self::Median
            }
            "norm-bound" => {
                expect_args(1)?;
                let max_norm = number(0)?;
                if !(max_norm.is_finite() && max_norm > 0.0) {
                    return Err(format!("norm-bound needs a positive norm, got {max_norm}"));
                }
                Self::NormBound { max_norm }
            }
            "trimmed-mean" => {
                expect_args(1)?;
                let trim = number(0)?;
                if !(0.0..0.5).contains(&trim) {
                    return Err(format!(
                        "trimmed-mean trims a fraction in [0, 0.5), got {trim}"
                    ));
                }
                Self::TrimmedMean { trim }
            }
            "krum" => {
                expect_args(1)?;
                Self::Krum { f: count(0)? }
            }
            "multi-krum" => {
                expect_args(2)?;
                let m = count(1)?;
                if m == 0 {
                    return Err("multi-krum averages at least one update (M ≥ 1)".into());
                }
                Self::MultiKrum { f: count(0)?, m }
            }
            "bulyan" => {
                expect_args(1)?;
                Self::Bulyan { f: count(0)? }
            }
            other => return Err(format!("unknown aggregator '{other}': {usage}")),
        };
        Ok(agg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Nine honest updates near 1.0 and `bad` attackers at −100.
    fn round(bad: usize) -> (Vec<Vec<f32>>, Vec<f64>) {
        let mut updates: Vec<Vec<f32>> = (0..9)
            .map(|i| vec![1.0 + 0.01 * i as f32, 2.0 - 0.01 * i as f32, 0.5])
            .collect();
        updates.extend((0..bad).map(|_| vec![-100.0, 100.0, -100.0]));
        let weights = vec![1.0; updates.len()];
        (updates, weights)
    }

    #[test]
    fn robust_rules_ignore_two_attackers_the_mean_does_not() {
        let (updates, weights) = round(2);
        let mean = Aggregator::Mean.aggregate(&updates, &weights).unwrap();
        assert!(mean[0] < -15.0, "the mean is dragged away: {mean:?}");
        for agg in [
            Aggregator::Median,
            Aggregator::TrimmedMean { trim: 0.2 },
            Aggregator::Krum { f: 2 },
            Aggregator::MultiKrum { f: 2, m: 5 },
            Aggregator::Bulyan { f: 2 },
        ] {
            let out = agg.aggregate(&updates, &weights).unwrap();
            assert!((out[0] - 1.04).abs() < 0.05, "{agg}: {out:?}");
            assert!((out[1] - 1.96).abs() < 0.05, "{agg}: {out:?}");
            assert!((out[2] - 0.5).abs() < 1e-6, "{agg}: {out:?}");
        }
        // Norm bounding limits each attacker's pull instead of removing it.
        let bounded = Aggregator::NormBound { max_norm: 3.0 }
            .aggregate(&updates, &weights)
            .unwrap();
        assert!(bounded[0] > 0.5, "{bounded:?}");
    }

    #[test]
    fn rules_refuse_rounds_too_small_for_them() {
        let (updates, weights) = round(0);
        assert_eq!(
            Aggregator::Bulyan { f: 2 }.aggregate(&updates[..8], &weights[..8]),
            Err(RobustError::TooFew {
                rule: "bulyan",
                needed: 11,
                got: 8
            })
        );
        assert!(
            Aggregator::Krum { f: 4 }
                .aggregate(&updates, &weights)
                .is_err()
        );
    }

    #[test]
    fn names_parse_and_print_back() {
        for s in [
            "mean",
            "median",
            "norm-bound:2.5",
            "trimmed-mean:0.1",
            "krum:2",
            "multi-krum:2:5",
            "bulyan:1",
        ] {
            let agg: Aggregator = s.parse().unwrap();
            assert_eq!(agg.to_string(), s);
        }
        for (bad, needle) in [
            ("avg", "unknown aggregator"),
            ("trimmed-mean:0.7", "[0, 0.5)"),
            ("krum", "takes 1 parameter"),
            ("krum:x", "not a count"),
            ("median:3", "takes 0 parameter"),
            ("norm-bound:-1", "positive norm"),
        ] {
            let err = bad.parse::<Aggregator>().unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    proptest! {
        #[test]
        fn median_and_trimmed_mean_stay_within_each_coordinates_range(
            rows in proptest::collection::vec(proptest::collection::vec(-1e3f32..1e3, 4), 1..12),
        ) {
            let weights = vec![1.0; rows.len()];
            for agg in [Aggregator::Median, Aggregator::TrimmedMean { trim: 0.25 }] {
                let out = agg.aggregate(&rows, &weights).unwrap();
                for j in 0..4 {
                    let lo = rows.iter().map(|r| r[j]).fold(f32::INFINITY, f32::min);
                    let hi = rows.iter().map(|r| r[j]).fold(f32::NEG_INFINITY, f32::max);
                    prop_assert!(out[j] >= lo - 1e-3 && out[j] <= hi + 1e-3);
                }
            }
        }

        #[test]
        fn robust_rules_do_not_depend_on_arrival_order(
            rows in proptest::collection::vec(proptest::collection::vec(-10f32..10.0, 3), 7..10),
            seed in any::<u64>(),
        ) {
            use rand::{SeedableRng, seq::SliceRandom};
            let weights = vec![1.0; rows.len()];
            let mut shuffled = rows.clone();
            shuffled.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
            for agg in [Aggregator::Median, Aggregator::TrimmedMean { trim: 0.2 }, Aggregator::MultiKrum { f: 1, m: 3 }] {
                let a = agg.aggregate(&rows, &weights).unwrap();
                let b = agg.aggregate(&shuffled, &weights).unwrap();
                for (x, y) in a.iter().zip(&b) {
                    prop_assert!((x - y).abs() < 1e-4, "{}: {:?} vs {:?}", agg, a, b);
                }
            }
        }
    }
}
