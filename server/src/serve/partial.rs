//! A leaf's half of a round: the partial aggregate it folds accepted
//! updates into, with the round's record. Under secure aggregation the sum
//! lives in the session instead, and only the unmasked total lands here.

use super::*;

/// The running aggregate of a round.
pub(super) enum Aggregate {
    Weighted(WeightedSum),
    /// Distributed DP: the modular sum of ring words.
    Ring {
        sum: Vec<u32>,
        count: usize,
    },
    /// A robust rule: every update of the round, with its weight.
    Buffered {
        updates: Vec<Vec<f32>>,
        weights: Vec<f64>,
    },
}

impl Aggregate {
    /// How many participants' updates are in it.
    pub(super) fn contributors(&self) -> usize {
        match self {
            Self::Weighted(sum) => sum.count(),
            Self::Ring { count, .. } => *count,
            Self::Buffered { updates, .. } => updates.len(),
        }
    }
}

pub(super) struct RoundInProgress {
    pub(super) record: RoundRecord,
    pub(super) sum: Aggregate,
    pub(super) loss_weighted: f64,
    pub(super) examples: f64,
    /// Accepted updates that were within the clip before clipping (DP).
    pub(super) within_clip: usize,
    pub(super) bytes_up_start: u64,
    pub(super) bytes_down_start: u64,
    pub(super) started: Instant,
}

impl Aggregate {
    /// The empty aggregate a round starts with: ring words when updates
    /// arrive quantized, every update when the rule needs them all at once,
    /// a running weighted sum otherwise.
    pub(super) fn empty(ring: Option<Quantizer>, aggregator: Aggregator, len: usize) -> Self {
        match ring {
            Some(quantizer) => Self::Ring {
                sum: vec![0; quantizer.encoded_len()],
                count: 0,
            },
            None if !aggregator.is_streaming() => Self::Buffered {
                updates: Vec::new(),
                weights: Vec::new(),
            },
            None => Self::Weighted(WeightedSum::new(len)),
        }
    }
}

impl RoundInProgress {
    pub(super) fn new(
        record: RoundRecord,
        sum: Aggregate,
        metrics: &Metrics,
        now: Instant,
    ) -> Self {
        Self {
            record,
            sum,
            loss_weighted: 0.0,
            examples: 0.0,
            within_clip: 0,
            bytes_up_start: metrics.bytes_in.get(),
            bytes_down_start: metrics.bytes_out.get(),
            started: now,
        }
    }

    /// Folds an accepted update, already checked for length and clip, in
    /// with `weight`. `ring` is the quantizer of ring words summed here;
    /// `None` under secure aggregation, whose session holds the masked sum.
    pub(super) fn fold(
        &mut self,
        update: Received,
        weight: f64,
        aggregator: Aggregator,
        ring: Option<Quantizer>,
    ) {
        if update.within_clip == Some(true) {
            self.within_clip += 1;
        }
        if update.loss.is_finite() {
            self.loss_weighted += f64::from(update.loss) * weight;
            self.examples += weight;
        }
        match (&mut self.sum, update.values) {
            (Aggregate::Weighted(sum), Values::Floats(mut v)) => {
                if let Aggregator::NormBound { max_norm } = aggregator
                    && let Ok(bound) = ClipNorm::new(max_norm)
                {
                    clip_l2(&mut v, bound);
                }
                let _ = sum.fold(&v, weight);
            }
            (Aggregate::Buffered { updates, weights }, Values::Floats(v)) => {
                updates.push(v);
                weights.push(weight);
            }
            (Aggregate::Ring { sum, count }, Values::Words(w)) => {
                if let Some(quantizer) = ring
                    && quantizer.accumulate(sum, &w).is_ok()
                {
                    *count += 1;
                }
            }
            _ => {}
        }
    }
}
