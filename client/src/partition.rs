//! Federated partitions of a labelled dataset, deterministic given a seed.

use std::str::FromStr;

use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Partition {
    /// Shuffle, then deal equal shares.
    Iid,
    /// McMahan et al. 2017: sort by label, cut 2·K shards, give each client 2.
    Shards,
    /// Hsu et al. 2019: each label's examples split by Dirichlet(α) weights.
    Dirichlet(Alpha),
}

/// A Dirichlet concentration: positive and finite by construction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Alpha(f64);

impl Alpha {
    pub fn new(alpha: f64) -> Result<Self, String> {
        if alpha.is_finite() && alpha > 0.0 {
            Ok(Self(alpha))
        } else {
            Err(format!("dirichlet alpha must be positive, got {alpha}"))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl FromStr for Partition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "iid" => Ok(Self::Iid),
            "shards" => Ok(Self::Shards),
            other => {
                let alpha = other
                    .strip_prefix("dirichlet:")
                    .and_then(|a| a.parse::<f64>().ok())
                    .ok_or_else(|| {
                        format!(
                            "unknown partition '{other}': expected iid, shards or dirichlet:ALPHA"
                        )
                    })?;
                Alpha::new(alpha).map(Self::Dirichlet)
            }
        }
    }
}

impl Partition {
    /// Index lists, one per client. Every example goes to exactly one client.
    pub fn split(self, labels: &[u8], clients: usize, seed: u64) -> Vec<Vec<usize>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let clients = clients.max(1);
        match self {
            Self::Iid => {
                let mut all: Vec<usize> = (0..labels.len()).collect();
                all.shuffle(&mut rng);
                deal(&all, clients)
            }
            Self::Shards => {
                let mut order: Vec<usize> = (0..labels.len()).collect();
                // Stable sort by label; shuffling first makes ties random.
                order.shuffle(&mut rng);
                order.sort_by_key(|&i| labels[i]);
                let shards = deal(&order, 2 * clients);
                let mut ids: Vec<usize> = (0..shards.len()).collect();
                ids.shuffle(&mut rng);
                ids.chunks(2)
                    .map(|pair| {
                        pair.iter()
                            .flat_map(|&s| shards[s].iter().copied())
                            .collect()
                    })
                    .collect()
            }
            Self::Dirichlet(alpha) => {
                let mut parts = vec![Vec::new(); clients];
                // alpha was checked positive when parsed.
                // Alpha is positive and finite, the only thing Gamma checks.
                let gamma = Gamma::new(alpha.get(), 1.0).expect("valid Dirichlet alpha");
                for label in 0..=u8::MAX {
                    let mut members: Vec<usize> =
                        (0..labels.len()).filter(|&i| labels[i] == label).collect();
                    if members.is_empty() {
                        continue;
                    }
                    members.shuffle(&mut rng);
                    let weights: Vec<f64> = (0..clients).map(|_| gamma.sample(&mut rng)).collect();
                    let total: f64 = weights.iter().sum::<f64>().max(f64::MIN_POSITIVE);
                    let mut start = 0;
                    let mut cumulative = 0.0;
                    for (c, w) in weights.iter().enumerate() {
                        cumulative += w / total;
                        let end = if c + 1 == clients {
                            members.len()
                        } else {
                            ((cumulative * members.len() as f64).round() as usize)
                                .min(members.len())
                        };
                        parts[c].extend_from_slice(&members[start..end.max(start)]);
                        start = end.max(start);
                    }
                }
                parts
            }
        }
    }
}

/// Cuts `items` into `n` contiguous runs whose lengths differ by at most 1.
fn deal(items: &[usize], n: usize) -> Vec<Vec<usize>> {
    let base = items.len() / n;
    let extra = items.len() % n;
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    for i in 0..n {
        let len = base + usize::from(i < extra);
        out.push(items[at..at + len].to_vec());
        at += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 10) as u8).collect()
    }

    fn check_cover(parts: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    fn label_counts(part: &[usize], labels: &[u8]) -> [usize; 10] {
        let mut c = [0; 10];
        for &i in part {
            c[labels[i] as usize] += 1;
        }
        c
    }

    #[test]
    fn iid_deals_equal_balanced_shares() {
        let l = labels(6000);
        let parts = Partition::Iid.split(&l, 10, 1);
        check_cover(&parts, 6000);
        for p in &parts {
            assert_eq!(p.len(), 600);
            for c in label_counts(p, &l) {
                assert!((30..=90).contains(&c), "label count {c} far from 60");
            }
        }
        assert_eq!(parts, Partition::Iid.split(&l, 10, 1));
        assert_ne!(parts, Partition::Iid.split(&l, 10, 2));
    }

    #[test]
    fn shards_give_each_client_at_most_two_labels() {
        // McMahan's setting: 60,000 examples, 100 clients, 200 shards of 300.
        let l = labels(60_000);
        let parts = Partition::Shards.split(&l, 100, 3);
        check_cover(&parts, 60_000);
        for p in &parts {
            assert_eq!(p.len(), 600);
            let present = label_counts(p, &l).iter().filter(|&&c| c > 0).count();
            assert!(present <= 2, "client holds {present} labels");
        }
    }

    #[test]
    fn dirichlet_skews_labels_more_as_alpha_shrinks() {
        let l = labels(10_000);
        let skew = |alpha: f64| {
            let parts = Partition::Dirichlet(Alpha::new(alpha).unwrap()).split(&l, 20, 5);
            check_cover(&parts, 10_000);
            // Mean over clients of the largest label's share.
            parts
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| *label_counts(p, &l).iter().max().unwrap() as f64 / p.len() as f64)
                .sum::<f64>()
                / 20.0
        };
        let (low, high) = (skew(0.1), skew(100.0));
        assert!(low > 0.5, "alpha 0.1 should be skewed: {low}");
        assert!(high < 0.2, "alpha 100 should be near uniform: {high}");
    }

    #[test]
    fn names_parse_and_bad_ones_are_refused() {
        assert_eq!("iid".parse::<Partition>().unwrap(), Partition::Iid);
        assert_eq!(
            "dirichlet:0.5".parse::<Partition>().unwrap(),
            Partition::Dirichlet(Alpha::new(0.5).unwrap())
        );
        assert!("dirichlet:-1".parse::<Partition>().is_err());
        assert!("random".parse::<Partition>().is_err());
    }
}
