//! A leaf's half of the hub: it runs rounds only when its root permits
//! them, forwards the unmasked partial sum instead of committing, and
//! follows the root's commits. The single-process server has no upstream
//! and commits itself.

use super::*;
use crate::cluster::{
    leaf::{LinkEnds, Outbound, RootNews},
    route::LeafId,
};

pub(super) struct Upstream {
    pub(super) leaf: LeafId,
    outbound: mpsc::Sender<Outbound>,
    available: tokio::sync::watch::Sender<u64>,
    /// The round forwarded and awaiting the root's word, with its record.
    forwarded: Option<(RoundId, RoundRecord)>,
    /// The last round the root permitted here: each permit is used once.
    permitted: Option<RoundId>,
}

impl Upstream {
    pub(super) fn new(leaf: LeafId, ends: &LinkEnds) -> Self {
        Self {
            leaf,
            outbound: ends.outbound.clone(),
            available: ends.available.clone(),
            forwarded: None,
            permitted: None,
        }
    }

    /// Tells the root how many devices wait here.
    pub(super) fn advertise(&self, waiting: usize) {
        let waiting = waiting as u64;
        self.available.send_if_modified(|n| {
            let changed = *n != waiting;
            *n = waiting;
            changed
        });
    }

    async fn send(&self, out: Outbound) {
        if self.outbound.send(out).await.is_err() {
            warn!(
                "the link to the root has stopped; the round's sum is lost and the root will retry it"
            );
        }
    }
}

impl Hub {
    /// The round's collected sum goes up to the root, not into a commit.
    pub(super) async fn forward(
        &mut self,
        round: RoundId,
        sum: Aggregate,
        tally: Tally,
        record: RoundRecord,
    ) -> Result<(), ServeError> {
        let Some(up) = &mut self.upstream else {
            return Ok(());
        };
        let out = match sum {
            Aggregate::Summed(summed) => {
                let bytes = PartialSum { summed, tally }.to_bytes();
                info!(round = %round, bytes = bytes.len(), "partial sum forwarded to the root");
                Outbound::Partial { round, bytes }
            }
            // check_splittable refuses such configurations at start.
            Aggregate::Buffered { .. } => Outbound::Failed {
                round,
                reason: "this leaf's rule keeps every update; it cannot forward a sum".into(),
            },
        };
        self.store.put_round(&record)?;
        up.forwarded = Some((round, record));
        up.send(out).await;
        Ok(())
    }

    /// A round this leaf ran ended without a sum: the root need not wait.
    pub(super) async fn report_failed(&mut self, round: RoundId, reason: AbortReason) {
        if reason == AbortReason::Superseded {
            return;
        }
        if let Some(up) = &self.upstream {
            up.send(Outbound::Failed {
                round,
                reason: reason.as_str().to_owned(),
            })
            .await;
        }
    }

    /// The root's state changed: take its model, settle the round this
    /// leaf forwarded, and start what it planned here.
    pub(super) async fn root_news(
        &mut self,
        news: RootNews,
        shared: &Shared,
    ) -> Result<(), ServeError> {
        let now = Instant::now();
        let Some(up) = &mut self.upstream else {
            return Ok(());
        };
        let state = news.state;
        let mut actions = Vec::new();
        if !Arc::ptr_eq(&self.committer.model, &news.weights) {
            self.committer.model = news.weights.clone();
            self.metrics.model_version.set(state.version.0 as i64);
        }
        if let Some((round, mut record)) = up.forwarded.take() {
            if state.committed_round == Some(round) {
                record.outcome = RoundOutcome::Committed {
                    version: state.version,
                };
                if let Some(last) = state.last.as_ref().filter(|l| l.round == round) {
                    record.epsilon = last.epsilon;
                    record.test_accuracy = last.test_accuracy;
                    record.test_loss = last.test_loss;
                }
                self.store.put_round(&record)?;
                info!(round = %round, version = %state.version, "the root committed the round");
                actions.extend(self.machine.commit_done(round, state.version, now));
                self.count_round(true);
            } else if state.plan.as_ref().is_some_and(|p| p.round == round) {
                // Still waiting on the other leaves.
                up.forwarded = Some((round, record));
            } else {
                record.outcome = RoundOutcome::Aborted {
                    reason: "the root did not commit it".into(),
                };
                self.store.put_round(&record)?;
                actions.extend(self.machine.commit_failed(round, now));
                self.count_round(false);
            }
        }
        let Some(up) = &mut self.upstream else {
            return Ok(());
        };
        if let Some(why) = state.finished {
            actions.extend(self.machine.finish(state.version, why.into()));
        } else if let Some(plan) = &state.plan
            && let Some(&quota) = plan.quotas.get(&up.leaf)
            && up.permitted.is_none_or(|r| r < plan.round)
            && up.forwarded.is_none()
        {
            up.permitted = Some(plan.round);
            if let (Some(clip), Some(p)) = (plan.clip, &mut self.committer.privacy) {
                p.ledger.clip = clip;
            }
            let deadline = now + Duration::from_millis(plan.collect_ms);
            actions.extend(
                self.machine
                    .permit(plan.round, plan.base, quota, deadline, now),
            );
        }
        self.execute(actions, shared).await
    }
}
