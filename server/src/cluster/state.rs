//! What the root commits under its lease, in the root key's record: the
//! current version and where its weights are, the round it planned and for
//! which leaves, the privacy ledger, and whether the run is over.
//!
//! Every change is one swap of that key from the revision the root read,
//! so the state and the lease move together: a deposed root can change
//! neither, and a standby that takes over reads exactly what was committed
//! (the plan of a round in flight included, so leaves' reports still count).
//! Round ids come from `next_round`, which only grows, so no id is reused
//! across takeovers.

use std::collections::BTreeMap;

use covey_privacy::ClipNorm;
use covey_protocol::{ModelVersion, RoundId, round::FinishReason};
use serde::{Deserialize, Serialize};

use super::{objects::ModelRef, route::LeafId};
use crate::{rounds::dp::PrivacyLedger, state::store::RoundRecord};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RootState {
    pub version: ModelVersion,
    /// The committed version's record in the object store.
    pub model: ModelRef,
    /// The round that produced `version` (none for the initial model).
    pub committed_round: Option<RoundId>,
    /// Larger than every round id planned so far.
    pub next_round: RoundId,
    /// The round in flight, if any.
    pub plan: Option<RoundPlan>,
    /// Under DP: what the released versions spent, and the next clip.
    pub ledger: Option<PrivacyLedger>,
    pub finished: Option<Finished>,
    /// The last round that ended, committed or abandoned, as auditors see
    /// every round: aggregates only.
    pub last: Option<RoundRecord>,
}

/// A round the root planned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundPlan {
    pub round: RoundId,
    pub base: ModelVersion,
    /// How many devices each leaf selects; leaves not named select none.
    pub quotas: BTreeMap<LeafId, usize>,
    /// How long a leaf collects, from when it sees the plan: durations,
    /// never instants, so no two machines' clocks are compared.
    pub collect_ms: u64,
    /// Central DP's clip for this round's updates.
    pub clip: Option<ClipNorm>,
}

/// Why the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Finished {
    TargetReached,
    BudgetExhausted,
}

impl From<Finished> for FinishReason {
    fn from(f: Finished) -> Self {
        match f {
            Finished::TargetReached => Self::TargetReached,
            Finished::BudgetExhausted => Self::BudgetExhausted,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the root key's state does not decode: {0}")]
pub struct CorruptState(String);

impl RootState {
    /// The state before any round: `model` is version `version`.
    pub fn initial(model: ModelRef, ledger: Option<PrivacyLedger>) -> Self {
        Self {
            version: model.version,
            model,
            committed_round: None,
            next_round: RoundId(1),
            plan: None,
            ledger,
            finished: None,
            last: None,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Plain data with no maps keyed by non-strings: encoding cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// `None` for the empty state a new lease starts with.
    pub fn from_bytes(bytes: &[u8]) -> Result<Option<Self>, CorruptState> {
        if bytes.is_empty() {
            return Ok(None);
        }
        postcard::from_bytes(bytes)
            .map(Some)
            .map_err(|e| CorruptState(e.to_string()))
    }

    /// Plans the next round on the current version.
    pub fn planned(
        &self,
        quotas: BTreeMap<LeafId, usize>,
        collect_ms: u64,
        clip: Option<ClipNorm>,
    ) -> Self {
        let round = self.next_round;
        Self {
            next_round: round.next(),
            plan: Some(RoundPlan {
                round,
                base: self.version,
                quotas,
                collect_ms,
                clip,
            }),
            ..self.clone()
        }
    }

    /// The planned round released `model`.
    pub fn committed(
        &self,
        model: ModelRef,
        ledger: Option<PrivacyLedger>,
        record: RoundRecord,
        finished: Option<Finished>,
    ) -> Self {
        Self {
            version: model.version,
            model,
            committed_round: self.plan.as_ref().map(|p| p.round),
            plan: None,
            ledger,
            finished,
            last: Some(record),
            ..self.clone()
        }
    }

    /// The planned round released nothing; the next plan retries it.
    pub fn abandoned(&self, record: RoundRecord) -> Self {
        Self {
            plan: None,
            last: Some(record),
            ..self.clone()
        }
    }

    /// The run is over (the budget is spent) without another round.
    pub fn finish(&self, why: Finished) -> Self {
        Self {
            plan: None,
            finished: Some(why),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::RoundOutcome;

    fn model(version: u64) -> ModelRef {
        ModelRef {
            version: ModelVersion(version),
            bytes: 10,
            sha256: [version as u8; 32],
        }
    }

    fn record(round: u64) -> RoundRecord {
        RoundRecord {
            round: RoundId(round),
            base: ModelVersion(0),
            outcome: RoundOutcome::InFlight,
            selected: 3,
            accepted: 3,
            dropped: 0,
            started_unix_ms: 1,
            ended_unix_ms: None,
            mean_client_loss: None,
            test_accuracy: None,
            test_loss: None,
            bytes_up: 0,
            bytes_down: 0,
            clip: None,
            epsilon: None,
            rejected: Default::default(),
        }
    }

    #[test]
    fn round_ids_only_grow_through_plans_commits_and_abandons() {
        let s = RootState::initial(model(0), None);
        let quotas = BTreeMap::from([(LeafId("a".into()), 3)]);
        let p1 = s.planned(quotas.clone(), 1000, None);
        assert_eq!(p1.plan.as_ref().map(|p| p.round), Some(RoundId(1)));
        let a1 = p1.abandoned(record(1));
        assert_eq!((a1.plan.clone(), a1.version), (None, ModelVersion(0)));
        let p2 = a1.planned(quotas, 1000, None);
        assert_eq!(
            p2.plan.as_ref().map(|p| (p.round, p.base)),
            Some((RoundId(2), ModelVersion(0)))
        );
        let c2 = p2.committed(model(1), None, record(2), None);
        assert_eq!(c2.version, ModelVersion(1));
        assert_eq!(c2.committed_round, Some(RoundId(2)));
        assert_eq!(c2.next_round, RoundId(3));
        assert!(c2.plan.is_none());
    }

    #[test]
    fn states_round_trip_and_garbage_is_named() {
        let s = RootState::initial(model(4), None).planned(
            BTreeMap::from([(LeafId("a".into()), 3), (LeafId("b".into()), 2)]),
            500,
            ClipNorm::new(1.5).ok(),
        );
        assert_eq!(RootState::from_bytes(&s.to_bytes()).unwrap(), Some(s));
        assert_eq!(RootState::from_bytes(&[]).unwrap(), None);
        assert!(RootState::from_bytes(&[0xff; 7]).is_err());
    }
}
