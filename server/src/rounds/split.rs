//! A round split across leaf aggregators, as the root runs it, sans-IO: how
//! many devices each leaf selects (its quota), whose partial sums are in,
//! and when the round commits or is abandoned.
//!
//! A leaf runs secure aggregation among its own devices, so a leaf given
//! fewer than `min_per_leaf` devices could never release a sum: a quota is
//! either 0 or at least that. The root commits once every leaf with a
//! quota has reported or been lost, or at the deadline, if the devices in
//! the reported sums meet the quorum and the minimum cohort; otherwise the
//! round is abandoned, and the coordinator retries it. A lost leaf's
//! devices count as dropouts and nothing of its partial secure aggregation
//! reaches the root: a leaf forwards only a sum it has unmasked whole.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use covey_protocol::RoundId;

use crate::{
    cluster::route::LeafId,
    fold::merge::{MergeError, PartialSum, Shape},
    rounds::compliance::{BelowMinCohort, MinCohort},
};

/// How many devices each leaf selects: shares of `cohort` in proportion to
/// the devices each has waiting, each 0 or at least `min_per_leaf`, none
/// above what the leaf has.
pub fn quotas(
    available: &BTreeMap<LeafId, usize>,
    cohort: usize,
    min_per_leaf: usize,
) -> BTreeMap<LeafId, usize> {
    let min_per_leaf = min_per_leaf.max(1);
    let mut eligible: BTreeMap<&LeafId, usize> = available
        .iter()
        .filter(|(_, n)| **n >= min_per_leaf)
        .map(|(l, n)| (l, *n))
        .collect();
    loop {
        let shares = proportional(&eligible, cohort);
        let too_small: Vec<&LeafId> = shares
            .iter()
            .filter(|(_, q)| **q < min_per_leaf)
            .map(|(l, _)| *l)
            .collect();
        if too_small.is_empty() {
            return available
                .keys()
                .map(|l| (l.clone(), shares.get(l).copied().unwrap_or(0)))
                .collect();
        }
        // Their share is too small to aggregate securely: the rest take it.
        // The smallest go first, one at a time, so no more leaves drop out
        // than must.
        let smallest = too_small
            .iter()
            .min_by_key(|l| (shares[**l], eligible[**l], **l))
            .copied();
        if let Some(l) = smallest {
            eligible.remove(l);
        }
    }
}

/// Largest-remainder shares of `cohort` by weight, capped by each weight.
fn proportional<'a>(
    weights: &BTreeMap<&'a LeafId, usize>,
    cohort: usize,
) -> BTreeMap<&'a LeafId, usize> {
    let total: usize = weights.values().sum();
    let target = cohort.min(total);
    if total == 0 {
        return BTreeMap::new();
    }
    let mut shares: BTreeMap<&LeafId, usize> = BTreeMap::new();
    let mut remainders = Vec::with_capacity(weights.len());
    let mut given = 0;
    for (leaf, &w) in weights {
        let exact = target as u128 * w as u128;
        let q = (exact / total as u128) as usize;
        shares.insert(leaf, q);
        given += q;
        remainders.push((exact % total as u128, *leaf));
    }
    // Largest remainder first; the leaf's name breaks ties, so every root
    // replica computes the same quotas.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let mut left = target - given;
    while left > 0 {
        let mut moved = false;
        for (_, leaf) in &remainders {
            if left == 0 {
                break;
            }
            let cap = weights.get(leaf).copied().unwrap_or(0);
            if let Some(q) = shares.get_mut(leaf)
                && *q < cap
            {
                *q += 1;
                left -= 1;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    shares
}

/// Why a leaf's report was refused; the round goes on without it.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ReportError {
    #[error("leaf {0} has no quota in this round")]
    NotInRound(String),
    #[error("leaf {0} already reported this round")]
    Duplicate(String),
    #[error("leaf {0} was written off as lost this round")]
    Lost(String),
    #[error("the round already ended")]
    Ended,
    #[error("leaf {leaf} reported {count} devices, above its quota of {quota}")]
    OverQuota {
        leaf: String,
        count: u64,
        quota: usize,
    },
    #[error("leaf {leaf} reported {count} devices, below the {min} a leaf may release")]
    TooFew {
        leaf: String,
        count: u64,
        min: usize,
    },
    #[error("leaf {leaf}: {source}")]
    Malformed { leaf: String, source: MergeError },
}

/// What the root does next with the round.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Nothing yet; look again at this instant (the deadline).
    Wait(Instant),
    /// Release the merged sum of `contributors` devices.
    Commit { sum: PartialSum, contributors: u64 },
    /// Not enough devices' updates arrived: retry the round.
    Abandon(String),
}

/// One round as the root coordinates it across leaves.
#[derive(Debug)]
pub struct SplitRound {
    round: RoundId,
    shape: Shape,
    quotas: BTreeMap<LeafId, usize>,
    min_per_leaf: usize,
    quorum: usize,
    min_cohort: MinCohort,
    deadline: Instant,
    reported: BTreeMap<LeafId, u64>,
    lost: BTreeSet<LeafId>,
    sum: Option<PartialSum>,
    ended: bool,
}

impl SplitRound {
    pub fn new(
        round: RoundId,
        shape: Shape,
        quotas: BTreeMap<LeafId, usize>,
        min_per_leaf: usize,
        quorum: usize,
        min_cohort: MinCohort,
        deadline: Instant,
    ) -> Self {
        Self {
            round,
            shape,
            quotas: quotas.into_iter().filter(|(_, q)| *q > 0).collect(),
            min_per_leaf: min_per_leaf.max(1),
            quorum,
            min_cohort,
            deadline,
            reported: BTreeMap::new(),
            lost: BTreeSet::new(),
            sum: None,
            ended: false,
        }
    }

    pub fn round(&self) -> RoundId {
        self.round
    }

    /// The leaves asked to select devices, with their quotas.
    pub fn quotas(&self) -> &BTreeMap<LeafId, usize> {
        &self.quotas
    }

    /// A leaf's partial sum, as it arrived; refused ones change nothing.
    pub fn report(&mut self, leaf: &LeafId, bytes: &[u8]) -> Result<(), ReportError> {
        let name = || leaf.0.clone();
        if self.ended {
            return Err(ReportError::Ended);
        }
        let Some(&quota) = self.quotas.get(leaf) else {
            return Err(ReportError::NotInRound(name()));
        };
        if self.reported.contains_key(leaf) {
            return Err(ReportError::Duplicate(name()));
        }
        if self.lost.contains(leaf) {
            return Err(ReportError::Lost(name()));
        }
        let malformed = |source| ReportError::Malformed {
            leaf: name(),
            source,
        };
        let partial = PartialSum::from_bytes(bytes, self.shape).map_err(malformed)?;
        let count = partial.summed.count();
        if count > quota as u64 {
            return Err(ReportError::OverQuota {
                leaf: name(),
                count,
                quota,
            });
        }
        if count < self.min_per_leaf as u64 {
            return Err(ReportError::TooFew {
                leaf: name(),
                count,
                min: self.min_per_leaf,
            });
        }
        match &mut self.sum {
            Some(sum) => sum.merge(&partial).map_err(malformed)?,
            None => self.sum = Some(partial),
        }
        self.reported.insert(leaf.clone(), count);
        Ok(())
    }

    /// A leaf died or was cut off: its devices drop out of the round.
    pub fn leaf_lost(&mut self, leaf: &LeafId) {
        if self.quotas.contains_key(leaf) && !self.reported.contains_key(leaf) {
            self.lost.insert(leaf.clone());
        }
    }

    /// What to do now. `Commit` and `Abandon` end the round.
    pub fn poll(&mut self, now: Instant) -> Decision {
        if self.ended {
            return Decision::Abandon("the round already ended".into());
        }
        let all_in = self
            .quotas
            .keys()
            .all(|l| self.reported.contains_key(l) || self.lost.contains(l));
        if !all_in && now < self.deadline {
            return Decision::Wait(self.deadline);
        }
        self.ended = true;
        let contributors: u64 = self.reported.values().sum();
        let count = usize::try_from(contributors).unwrap_or(usize::MAX);
        if count < self.quorum {
            return Decision::Abandon(format!(
                "{contributors} device(s) reported through {} of {} leaves, below the quorum of {}",
                self.reported.len(),
                self.quotas.len(),
                self.quorum
            ));
        }
        if let Err(BelowMinCohort { contributors, k }) = self.min_cohort.check(count) {
            return Decision::Abandon(format!(
                "{contributors} device(s), below the minimum cohort of {k}"
            ));
        }
        match self.sum.take() {
            Some(sum) => Decision::Commit { sum, contributors },
            None => Decision::Abandon("no leaf reported".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::fold::{
        aggregate::WeightedSum,
        merge::{Summed, Tally},
    };

    fn leaf(name: &str) -> LeafId {
        LeafId(name.into())
    }

    fn available(counts: &[(&str, usize)]) -> BTreeMap<LeafId, usize> {
        counts.iter().map(|(n, c)| (leaf(n), *c)).collect()
    }

    /// A leaf's report: `count` devices whose updates are all `value`.
    fn report(count: u64, value: f32) -> Vec<u8> {
        let mut sum = WeightedSum::new(2);
        for _ in 0..count {
            sum.fold(&[value, -value], 1.0).unwrap();
        }
        PartialSum {
            summed: Summed::Floats(sum),
            tally: Tally::default(),
        }
        .to_bytes()
    }

    fn three_leaves(now: Instant) -> SplitRound {
        SplitRound::new(
            RoundId(4),
            Shape::Floats { len: 2 },
            available(&[("a", 10), ("b", 10), ("c", 10)]),
            3,
            20,
            MinCohort::new(3).unwrap(),
            now + Duration::from_secs(60),
        )
    }

    #[test]
    fn quotas_follow_the_devices_waiting_and_skip_leaves_too_small_to_aggregate() {
        let q = quotas(&available(&[("a", 600), ("b", 300), ("c", 100)]), 100, 5);
        assert_eq!(q, available(&[("a", 60), ("b", 30), ("c", 10)]));
        // c's share (2) is below k = 5: a and b take it.
        let q = quotas(&available(&[("a", 600), ("b", 300), ("c", 20)]), 100, 5);
        assert_eq!(q[&leaf("c")], 0);
        assert_eq!(q[&leaf("a")] + q[&leaf("b")], 100);
        // Fewer devices than the cohort: everyone eligible, all of them.
        let q = quotas(&available(&[("a", 7), ("b", 4), ("c", 2)]), 100, 3);
        assert_eq!(q, available(&[("a", 7), ("b", 4), ("c", 0)]));
    }

    proptest! {
        #[test]
        fn quotas_sum_to_the_cohort_each_zero_or_at_least_k_and_within_what_is_waiting(
            counts in proptest::collection::vec(0usize..500, 1..8),
            cohort in 1usize..2000,
            k in 1usize..20,
        ) {
            let names: Vec<String> = (0..counts.len()).map(|i| format!("leaf-{i}")).collect();
            let avail: BTreeMap<LeafId, usize> =
                names.iter().zip(&counts).map(|(n, c)| (LeafId(n.clone()), *c)).collect();
            let q = quotas(&avail, cohort, k);
            prop_assert_eq!(q.len(), avail.len());
            let mut total = 0;
            for (l, &n) in &q {
                prop_assert!(n == 0 || n >= k, "{l:?} got {n} < {k}");
                prop_assert!(n <= avail[l]);
                total += n;
            }
            prop_assert!(total <= cohort);
            // Nothing is left on the table that an eligible leaf could take,
            // unless taking it would leave that leaf below k.
            let eligible: usize = avail.values().filter(|n| **n >= k).sum();
            if cohort >= k && eligible >= cohort && avail.values().any(|n| *n >= cohort) {
                prop_assert_eq!(total, cohort);
            }
            // Every replica computes the same quotas.
            prop_assert_eq!(q, quotas(&avail, cohort, k));
        }
    }

    #[test]
    fn the_round_commits_once_every_leaf_reported_with_the_merged_sum() {
        let now = Instant::now();
        let mut r = three_leaves(now);
        r.report(&leaf("a"), &report(10, 1.0)).unwrap();
        r.report(&leaf("b"), &report(8, 2.0)).unwrap();
        assert!(matches!(r.poll(now), Decision::Wait(_)));
        r.report(&leaf("c"), &report(9, 3.0)).unwrap();
        let Decision::Commit { sum, contributors } = r.poll(now) else {
            panic!("expected a commit")
        };
        assert_eq!(contributors, 27);
        let Summed::Floats(sum) = sum.summed else {
            panic!("floats")
        };
        assert_eq!(sum.into_sum().unwrap(), vec![53.0, -53.0]);
        assert!(matches!(r.poll(now), Decision::Abandon(_)));
    }

    #[test]
    fn a_lost_leaf_counts_as_dropouts_and_the_quorum_decides() {
        let now = Instant::now();
        let mut r = three_leaves(now);
        r.report(&leaf("a"), &report(10, 1.0)).unwrap();
        r.report(&leaf("b"), &report(10, 1.0)).unwrap();
        r.leaf_lost(&leaf("c"));
        assert!(matches!(
            r.poll(now),
            Decision::Commit {
                contributors: 20,
                ..
            }
        ));
        // With only one leaf left, the quorum of 20 is out of reach.
        let mut r = three_leaves(now);
        r.report(&leaf("a"), &report(10, 1.0)).unwrap();
        r.leaf_lost(&leaf("b"));
        r.leaf_lost(&leaf("c"));
        let Decision::Abandon(reason) = r.poll(now) else {
            panic!("expected the round abandoned")
        };
        assert!(reason.contains("below the quorum of 20"), "{reason}");
        // A lost leaf's late report is refused.
        assert_eq!(
            r.report(&leaf("c"), &report(10, 1.0)),
            Err(ReportError::Ended)
        );
    }

    #[test]
    fn the_deadline_ends_a_round_missing_a_leaf() {
        let now = Instant::now();
        let mut r = three_leaves(now);
        r.report(&leaf("a"), &report(10, 1.0)).unwrap();
        r.report(&leaf("b"), &report(10, 1.0)).unwrap();
        let Decision::Wait(deadline) = r.poll(now) else {
            panic!("waiting for c")
        };
        assert!(matches!(
            r.poll(deadline),
            Decision::Commit {
                contributors: 20,
                ..
            }
        ));
    }

    #[test]
    fn bad_reports_are_refused_by_name_and_the_round_goes_on() {
        let now = Instant::now();
        let mut r = three_leaves(now);
        assert_eq!(
            r.report(&leaf("z"), &report(5, 1.0)),
            Err(ReportError::NotInRound("z".into()))
        );
        assert!(matches!(
            r.report(&leaf("a"), &report(11, 1.0)),
            Err(ReportError::OverQuota { quota: 10, .. })
        ));
        assert!(matches!(
            r.report(&leaf("a"), &report(2, 1.0)),
            Err(ReportError::TooFew { min: 3, .. })
        ));
        assert!(matches!(
            r.report(&leaf("a"), b"not a sum"),
            Err(ReportError::Malformed { .. })
        ));
        let mut nan = WeightedSum::new(2);
        for _ in 0..5 {
            nan.fold(&[f32::MAX, 0.0], 1e30).unwrap();
        }
        let nan = PartialSum {
            summed: Summed::Floats(nan),
            tally: Tally::default(),
        };
        assert!(matches!(
            r.report(&leaf("a"), &nan.to_bytes()),
            Err(ReportError::Malformed { .. })
        ));
        r.report(&leaf("a"), &report(10, 1.0)).unwrap();
        assert_eq!(
            r.report(&leaf("a"), &report(10, 1.0)),
            Err(ReportError::Duplicate("a".into()))
        );
        r.leaf_lost(&leaf("b"));
        assert_eq!(
            r.report(&leaf("b"), &report(10, 1.0)),
            Err(ReportError::Lost("b".into()))
        );
        r.report(&leaf("c"), &report(10, 1.0)).unwrap();
        assert!(matches!(
            r.poll(now),
            Decision::Commit {
                contributors: 20,
                ..
            }
        ));
    }
}
