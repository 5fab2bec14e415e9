//! A leaf's half of a round: the partial aggregate it folds accepted
//! updates into, with the round's record. The sum is a [`Summed`], the
//! same value a leaf forwards to the root and the root merges; under
//! secure aggregation the session holds the masked sum, and only its
//! unmasked total lands here.

use super::*;

pub(super) struct RoundInProgress {
    pub(super) record: RoundRecord,
    pub(super) sum: Aggregate,
    pub(super) tally: Tally,
    pub(super) bytes_up_start: u64,
    pub(super) bytes_down_start: u64,
    pub(super) started: Instant,
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
            tally: Tally::default(),
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
            self.tally.within_clip += 1;
        }
        if update.loss.is_finite() {
            self.tally.loss_weighted += f64::from(update.loss) * weight;
            self.tally.loss_weight += weight;
        }
        match (&mut self.sum, update.values) {
            (Aggregate::Summed(Summed::Floats(sum)), Values::Floats(mut v)) => {
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
            (Aggregate::Summed(Summed::Ring { words, count, .. }), Values::Words(w)) => {
                if let Some(quantizer) = ring
                    && quantizer.accumulate(words, &w).is_ok()
                {
                    *count += 1;
                }
            }
            _ => {}
        }
    }
}
